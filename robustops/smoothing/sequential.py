"""Sequential tests for randomized-smoothing certification: "is g certified at radius r?" answered with
as few noisy samples as the input allows, with the guarantee of fixed-n CERTIFY.

The question (Voracek 2024, "Treatment of statistical estimation problems in randomized smoothing for
adversarial robustness", NeurIPS): the class cA is chosen on n0 separate selection samples, then
estimation samples X_1, X_2, ... in {0, 1} (1: the base classifier voted cA; a NaN vote is a 0) are
i.i.d. Bernoulli(pA). g is certified at L2 radius r when pA > p0 = Phi(r / sigma) (Cohen et al. 2019,
Theorem 1), so a certificate at r is the rejection of H0: pA <= p0. This module holds the statistics only
(numpy / scipy, no network): ``SequentialTest`` keeps the state of many rows (inputs, or simulated
trials) and is updated with each row's vote counts at its *looks*, the cumulative sample numbers where
the row's counts are examined. ``robustops.smoothing.stream`` feeds it from the network, and
``simulate`` from a Bernoulli oracle, through the same ``update``.

Every row holds a lower bound L and an upper bound U on pA such that, for a row whose estimation
samples are i.i.d. Bernoulli(pA), P(L > pA at some look) <= alpha and P(U < pA at some look) <= beta.
Because they hold at every look at once, they hold at the look where the row stops, whatever the
stopping rule (optional stopping), and they hold for every threshold at once:

- certified at r (CERTIFIED) as soon as L >= Phi(r / sigma): wrong with probability <= alpha for the
  whole grid of radii together (a wrong certificate at any r implies L > pA at some look);
- not certified at r (NOT_CERTIFIED) as soon as U < Phi(r / sigma): pA < Phi(r / sigma) with probability
  >= 1 - beta. This stop cannot make a certificate wrong; beta only trades samples for missed
  certificates (default beta = alpha);
- ABSTAINED: still undecided when the row reaches n_max samples, or undecidable within n_max (even
  all-successes on the samples left could not certify and the upper bound has not ruled it out).

With "betting" the bets aim at the grid's thresholds, so one radius can be decided differently alone and
within a grid (both sound); the "cp" bounds do not depend on the grid. A grid row can read "abstained"
at a small radius and "not certified" at a larger one: the small one was still open at n_max.

A grid of radii therefore needs no split of alpha across radii: all decisions are read off one
simultaneous confidence sequence, and the family-wise error (any radius wrongly certified) is <= alpha.
The per-threshold alternative (one test per radius at alpha / R, the union bound) is strictly weaker.

Two confidence sequences, both selectable (``test``; "cp" is the default: in simulation it needs fewer
samples than the betting sequence at most points, e.g. a mean of 705 against 774 estimation samples at
pA = 0.9, r = sigma, alpha = 0.001, with the default schedule, 10^4 trials; betting needed fewer at
r = sigma, pA = 0.95 (176 against 179) and at r = sigma / 2, pA = 0.9 (78 against 82):
benchmarks/results/sequential_oracle.csv has the table per pA bin):

``"cp"`` -- Clopper-Pearson at the row's looks n_1 < ... < n_K = n_max: L_k = the one-sided
    (1 - w_k alpha) Clopper-Pearson lower bound, U_k = the (1 - w_k beta) upper bound, L = max over looks
    so far, U = min, with shares w_k >= 0 summing to 1 over the row's K looks (the union bound over them:
    P(L_k > pA for some k) <= sum_k w_k alpha = alpha). Geometric schedule: w_k = 1/K.

Look schedules (``schedule``, ``growth``):

``"geometric"`` -- n_k = ceil(n_min * growth^k) below n_max (strictly increasing), then n_max; the same for
    every row, w_k = 1/K. growth = 2 was the old default; 1.5 needs fewer samples with both tests in
    simulation (e.g. cp at r = sigma: 2.14x the oracle with doubling from n0 = n_min = 100, 1.99x with 1.5
    from 50 / 50 at pA = 0.9; 2.09x -> 1.88x at 0.95: sequential_oracle.csv).

``"threshold"`` (the default) -- per row, from its SELECTION counts (s0 of n0 votes for cA): p_hat = s0 / n0
    (less SCHEDULE_SHRINK standard errors; 0: the measured best), t = the largest threshold below p_hat,
    and the anchor n* = the smallest n whose one-sided Clopper-Pearson lower bound at ANCHOR_SHARE * alpha
    with n * p_hat successes reaches t (``clearing_n``): where the bound can first clear t if the input's
    rate is what the selection saw. The looks are the geometric grid through the anchor,
    ceil(n* growth^j) for every integer j with the first look >= min(n*, n_min), then n_max; the anchor
    spends ANCHOR_SHARE (1/2) of alpha and beta, the last look n_max FINAL_SHARE (0.07), the K - 2 other
    looks (1 - ANCHOR_SHARE - FINAL_SHARE) / (K - 2) each (an unequal split, not the brief's alpha / K: at
    pA = 1, r = sigma, alpha = 0.001 it puts the first look at 44 instead of 54). The final share is for
    inputs near a threshold, which run to n_max: without it n_max got about alpha / 50 and cp certified 44%
    at pA = 0.979, r = 2 sigma (50% with doubling looks); with 0.07, 49% (10^4 trials), for +0.5% samples
    at r = sigma, pA = 0.9 (0.1 gave 51% for +1.8%). Fallback to the geometric looks when no threshold is below p_hat
    (p_hat at or below the threshold: nothing to aim at), when n* >= n_max, and in full-radius mode (no
    threshold). The mixture betting test anchors instead at the smallest n where its own capital K+(t)
    with n * p_hat successes reaches its level (``capital_clearing_n``: later than cp's anchor; fewer
    wasted looks, e.g. 80 -> 72 samples at r = sigma, pA = 0.99, 68 -> 57 at 0.999, 766 -> 774 at 0.9);
    its bounds need no union bound over the looks. Why the guarantee holds: the selection samples are independent of the estimation
    samples (separate noise: Smooth.certify's SELECTION and ESTIMATION keys), and the looks and shares
    are a function of the selection counts alone, fixed at ``start`` before any estimation sample.
    Conditionally on the selection counts the looks are therefore fixed numbers, the estimation samples
    are still i.i.d. Bernoulli(pA), and the union bound over the row's own looks gives
    P(L > pA | selection) <= alpha; averaging over the selection keeps it. (The selection samples are
    never counted in s or n: reusing them in the bound is what stays forbidden.) The tests check it with
    the selection forced to its worst cases (test_threshold_schedule_sound_whatever_the_selection).

``"betting"`` -- an anytime-valid confidence sequence from betting capital (Waudby-Smith and Ramdas 2023,
    "Estimating means of bounded random variables by betting", JRSS-B; the predictable plug-in bet):
    for a candidate mean m the capitals K+_t(m) = prod_i (1 + l+_i (X_i - m)) and
    K-_t(m) = prod_i (1 - l-_i (X_i - m)) are nonnegative martingales when pA = m (bets 0 <= l <= max_bet
    < 1), so by Ville's inequality P(sup_t K+_t(pA) >= 1/alpha) <= alpha. Choices the paper leaves open,
    made here: the bets do not depend on m, so K+ decreases and K- increases in m, and
    L = inf{m : K+(m) < 1/alpha}, U = sup{m : K-(m) < 1/beta} are found by bisection (L rounded down, U
    up); a bet is constant over the chunk of samples between two looks (chosen before the chunk: still
    predictable), so the capital needs only each chunk's count of successes; the bet is Kelly's for a
    Bernoulli(p_hat) against the next threshold to decide, l = kelly * (p_hat - t) / (t (1 - t)) clipped
    to [0, max_bet] (t: the largest undecided threshold below p_hat for K+, the smallest above p_hat for
    K-; full-radius mode: the lower bound fixed-n_max CERTIFY would reach at p_hat, and its mirror image
    above p_hat), with p_hat = (s + s0 + 1/2) / (n + n0 + 1) from the estimation counts so far and the
    selection counts (s0 of n0 selection votes for cA). The selection samples only steer the bets: they
    are never counted in s or n, so they cannot bias the bounds (the capital is a martingale conditionally
    on them). Bounds are examined at the same looks as "cp" (any look is allowed; fewer looks mean fewer
    host synchronizations), and L, U are the running max / min over looks (the intersection of a
    confidence sequence is one). Any schedule keeps the betting bounds valid (Ville's inequality holds at
    every sample, so at any looks, even data-dependent ones).

Full-radius mode (no thresholds): the row stops when its certified radius sigma * Phi^-1(L) is within
``precision`` of the radius fixed-n_max CERTIFY would give if pA were as large as U (the Clopper-Pearson
lower bound at level alpha of n_max * U successes in n_max samples), when U < 1/2 (nothing can be
certified: abstain), or at n_max. With pA near 1 that radius needs nearly all n_max samples: little is
saved there, and it says so in the benchmark.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
from scipy import special, stats

from .. import _checks
from . import betting

__all__ = ["SequentialTest", "look_schedule", "simulate", "clopper_pearson_lower", "clopper_pearson_upper", "TESTS",
           "CERTIFIED", "NOT_CERTIFIED", "ABSTAINED", "DEFAULT_TEST", "DEFAULT_N_MIN", "DEFAULT_PRECISION", "DEFAULT_N0",
           "SCHEDULES", "DEFAULT_SCHEDULE", "DEFAULT_GROWTH", "check_growth", "clearing_n"]

#: Decision codes for one radius of one input.
CERTIFIED, NOT_CERTIFIED, ABSTAINED = 1, 0, -1
TESTS = ("betting", "cp")
#: The defaults of the sequential modes (Smooth.certify_radius / certify_radii / certify_sequential and
#: `robustops certify --sequential`): the test, the first look of the geometric schedule, full-radius
#: mode's precision, the selection samples (benchmarks/sequential_oracle.py: 50 / 50 rather than 100 /
#: 100 cut the easy inputs' total by about a third and cost nothing measurable at pA >= 0.9).
DEFAULT_TEST, DEFAULT_N_MIN, DEFAULT_PRECISION, DEFAULT_N0 = "cp", 50, 0.05, 50
#: Look schedules: "geometric" (n_min * growth^k for every row), "threshold" (per row, from the selection
#: samples; see the module docstring), and the growth factor of the looks.
SCHEDULES = ("geometric", "threshold")
DEFAULT_SCHEDULE, DEFAULT_GROWTH = "threshold", 1.5
#: The threshold schedule plans with the selection rate shrunk by this many standard errors (a first look
#: planned from an overestimate comes too early and is wasted).
SCHEDULE_SHRINK = 0.0
#: The threshold schedule's share of alpha (and beta) spent at its anchor look; the other looks share the
#: rest equally (a union bound over the row's looks all the same).
ANCHOR_SHARE = 0.5
#: The threshold schedule's share of alpha (and beta) spent at the last look, n_max (cp; betting has its own
#: final_share): inputs near a threshold run there.
FINAL_SHARE = 0.07


def clopper_pearson_lower(n_a, n, alpha) -> np.ndarray:
    """One-sided (1 - alpha) Clopper-Pearson lower confidence bound on a binomial proportion after
    n_a successes in n trials: the alpha quantile of Beta(n_a, n - n_a + 1), and 0 when n_a = 0.
    Vectorized over n_a (and n, and alpha: a level per element for per-row look budgets); a fractional
    n_a interpolates (used for what-if bounds)."""
    n_a = np.asarray(n_a, dtype=np.float64)
    n = np.broadcast_to(np.asarray(n, dtype=np.float64), n_a.shape)
    alpha = np.broadcast_to(np.asarray(alpha, dtype=np.float64), n_a.shape)
    out = np.zeros(n_a.shape, dtype=np.float64)
    pos = n_a > 0
    out[pos] = special.betaincinv(n_a[pos], n[pos] - n_a[pos] + 1.0, alpha[pos])
    return out


def clopper_pearson_upper(n_a, n, beta) -> np.ndarray:
    """One-sided (1 - beta) Clopper-Pearson upper confidence bound: the 1 - beta quantile of
    Beta(n_a + 1, n - n_a), and 1 when n_a = n. Vectorized (beta too)."""
    n_a = np.asarray(n_a, dtype=np.float64)
    n = np.broadcast_to(np.asarray(n, dtype=np.float64), n_a.shape)
    beta = np.broadcast_to(np.asarray(beta, dtype=np.float64), n_a.shape)
    out = np.ones(n_a.shape, dtype=np.float64)
    low = n_a < n
    out[low] = special.betaincinv(n_a[low] + 1.0, n[low] - n_a[low], 1.0 - beta[low])
    return out


def look_schedule(n_min: int, n_max: int, growth: float = DEFAULT_GROWTH) -> np.ndarray:
    """The cumulative estimation-sample numbers at which a row is examined: n_k = ceil(n_min * growth^k)
    below n_max (at least one more than the look before), then n_max (int64)."""
    n_min = _checks.check_int(n_min, "n_min", 1)
    n_max = _checks.check_int(n_max, "n_max", 1)
    growth = check_growth(growth)
    if n_min > n_max:
        raise ValueError(f"n_min must be <= n_max, got n_min {n_min}, n_max {n_max}")
    looks, k, n = [], 0, n_min
    while n < n_max:
        looks.append(n)
        k += 1
        n = max(math.ceil(n_min * growth ** k - 1e-9), n + 1)
    looks.append(n_max)
    return np.array(looks, dtype=np.int64)


def check_growth(growth) -> float:
    """The looks' growth factor: a number > 1."""
    growth = _checks.check_number(growth, "growth", 1.0, strict=True)
    if not math.isfinite(growth):
        raise ValueError(f"growth must be a finite number > 1, got {growth!r}")
    return growth


