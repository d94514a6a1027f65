"""The selection maths of adversarial coreset selection (Dolatabadi, Erfani & Leckie, ECCV 2022 /
IJCV 2023): last-layer gradient proxies in closed form, their Gram matrices, and the two selection
rules, CRAIG's facility location (Mirzasoleiman et al. 2020) and GradMatch's non-negative orthogonal
matching pursuit (Killamsetty et al. 2021). Pure tensor functions: :mod:`.coreset` runs them in a fit.

**Proxies.** The last layer is linear, z = W h + b (h: the penultimate features, [D]). For a loss
whose gradient in the logits is e (``[C]``), the gradient in (W, b) is the rank-1 pair (e h^T, e), so

    <g_i, g_j> = <e_i, e_j> * (<h_i, h_j> + 1),

and a sum of such terms (``pairs``: [(e_k, h_k)]) has the Gram matrix sum_{k,l} (E_k E_l^T) * (H_k H_l^T + 1)
(element-wise product): no per-sample gradient [C*(D+1)] is ever formed.

- Cross-entropy on the adversarial input (PGD-AT, FGSM-AT): e = softmax(z_adv) - onehot(y), h = h_adv.
- TRADES, L = CE(z, y) + beta * KL(p || p'), p = softmax(z) (clean), p' = softmax(z') (adversarial),
  differentiated through both forwards (the training loss of ``methods/trades.py`` does, the KL's
  target p is not detached):
    dL/dz' = beta (p' - p),
    dL/dz  = p - onehot(y) + beta * p * (l - <p, l>),   l = log p - log p',
  two rank-1 terms (e_clean h_clean^T + e_adv h_adv^T). The official ACS code's TRADES proxy
  multiplies beta twice (its KL term is scaled by beta where the loss is built and again in the
  gradient); here beta appears once, as in the loss that is trained.

**Selection** runs per class (as ACS and CRAIG's per-class variant do), k_c = max(1, round(frac * n_c)) of
the n_c samples of class c.

- CRAIG: maximise the facility-location function F(S) = sum_i max_{j in S} s_ij with
  s_ij = max(d) - d_ij, d_ij = sqrt(G_ii + G_jj - 2 G_ij) (the gradient distances), by lazy greedy
  (Minoux 1978: stale upper bounds of the marginal gains in a heap; exact greedy's choices, ties to
  the lowest index); each chosen j weighs |{i : j = argmax_{j' in S} s_ij'}|, its cluster's size.
- GradMatch: non-negative OMP fitting the class's summed gradient t = sum_i g_i (so the weights are on
  the scale of cluster sizes, like CRAIG's): repeatedly add the j of largest positive correlation
  <g_j, t - sum_S w g> (the Gram form: (G 1)_j - (G_{:,S} w)_j), then re-solve
  min_{w >= 0} ||t - sum_S w_s g_s||^2 + lam ||w||^2 (an NNLS through the Cholesky factor of
  G_SS + lam I; lam = 0.5 as GradMatch). Stops at k_c or when no correlation is positive; the
  samples left with weight 0 are dropped and the shortfall filled with uniform random samples of weight 1
  (what the CORDS implementation of GradMatch does with a short OMP).

Library: apricot-select (submodular selection) was considered; it needs numba, its last release is
from 2021, and it works on NumPy arrays on the CPU; the lazy greedy on a precomputed per-class
similarity is a few lines here and runs on the Gram matrix where it was computed.
"""
from __future__ import annotations

import heapq
from typing import List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["ce_proxy", "trades_proxy", "proxy_gram", "gram_distances", "facility_location", "nn_omp",
           "class_budgets", "fill_random", "select_class"]

Pairs = Sequence[Tuple[torch.Tensor, torch.Tensor]]


def _f(t: torch.Tensor) -> torch.Tensor:
    """t in float32, or float64 when it is (the tests' oracle precision)."""
    return t if t.dtype == torch.float64 else t.float()


