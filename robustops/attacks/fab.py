"""FAB and FAB-T: the fast adaptive boundary attack (Croce & Hein, "Minimally distorted adversarial
examples with a fast adaptive boundary attack", ICML 2020), a minimum-norm attack, L-inf and L2.

    atk = FAB(model, eps=8/255, steps=100)                    # untargeted, L-inf
    atk = FABT(model, eps=0.5, norm="l2")                     # FAB-T as AutoAttack runs it: 9 targets
    res = atk.perturb(images, labels)                         # FABResult: ... and distance
    res.distance                                              # ||x_adv - x|| (+inf: none found)

The paper's Algorithm 1, as implemented per sample, batched (x_orig the clean input, y its label,
f_l(z) = z_l(z) - z_y(z) the logit differences, [lo, hi] the box ``clip``, p the attack's norm and q
its dual: 1 for L-inf, 2 for L2):

- Line 5 (the hyperplane): at the iterate x(i), the linearisation of f_l is f_l(x(i)) +
  grad f_l(x(i)) . (z - x(i)); untargeted FAB takes the class s = argmin_{l != y}
  |f_l(x(i))| / ||grad f_l(x(i))||_q (the closest linearised boundary), FAB-T the run's target class.
- Lines 6-7 (the projections): delta(i) = argmin ||d||_p subject to the hyperplane of s through
  x(i) + d and x(i) + d in the box; delta_orig(i) the same from x_orig
  (:func:`boundary_projection`, exact; see below).
- Line 8: alpha = min(||delta(i)||_p / (||delta(i)||_p + ||delta_orig(i)||_p), alpha_max), both
  norms at least 1e-8 (the reference's guard against 0 / 0).
- Line 9 (the biased, extrapolated step): x(i+1) = P_box((1 - alpha)(x(i) + eta delta(i)) +
  alpha (x_orig + eta delta_orig(i))), eta the overshoot (1.05).
- Lines 10-15: when the model misclassifies x(i+1), it is recorded if ||x(i+1) - x_orig||_p is
  below the best distance so far, and the backward step x(i+1) = (1 - beta) x_orig + beta x(i+1)
  (beta 0.9) follows.
- Restarts (line 3): the first run starts at x_orig; restart j > 0 at x_orig + r u / ||u||_p
  clipped to the box, u uniform in [-1, 1]^D (L-inf) or a uniform direction (L2), r = min(u*, eps) / 2
  with u* the smallest distance found so far for that sample (over earlier runs), as the paper and
  fra31/fab-attack do (AutoAttack's version resets u* per call, so it uses eps / 2). With eps None
  and nothing found yet, r = DEFAULT_RADIUS[norm] * (hi - lo) / 2 (the reference's default eps:
  0.3 L-inf, 1.0 L2). u comes from ``ops.random_init`` keyed by (derive_seed(seed, run), offset + b),
  so a sample's start depends only on the seed, its index in the stream and the run.
- The final search (the paper's last step; fra31/fab-attack's "linear approximation search", 3
  steps): on the segment from a_in = x_orig (classified y) to a_out = the best adversarial point, with
  l the class predicted at a_out and m(z) = z_y(z) - z_l(z), the next point is
  a = a_in + t (a_out - a_in), t = m(a_in) / (m(a_in) - m(a_out)) (false position: exact for a
  linear model), nudged 1e-3 of (1 - t) toward a_out (a point exactly on the boundary is a tie, or
  rounds to class y, and false position would then never move a_out); it replaces a_out when
  misclassified, else a_in. Where t is not strictly inside
  (0, 1) (a_in on the boundary, a NaN) this implementation bisects (t = 1/2) where the reference
  would repeat a_out: it never stalls. It runs at the end of each run, on the samples that run
  improved, so early exit sees the refined distance. ``final_search=0`` turns it off (AutoAttack's
  FAB has none).

The exact projection (lines 6-7, AutoAttack's projection_linf / projection_l2 solve the same problem
with a bisection over sorted breakpoints; this is a closed form over the same breakpoints). To move
from t onto {z : w . z = b} with z in [lo, hi]^D, w . d = r := b - w . t is needed; coordinate i moves
in the direction s_i = sign(w_i r), by at most room_i = hi - t_i (s_i > 0) or t_i - lo (s_i < 0).
L-inf: the best d at radius lam is d_i = s_i min(lam, room_i), reaching
g(lam) = sum_i |w_i| min(lam, room_i). L2 (KKT: d_i = clip(mu w_i) to the box): d_i = s_i min(mu |w_i|,
room_i), reaching h(mu) = sum_i w_i^2 min(mu, room_i / |w_i|). Both are sum_i a_i min(lam, beta_i):
concave, piecewise linear, nondecreasing; sorting the breakpoints beta_i gives g at every breakpoint
by two cumulative sums, the segment holding |r| by a count, and lam on it in closed form. When even
lam = infinity falls short (the hyperplane misses the box) d moves every coordinate to its face
(the box point closest to the hyperplane in w's direction). In float32 (the iterate, the
gradients and the projection are float32; the model's forward may run under autocast).

Choices the paper leaves open, and the ones made here:

- Gradients: one forward with the input requiring gradients, then one backward per class l != y
  of z_l - z_y (C - 1 backwards; ``retain_graph``) for FAB, one backward of z_t - z_y for FAB-T.
  Measured on CPU (SmallCNN, 8x8 digits, one thread, the full C-logit Jacobian): a loop of backwards
  13.4 ms at 64 points and 80 ms at 256; ``is_grads_batched`` 15.0 / 59.5 ms; ``vmap(jacrev)``
  23.5 / 55.4 ms; replicating the input C times 33 / 113 ms. The loop is best at the batch sizes that
  remain after earlier attacks and needs no vmap support from the model.
- Budget: ``steps`` iterations, each one forward with gradients, the backwards, and one forward
  without gradients at x(i+1) (it decides lines 10-15); the final search adds ``final_search``
  forwards on the improved samples.
- Points the model already misclassifies at x_orig are adversarial at distance 0 (step 0) and not
  attacked (the reference attacks only correctly classified points).
- Success is untargeted misclassification within eps: distance <= eps (eps None: any adversarial
  point). FAB-T's targets only choose the hyperplane (AutoAttack's FAB-T); its target t-th run
  attacks the t-th most likely class other than y at x_orig, as APGD-T orders them.
- Early exit (``early_stop``, eps given): after each run (restart or target), samples whose distance
  is <= eps leave; later runs attack only the others (AutoAttack's restarts attack the points not yet
  fooled within eps). Within a run every sample does all iterations (the distance keeps shrinking).
  With eps None nothing leaves: every run attacks every sample, for the smallest distance.
- The result per sample: x_adv the point of smallest distance over all runs (x where none), its run
  (``restart``: target number * restarts + restart), ``success_step`` the iteration 1..steps that
  found the point the final search refined (-1 none, 0 misclassified at x), ``loss`` the margin
  z_y - max_{k != y} z_k at x_adv (negative when fooled), ``pred`` the prediction there. Samples in
  ``skip`` report success with step 0 (and distance +inf unless attacked), as APGD does.
- Half-precision images: the attack runs in float32 and x_adv is rounded to the images' dtype;
  distance is measured on the rounded x_adv.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import _checks, _rng, ops
from .base import Attack, Param
from .engine import AttackResult, layout, predictions, to_layout

__all__ = ["FAB", "FABT", "FABResult", "boundary_projection", "lp_norm", "margin", "DEFAULT_RADIUS"]

#: Restart radius (times hi - lo, halved) when eps is None and nothing was found yet: the reference's default eps.
DEFAULT_RADIUS = {"linf": 0.3, "l2": 1.0}
_NORMS = ("linf", "l2")
#: The final search's points move this share of the remaining gap past the false-position estimate,
#: so that a point on a (locally) linear boundary lands on its adversarial side: exactly on it, a
#: tie or a rounding error would classify it y, and a_out would never move.
_NUDGE = 1e-3


@dataclass
class FABResult(AttackResult):
    """:class:`~robustops.attacks.engine.AttackResult` plus ``distance``: FloatTensor[B], the norm
    ||x_adv - x|| of the smallest adversarial example found (+inf where none was found, 0 where x is
    already misclassified)."""
    distance: Optional[torch.Tensor] = None


def lp_norm(v: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-row norm of v [N, ...]: max |v| ("linf") or the Euclidean norm ("l2"), in float32."""
    v = v.reshape(v.shape[0], -1).float()
    if norm == "linf":
        return v.abs().amax(1) if v.shape[1] else v.new_zeros(v.shape[0])
    return v.norm(dim=1)


def margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """z_y - max_{k != y} z_k per row: positive when y is predicted, negative when fooled."""
    z = logits.float()
    zy = z.gather(1, labels[:, None]).squeeze(1)
    return zy - z.scatter(1, labels[:, None], float("-inf")).amax(1)


def _breakpoint_solve(a: torch.Tensor, brk: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
    """Per row, the smallest lam >= 0 with sum_i a_i min(lam, brk_i) >= need (a, brk >= 0, [N, D];
    need [N]); +inf where no lam reaches it. g(lam) is concave and piecewise linear with kinks at the
    brk_i: its value at each sorted kink comes from two cumulative sums, the segment holding need from
    a count (g is nondecreasing), and lam on that segment from g(lam) = S + lam W."""
    bs, order = brk.sort(dim=1)
    as_ = a.gather(1, order)
    total = a.sum(1, keepdim=True)
    S = torch.cumsum(as_ * bs, dim=1)                         # sum_{j <= k} a_j brk_j
    W = (total - torch.cumsum(as_, dim=1)).clamp_min(0.0)     # sum_{j > k} a_j (rounding can go below 0)
    G = S + bs * W                                            # g(brk_k)
    k = (G < need[:, None]).sum(1, keepdim=True)              # kinks below the solution
    D = a.shape[1]
    prev = (k - 1).clamp_min(0)
    S_prev = torch.where(k > 0, S.gather(1, prev), 0.0)
    W_prev = torch.where(k > 0, W.gather(1, prev), total)
    lam = (need[:, None] - S_prev) / W_prev.clamp_min(torch.finfo(a.dtype).tiny)
    lam = torch.where(k >= D, float("inf"), lam.clamp_min(0.0))
    return lam.squeeze(1)


def boundary_projection(t: torch.Tensor, w: torch.Tensor, r: torch.Tensor, norm: str, lo: float,
                        hi: float) -> torch.Tensor:
    """The minimal-norm move onto a hyperplane inside a box: per row, d = argmin ||d||_p subject to
    w . d = r and lo <= t + d <= hi, for t, w [N, D] (t in the box) and r [N] (float32; norm "linf" or
    "l2"). Where the hyperplane misses the box, d moves each coordinate to the face in the direction
    sign(w_i r) (the closest the box gets). Exact (module docstring); no per-row loop."""
    if norm not in _NORMS:
        raise ValueError(f'norm must be "linf" or "l2", got {norm!r}')
    s = torch.sign(w) * torch.sign(r)[:, None]
    room = torch.where(s > 0, hi - t, t - lo).clamp_min(0.0)
    aw = w.abs()
    moving = s != 0
    if norm == "linf":
        a, brk = aw, room
    else:
        a = aw * aw
        brk = (room / aw.clamp_min(torch.finfo(aw.dtype).tiny)).clamp_max(1e30)
    a = torch.where(moving, a, 0.0)
    brk = torch.where(moving & (a > 0), brk, 0.0)
    lam = _breakpoint_solve(a, brk, r.abs())[:, None]
    step = lam if norm == "linf" else lam * aw
    return torch.where(moving, s * torch.minimum(step, room), 0.0)


class _Run:
    """Per-sample state of one run on the rows ``idx`` of the batch: x0 / x1 / best as flat float32
    [n, D] (x_orig, the iterate, the best adversarial point), u the best distance (+inf), its
    iteration and logits."""

    def __init__(self, idx, x0, x1, y, t, shape, fmt):
        self.idx, self.x0, self.x1, self.y, self.t = idx, x0, x1, y, t
        self.shape, self.fmt = shape, fmt
        n = idx.numel()
        self.best = x0.clone()
        self.u = torch.full((n,), float("inf"), device=x0.device)
        self.step = torch.full((n,), -1, dtype=torch.int64, device=x0.device)
        self.logits = None

    def image(self, z: torch.Tensor) -> torch.Tensor:
        """Flat rows z [n, D] as images in the batch's shape and layout (the model's input)."""
        return to_layout(z.view(z.shape[0], *self.shape), self.fmt)


class FAB(Attack):
    """FAB (Croce & Hein 2020, Algorithm 1), untargeted, L-inf or L2: the smallest adversarial
    perturbation it finds, per sample. See the module docstring for the equations implemented and
    the choices the paper leaves open.

    model, clip, mean / std, dtype, train_mode, seed: as :class:`~robustops.attacks.base.Attack`.
    eps: None (minimum-norm mode: success = any adversarial point found), a float or a Tensor[B]
      (success = distance <= eps; it also bounds the restart radius). norm: "linf" or "l2".
    steps: iterations per run (>= 1). restarts: runs per target (the first from x, the others from
      random points at radius min(best distance, eps) / 2). alpha_max: the largest bias toward x
      (0.1, in [0, 1]). eta: the overshoot (1.05, >= 1). beta: the backward step (0.9, in [0, 1]).
    final_search: false-position steps between x and the best point at the end of each run (3; 0:
      none). early_stop: with eps, samples fooled within eps (and ``skip`` samples) are not attacked
      by later runs.
    """

    result_fields = ("distance",)

    def __init__(self, model, eps: Optional[Param] = None, norm: str = "linf", steps: int = 100,
                 restarts: int = 1, alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9,
                 seed: Optional[int] = None, clip=(0.0, 1.0), mean=None, std=None, dtype=None,
                 early_stop: bool = True, train_mode: bool = False, final_search: int = 3):
        super().__init__(model, clip=clip, mean=mean, std=std, seed=seed, train_mode=train_mode, dtype=dtype)
        if norm not in _NORMS:
            raise ValueError(f'norm must be "linf" or "l2", got {norm!r}')
        self.norm = norm
        self.eps = None if eps is None else _checks.check_sample_param(eps, "eps")
        self.steps = _checks.check_int(steps, "steps", 1)
        self.restarts = _checks.check_int(restarts, "restarts", 1)
        self.alpha_max = _checks.check_number(alpha_max, "alpha_max", 0.0, maximum=1.0)
        self.eta = _checks.check_number(eta, "eta", 1.0)
        self.beta = _checks.check_number(beta, "beta", 0.0, maximum=1.0)
        self.final_search = _checks.check_int(final_search, "final_search", 0)
        self.early_stop = bool(early_stop)
        self.engine = self.make_engine(norm)

    def __repr__(self) -> str:
        eps = self.eps if not isinstance(self.eps, torch.Tensor) else f"Tensor[{self.eps.numel()}]"
        return (f"{type(self).__name__}(eps={eps}, norm={self.norm!r}, steps={self.steps}, restarts={self.restarts}, "
                f"alpha_max={self.alpha_max}, eta={self.eta}, beta={self.beta}, early_stop={self.early_stop})")

    @staticmethod
    def success(logits, y):
        """Untargeted: the model predicts a class other than the label (NaN logits predict nothing)."""
        pred = predictions(logits)
        return (pred != y[0]) & (pred >= 0)

    # --------------------------------------------------------------------------------- call

    def perturb(self, images: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor] = None,
                eps: Optional[Param] = None, offset: Optional[int] = None, skip: Optional[torch.Tensor] = None,
                evaluate: bool = True) -> FABResult:
        """Runs the attack on images [B, ...] in clip with labels [B]. eps overrides the attack's (a
        float or Tensor[B]; None keeps it). offset: this batch's first sample in the random stream.
        skip: BoolTensor[B] of samples counted as already fooled (not attacked with early_stop).
        evaluate is accepted for PGD's signature (loss / pred are always known here). ``targets``
        must be None (FAB-T picks its own)."""
        return super().perturb(images, labels, targets, offset=offset, skip=skip, evaluate=evaluate, eps=eps)

    def prepare(self, x: torch.Tensor, eps: Optional[Param] = None) -> dict:
        """eps per sample: a float32 Tensor[B] on x's device, +inf for eps None (no bound)."""
        B, device = x.shape[0], x.device
        eps = self.eps if eps is None else eps
        if eps is None:
            return {"eps": torch.full((B,), float("inf"), device=device)}
        eps = _checks.sample_param_on(eps, "eps", B, device)
        if not isinstance(eps, torch.Tensor):
            eps = torch.full((B,), float(eps), dtype=torch.float32, device=device)
        return {"eps": eps}

    def empty_result(self, x: torch.Tensor, **params) -> FABResult:
        """The result for an empty batch."""
        r = super().empty_result(x)
        return FABResult(r.x_adv, r.success, r.success_step, r.restart, r.loss, r.pred,
                         torch.zeros(0, device=x.device))

    def _run_targets(self, clean_logits: torch.Tensor, y: torch.Tensor):
        """The per-run target classes: [None] (untargeted: the closest boundary at each iterate)."""
        return [None]

    def attack(self, x, y, targets, *, seed: int, offset: int, skip, evaluate, eps) -> FABResult:
        """Runs per target and restart, each on the samples that no earlier run fooled within eps."""
        B, device = x.shape[0], x.device
        with torch.no_grad():
            clean = self.engine.logits(x)
        pred = predictions(clean)
        mis = (pred != y) & (pred >= 0)
        res = FABResult(x.clone(memory_format=torch.preserve_format), mis.clone(),
                        torch.where(mis, 0, -1), torch.zeros(B, dtype=torch.int64, device=device),
                        margin(clean, y), pred, torch.where(mis, 0.0, float("inf")))
        bounded = torch.isfinite(eps)
        run = 0
        for t in self._run_targets(clean, y):
            for r in range(self.restarts):
                todo = ~mis
                if self.early_stop:
                    todo &= ~(bounded & (res.distance <= eps))
                    if skip is not None:
                        todo &= ~skip
                idx = todo.nonzero().squeeze(1)
                if idx.numel() == 0:
                    break
                self._run(res, run, x, y, t, eps, clean, idx, r > 0, _rng.derive_seed(seed, run), offset)
                run += 1
        res.success = res.distance <= eps
        if skip is not None:
            res.success_step = torch.where(skip & ~res.success, 0, res.success_step)
            res.success = res.success | skip
        return res

    # ------------------------------------------------------------------------------ one run

    def _start(self, x: torch.Tensor, res: FABResult, eps, idx, seed: int, offset: int) -> torch.Tensor:
        """Restart points for rows idx (flat float32): x + r u / ||u||_p clipped, r = min(best, eps) / 2.
        u is drawn for the whole batch (ops.random_init keyed by offset + b), then rows are picked."""
        lo, hi = self.clip
        u = ops.random_init(torch.zeros(x.shape, dtype=torch.float32, device=x.device), 1.0, self.norm,
                            -1.0, 1.0, seed=seed, offset=offset, radius="uniform")
        u = u.index_select(0, idx).reshape(idx.numel(), -1)
        u = u / lp_norm(u, self.norm).clamp_min(1e-12)[:, None]
        radius = torch.minimum(res.distance.index_select(0, idx), eps.index_select(0, idx))
        radius = torch.where(torch.isfinite(radius), radius, DEFAULT_RADIUS[self.norm] * (hi - lo))
        x0 = x.index_select(0, idx).reshape(idx.numel(), -1).float()
        return (x0 + 0.5 * radius[:, None] * u).clamp(lo, hi)

    def _run(self, res: FABResult, run: int, x, y, t, eps, clean, idx, random: bool, seed: int,
             offset: int) -> None:
        """One run of Algorithm 1 (lines 4-16) on the rows idx; improvements are written to res."""
        n = idx.numel()
        x0 = x.index_select(0, idx).reshape(n, -1).float()
        x1 = self._start(x, res, eps, idx, seed, offset) if random else x0.clone()
        s = _Run(idx, x0, x1, y.index_select(0, idx), None if t is None else t.index_select(0, idx),
                 x.shape[1:], layout(x))
        for i in range(self.steps):
            df, dg = self._boundaries(s)
            s.x1 = self._step(s, df, dg)
            with torch.no_grad():
                logits = self.engine.logits(s.image(s.x1))
            adv = self.success(logits, (s.y, None))
            dist = lp_norm(s.x1 - s.x0, self.norm)
            better = adv & (dist < s.u)
            s.best = torch.where(better[:, None], s.x1, s.best)
            s.u = torch.where(better, dist, s.u)
            s.step = torch.where(better, i + 1, s.step)
            s.logits = logits if s.logits is None else torch.where(better[:, None], logits, s.logits)
            s.x1 = torch.where(adv[:, None], s.x0 + self.beta * (s.x1 - s.x0), s.x1)    # line 14
        found = s.step >= 0
        if self.final_search and bool(found.any()):
            self._final_search(s, clean.index_select(0, idx), found)
        self._write(res, run, x, s)

    def _boundaries(self, s: _Run):
        """(f [n, K], grad f [n, K, D]) at the iterate for the K candidate boundaries: f_l = z_l - z_y
        for the C - 1 classes l != y (FAB: one backward each), or the target's alone (FAB-T)."""
        xin = s.image(s.x1).detach().requires_grad_(True)
        with torch.enable_grad():
            logits = self.engine.logits(xin)
            C = logits.shape[1]
            if s.t is not None:
                cls = s.t[:, None]
            else:
                k = torch.arange(C - 1, device=logits.device)[None, :]
                cls = k + (k >= s.y[:, None]).long()           # the classes other than y, in order
            K = cls.shape[1]
            grads = []
            for j in range(K):
                go = torch.zeros_like(logits)
                go.scatter_(1, cls[:, j:j + 1], 1.0)
                go.scatter_add_(1, s.y[:, None], -torch.ones_like(go[:, :1]))
                (g,) = torch.autograd.grad(logits, xin, go, retain_graph=j < K - 1, allow_unused=True)
                grads.append(torch.zeros_like(s.x1) if g is None else g.reshape(s.x1.shape).float())
        z = logits.detach()
        df = z.gather(1, cls) - z.gather(1, s.y[:, None])
        return df, torch.stack(grads, 1)

    def _step(self, s: _Run, df: torch.Tensor, dg: torch.Tensor) -> torch.Tensor:
        """Lines 5-9: the closest linearised boundary, both projections onto it, the biased step."""
        n = df.shape[0]
        q = dg.abs().sum(2) if self.norm == "linf" else dg.norm(dim=2)        # the dual norm of the gradients
        sel = (df.abs() / (q + 1e-12)).argmin(1)
        rows = torch.arange(n, device=df.device)
        w, f = dg[rows, sel], df[rows, sel]
        # the hyperplane f + w . (z - x1) = 0: from x1 it needs w . d = -f, from x0 w . d = -f + w . (x1 - x0)
        r0 = -f + (w * (s.x1 - s.x0)).sum(1)
        lo, hi = self.clip
        d = boundary_projection(torch.cat((s.x1, s.x0)), torch.cat((w, w)), torch.cat((-f, r0)), self.norm, lo, hi)
        d1, d2 = d[:n], d[n:]
        n1 = lp_norm(d1, self.norm).clamp_min(1e-8)
        n2 = lp_norm(d2, self.norm).clamp_min(1e-8)
        a = (n1 / (n1 + n2)).clamp(0.0, self.alpha_max)[:, None]
        return ((1 - a) * (s.x1 + self.eta * d1) + a * (s.x0 + self.eta * d2)).clamp(lo, hi)

    @torch.no_grad()
    def _final_search(self, s: _Run, clean: torch.Tensor, found: torch.Tensor) -> None:
        """False position on [x0, best] for the found rows (module docstring): best moves toward x0
        and stays adversarial."""
        rows = found.nonzero().squeeze(1)
        y = s.y.index_select(0, rows)
        a_in, a_out = s.x0.index_select(0, rows), s.best.index_select(0, rows)
        z_in, z_out = clean, s.logits.index_select(0, rows)
        z_in = z_in.index_select(0, rows)
        for _ in range(self.final_search):
            lab = predictions(z_out).clamp_min(0)[:, None]
            m_in = (z_in.gather(1, y[:, None]) - z_in.gather(1, lab)).squeeze(1)
            m_out = (z_out.gather(1, y[:, None]) - z_out.gather(1, lab)).squeeze(1)
            tt = m_in / (m_in - m_out)
            tt = torch.where((tt > 0) & (tt < 1), tt, 0.5)
            tt = (tt + _NUDGE * (1 - tt))[:, None]
            a = a_in + tt * (a_out - a_in)
            z = self.engine.logits(s.image(a))
            adv = self.success(z, (y, None))[:, None]
            a_in, z_in = torch.where(adv, a_in, a), torch.where(adv, z_in, z)
            a_out, z_out = torch.where(adv, a, a_out), torch.where(adv, z, z_out)
        s.best[rows] = a_out
        s.logits[rows] = z_out
        s.u[rows] = lp_norm(a_out - s.x0.index_select(0, rows), self.norm)

    def _write(self, res: FABResult, run: int, x: torch.Tensor, s: _Run) -> None:
        """Rows of s whose best distance beats the result's take it (x_adv rounded to x's dtype and
        its distance measured after rounding)."""
        old = res.distance.index_select(0, s.idx)
        better = s.u < old
        if not bool(better.any()):
            return
        ti = s.idx[better]
        xa = s.best[better].view(-1, *s.shape).to(x.dtype)
        res.x_adv[ti] = xa
        res.distance[ti] = lp_norm(xa.float() - x.index_select(0, ti).float(), self.norm)
        res.success_step[ti] = s.step[better]
        res.restart[ti] = run
        res.loss[ti] = margin(s.logits[better], s.y[better])
        res.pred[ti] = predictions(s.logits[better])