def clearing_n(p, t, alpha: float, n_max: int) -> np.ndarray:
    """The smallest n in [1, n_max] whose one-sided (1 - alpha) Clopper-Pearson lower bound with the
    expected successes n * p reaches t, per element of p (and t); n_max + 1 where none does. Bisection
    over n (the bound with n * p successes grows with n when p > t). This is the ORACLE of the benchmark
    (p the true pA, alpha the test's level) and the first look of the "threshold" schedule."""
    p, t = np.broadcast_arrays(np.asarray(p, dtype=np.float64), np.asarray(t, dtype=np.float64))
    alpha = np.broadcast_to(np.asarray(alpha, dtype=np.float64), p.shape)
    lo, hi = np.zeros(p.shape, np.int64), np.full(p.shape, n_max + 1, np.int64)  # lo fails, hi clears
    while np.any(hi - lo > 1):
        mid = (lo + hi) // 2
        ok = clopper_pearson_lower(mid * p, mid, alpha) >= t
        hi, lo = np.where(ok, mid, hi), np.where(ok, lo, mid)
    return hi


class SequentialTest:
    """The sequential test of ``rows`` rows (inputs or simulated trials); see the module docstring.

    test: "betting" or "cp". alpha: the error of a certificate. beta: the error of a "not certified" stop
    (None: alpha). n_min, n_max: the first look of the geometric schedule and the largest number of
    estimation samples of a row. growth, schedule: the looks (module docstring); per row: looks
    [rows, K] (padded with n_max), K_row (the row's looks), spend [rows, K] (its share of alpha per look).
    thresholds: the p0 = Phi(r / sigma) of the radii to decide (fixed-radius and grid modes), or None for
    full-radius mode, which then needs precision_z (the radius precision divided by sigma).
    kelly, max_bet: the betting test's fraction of Kelly's bet and its largest bet (0 < max_bet < 1).

    A row's life: ``start(rows, s0, n0)`` (s0 of the n0 selection votes went to cA: they steer the bets
    only), then ``chunk(rows)`` samples and ``update(rows, s)`` with the row's cumulative estimation
    successes, until ``done[row]``. Arrays: n (samples), s (successes), lower, upper (bounds on pA),
    decisions [rows, R] (CERTIFIED / NOT_CERTIFIED / ABSTAINED, and -2 while undecided).
    """

    UNDECIDED = -2

    def __init__(self, rows: int, *, test: str = DEFAULT_TEST, alpha: float = 0.001, beta: Optional[float] = None,
                 n_min: int = DEFAULT_N_MIN, n_max: int = 100_000, thresholds: Optional[Sequence[float]] = None,
                 precision_z: Optional[float] = None, kelly: float = 1.0, max_bet: float = 0.9,
                 growth: float = DEFAULT_GROWTH, schedule: str = DEFAULT_SCHEDULE, bets: str = betting.DEFAULT_BETS,
                 final_share: float = betting.DEFAULT_FINAL_SHARE):
        if test not in TESTS:
            raise ValueError(f"test must be one of {', '.join(map(repr, TESTS))}, got {test!r}")
        if bets not in betting.BETS:
            raise ValueError(f"bets must be one of {', '.join(map(repr, betting.BETS))}, got {bets!r}")
        self.test, self.bets = test, bets
        self.final_share = _checks.check_number(final_share, "final_share", 0.0, maximum=1.0)
        if self.final_share >= 1.0:
            raise ValueError(f"final_share must be < 1 (the capital needs a share of alpha), got {final_share!r}")
        self.alpha = _checks.check_probability(alpha, "alpha")
        self.beta = self.alpha if beta is None else _checks.check_probability(beta, "beta")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(map(repr, SCHEDULES))}, got {schedule!r}")
        self.schedule, self.growth = schedule, check_growth(growth)
        self._base = look_schedule(n_min, n_max, self.growth)  # every row's looks, or the fallback
        self.n_max = int(n_max)
        self.kelly = _checks.check_number(kelly, "kelly", 0.0, strict=True, maximum=1.0)
        self.max_bet = _checks.check_number(max_bet, "max_bet", 0.0, strict=True)
        if self.max_bet >= 1.0:
            raise ValueError(f"max_bet must be < 1 (a bet of 1 can lose all the capital), got {max_bet!r}")
        if thresholds is None:
            if precision_z is None:
                raise ValueError("full-radius mode (thresholds None) needs precision_z > 0")
            self.precision_z = _checks.check_number(precision_z, "precision_z", 0.0, strict=True)
            self.thresholds = np.zeros(0)
        else:
            t = np.asarray(thresholds, dtype=np.float64).reshape(-1)
            if t.size == 0 or not np.all((t > 0) & (t <= 1)):
                raise ValueError(f"thresholds must be a non-empty list of probabilities in (0, 1], got {t.tolist()}")
            self.thresholds, self.precision_z = t, None
        # K: the most looks a row can have (the columns of looks and hist); K_row: the row's own looks. An
        # anchored plan can have one look more than the geometric looks from 1 (the ceilings round up on
        # both sides of the anchor: measured for growth 1.02 to 10, n_min 1 to 50)
        K = len(look_schedule(1, n_max, self.growth)) + 1 if schedule == "threshold" else len(self._base)
        R = self.thresholds.size
        self.K, self.R = K, R
        self.grid = betting.mixture_grid(self.thresholds, self.n_max, self.alpha, self.max_bet)
        rows = _checks.check_int(rows, "rows", 0)
        self.looks = np.full((rows, K), self.n_max, np.int64)
        self.looks[:, :len(self._base)] = self._base
        self.K_row = np.full(rows, len(self._base), np.int64)
        self.n = np.zeros(rows, np.int64)
        self.s = np.zeros(rows, np.int64)
        self.k = np.zeros(rows, np.int64)  # index of the next look
        self.s0 = np.zeros(rows, np.float64)
        self.n0 = np.zeros(rows, np.float64)
        self.lower = np.zeros(rows)
        self.upper = np.ones(rows)
        self.decisions = np.full((rows, R), self.UNDECIDED, np.int8)
        self.done = np.ones(rows, bool)
        # betting: per chunk, successes, failures and the two bets
        self.hist = np.zeros((rows, 4, K))
        self.log_w = np.full((rows, 2, self.grid.size), -math.log(self.grid.size))  # mixture weights (K+, K-)
        # betting: the capital's levels, and the final look's Clopper-Pearson budget (betting.py)
        share = self.final_share if test == "betting" else 0.0
        self._log_a = math.log(1.0 / ((1.0 - share) * self.alpha))
        self._log_b = math.log(1.0 / ((1.0 - share) * self.beta))
        self._alpha_f, self._beta_f = share * self.alpha, share * self.beta
        # Clopper-Pearson: the share of alpha and beta of each look of the row (summing to 1 over its looks)
        self.spend = np.zeros((rows, K))
        self.spend[:, :len(self._base)] = 1.0 / len(self._base)

    # -------------------------------------------------------------------------------- life of a row

    def start(self, rows, s0=0, n0=0) -> None:
        """(Re)starts rows with no estimation samples; s0 of n0 selection votes went to cA (bets only)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        self.n[rows] = self.s[rows] = self.k[rows] = 0
        self.s0[rows], self.n0[rows] = s0, n0
        self.lower[rows], self.upper[rows] = 0.0, 1.0
        self.decisions[rows] = self.UNDECIDED
        self.done[rows] = False
        self.hist[rows] = 0.0
        self._weigh(rows)
        self._plan(rows)
        self._decide_budget(rows)
        self._bet(rows[~self.done[rows]])

    def abstain(self, rows) -> None:
        """Rows that stop before any estimation sample (a non-finite input, no class selected): every
        radius ABSTAINED, L = 0."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        self.start(rows)
        self.decisions[rows] = ABSTAINED
        self.done[rows] = True

    def chunk(self, rows) -> np.ndarray:
        """Samples each row needs before its next look."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        return self.looks[rows, np.minimum(self.k[rows], self.K_row[rows] - 1)] - self.n[rows]

    def update(self, rows, s_cumulative) -> np.ndarray:
        """Rows reached their next look with s_cumulative estimation successes in all: new bounds,
        decisions, and the bets of the next chunk. Returns the done flags of rows."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        s_cum = np.asarray(s_cumulative, dtype=np.int64).reshape(-1)
        if np.any(self.done[rows]):
            raise ValueError("update of a row that is done")
        ds, dn = s_cum - self.s[rows], self.chunk(rows)
        if np.any(ds < 0) or np.any(ds > dn):
            raise ValueError("the cumulative successes must grow by at most the chunk's samples")
        k = self.k[rows]
        self.hist[rows, 0, k] = ds
        self.hist[rows, 1, k] = dn - ds
        self.s[rows], self.n[rows], self.k[rows] = s_cum, self.n[rows] + dn, k + 1
        if self.test == "cp":
            w = self.spend[rows, k]
            lo = clopper_pearson_lower(self.s[rows], self.n[rows], self.alpha * w)
            hi = clopper_pearson_upper(self.s[rows], self.n[rows], self.beta * w)
        else:
            lo, hi = self._betting_bounds(rows)
        self.lower[rows] = np.maximum(self.lower[rows], lo)
        self.upper[rows] = np.minimum(self.upper[rows], hi)
        if self.R:
            self._decide_thresholds(rows)
        else:
            self._decide_full(rows)
        self._decide_budget(rows)
        last = self.n[rows] >= self.n_max
        if self.R:
            d = self.decisions[rows]
            d[last[:, None] & (d == self.UNDECIDED)] = ABSTAINED
            self.decisions[rows] = d
        self.done[rows] |= last
        self._bet(rows[~self.done[rows]])
        return self.done[rows]

    # ------------------------------------------------------------------------------------ schedules

    def _plan(self, rows) -> None:
        """Each row's looks and its share of alpha per look, fixed at start from the selection counts only
        (see the module docstring: the guarantee holds conditionally on them)."""
        self.looks[rows] = self.n_max
        self.looks[rows, :len(self._base)] = self._base
        self.K_row[rows] = len(self._base)
        self.spend[rows] = 0.0
        self.spend[rows, :len(self._base)] = 1.0 / len(self._base)
        if self.schedule != "threshold" or not self.R or not len(rows):
            return
        first = self.first_looks(self.s0[rows], self.n0[rows], self.log_w[rows, 0])
        for n1 in np.unique(first[first > 0]):
            plan = self.anchored_schedule(int(n1))
            sel, K = rows[first == n1], len(plan)
            self.looks[sel] = self.n_max
            self.looks[sel, :K] = plan
            self.K_row[sel] = K
            self.spend[sel] = 0.0
            self.spend[sel, :K] = self.anchored_spend(plan, n1)

    def anchored_schedule(self, n1: int) -> np.ndarray:
        """The geometric looks shifted to pass through n1: ceil(n1 * growth^k) for every integer k with
        the first look >= n_min (or n1 itself when n1 < n_min), then n_max."""
        g, lo = self.growth, min(n1, int(self._base[0]))
        down = [n1]
        while down[-1] > 1:  # at least one less each step: ceil(x / g) = x for x <= ~g / (g - 1)
            nx = min(math.ceil(down[-1] / g - 1e-9), down[-1] - 1)
            if nx < lo:
                break
            down.append(nx)
        looks = down[::-1] + [int(v) for v in look_schedule(n1, self.n_max, g)[1:]]
        if len(looks) > self.K:
            raise RuntimeError(f"anchored schedule of {len(looks)} looks exceeds the table's {self.K} columns")
        return np.array(looks, dtype=np.int64)

    def anchored_spend(self, plan: np.ndarray, n1: int) -> np.ndarray:
        """The shares of alpha (and beta) of an anchored plan's looks (summing to 1): ANCHOR_SHARE at the
        anchor n1, FINAL_SHARE at n_max (the last look, where inputs near a threshold end), the rest equally
        over the other looks (with only the anchor and n_max: the anchor's share and the rest at n_max)."""
        K = len(plan)
        w = np.zeros(K)
        a = int(np.searchsorted(plan, n1))
        if K - 2 > 0:
            w[:] = (1.0 - ANCHOR_SHARE - FINAL_SHARE) / (K - 2)
            w[-1] = FINAL_SHARE
        else:
            w[:] = 1.0 - ANCHOR_SHARE
        w[a] = ANCHOR_SHARE
        return w

    def first_looks(self, s0, n0, log_w=None) -> np.ndarray:
        """The threshold schedule's anchor per row from its selection counts (s0 of n0 for cA): the
        smallest n whose Clopper-Pearson bound at ANCHOR_SHARE * alpha with n * p_c expected successes
        clears the largest threshold below p_c (p_c = s0 / n0 less SCHEDULE_SHRINK standard errors);
        0 (fall back to the geometric looks) where no threshold is below p_c or the anchor would not
        come before n_max. The mixture betting test given its weights log_w [rows, J] (K+'s) aims instead
        at the smallest n where its own capital with n * p_c successes reaches its level (capital_clearing_n)."""
        s0, n0 = np.asarray(s0, np.float64), np.asarray(n0, np.float64)
        p = np.divide(s0, n0, out=np.zeros_like(s0), where=n0 > 0)
        p_c = p - SCHEDULE_SHRINK * np.sqrt(p * (1.0 - p) / np.maximum(n0, 1.0))
        t = np.where(self.thresholds[None, :] < p_c[:, None], self.thresholds[None, :], -1.0).max(1)
        ok = (t > 0) & (n0 > 0)
        first = np.zeros(len(p), np.int64)
        if ok.any() and log_w is not None and self.test == "betting" and self.bets == "mixture":
            n1 = self.capital_clearing_n(p_c[ok], t[ok], np.asarray(log_w)[ok])
            first[ok] = np.where(n1 < self.n_max, n1, 0)
        elif ok.any():
            n1 = clearing_n(p_c[ok], t[ok], self.alpha * ANCHOR_SHARE, self.n_max)
            first[ok] = np.where(n1 < self.n_max, n1, 0)
        return first

    def capital_clearing_n(self, p, t, log_w) -> np.ndarray:
        """The smallest n in [1, n_max] where the mixture capital K+(t) with weights log_w [rows, J] and the
        expected successes n * p reaches the test's level 1 / ((1 - final_share) alpha); n_max + 1 where none
        does. Bisection: log K+ is convex in n and 0 at n = 0, so once above the level it stays there."""
        p, t = np.asarray(p, np.float64), np.asarray(t, np.float64)
        lo, hi = np.zeros(p.shape, np.int64), np.full(p.shape, self.n_max + 1, np.int64)
        while np.any(hi - lo > 1):
            mid = (lo + hi) // 2
            ok = betting.mixture_log_capital(mid * p, mid, t[:, None], self.grid, +1, log_w)[:, 0] >= self._log_a
            hi, lo = np.where(ok, mid, hi), np.where(ok, lo, mid)
        return hi

    # ------------------------------------------------------------------------------------ decisions

    def _decide_thresholds(self, rows) -> None:
        t = self.thresholds[None, :]
        d = self.decisions[rows]
        open_ = d == self.UNDECIDED
        if self.test == "cp":
            cert = self.lower[rows, None] >= t
            futile = self.upper[rows, None] < t
        else:  # exact, without the bisection's rounding: K+(p0) >= 1/alpha <=> L >= p0 (K+ decreasing)
            cert = (self._log_capital(rows, t, +1) >= self._log_a) | (self.lower[rows, None] >= t)
            futile = (self._log_capital(rows, t, -1) >= self._log_b) | (self.upper[rows, None] < t)
        d[open_ & cert] = CERTIFIED
        d[open_ & ~cert & futile] = NOT_CERTIFIED
        self.decisions[rows] = d
        self.done[rows] = ~(d == self.UNDECIDED).any(1)

    def _decide_full(self, rows) -> None:
        lo, hi = self.lower[rows], self.upper[rows]
        reach = clopper_pearson_lower(self.n_max * hi, self.n_max, self.alpha)
        z_lo = stats.norm.ppf(np.clip(lo, 0.5, None))
        close = (lo >= 0.5) & (stats.norm.ppf(np.maximum(reach, 0.5)) - z_lo <= self.precision_z)
        self.done[rows] = close | (hi < 0.5)

    def _decide_budget(self, rows) -> None:
        """Thresholds that all-successes on the samples left could not certify are ABSTAINED when the
        upper bound has not decided them; a row whose thresholds are all decided is done."""
        if not self.R or not len(rows):
            return
        left = (self.n_max - self.n[rows]).astype(np.float64)
        t = self.thresholds[None, :]
        if self.test == "cp":
            reachable = self._cp_reachable(rows, left, t)
        else:
            reachable = self._best_log_capital(rows, t, left) >= self._log_a
            if self._alpha_f > 0:  # the final look's Clopper-Pearson bound
                final = clopper_pearson_lower(self.s[rows] + left, np.full(len(rows), self.n_max), self._alpha_f)
                reachable |= final[:, None] >= t
        d = self.decisions[rows]
        d[(d == self.UNDECIDED) & ~reachable] = ABSTAINED
        self.decisions[rows] = d
        self.done[rows] = ~(d == self.UNDECIDED).any(1)

    def _cp_reachable(self, rows, left: np.ndarray, t: np.ndarray) -> np.ndarray:
        """[len(rows), R]: could all-successes from now on certify t at some look still ahead? First at n_max
        with its share; the undecided rows that cannot there are checked at the looks ahead with a larger
        share (an anchor ahead spends far more than n_max; a look with fewer samples and no larger share
        cannot reach further than n_max)."""
        last = self.spend[rows, self.K_row[rows] - 1]
        best = clopper_pearson_lower(self.s[rows] + left, np.full(len(rows), self.n_max), self.alpha * last)
        reachable = best[:, None] >= t
        short = np.nonzero((~reachable & (self.decisions[rows] == self.UNDECIDED)).any(1))[0]
        if len(short):
            r = rows[short]
            ahead = (np.arange(self.K)[None, :] >= self.k[r][:, None]) & (self.spend[r] > last[short, None])
            i, k = np.nonzero(ahead)
            n_k = self.looks[r[i], k].astype(np.float64)
            lo = clopper_pearson_lower(self.s[r[i]] + n_k - self.n[r[i]], n_k, self.alpha * self.spend[r[i], k])
            best = np.zeros(len(r))
            np.maximum.at(best, i, lo)
            reachable[short] |= best[:, None] >= t
        return reachable

    # -------------------------------------------------------------------------------------- betting

    def _log_capital(self, rows, m: np.ndarray, side: int) -> np.ndarray:
        """log K+(m) (side +1) or log K-(m) (side -1) of rows at candidate means m [len(rows), J] (or
        broadcastable); returns [len(rows), J]. The capitals are ``betting``'s."""
        return self._capital(rows, side)(m)

    def _capital(self, rows, side: int):
        """m -> log capital of rows (see _log_capital), the rows' state gathered once: a bound's search
        evaluates it ~30 times."""
        if self.bets == "mixture":
            s, n, w = self.s[rows], self.n[rows], self.log_w[rows, 0 if side > 0 else 1]
            return lambda m: betting.mixture_log_capital(s, n, m, self.grid, side, w)
        used = int(self.k[rows].max(initial=0))  # chunks past every row's last look hold no samples
        h = self.hist[rows, :, :used]  # [r, 4, used]
        succ, fail, bets = h[:, 0], h[:, 1], h[:, 2 if side > 0 else 3]
        return lambda m: betting.chunked_log_capital(succ, fail, bets, m, side)

    def _best_log_capital(self, rows, t: np.ndarray, left: np.ndarray) -> np.ndarray:
        """log K+(t) [len(rows), R] if every one of the ``left`` samples still to come were a success
        (exact for the mixture; the plug-in at its largest bet)."""
        if self.bets == "mixture":
            w = self.log_w[rows, 0]
            return betting.mixture_log_capital(self.s[rows] + left, self.n[rows] + left, t, self.grid, +1, w)
        return self._log_capital(rows, t, +1) + left[:, None] * np.log1p(self.max_bet * (1.0 - t))

    def _betting_bounds(self, rows):
        """(L, U) of the current capitals: L rounded down, U rounded up (bisection over m in [0, 1])."""
        r = len(rows)
        lo = betting.bisect_bound(self._capital(rows, +1), r, +1, self._log_a)
        hi = betting.bisect_bound(self._capital(rows, -1), r, -1, self._log_b)
        end = self.n[rows] >= self.n_max
        if self._alpha_f > 0 and end.any():  # the final look: a fixed-n Clopper-Pearson bound (union bound)
            s, n = self.s[rows][end], self.n[rows][end]
            lo[end] = np.maximum(lo[end], clopper_pearson_lower(s, n, self._alpha_f))
            hi[end] = np.minimum(hi[end], clopper_pearson_upper(s, n, self._beta_f))
        return lo, hi

    def _targets(self, rows, p):
        """The means the bets aim at, for an estimate p [len(rows)]: below p, the largest undecided
        threshold (K+), above p the smallest (K-); full-radius mode: the lower bound fixed-n_max CERTIFY
        would reach at p, and its mirror image above p."""
        if not self.R:
            lo_t = clopper_pearson_lower(self.n_max * p, self.n_max, self.alpha)
            return lo_t, np.minimum(2.0 * p - lo_t, 1.0)
        t = np.broadcast_to(self.thresholds, (len(rows), self.R))
        open_ = self.decisions[rows] == self.UNDECIDED
        below, above = open_ & (t <= p[:, None]), open_ & (t > p[:, None])
        lo_t = np.where(below.any(1), np.where(below, t, -np.inf).max(1), np.where(open_, t, np.inf).min(1))
        hi_t = np.where(above.any(1), np.where(above, t, np.inf).min(1), np.where(open_, t, -np.inf).max(1))
        return np.where(np.isfinite(lo_t), lo_t, p), np.where(np.isfinite(hi_t), hi_t, p)

    def _weigh(self, rows) -> None:
        """The mixture's weights of rows from their selection votes alone (fixed for the row's life)."""
        if self.test != "betting" or self.bets != "mixture" or not len(rows):
            return
        s0, n0 = self.s0[rows], self.n0[rows]
        lo_t, hi_t = self._targets(rows, (s0 + 0.5) / (n0 + 1.0))
        self.log_w[rows, 0] = betting.pilot_log_weights(s0, n0, lo_t, self.grid, +1)
        self.log_w[rows, 1] = betting.pilot_log_weights(s0, n0, hi_t, self.grid, -1)

    def _bet(self, rows) -> None:
        """The plug-in bets of each row's next chunk, from what is known now (predictable)."""
        if self.test != "betting" or self.bets != "plugin" or not len(rows):
            return
        p = (self.s[rows] + self.s0[rows] + 0.5) / (self.n[rows] + self.n0[rows] + 1.0)
        lo_t, hi_t = self._targets(rows, p)
        k = np.minimum(self.k[rows], self.K_row[rows] - 1)
        self.hist[rows, 2, k] = betting.kelly_bet(p - lo_t, lo_t, self.kelly, self.max_bet)
        self.hist[rows, 3, k] = betting.kelly_bet(hi_t - p, hi_t, self.kelly, self.max_bet)

    # ---------------------------------------------------------------------------------- summaries

    def radius_z(self, rows=None) -> np.ndarray:
        """Phi^-1(L): the certified radius in units of sigma (0 where L < 1/2)."""
        lo = self.lower if rows is None else self.lower[np.asarray(rows, dtype=np.int64)]
        return np.where(lo >= 0.5, stats.norm.ppf(np.clip(lo, 0.5, None)), 0.0)


def simulate(p, trials: int, *, seed: int = 0, n0: int = DEFAULT_N0, s0=None, **kwargs) -> SequentialTest:
    """Runs SequentialTest(trials, **kwargs) against a Bernoulli(p) oracle (no network) until every
    trial is done: p is a float or one per trial; the n0 selection votes for cA are Binomial(n0, p) too
    (they steer the bets and the threshold schedule only), or s0 when given (a number or one per trial:
    the guarantee holds conditionally on the selection, so any s0 must keep it). Returns the finished
    test (n, lower, upper, decisions per trial)."""
    rng = np.random.default_rng(seed)
    test = SequentialTest(trials, **kwargs)
    p = np.broadcast_to(np.asarray(p, dtype=np.float64), (trials,))
    rows = np.arange(trials)
    if s0 is None:
        s0 = rng.binomial(n0, p) if n0 else 0
    test.start(rows, s0, n0)
    live = rows[~test.done]
    while len(live):
        s = test.s[live] + rng.binomial(test.chunk(live), p[live])
        test.update(live, s)
        live = live[~test.done[live]]
    return test