def ce_proxy(logits: torch.Tensor, h: torch.Tensor, y: torch.Tensor) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The last-layer gradient of CE(z, y) as pairs [(e [B, C], h [B, D])]: e = softmax(z) - onehot(y)."""
    p = F.softmax(_f(logits), dim=1)
    return [(p - F.one_hot(y, p.shape[1]).to(p.dtype), _f(h))]


def trades_proxy(logits: torch.Tensor, h: torch.Tensor, logits_adv: torch.Tensor, h_adv: torch.Tensor,
                 y: torch.Tensor, beta: float) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The last-layer gradient of CE(z, y) + beta * KL(softmax(z) || softmax(z')) as two pairs
    [(e_clean, h), (e_adv, h_adv)] (module docstring; beta once, not twice as the official code)."""
    logp, logq = F.log_softmax(_f(logits), dim=1), F.log_softmax(_f(logits_adv), dim=1)
    p, q = logp.exp(), logq.exp()
    ell = logp - logq
    e_clean = p - F.one_hot(y, p.shape[1]).to(p.dtype) + beta * p * (ell - (p * ell).sum(1, keepdim=True))
    return [(e_clean, _f(h)), (beta * (q - p), _f(h_adv))]


def proxy_gram(pairs: Pairs, rows=None, cols=None) -> torch.Tensor:
    """The Gram matrix <g_i, g_j> of the samples' last-layer gradients given as pairs (module
    docstring), for the samples ``rows`` x ``cols`` (index tensors; None: all), in float64; exactly
    symmetric when rows is cols."""
    def side(idx):  # each pair's rows in float64, converted once (not once per term)
        return [((e if idx is None else e[idx]).double(), (h if idx is None else h[idx]).double()) for e, h in pairs]

    left = side(rows)
    same = rows is cols  # a square Gram: the (k, l) and (l, k) terms are transposes, computed once
    right = left if same else side(cols)
    out = None
    for k, (a, ha) in enumerate(left):
        for m, (b, hb) in enumerate(right):
            if same and m < k:
                continue
            term = (a @ b.T) * (ha @ hb.T + 1.0)
            if same and m > k:
                term = term + term.T
            out = term if out is None else out + term
    # a square Gram exactly symmetric (a @ a.T need not be to the last bit; x + y == y + x is):
    # facility_location reads its similarities' rows for their columns
    return 0.5 * (out + out.T) if same else out


def gram_distances(G: torch.Tensor) -> torch.Tensor:
    """d_ij = sqrt(max(G_ii + G_jj - 2 G_ij, 0)) of a Gram matrix G [n, n] (the clamp absorbs rounding)."""
    d = G.diagonal()
    return (d[:, None] + d[None, :] - 2.0 * G).clamp_min(0.0).sqrt()


def class_budgets(counts: Sequence[int], frac: float) -> List[int]:
    """Per-class subset sizes: max(1, round(frac * n_c)) for every class present (0 for an empty one)."""
    return [0 if n == 0 else min(n, max(1, int(round(frac * n)))) for n in counts]