class FABT(FAB):
    """FAB-T as AutoAttack runs it: run t (t = 0 .. n_target_classes - 1) linearises only the boundary
    between y and the t-th most likely class other than y at x (clean logits, in the attack's model
    mode), with ``restarts`` runs each; success stays untargeted misclassification within eps, and
    with early_stop later runs attack only the samples no earlier run fooled. At most C - 1 targets.
    ``restart`` in the result is target number * restarts + restart. Other options as :class:`FAB`."""

    def __init__(self, model, eps: Optional[Param] = None, norm: str = "linf", steps: int = 100,
                 restarts: int = 1, n_target_classes: int = 9, **kwargs):
        super().__init__(model, eps, norm=norm, steps=steps, restarts=restarts, **kwargs)
        self.n_target_classes = _checks.check_int(n_target_classes, "n_target_classes", 1)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", n_target_classes={self.n_target_classes})"

    def _run_targets(self, clean_logits: torch.Tensor, y: torch.Tensor):
        C = clean_logits.shape[1]
        if C < 2:
            raise ValueError(f"FAB-T needs at least 2 classes, the model has {C}")
        others = clean_logits.scatter(1, y[:, None], float("-inf"))
        order = others.argsort(dim=1, descending=True, stable=True)
        return [order[:, k].contiguous() for k in range(min(self.n_target_classes, C - 1))]
