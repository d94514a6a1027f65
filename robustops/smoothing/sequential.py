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

Two confidence sequences, both selectable (``test``; "cp" is the default: with looks that double, it needs
as few or fewer samples than the betting sequence in simulation, e.g. a mean of 749 against 899 estimation
samples at pA = 0.9, r = sigma, alpha = 0.001):

``"cp"`` -- Clopper-Pearson at geometrically spaced looks n_k = n_min * 2^k (then n_max), K looks in all:
    L_k = the one-sided (1 - alpha/K) Clopper-Pearson lower bound, U_k = the (1 - beta/K) upper bound,
    L = max over looks so far, U = min. The budget split over looks is uniform, alpha/K per look (the
    union bound over the K looks); K = len(look_schedule(n_min, n_max)), e.g. 11 looks for
    n_min = 100, n_max = 100,000.

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
    confidence sequence is one).

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

__all__ = ["SequentialTest", "look_schedule", "simulate", "clopper_pearson_lower", "clopper_pearson_upper", "TESTS",
           "CERTIFIED", "NOT_CERTIFIED", "ABSTAINED", "DEFAULT_TEST", "DEFAULT_N_MIN", "DEFAULT_PRECISION"]

#: Decision codes for one radius of one input.
CERTIFIED, NOT_CERTIFIED, ABSTAINED = 1, 0, -1
TESTS = ("betting", "cp")
#: The defaults of the sequential modes (Smooth.certify_radius / certify_radii / certify_sequential and
#: `robustops certify --sequential`): the test, the first look, full-radius mode's precision.
DEFAULT_TEST, DEFAULT_N_MIN, DEFAULT_PRECISION = "cp", 100, 0.05

_BISECT = 64  # bisection steps of the betting bounds (2^-64: below float64 resolution)


def clopper_pearson_lower(n_a, n, alpha: float) -> np.ndarray:
    """One-sided (1 - alpha) Clopper-Pearson lower confidence bound on a binomial proportion after
    n_a successes in n trials: the alpha quantile of Beta(n_a, n - n_a + 1), and 0 when n_a = 0.
    Vectorized over n_a (and n); a fractional n_a interpolates (used for what-if bounds)."""
    n_a = np.asarray(n_a, dtype=np.float64)
    n = np.broadcast_to(np.asarray(n, dtype=np.float64), n_a.shape)
    out = np.zeros(n_a.shape, dtype=np.float64)
    pos = n_a > 0
    out[pos] = special.betaincinv(n_a[pos], n[pos] - n_a[pos] + 1.0, alpha)
    return out


def clopper_pearson_upper(n_a, n, beta: float) -> np.ndarray:
    """One-sided (1 - beta) Clopper-Pearson upper confidence bound: the 1 - beta quantile of
    Beta(n_a + 1, n - n_a), and 1 when n_a = n. Vectorized."""
    n_a = np.asarray(n_a, dtype=np.float64)
    n = np.broadcast_to(np.asarray(n, dtype=np.float64), n_a.shape)
    out = np.ones(n_a.shape, dtype=np.float64)
    low = n_a < n
    out[low] = special.betaincinv(n_a[low] + 1.0, n[low] - n_a[low], 1.0 - beta)
    return out


def look_schedule(n_min: int, n_max: int) -> np.ndarray:
    """The cumulative estimation-sample numbers at which a row is examined: n_min * 2^k below n_max,
    then n_max (int64)."""
    n_min = _checks.check_int(n_min, "n_min", 1)
    n_max = _checks.check_int(n_max, "n_max", 1)
    if n_min > n_max:
        raise ValueError(f"n_min must be <= n_max, got n_min {n_min}, n_max {n_max}")
    looks, n = [], n_min
    while n < n_max:
        looks.append(n)
        n *= 2
    looks.append(n_max)
    return np.array(looks, dtype=np.int64)


