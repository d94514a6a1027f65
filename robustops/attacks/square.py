"""Square Attack (Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient black-box
adversarial attack via random search", ECCV 2020): score-based random search over square-shaped
updates, L-inf and L2, without any gradient.

    atk = Square(model, eps=8/255, n_queries=5000)             # L-inf, margin loss, AutoAttack's p_init 0.8
    res = atk.perturb(images, labels)                          # SquareResult: x_adv, success, queries, ...
    atk = Square(model, eps=0.5, norm="l2")

Every model call runs under ``torch.no_grad()``: the attack needs logits only, so it works on a model
whose forward is itself wrapped in ``torch.no_grad`` or has no autograd at all, and it is the attack
that reveals gradient masking (it succeeds where gradient attacks see a zero gradient).

What is implemented (x: the clean input, x^: the current best point, L: the loss, minimised; every
point is first projected on the eps-ball around x and then clipped to the box [lo, hi]):

- Algorithm 1 (random search): x^ = init(x), l* = L(f(x^), y); then per iteration i = 0, 1, ...:
  a side length h(i) from the schedule, an update delta ~ P(eps, h(i), x^, x), x_new = Pi(x^ + delta),
  l_new = L(f(x_new), y); x^ = x_new and l* = l_new when l_new < l* (or when x_new fools the model,
  as AutoAttack does); a sample stops when x^ fools the model (``early_stop``).
- The loss: "margin" L = z_y - max_{k != y} z_k (the paper's default), or "ce" L = -CE(z, y)
  (AutoAttack's option). Success is misclassification (``Attack.success``: argmax != y, NaN logits
  never count), so a tie z_y == max_{k != y} z_k is not a success unless argmax picks another class.
- The schedule of p (the fraction of pixels changed per update), :func:`square_p_selection`: p_init,
  halved after iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 (p = p_init / 2 for
  10 < i <= 50, ..., p_init / 512 for i > 8000), as ``p_selection`` of the authors' code and of
  AutoAttack. ``rescale_schedule=True`` first maps i to int(i / n_queries * 10000), the authors'
  rule (their code always rescales; AutoAttack's ``resc_schedule`` defaults to True, but its
  standard suite builds SquareAttack with ``resc_schedule=False``, 5000 queries, p_init 0.8: the
  default here).
- The side: h(i) = round(sqrt(p * H * W)) (Python's round, as both references), at least 1 (L-inf)
  or 3 and odd (L2, +1 when even, as the references), at most min(H, W) (the largest odd side
  <= min(H, W) for L2). The authors' L-inf code caps at H - 1 and AutoAttack not at all; with
  p_init <= 1 and square images the cap changes nothing but p_init = 1 on tiny images.
- L-inf init: vertical stripes, x^ = clip(x + eps * r) with r in {-1, +1} drawn per sample, channel
  and column (constant down each column).
- L-inf update (Algorithm 2): a window of h x h pixels at a uniform position in {0..H-h} x
  {0..W-h}; every channel of the window is set to x + eps * rho_c, rho_c uniform in {-1, +1}
  (x^ + 2 eps rho_c projected on the ball, as the paper writes it). When the draw would leave the
  window unchanged (all channels already at those values), the signs are redrawn, as the authors'
  code does (AutoAttack's port does not, and spends the query): the redraw is exact in one step (the
  unchanged sign vector is unique for eps > 0, so the new signs are uniform over the 2^C - 1 others;
  for C > 24 channels, an event of probability 2^-C per query, all signs are flipped instead).
- L2 init: a grid of squares of side s = H // 5 (at least 1) starting at (H - 5 s) // 2 on each axis,
  as many as fit; each square and channel holds rho * eta (eta the meta pseudo-Gaussian of side s,
  transposed with probability 1/2, rho in {-1, +1}); delta is scaled to ||delta||_2 = eps, then x^ =
  clip(x + delta).
- eta^(h1, h2) (:func:`eta_rectangle`): eta_{r,c} = sum_{k=d(r,c)}^{K} 1 / (k + 1)^2 with
  d(r, c) = max(|r - h1 // 2|, |c - h2 // 2|) (0-based) and K = max(h1 // 2, h2 // 2), normalised to
  unit L2 norm; the meta pseudo-Gaussian (:func:`meta_pseudo_gaussian`) of side s stacks
  eta^(s//2, s) on -eta^(s - s//2, s) and normalises, as the authors' code does.
- L2 update (Algorithm 3): nu = x^ - x; windows W1, W2 of side h at uniform positions; per channel c,
  rho_c in {-1, +1} and nu_temp = rho_c eta / ||eta|| + nu_{W1,c} / ||nu_{W1,c}||; the budget
  eps_c = sqrt(||nu_{W1 u W2, c}||^2 + max(eps^2 - ||nu||^2, 0) / C); nu_{W2,c} = 0; nu_{W1,c} =
  eps_c nu_temp / ||nu_temp||. Then nu is rescaled to ||nu||_2 = eps (a no-op up to rounding: the
  mass removed from W1 u W2 plus the unused budget is what W1 receives) and x_new = clip(x + nu).
  eta is transposed with probability 1/2 per sample and query.

Choices beyond the paper, and where the references differ:

- Window positions are drawn per sample (the authors' L-inf code draws per image; their L2 code and
  AutoAttack share one position across the batch per iteration), uniform in {0, ..., H - h} as the
  paper says; both references draw in {0, ..., H - h - 1} (an exclusive upper bound) and so never
  touch the last row and column after the init. Cost measured on one CPU thread, B = 256 images
  3x32x32, nothing broken: 5.6 ms (L-inf; 7.0 before the window masks were gathered from a cached
  table and the stuck check became a uint8 amin) and 12 ms (L2) per iteration besides the model,
  whose forward alone took 0.6 ms (a linear model) and 190 ms (SmallCNN); the masks are a few
  elementwise passes over the batch, the same order as the update itself.
- Randomness: every draw comes from ``ops.random_init``'s Philox stream, keyed by (seed, restart,
  iteration) and the sample's index offset + b: a sample's draws do not depend on which other
  samples are in the batch or still attacked, so any split of a batch gives the same answer (up to
  the model's own batch-size rounding).
- Budget and query counting: ``n_queries`` is the most model evaluations per sample and restart:
  the init point's evaluation plus n_queries - 1 updates (the authors' L-inf code; AutoAttack runs
  n_queries updates after the init, n_queries + 1 evaluations). ``SquareResult.queries`` counts
  exactly the rows of that sample fed to the model over all restarts: 1 for the init point, then one
  per update while it is unbroken. No clean evaluation is made: a sample misclassified at x costs
  1 query when its init point is misclassified too (it is then broken at query 1); samples in
  ``skip`` cost 0 (success, success_step 0). A sample fooled at query q stops there, so for a broken
  sample success_step == queries (AutoAttack's n_queries counts the same: its init point is 1).
- early_stop=False keeps broken samples in the batch until the budget is spent (their queries count)
  and attacks ``skip`` samples too; the answer (x_adv, success, success_step) is the same.
- Restarts attack only samples that no earlier restart broke; a new restart draws a new init.
- The result: x_adv is the first adversarial point found; otherwise the point of lowest loss over the
  restarts. ``loss`` is L at x_adv (the margin by default: negative means fooled with a strict
  margin), ``pred`` the prediction there, ``restart`` the restart that produced x_adv.
- Inputs must be images [B, C, H, W]; eps a float or Tensor[B] (per sample).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _checks, _rng, ops
from .base import Attack, Param
from .engine import AttackResult, batch_view_shape, predictions

__all__ = ["Square", "SquareResult", "square_p_selection", "square_side", "eta_rectangle", "meta_pseudo_gaussian",
           "P_HALVINGS"]

#: The iterations after which p is halved (AutoAttack's and the authors' ``p_selection``).
P_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)

#: Above this many channels the L-inf redraw flips every sign (see the module docstring).
_EXACT_REDRAW_CHANNELS = 24

#: The most booleans in a cached table of every window position's mask (per side and image size).
_WINDOW_TABLE_ELEMENTS = 1 << 22


def square_p_selection(it: int, n_queries: int, p_init: float, rescale: bool = False) -> float:
    """p at iteration ``it`` (0 = the first update after the init): p_init / 2^k, k the number of
    P_HALVINGS strictly below it (p_init for it <= 10, p_init / 2 for 10 < it <= 50, ...,
    p_init / 512 for it > 8000). rescale maps it to int(it / n_queries * 10000) first."""
    it = _checks.check_int(it, "it", 0)
    n_queries = _checks.check_int(n_queries, "n_queries", 1)
    p_init = _check_p_init(p_init)
    if rescale:
        it = int(it / n_queries * 10000)
    return p_init / 2 ** sum(it > b for b in P_HALVINGS)


def square_side(p: float, h: int, w: int, norm: str) -> int:
    """The side of the update window for fraction p on an H x W image: round(sqrt(p H W)), at least
    1 (L-inf) or 3 and odd (L2), at most min(H, W) (the largest odd side there for L2)."""
    s = int(round(math.sqrt(p * h * w)))
    m = min(h, w)
    if norm == "linf":
        return min(max(s, 1), m)
    s = max(s, 3)
    s += 1 - s % 2
    if s > m:
        s = max(m - 1 + m % 2, 1)
    return s


def eta_rectangle(h1: int, h2: int, device=None) -> torch.Tensor:
    """eta^(h1, h2) [h1, h2]: entry (r, c) = sum_{k=d}^{K} 1/(k+1)^2, d = max(|r - h1//2|, |c - h2//2|),
    K = max(h1//2, h2//2), normalised to unit L2 norm (empty for h1 = 0)."""
    r = (torch.arange(h1, device=device) - h1 // 2).abs()
    c = (torch.arange(h2, device=device) - h2 // 2).abs()
    d = torch.maximum(r[:, None], c[None, :])
    K = max(h1 // 2, h2 // 2)
    tail = torch.cat([(1.0 / torch.arange(1, K + 2, device=device, dtype=torch.float64) ** 2).flip(0).cumsum(0)
                      .flip(0), torch.zeros(1, device=device, dtype=torch.float64)])
    eta = tail[d.clamp(max=K + 1)]
    return (eta / eta.norm().clamp_min(1e-300)).float()


def meta_pseudo_gaussian(s: int, device=None) -> torch.Tensor:
    """The L2 attack's update pattern [s, s]: eta^(s//2, s) over -eta^(s - s//2, s), unit L2 norm."""
    eta = torch.cat([eta_rectangle(s // 2, s, device), -eta_rectangle(s - s // 2, s, device)])
    return eta / eta.norm()


def _check_p_init(p) -> float:
    if not _checks.is_number(p) or not 0.0 < float(p) <= 1.0:
        raise ValueError(f"p_init must be a float in (0, 1] (the initial fraction of pixels changed), got {p!r}")
    return float(p)


@dataclass
class SquareResult(AttackResult):
    """:class:`AttackResult` plus ``queries``: LongTensor[B], the model evaluations spent on each
    sample (the init point's, and one per update while unbroken, over all restarts; 0 for ``skip``).
    success_step is the query number at which the sample was broken (-1: never, 0: skip); loss is
    the attack's (minimised) loss at x_adv (+inf and pred -1 where nothing was evaluated: skip)."""
    queries: Optional[torch.Tensor] = None


class _Run:
    """The rows still attacked in one restart: global indices, clean and best points, loss, prediction."""

    fields = ("gidx", "xs", "xb", "lb", "pb", "ys", "es", "xp", "xm")

    def keep(self, rows: torch.Tensor) -> None:
        for name in self.fields:
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, v.index_select(0, rows))


class Square(Attack):
    """Square Attack (Andriushchenko et al. 2020), untargeted, L-inf or L2, gradient-free. See the
    module docstring for the equations and choices.

    eps: radius, a float or a Tensor[B]. norm: "linf" or "l2". n_queries: the most model
    evaluations per sample and restart (the init point's included). p_init: the initial fraction of
    pixels per update, in (0, 1] (AutoAttack: 0.8). restarts: later ones attack only the samples
    still unbroken. loss: "margin" or "ce". rescale_schedule: map the iteration to a 10000-query
    budget before the p schedule (the authors' code; AutoAttack's standard suite: False).
    early_stop: broken samples leave the batch (stop costing queries); the answer is the same
    without it. model, seed, clip, mean / std, dtype, train_mode: as
    :class:`~robustops.attacks.base.Attack`."""

    result_fields = ("queries",)

    def __init__(self, model, eps: Param, norm: str = "linf", n_queries: int = 5000, p_init: float = 0.8,
                 restarts: int = 1, loss: str = "margin", seed: Optional[int] = None, clip=(0.0, 1.0), mean=None,
                 std=None, dtype=None, early_stop: bool = True, train_mode: bool = False,
                 rescale_schedule: bool = False):
        if loss not in ("margin", "ce"):
            raise ValueError(f'loss must be "margin" or "ce", got {loss!r}')
        if norm not in ("linf", "l2"):
            raise ValueError(f'norm must be "linf" or "l2", got {norm!r}')
        super().__init__(model, loss="ce", clip=clip, mean=mean, std=std, seed=seed, train_mode=train_mode,
                         dtype=dtype)
        self.loss = loss
        self.norm = norm
        self.eps = _checks.check_sample_param(eps, "eps")
        self.n_queries = _checks.check_int(n_queries, "n_queries", 1)
        self.p_init = _check_p_init(p_init)
        self.restarts = _checks.check_int(restarts, "restarts", 1)
        self.early_stop = bool(early_stop)
        self.rescale_schedule = bool(rescale_schedule)
        self.engine = self.make_engine(norm)
        self._etas = {}
        self._zeros = {}
        self._spans = {}

    def __repr__(self) -> str:
        eps = self.eps if not isinstance(self.eps, torch.Tensor) else f"Tensor[{self.eps.numel()}]"
        return (f"Square(eps={eps}, norm={self.norm!r}, n_queries={self.n_queries}, p_init={self.p_init}, "
                f"restarts={self.restarts}, loss={self.loss!r}, rescale_schedule={self.rescale_schedule})")

    # ------------------------------------------------------------------------ the objective

    def square_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss minimised, per sample: the margin z_y - max_{k != y} z_k, or -CE(z, y)."""
        if self.loss == "ce":
            return -F.cross_entropy(logits, labels, reduction="none")
        zy = logits.gather(1, labels[:, None]).squeeze(1)
        return zy - logits.scatter(1, labels[:, None], float("-inf")).amax(1)

    def objective(self, logits, y):
        """The ascended objective of the base's interface: minus :meth:`square_loss`."""
        return -self.square_loss(logits, y[0])

    @staticmethod
    def success(logits, y):
        """Untargeted: the prediction is another class than the label (NaN logits: no success)."""
        pred = predictions(logits)
        return (pred != y[0]) & (pred >= 0)

    def _query(self, xq: torch.Tensor, ys: torch.Tensor):
        """(loss, success, prediction) at the points xq: one model evaluation per row, no gradients."""
        with torch.no_grad():
            logits = self.engine.logits(xq)
            pred = predictions(logits)                  # once: success is derived from it (no second argmax)
            return self.square_loss(logits, ys), (pred != ys) & (pred >= 0), pred

    # --------------------------------------------------------------------------------- call

    def perturb(self, images: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor] = None,
                eps: Optional[Param] = None, offset: Optional[int] = None, skip: Optional[torch.Tensor] = None,
                evaluate: bool = True) -> SquareResult:
        """Runs the attack on images [B, C, H, W] in clip with labels [B]. eps overrides the attack's
        (float or Tensor[B]). offset: index of this batch's first sample in the random stream
        (default: the samples this attack has seen). skip: BoolTensor[B] of samples counted as
        already broken (0 queries; with early_stop not attacked). evaluate is accepted for the common
        signature: loss and pred at x_adv are always known. ``targets`` must be None."""
        return super().perturb(images, labels, targets, offset=offset, skip=skip, evaluate=evaluate, eps=eps)

    def prepare(self, x: torch.Tensor, eps: Optional[Param] = None) -> dict:
        """Checks that x is a batch of images [B, C, H, W]; eps per sample as a float32 Tensor[B]."""
        if x.dim() != 4:
            video = (" (videos [B, T, C, H, W] are not supported: its square windows are drawn per image; "
                     "attack them with PGD / APGD / FAB, which take any [B, ...])") if x.dim() == 5 else ""
            raise ValueError(f"Square attacks images [B, C, H, W], got shape {list(x.shape)}{video}")
        B, device = x.shape[0], x.device
        eps = _checks.sample_param_on(self.eps if eps is None else eps, "eps", B, device)
        if not isinstance(eps, torch.Tensor):
            eps = torch.full((B,), float(eps), dtype=torch.float32, device=device)
        return {"eps": eps}

    def empty_result(self, x: torch.Tensor, **params) -> SquareResult:
        none = torch.zeros(0, dtype=torch.int64, device=x.device)
        return SquareResult(x.clone(), none.bool(), none, none, torch.zeros(0, device=x.device), none, none)

    def attack(self, x, y, targets, *, seed: int, offset: int, skip, evaluate, eps) -> SquareResult:
        """The restarts, each on the samples no earlier one broke."""
        B, device = x.shape[0], x.device
        long = dict(dtype=torch.int64, device=device)
        res = SquareResult(x.clone(memory_format=torch.preserve_format), torch.zeros(B, dtype=torch.bool, device=device),
                           torch.full((B,), -1, **long), torch.zeros(B, **long),
                           torch.full((B,), float("inf"), device=device), torch.full((B,), -1, **long),
                           torch.zeros(B, **long))
        for run in range(self.restarts):
            idx = self.pending(res.success, skip)
            if idx.numel() == 0:
                break
            self._run(res, run, x, y, eps, idx, _rng.derive_seed(seed, run), offset)
        if skip is not None:
            res.success_step = torch.where(skip & ~res.success, 0, res.success_step)
            res.success = res.success | skip
        return res

    # ------------------------------------------------------------------------------ one run

    def _uniform(self, B: int, k: int, seed: int, stream: int, offset: int, device,
                 rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B, k] uniform numbers in [0, 1) for every sample of the batch (rows by batch index; only
        ``rows`` of them when given), from sub-stream ``stream`` of the run's seed: a sample's draw
        depends on (seed, offset + b) only."""
        key = (B, k, str(device))
        if key not in self._zeros:
            self._zeros = {key: torch.zeros(B, k, device=device)}    # random_init only reads it
        u = ops.random_init(self._zeros[key], 1.0, "linf", -1.0, 1.0, seed=_rng.derive_seed(seed, stream),
                            offset=offset)
        if rows is not None:
            u = u.index_select(0, rows)                # before the map: elementwise, so the same numbers
        return ((u + 1.0) * 0.5).clamp_(0.0, 1.0 - 2.0 ** -24)

    def _run(self, res: SquareResult, run: int, x, y, eps, idx, seed: int, offset: int) -> None:
        """One restart of Algorithm 1 on the samples idx; writes their results into res."""
        B, device = x.shape[0], x.device
        lo, hi = self.clip
        s = _Run()
        s.gidx, s.xs, s.ys, s.es = idx, x.index_select(0, idx), y.index_select(0, idx), eps.index_select(0, idx)
        ev = s.es.to(x.dtype).view(batch_view_shape(s.xs))
        s.xp, s.xm = (s.xs + ev).clamp(lo, hi), (s.xs - ev).clamp(lo, hi)
        if self.norm == "l2":
            s.xp = s.xm = None
        init = self._init_linf if self.norm == "linf" else self._init_l2
        s.xb = init(s, self._uniform(B, self._init_draws(x), seed, 1, offset, device, idx))
        s.lb, succ, s.pb = self._query(s.xb, s.ys)
        q0 = res.queries.index_select(0, idx)
        # With early_stop a row leaves as soon as it is broken, so every row still here is unbroken and
        # one broken at iteration it - 1 (or at the init, it = 0) was broken at query it + 1: the step
        # is that scalar, and no per-row step or done mask has to be kept across iterations.
        step = 1 if self.early_stop else torch.where(succ, 1, -1)
        done = succ
        update = self._update_linf if self.norm == "linf" else self._update_l2
        n_iter = 0
        for it in range(self.n_queries - 1):
            if self.early_stop:
                if bool(done.any()):
                    self._write_broken(res, run, s, done, it + 1, q0)
                    keep = (~done).nonzero().squeeze(1)
                    s.keep(keep)
                    q0, done = q0.index_select(0, keep), done.index_select(0, keep)
                if s.gidx.numel() == 0:
                    break
            u = self._uniform(B, x.shape[1] + 5, seed, it + 2, offset, device, s.gidx)
            p = square_p_selection(it, self.n_queries, self.p_init, self.rescale_schedule)
            cand = update(s, u, square_side(p, x.shape[2], x.shape[3], self.norm))
            ln, sn, pn = self._query(cand, s.ys)
            if self.early_stop:
                accept, done = (ln < s.lb) | sn, sn
            else:
                accept = ~done & ((ln < s.lb) | sn)
                new = ~done & sn
                step = torch.where(new, it + 2, step)
                done = done | new
            s.xb = torch.where(accept.view(batch_view_shape(cand)), cand, s.xb)
            s.lb, s.pb = torch.where(accept, ln, s.lb), torch.where(accept, pn, s.pb)
            n_iter = it + 1
        if self.early_stop:
            step = n_iter + 1
        res.queries[s.gidx] = q0 + (n_iter + 1)        # a row broken in the last iteration used them all too
        self._write_broken(res, run, s, done, step, q0, write_queries=False)
        better = ~done & (s.lb < res.loss.index_select(0, s.gidx))
        ti = s.gidx[better]
        res.x_adv[ti] = s.xb[better]
        res.success_step[ti] = -1
        res.restart[ti] = run
        res.loss[ti] = s.lb[better]
        res.pred[ti] = s.pb[better]

    @staticmethod
    def _write_broken(res: SquareResult, run: int, s: _Run, done, step, q0, write_queries: bool = True) -> None:
        """The broken rows of s into res: their first adversarial point, found at query q0 + step (step:
        per row, or one int for all)."""
        ti = s.gidx[done]
        at = q0[done] + (step[done] if isinstance(step, torch.Tensor) else step)
        res.x_adv[ti] = s.xb[done]
        res.success[ti] = True
        res.success_step[ti] = at
        res.restart[ti] = run
        res.loss[ti] = s.lb[done]
        res.pred[ti] = s.pb[done]
        if write_queries:
            res.queries[ti] = at

    # ---------------------------------------------------------------------- init and updates

    def _init_draws(self, x: torch.Tensor) -> int:
        C, H, W = x.shape[1:]
        if self.norm == "linf":
            return C * W
        return len(_grid(H)) * len(_grid(W)) * (C + 1)

    def _init_linf(self, s: _Run, u: torch.Tensor) -> torch.Tensor:
        """Vertical stripes: each column of each channel at x + eps or x - eps (clipped)."""
        n, C, _, W = s.xs.shape
        up = (u < 0.5).view(n, C, 1, W)
        return torch.where(up, s.xp, s.xm)

    def _init_l2(self, s: _Run, u: torch.Tensor) -> torch.Tensor:
        """The grid of signed meta pseudo-Gaussian squares, scaled to ||delta||_2 = eps, clipped."""
        n, C, H, W = s.xs.shape
        side = max(H // 5, 1)
        eta = meta_pseudo_gaussian(side, s.xs.device)
        pair = torch.stack([eta, eta.t()])
        delta = torch.zeros(n, C, H, W, device=s.xs.device)
        u = u.view(n, -1, C + 1)
        q = 0
        for r in _grid(H):
            for c in _grid(W):
                sign = torch.where(u[:, q, :C] < 0.5, 1.0, -1.0)
                pattern = pair[(u[:, q, C] < 0.5).long()]
                delta[:, :, r:r + side, c:c + side] = sign[:, :, None, None] * pattern[:, None]
                q += 1
        return self._to_l2_point(s, delta)

    def _to_l2_point(self, s: _Run, delta: torch.Tensor) -> torch.Tensor:
        """clip(x + eps * delta / ||delta||_2) in x's dtype (delta = 0 stays 0)."""
        scale = s.es / delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        lo, hi = self.clip
        return (s.xs.float() + delta * scale.view(-1, 1, 1, 1)).clamp(lo, hi).to(s.xs.dtype)

    def _windows(self, u_h, u_w, side: int, H: int, W: int, outside: bool = False):
        """Per-sample windows of side ``side`` at uniform positions in {0..H-side} x {0..W-side}:
        (mask [n, 1, H, W], top rows [n], left columns [n]); with ``outside`` the complement too
        (mask, outside, rows, columns)."""
        vh = (u_h * (H - side + 1)).long().clamp_(max=H - side)   # float rounding could reach H - side + 1
        vw = (u_w * (W - side + 1)).long().clamp_(max=W - side)
        table = self._window_table(side, H, W, u_h.device)
        if table is not None:                  # one gather of precomputed masks: cheaper than building them
            at = vh * (W - side + 1) + vw
            m = table[0].index_select(0, at).unsqueeze(1)
            return (m, table[1].index_select(0, at).unsqueeze(1), vh, vw) if outside else (m, vh, vw)
        mh = self._span(side, H, u_h.device).index_select(0, vh)
        mw = self._span(side, W, u_h.device).index_select(0, vw)
        m = (mh[:, :, None] & mw[:, None, :]).unsqueeze(1)
        return (m, ~m, vh, vw) if outside else (m, vh, vw)

    def _window_table(self, side: int, H: int, W: int, device):
        """(masks, complements) BoolTensor[(H - side + 1) (W - side + 1), H, W] of every window
        position, row-major, or None when that would exceed _WINDOW_TABLE_ELEMENTS."""
        key = ("2d", side, H, W, str(device))
        if key not in self._spans:
            n = (H - side + 1) * (W - side + 1)
            if n * H * W > _WINDOW_TABLE_ELEMENTS:
                self._spans[key] = None
            else:
                rh, rw = self._span(side, H, device), self._span(side, W, device)
                m = (rh[:, None, :, None] & rw[None, :, None, :]).reshape(n, H, W)
                self._spans[key] = (m, ~m)
        return self._spans[key]

    def _span(self, side: int, n: int, device) -> torch.Tensor:
        """BoolTensor[n - side + 1, n]: row v marks {v, ..., v + side - 1}."""
        key = (side, n, str(device))
        if key not in self._spans:
            v = torch.arange(n - side + 1, device=device)[:, None]
            i = torch.arange(n, device=device)[None, :]
            self._spans[key] = (i >= v) & (i < v + side)
        return self._spans[key]

    def _update_linf(self, s: _Run, u: torch.Tensor, side: int) -> torch.Tensor:
        """Algorithm 2: one window, every channel set to x +- eps; signs that would change nothing are
        replaced by a uniform draw among the others."""
        n, C, H, W = s.xs.shape
        m, out, _, _ = self._windows(u[:, 0], u[:, 1], side, H, W, outside=True)
        up = u[:, 2:2 + C] < 0.5
        # stuck: every channel's window already holds the drawn value (x^ is x + eps or x - eps
        # everywhere); the all() as a uint8 amin, several times faster than bool all() on CPU
        same = (torch.where(up[:, :, None, None], s.xp, s.xm) == s.xb).logical_or_(out)
        stuck = same.view(torch.uint8).flatten(1).amin(1).bool()
        if C == 1:
            flip = stuck[:, None]                      # the only other sign vector
        elif C <= _EXACT_REDRAW_CHANNELS:
            k = 1 + (u[:, 2 + C] * (2 ** C - 1)).long().clamp_(max=2 ** C - 2)
            flip = ((k[:, None] >> torch.arange(C, device=u.device)) & 1).bool() & stuck[:, None]
        else:
            flip = stuck[:, None].expand(n, C)
        return torch.where(m, torch.where((up ^ flip)[:, :, None, None], s.xp, s.xm), s.xb)

    def _eta_pair(self, side: int, device) -> torch.Tensor:
        key = (side, str(device))
        if key not in self._etas:
            eta = meta_pseudo_gaussian(side, device)
            self._etas[key] = torch.stack([eta, eta.t()])
        return self._etas[key]

    def _update_l2(self, s: _Run, u: torch.Tensor, side: int) -> torch.Tensor:
        """Algorithm 3: W1 takes rho eta plus its old content (normalised) with the mass of W1 u W2 and
        the unused budget; W2 is emptied; the whole perturbation is rescaled to norm eps."""
        n, C, H, W = s.xs.shape
        m1, vh, vw = self._windows(u[:, 0], u[:, 1], side, H, W)
        m2, _, _ = self._windows(u[:, 2], u[:, 3], side, H, W)
        rho = torch.where(u[:, 5:5 + C] < 0.5, 1.0, -1.0)[:, :, None, None]
        ih = (torch.arange(H, device=u.device) - vh[:, None]).clamp(0, side - 1)
        iw = (torch.arange(W, device=u.device) - vw[:, None]).clamp(0, side - 1)
        t = (u[:, 4] < 0.5).long()
        eta = self._eta_pair(side, u.device)[t[:, None, None], ih[:, :, None], iw[:, None, :]].unsqueeze(1) * m1
        nu = s.xb.float() - s.xs.float()
        nw1 = (nu * m1).square().sum((2, 3), keepdim=True).sqrt()
        m12 = m1 | m2
        nw12 = (nu * m12).square().sum((2, 3), keepdim=True)
        unused = (s.es.square() - nu.square().sum((1, 2, 3))).clamp_min(0.0).view(-1, 1, 1, 1)
        new = rho * eta + nu * m1 / (nw1 + 1e-12)
        new = new / new.square().sum((2, 3), keepdim=True).sqrt().clamp_min(1e-12) * (unused / C + nw12).sqrt()
        return self._to_l2_point(s, nu * ~m12 + new)


def _grid(n: int):
    """Top-left coordinates along one axis of the L2 init's squares (side max(n // 5, 1), starting at
    (n - 5 side) // 2, stepping by the side while a square fits)."""
    side = max(n // 5, 1)
    start = max((n - 5 * side) // 2, 0)
    return list(range(start, n - side + 1, side))[: max(n // side, 1)]