def facility_location(S: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Lazy greedy maximisation of F(T) = sum_i max_{j in T} S_ij over |T| = k (S: [n, n] symmetric
    similarities >= 0, as those of a distance are). Returns (chosen indices in the order chosen,
    weights = the number of i whose most similar chosen point is each one)."""
    S = S.double().cpu()
    n = S.shape[0]
    k = min(int(k), n)
    cur = torch.zeros(n, dtype=torch.float64)
    # gains of the empty set (upper bounds for ever): one reduction, not n; S symmetric, so column j of
    # S is its row j, a contiguous read where S[:, j] is strided
    heap = [(-g, j) for j, g in enumerate(S.sum(0).tolist())]
    heapq.heapify(heap)
    chosen: List[int] = []
    while len(chosen) < k and heap:
        neg, j = heapq.heappop(heap)
        gain = float((S[j] - cur).clamp_min(0).sum())
        if not heap or gain >= -heap[0][0]:  # still the best: its fresh gain beats every stale bound
            chosen.append(j)
            cur = torch.maximum(cur, S[j])
        else:
            heapq.heappush(heap, (-gain, j))
    idx = torch.tensor(chosen, dtype=torch.long)
    owner = S[idx].argmax(0)
    weights = torch.bincount(owner, minlength=len(chosen)).to(torch.float64)
    return idx, weights


def _nnls_gram(G: np.ndarray, c: np.ndarray, lam: float) -> np.ndarray:
    """argmin_{w >= 0} w^T (G + lam I) w - 2 c^T w, as the NNLS ||L^T w - L^-1 c||^2 (G + lam I = L L^T)."""
    from scipy.linalg import solve_triangular
    from scipy.optimize import nnls

    A = G + (lam + 1e-10 * max(1.0, float(np.abs(np.diag(G)).max()))) * np.eye(G.shape[0])
    L = np.linalg.cholesky(A)
    w, _ = nnls(L.T, solve_triangular(L, c, lower=True), maxiter=50 * G.shape[0])
    return w


def nn_omp(G: torch.Tensor, c: torch.Tensor, k: int, lam: float = 0.5, tol: float = 1e-12):
    """Non-negative orthogonal matching pursuit in Gram form: G [n, n] the candidates' Gram matrix,
    c [n] their inner products with the target t; at most k picks. Returns (indices, weights >= 0),
    the weights from the final regularised NNLS. (NumPy on the CPU: k small solves, each a few
    microseconds there, where torch's per-call overhead dominated.) The NNLS is re-solved from scratch
    after every pick, O(k^4) per class in all: fine for the digits, slow at CIFAR scale (k in the hundreds)."""
    G, c = G.double().cpu().numpy(), c.double().cpu().numpy()
    n = G.shape[0]
    chosen: List[int] = []
    w = np.zeros(0)
    corr = c.copy()
    while len(chosen) < min(k, n):
        corr[chosen] = -np.inf
        j = int(corr.argmax())
        if not corr[j] > tol:
            break
        chosen.append(j)
        w = _nnls_gram(G[np.ix_(chosen, chosen)], c[chosen], lam)
        corr = c - G[:, chosen] @ w
    return torch.tensor(chosen, dtype=torch.long), torch.from_numpy(w)


def fill_random(idx: torch.Tensor, w: torch.Tensor, n: int, k: int, gen: torch.Generator):
    """(idx, w) without the zero weights, topped up to k with uniform random other samples of weight 1."""
    keep = w > 0
    idx, w = idx[keep], w[keep]
    short = k - idx.numel()
    if short > 0:
        free = torch.ones(n, dtype=torch.bool)
        free[idx] = False
        pool = free.nonzero()[:, 0]
        extra = pool[torch.randperm(pool.numel(), generator=gen)[:short]]
        idx = torch.cat([idx, extra])
        w = torch.cat([w, torch.ones(extra.numel(), dtype=w.dtype)])
    return idx, w


def select_class(pairs: Pairs, rule: str, k: int, gen: torch.Generator, lam: float = 0.5):
    """One class's subset (local indices into its samples) and weights by ``rule``: "craig",
    "gradmatch" or "random" (k uniform samples, weight n / k each, so the weights sum to n as CRAIG's do)."""
    n = pairs[0][0].shape[0]
    if rule == "random":
        idx = torch.randperm(n, generator=gen)[:k]
        return idx, torch.full((idx.numel(),), n / max(idx.numel(), 1), dtype=torch.float64)
    G = proxy_gram(pairs)
    if rule == "craig":
        D = gram_distances(G)
        return facility_location(D.max() - D, k)
    idx, w = nn_omp(G, G.sum(1), k, lam)
    return fill_random(idx, w, n, k, gen)