class SequentialTest:
    """The sequential test of ``rows`` rows (inputs or simulated trials); see the module docstring.

    test: "betting" or "cp". alpha: the error of a certificate. beta: the error of a "not certified" stop
    (None: alpha). n_min, n_max: the first look and the largest number of estimation samples of a row.
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
                 precision_z: Optional[float] = None, kelly: float = 1.0, max_bet: float = 0.9):
        if test not in TESTS:
            raise ValueError(f"test must be one of {', '.join(map(repr, TESTS))}, got {test!r}")
        self.test = test
        self.alpha = _checks.check_probability(alpha, "alpha")
        self.beta = self.alpha if beta is None else _checks.check_probability(beta, "beta")
        self.looks = look_schedule(n_min, n_max)
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
        K, R = len(self.looks), self.thresholds.size
        self.K, self.R = K, R
        rows = _checks.check_int(rows, "rows", 0)
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
        self._log_a, self._log_b = math.log(1.0 / self.alpha), math.log(1.0 / self.beta)
        # Clopper-Pearson: the budget of each look
        self._alpha_k, self._beta_k = self.alpha / K, self.beta / K

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
        return self.looks[np.minimum(self.k[rows], self.K - 1)] - self.n[rows]

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
            lo = clopper_pearson_lower(self.s[rows], self.n[rows], self._alpha_k)
            hi = clopper_pearson_upper(self.s[rows], self.n[rows], self._beta_k)
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

    # ------------------------------------------------------------------------------------ decisions

    def _decide_thresholds(self, rows) -> None:
        t = self.thresholds[None, :]
        d = self.decisions[rows]
        open_ = d == self.UNDECIDED
        if self.test == "cp":
            cert = self.lower[rows, None] >= t
            futile = self.upper[rows, None] < t
        else:  # exact, without the bisection's rounding: K+(p0) >= 1/alpha <=> L >= p0 (K+ decreasing)
            cert = self._log_capital(rows, t, +1) >= self._log_a
            futile = self._log_capital(rows, t, -1) >= self._log_b
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
            best = clopper_pearson_lower(self.s[rows] + left, np.full(len(rows), self.n_max), self._alpha_k)
            reachable = best[:, None] >= t
        else:
            best = self._log_capital(rows, t, +1) + left[:, None] * np.log1p(self.max_bet * (1.0 - t))
            reachable = best >= self._log_a
        d = self.decisions[rows]
        d[(d == self.UNDECIDED) & ~reachable] = ABSTAINED
        self.decisions[rows] = d
        self.done[rows] = ~(d == self.UNDECIDED).any(1)

    # -------------------------------------------------------------------------------------- betting

    def _log_capital(self, rows, m: np.ndarray, side: int) -> np.ndarray:
        """log K+(m) (side +1) or log K-(m) (side -1) of rows at candidate means m [len(rows), J] (or
        broadcastable); returns [len(rows), J]."""
        h = self.hist[rows]  # [r, 4, K]
        s, f = h[:, 0, :, None], h[:, 1, :, None]
        m = np.broadcast_to(np.asarray(m, dtype=np.float64), (len(rows), np.shape(m)[-1]))[:, None, :]
        if side > 0:
            lam = h[:, 2, :, None]
            out = s * np.log1p(lam * (1.0 - m)) + f * np.log1p(-lam * m)
        else:
            lam = h[:, 3, :, None]
            out = s * np.log1p(-lam * (1.0 - m)) + f * np.log1p(lam * m)
        return out.sum(1)

    def _betting_bounds(self, rows):
        """(L, U) of the current capitals: L rounded down, U rounded up (bisection over m in [0, 1])."""
        return self._root(rows, +1, self._log_a), self._root(rows, -1, self._log_b)

    def _root(self, rows, side: int, level: float) -> np.ndarray:
        """K+ decreases in m: L = inf{m : log K+(m) < level}, the last m still rejected, 0 if even m = 0 is
        not. K- increases: U = sup{m : log K-(m) < level}, the first m rejected, 1 if even m = 1 is not."""
        r = len(rows)
        edge = np.full((r, 1), 0.0 if side > 0 else 1.0)
        ok = self._log_capital(rows, edge, side)[:, 0] >= level
        a, b = np.zeros(r), np.ones(r)  # side +1: a rejected, b not; side -1: a not rejected, b rejected
        for _ in range(_BISECT):
            mid = 0.5 * (a + b)
            rej = self._log_capital(rows, mid[:, None], side)[:, 0] >= level
            moves_a = rej if side > 0 else ~rej
            a, b = np.where(moves_a, mid, a), np.where(moves_a, b, mid)
        return np.where(ok, a, 0.0) if side > 0 else np.where(ok, b, 1.0)

    def _bet(self, rows) -> None:
        """The bets of each row's next chunk, from what is known now (predictable)."""
        if self.test != "betting" or not len(rows):
            return
        p = (self.s[rows] + self.s0[rows] + 0.5) / (self.n[rows] + self.n0[rows] + 1.0)
        if self.R:
            t = np.broadcast_to(self.thresholds, (len(rows), self.R))
            open_ = self.decisions[rows] == self.UNDECIDED
            below, above = open_ & (t <= p[:, None]), open_ & (t > p[:, None])
            lo_t = np.where(below.any(1), np.where(below, t, -np.inf).max(1), np.where(open_, t, np.inf).min(1))
            hi_t = np.where(above.any(1), np.where(above, t, np.inf).min(1), np.where(open_, t, -np.inf).max(1))
            lo_t = np.where(np.isfinite(lo_t), lo_t, p)
            hi_t = np.where(np.isfinite(hi_t), hi_t, p)
        else:
            lo_t = clopper_pearson_lower(self.n_max * p, self.n_max, self.alpha)
            hi_t = np.minimum(2.0 * p - lo_t, 1.0)
        k = np.minimum(self.k[rows], self.K - 1)
        self.hist[rows, 2, k] = self._kelly(p - lo_t, lo_t)
        self.hist[rows, 3, k] = self._kelly(hi_t - p, hi_t)

    def _kelly(self, edge, t):
        var = np.maximum(t * (1.0 - t), 1e-12)
        return np.clip(self.kelly * edge / var, 0.0, self.max_bet)

    # ---------------------------------------------------------------------------------- summaries

    def radius_z(self, rows=None) -> np.ndarray:
        """Phi^-1(L): the certified radius in units of sigma (0 where L < 1/2)."""
        lo = self.lower if rows is None else self.lower[np.asarray(rows, dtype=np.int64)]
        return np.where(lo >= 0.5, stats.norm.ppf(np.clip(lo, 0.5, None)), 0.0)


def simulate(p, trials: int, *, seed: int = 0, n0: int = 100, **kwargs) -> SequentialTest:
    """Runs SequentialTest(trials, **kwargs) against a Bernoulli(p) oracle (no network) until every
    trial is done: p is a float or one per trial; the n0 selection votes for cA are Binomial(n0, p)
    too (they steer the bets only). Returns the finished test (n, lower, upper, decisions per trial)."""
    rng = np.random.default_rng(seed)
    test = SequentialTest(trials, **kwargs)
    p = np.broadcast_to(np.asarray(p, dtype=np.float64), (trials,))
    rows = np.arange(trials)
    test.start(rows, rng.binomial(n0, p) if n0 else 0, n0)
    live = rows[~test.done]
    while len(live):
        s = test.s[live] + rng.binomial(test.chunk(live), p[live])
        test.update(live, s)
        live = live[~test.done[live]]
    return test
