"""Betting capital for the sequential certification test (``SequentialTest(test="betting")``): pure numpy
functions of the per-row success / failure counts, the bets and the candidate means m.

The paper: Waudby-Smith and Ramdas 2023, "Estimating means of bounded random variables by betting"
(JRSS-B, arXiv 2010.09686). For X_i in {0, 1} with mean pA and a candidate mean m, the capital of a
gambler who stakes a fraction l_i of it on X_i > m (the "+" side) or on X_i < m (the "-" side),

    K+_t(m) = prod_{i <= t} (1 + l+_i (X_i - m)),      K-_t(m) = prod_{i <= t} (1 - l-_i (X_i - m)),

is a nonnegative martingale when pA = m and the bets l_i in [0, 1) are predictable (chosen before X_i is
seen), so by Ville's inequality P(sup_t K+_t(pA) >= 1/alpha) <= alpha. The paper's hedged capital
process, max(theta K+, (1 - theta) K-), is the two-sided form of the same pair; here the two sides get
their own levels alpha and beta (a one-sided certificate, a one-sided "not certified" stop). Since
X_i is binary, a run of s successes and f failures at a constant bet l has capital
(1 + l (1 - m))^s (1 - l m)^f: the capital needs only counts.

Two bets (``BETS``):

``"mixture"`` (the default) -- a fixed grid of bets l_1 < ... < l_J in (0, max_bet] and weights w_j
    (sum 1), the capital their average (the paper's "diversified" Kelly bets, an average of D
    constant-bet capital processes):

        K+_n(m) = sum_j w_j (1 + l_j (1 - m))^s (1 - l_j m)^(n - s)   (s successes in n samples),

    and K- with l_j -> -l_j. Each term is a nonnegative martingale under pA = m and the weights are fixed,
    so the average is one: Ville's inequality holds for it. Nothing is predicted, so the capital depends on
    the cumulative (s, n) alone and any look schedule is valid; it is computed in log space (logsumexp).
    Choices the paper leaves open, made here: the grid is geometric with ratio ``GRID_RATIO`` from the
    smallest useful bet to max_bet, with uniform weights; the smallest useful bet is the Kelly bet
    (pA - t) / (t (1 - t)) for the smallest edge pA - t that n_max samples can detect at level alpha,
    sqrt(2 log(1/alpha) t (1 - t) / n_max) (the Gaussian approximation), at the threshold t of the
    grid with the largest t (1 - t) (full-radius mode: t = 1/2): a smaller bet cannot reach 1/alpha
    within n_max samples. The bets do not depend on m, so K+ decreases and K- increases in m (bounds by
    a bracket search, ``bisect_bound``) and more successes never lower K+ (the bounds are monotone in
    the data). The weights are not uniform but steered by the selection votes (``pilot_log_weights``):
    those n0 votes are independent of the estimation samples, so weights fixed from them before the
    first estimation sample keep the average a martingale (conditionally on them); bet l_j gets the
    posterior mass of the means it is Kelly's bet for, mixed 3:1 with uniform weights (``PILOT_FLOOR``).
    The paper's mixtures have fixed (uniform) weights; this prior is our choice. Measured: uniform
    weights certify 35% instead of 43% at pA = 0.979, r = 2 sigma, and need 908 instead of 667 samples at
    pA = 0.999, r = 2 sigma. The authors' code (confseq, ``dKelly_cs``) differs: D = 10 evenly spaced
    bets d / ((D + 1) m) that scale with 1/m (so the capital is not monotone in m and the CS is read off a
    grid of 1000 m), uniform weights, and the two sides combined as theta K+ + (1 - theta) K- at one
    alpha; here the grid is geometric and fixed (monotone capitals, exact bounds by a bracket search),
    reaches down to the bets that matter near a threshold at n_max (d / 11 is too coarse there: the
    Kelly bet at pA = 0.979 against 0.9772 is 0.08), and each side has its own level (alpha, beta).

The final look (``final_share``, default ``DEFAULT_FINAL_SHARE``; not in the paper): the capital is
compared with 1 / ((1 - share) alpha) instead of 1 / alpha, and a row that reaches n_max is also judged
by the one-sided fixed-n Clopper-Pearson bound at level share * alpha (and share * beta): by the union
bound, P(L > pA at some look) <= (1 - share) alpha + share alpha. Near a threshold a row runs to n_max,
where a fixed-n bound is sharper than any capital at 1/alpha (an e-value pays for being valid at every n;
the binomial tail is smaller than exp(-n KL) by a factor ~ 1 / (z sqrt(2 pi))): at pA = 0.979,
r = 2 sigma the mixture alone certifies 45%, with a 0.1 share 53%, cp 50%; the share costs ~1% more
samples on inputs decided before n_max.

With the threshold-aimed look schedule of issue 30 (growth 1.5, n0 = n_min = 50; cp anchored where its
Clopper-Pearson bound first clears the threshold, the mixture where its own capital does), mean
estimation samples cp / betting (default), 10^4 trials (benchmarks/sequential_oracle.py, its CSV for
r <= sigma): 705 / 774 at r = sigma, pA = 0.9; 179 / 176 at 0.95; 69 / 72 at 0.99; 47 / 57 at 0.999;
2,362 / 2,436 at r = 2 sigma, pA = 0.99; 471 / 482 at 0.999; certified at pA = 0.979, r = 2 sigma:
49% / 52%.

``"plugin"`` -- the predictable plug-in bet of the first version: constant within a chunk between two
    looks (chosen before the chunk: predictable), Kelly's bet for a Bernoulli(p_hat) against the next
    threshold to decide, l = kelly (p_hat - t) / (t (1 - t)) clipped to [0, max_bet] (the paper's PrPl
    bet uses a variance estimate instead of the threshold's t (1 - t); its aGRAPA bet the running mean
    of the Kelly criterion), p_hat = (s + s0 + 1/2) / (n + n0 + 1) from the estimation and selection
    counts so far; the capital is the product over chunks.

Measured (``benchmarks/bench_sequential_bets.py``; n_max = 100,000, alpha = 0.001, n0 = n_min = 100,
doubling looks): see the table in ``robustops.smoothing.sequential``'s docstring. The paper's text could
not be retrieved while this was written: the equations above follow its published account (capital
processes, Ville's inequality, hedged and diversified capital) and the authors' code; its section
numbers are not checked.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import special

__all__ = ["BETS", "DEFAULT_BETS", "GRID_RATIO", "mixture_grid", "mixture_log_capital", "chunked_log_capital",
           "bisect_bound", "kelly_bet"]

BETS = ("mixture", "plugin")
DEFAULT_BETS = "mixture"
#: The ratio of neighbouring bets of the mixture's grid: a bet off the best by a factor sqrt(1.6) still
#: earns ~95% of the best growth rate (2c - c^2 of it, c the factor, in the Gaussian approximation).
GRID_RATIO = 1.6
#: The share of the uniform weights in the pilot-steered mixture weights.
PILOT_FLOOR = 0.25
#: The share of alpha (and beta) spent on a fixed-n Clopper-Pearson bound at n_max (``final_look``).
DEFAULT_FINAL_SHARE = 0.1
_STEPS, _HALVINGS = 32, 8  # steps of the bounds' bracket search, the first _HALVINGS of them halvings


def mixture_grid(thresholds, n_max: int, alpha: float, max_bet: float, ratio: float = GRID_RATIO) -> np.ndarray:
    """The mixture's bets: geometric with ``ratio`` from the smallest bet that can reach 1/alpha within
    n_max samples at the hardest threshold (largest t (1 - t); none: t = 1/2) up to max_bet, max_bet
    included. Depends on the settings only, never on data."""
    t = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    t = t[(t > 0) & (t < 1)]
    var = float(np.max(t * (1 - t))) if t.size else 0.25
    lo = min(math.sqrt(2.0 * math.log(1.0 / alpha) / (n_max * var)), max_bet)
    count = int(math.floor(math.log(max_bet / lo) / math.log(ratio))) + 1
    return max_bet / ratio ** np.arange(count - 1, -1, -1, dtype=np.float64)


def pilot_log_weights(s0, n0, t, bets, side: int, floor: float = PILOT_FLOOR) -> np.ndarray:
    """log w [r, J]: the mixture's weights from the selection (pilot) votes, s0 of n0 for cA, which are
    independent of the estimation samples, so weights fixed from them keep the mixture a martingale.
    Bet l_j is Kelly's against the target t [r] (side +1) for the alternative p_j = t + l_j t (1 - t)
    (side -1: t - l_j t (1 - t)); w_j is the Beta(s0 + 1/2, n0 - s0 + 1/2) posterior mass of the p
    closest to p_j on the geometric scale of the bets (the mass beyond the last bet to it, short of the
    first to the first), mixed with the uniform weights: (1 - floor) w + floor / J, so a misleading
    pilot costs at most log(1 / floor) of capital."""
    s0 = np.asarray(s0, dtype=np.float64).reshape(-1, 1)
    n0 = np.broadcast_to(np.asarray(n0, dtype=np.float64).reshape(-1, 1), s0.shape)
    t = np.asarray(t, dtype=np.float64).reshape(-1, 1)
    bets = np.asarray(bets, dtype=np.float64)
    J = bets.size
    cuts = np.sqrt(bets[:-1] * bets[1:])  # edges between neighbouring bets
    edges = np.clip(t + side * cuts[None, :] * t * (1 - t), 0.0, 1.0)  # [r, J - 1]
    cdf = special.betainc(s0 + 0.5, n0 - s0 + 0.5, edges)
    first, last = (np.zeros_like(t), np.ones_like(t)) if side > 0 else (np.ones_like(t), np.zeros_like(t))
    mass = side * np.diff(np.concatenate([first, cdf, last], axis=1), axis=1)
    w = (1.0 - floor) * np.clip(mass, 0.0, None) + floor / J
    return np.log(w / w.sum(1, keepdims=True))


def mixture_log_capital(s, n, m, bets, side: int, log_w=None) -> np.ndarray:
    """log K+(m) (side +1) or log K-(m) (side -1) of the mixture over ``bets`` after s successes in n
    samples: s, n [r]; m [r, M] (or broadcastable); log_w [r, J] (None: uniform); returns [r, M]."""
    s = np.asarray(s, dtype=np.float64).reshape(-1, 1, 1)
    f = np.asarray(n, dtype=np.float64).reshape(-1, 1, 1) - s
    m = np.asarray(m, dtype=np.float64)
    m = np.broadcast_to(m, (s.shape[0], m.shape[-1]) if m.ndim else (s.shape[0], 1))[:, :, None]
    lam = np.asarray(bets, dtype=np.float64) * side
    terms = s * np.log1p(lam * (1.0 - m)) + f * np.log1p(-lam * m)
    terms = terms - math.log(lam.size) if log_w is None else terms + np.asarray(log_w)[:, None, :]
    top = terms.max(axis=2, keepdims=True)  # logsumexp by hand: scipy's costs 2x the whole capital here
    return (top + np.log(np.exp(terms - top).sum(axis=2, keepdims=True)))[:, :, 0]


def chunked_log_capital(successes, failures, bets, m, side: int) -> np.ndarray:
    """log K+(m) (side +1) or log K-(m) (side -1) of the plug-in bets: successes, failures and bets
    [r, K] per chunk (the bet of the side asked for); m [r, M] (or broadcastable); returns [r, M]."""
    s, f, lam = (np.asarray(a, dtype=np.float64)[:, :, None] for a in (successes, failures, bets))
    m = np.asarray(m, dtype=np.float64)
    m = np.broadcast_to(m, (s.shape[0], m.shape[-1]) if m.ndim else (s.shape[0], 1))[:, None, :]
    lam = lam * side
    return (s * np.log1p(lam * (1.0 - m)) + f * np.log1p(-lam * m)).sum(1)


def bisect_bound(log_capital, rows: int, side: int, level: float, steps: int = _STEPS) -> np.ndarray:
    """The confidence bound of capitals monotone in m: log_capital(m [rows, 1]) -> [rows, 1]. K+ decreases
    in m: L = inf{m : log K+(m) < level}, the last m still rejected (rounded down), 0 if even m = 0 is not.
    K- increases: U = sup{m : log K-(m) < level}, the first m rejected (rounded up), 1 if even m = 1 is
    not. The bracket [a, b] (one end rejected, the other not) shrinks by 8 halvings, then by Illinois
    false-position steps
    (the secant of log K through the ends, an end kept twice gets half its value) with a halving every
    4th step: the secant converges superlinearly on these smooth capitals, the halvings bound the worst
    case (2^-(8 + (steps - 8) / 4)); the returned end is always one that was evaluated and rejected, so the bound is
    never on the wrong side whatever the convergence."""
    edge = np.full((rows, 1), 0.0 if side > 0 else 1.0)
    ok = log_capital(edge)[:, 0] >= level
    a, b = np.zeros(rows), np.ones(rows)  # side +1: a rejected, b not; side -1: a not rejected, b rejected
    qa = log_capital(a[:, None])[:, 0] - level
    qb = log_capital(b[:, None])[:, 0] - level
    prev = np.zeros(rows, np.int8)  # which end moved last (+1 a, -1 b): the Illinois step halves the other
    for step in range(steps):
        mid = 0.5 * (a + b)
        if step >= _HALVINGS and step % 4 != 3:
            with np.errstate(divide="ignore", invalid="ignore"):
                sec = a - qa * (b - a) / (qb - qa)
            mid = np.where(np.isfinite(sec) & (sec > a) & (sec < b), sec, mid)
        q = log_capital(mid[:, None])[:, 0] - level
        moves_a = (q >= 0) if side > 0 else (q < 0)
        qa = np.where(~moves_a & (prev == -1), 0.5 * qa, qa)  # Illinois: b moved twice, halve a's value
        qb = np.where(moves_a & (prev == 1), 0.5 * qb, qb)
        a, qa = np.where(moves_a, mid, a), np.where(moves_a, q, qa)
        b, qb = np.where(moves_a, b, mid), np.where(moves_a, qb, q)
        prev = np.where(moves_a, 1, -1).astype(np.int8)
    return np.where(ok, a, 0.0) if side > 0 else np.where(ok, b, 1.0)


def kelly_bet(edge, t, kelly: float, max_bet: float) -> np.ndarray:
    """kelly * edge / (t (1 - t)) clipped to [0, max_bet]: a fraction of Kelly's bet for a Bernoulli with
    mean t + edge against the candidate mean t (for binary X the log-optimal bet exactly: then
    1 + l (1 - t) = (t + edge) / t)."""
    var = np.maximum(np.asarray(t) * (1.0 - np.asarray(t)), 1e-12)
    return np.clip(kelly * np.asarray(edge) / var, 0.0, max_bet)
