"""APGD-CE / APGD-DLR and APGD-T: Auto-PGD (Croce & Hein, "Reliable evaluation of adversarial
robustness with an ensemble of diverse parameter-free attacks", ICML 2020: Auto-PGD and its
Algorithm 1) on the projected-gradient engine (:mod:`robustops.attacks.engine`).

    atk = APGD(model, eps=8/255, steps=100)                  # APGD-CE, L-inf
    atk = APGDT(model, eps=0.5, steps=100, norm="l2")        # APGD-T: targeted DLR, top-9 targets
    x_adv = atk(images, labels)
    robust_accuracy(model, loader, atk)

The engine supplies the forward pass with its objective and the input gradient
(:meth:`Engine.gradient`), the random start (:meth:`Engine.start`, ``ops.random_init``), the first-
success record (:class:`Recorder`) and the projection (:meth:`Engine.step_`, ``ops.pgd_step_``).
Around it this module runs the paper's Algorithm 1, per sample, with all per-sample state on the
device.

The paper's equations, as implemented (f: the per-sample objective, P: the projection onto the
eps-ball around x intersected with the box [lo, hi], eta: a per-sample step size):

- Algorithm 1, lines 1-3 (the first step, plain): x(1) = P(x(0) + eta * s(grad f(x(0)))),
  f_max = max(f(x(0)), f(x(1))), x_max the point that attains it. s(g) = sign(g) for L-inf and
  g / ||g||_2 for L2 (the steepest-ascent direction of the norm).
- Algorithm 1, lines 5-6 (the momentum step, alpha = 0.75):
  z(k+1) = P(x(k) + eta * s(grad f(x(k)))),
  x(k+1) = P(x(k) + alpha (z(k+1) - x(k)) + (1 - alpha)(x(k) - x(k-1))).
  z is one ``pgd_step_`` of size eta from x(k) (exactly P(x(k) + eta s(g))); the outer P is a
  ``pgd_step_`` of size 0, which only projects.
- Algorithm 1, lines 7-9: x_max / f_max follow the highest objective seen.
- Initial step size eta(0) = 2 eps (the paper's step-size selection), per sample.
- Checkpoints (same): w_j = ceil(p_j N) with p_0 = 0, p_1 = 0.22,
  p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), N = ``steps`` (:func:`checkpoints`).
- At checkpoint w_j (Algorithm 1, lines 10-13) the step size is halved, and the next iterate set to
  x_max, when
  Condition 1: sum_{i = w_{j-1}}^{w_j - 1} 1[f(x(i+1)) > f(x(i))] < rho (w_j - w_{j-1}), rho = 0.75, or
  Condition 2: eta(w_{j-1}) == eta(w_j) and f_max(w_{j-1}) == f_max(w_j)
  (the step size was not halved at the previous checkpoint and the best objective did not improve).
- The losses: cross entropy (APGD-CE); DLR(x, y) = -(z_y - max_{i != y} z_i) /
  (z_pi1 - z_pi3) (APGD-DLR); targeted DLR(x, y, t) = -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)
  for APGD-T, z_pi_k being the k-th largest logit (``base.dlr_loss``).

Choices the paper leaves open, and the ones made here:

- Budget: ``steps`` = N is the number of gradient evaluations (at x(0) .. x(N-1)); the last iterate
  x(N) is evaluated with one forward pass only. That is PGD(steps=N)'s budget exactly.
- Start x(0) (Algorithm 1 takes it as an input; AutoAttack starts at random): a random draw in the
  eps-ball clipped to [lo, hi] (``Engine.start``), restart r drawing with ``_rng.derive_seed(seed, r)``.
  L-inf: uniform in the box. L2: a uniform direction at radius eps * U (``l2_radius="uniform"``, as
  PGD's default) rather than uniform in the ball's volume (``"ball"``: radius eps * U^(1/D), almost on
  the sphere), because it measured stronger: on the digits SmallCNN of tests/helpers.py, L2 eps 1.0,
  30 seeds, APGD-CE robust accuracy 0.0252 ("uniform") vs 0.0290 ("ball") at 20 steps and 0.0219 vs
  0.0251 at 50 steps (torchattacks.APGD, which starts on the sphere: 0.0267 and 0.0244).
- Checkpoints: p_j is computed in exact hundredths and w_j = ceil(p_j N) in integers (floating point
  would give ceil(0.41 * 100) = 42); the list stops at the last p_j <= 1; equal consecutive w_j (small
  N) count once. Algorithm 1 tests k in W for iterations k = 1 .. N-1, so w_j = 0 and w_j >= N never
  halve (a halving at N-1 could not change the result, which is x_max anyway).
- Condition 1 counts the iterates as Algorithm 1 leaves them: after a halving at w_j, x(w_j + 1) is
  x_max, so the comparisons i = w_j and i = w_j + 1 use f(x_max) (counting the value before the reset
  instead would change at most one comparison per window).
- Condition 2 at the first checkpoint compares with f_max after line 2, max(f(x(0)), f(x(1))), and
  the step size counts as not halved at w_0 = 0. "Did not improve" is f_max(w_j) <= f_max(w_{j-1}).
- Restart from x_max (line 12): its gradient is the one stored when x_max was evaluated (no extra
  pass), and the momentum term of the next step is x_max - x(w_j), as line 6 reads after line 12.
- L2 projection P: onto the ball, then clipping to [lo, hi] (``pgd_step_``'s L2 projection); the
  clipped point stays in the ball. For L-inf P is the exact projection onto the intersection.
- Success and the result: a sample counts as fooled when the model misclassifies any iterate (a
  point is broken as soon as any iterate is an adversarial example, as AutoAttack counts); its x_adv
  is the first such iterate of the first run that found one, and its loss / pred are the objective /
  prediction there. Otherwise x_adv is x_max of the run with the highest f_max. So ``early_stop``
  changes only the work done, not the answer: with it, fooled samples leave the batch at the next
  checkpoint (w_0 = 0 included: one host sync per checkpoint), and samples in ``skip`` are not
  attacked at all.
- Restarts (and APGD-T's target runs) attack only samples that no earlier run fooled.
- APGD-T: the targets of a sample are the classes other than its label, ordered by the model's
  logits at the clean input (largest first; computed in the attack's model mode); run t (t = 0 ..
  n_target_classes - 1) attacks target number t, with ``restarts`` random starts each. At most C - 1
  targets exist for C classes, so n_target_classes is capped at C - 1. Success is untargeted
  misclassification (``targeted`` is False), as in the paper's use of APGD-T in AutoAttack.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from .. import _checks, _rng
from .base import Attack, Param
from .engine import AttackResult, Recorder, batch_view_shape, layout, predictions, to_layout

__all__ = ["APGD", "APGDT", "checkpoints"]


def checkpoints(steps: int) -> List[int]:
    """The checkpoints w_0 = 0 < w_1 < ... of APGD's step-size selection for a budget of ``steps`` iterations:
    w_j = ceil(p_j * steps) for p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06),
    while p_j <= 1. The p_j are exact hundredths (integers here), so no float rounding moves a w_j;
    equal consecutive values (small ``steps``) are listed once."""
    steps = _checks.check_int(steps, "steps", 1)
    out = [0]
    p_prev, p = 0, 22  # hundredths
    while p <= 100:
        w = -(-p * steps // 100)  # ceil(p * steps / 100) in integers
        if w > out[-1]:
            out.append(w)
        p_prev, p = p, p + max(p - p_prev - 3, 6)
    return out


def _rows(t, keep: torch.Tensor):
    if t is None:
        return None
    if isinstance(t, tuple):
        return tuple(_rows(e, keep) for e in t)
    return t.index_select(0, keep)


class _Run:
    """Per-sample state of one run of Algorithm 1 on the samples ``idx`` still attacked, all on the
    device. ``keep`` drops rows (the samples that leave at a checkpoint)."""

    images = ("xs", "xk", "x_prev", "g", "x_max", "g_max")
    vectors = ("idx", "es", "eta", "f", "f_prev", "f_max", "pred_max", "f_max_ckpt", "count", "reduced")

    def keep(self, keep: torch.Tensor, fmt) -> None:
        for name in self.images:
            setattr(self, name, to_layout(self.__dict__[name].index_select(0, keep), fmt))
        for name in self.vectors:
            setattr(self, name, self.__dict__[name].index_select(0, keep))
        self.ys = _rows(self.ys, keep)
        rec = self.rec
        self.rec = Recorder(self.xk)
        self.rec.step.copy_(rec.step.index_select(0, keep))
        self.rec.x_first.copy_(rec.x_first.index_select(0, keep))
        self.rec.score_first.copy_(rec.score_first.index_select(0, keep))
        self.rec.pred_first.copy_(rec.pred_first.index_select(0, keep))


class APGD(Attack):
    """Auto-PGD (Croce & Hein 2020, Algorithm 1): APGD-CE (``loss="ce"``) or APGD-DLR
    (``loss="dlr"``), untargeted, L-inf or L2, in pixel space. See the module docstring for the
    equations implemented and the choices the paper leaves open.

    model, clip, mean / std, dtype, train_mode, seed: as :class:`~robustops.attacks.base.Attack` (the
    model's mode and its parameters' requires_grad flags are restored after each call).
    eps: radius, a float or a Tensor[B] (per sample); the initial step size is 2 eps per sample.
    steps: the iteration budget N >= 1 (N gradient evaluations and one final forward pass).
    norm: "linf" or "l2". loss: "ce" or "dlr" (needs >= 3 classes).
    restarts: random starts; later ones attack only the samples that earlier ones did not fool.
    rho: the threshold of Condition 1 (0.75); momentum: alpha of Algorithm 1 (0.75).
    early_stop: fooled samples (and those in ``perturb``'s ``skip``) leave the batch at the next
      checkpoint; the answer is the same without it (any fooling iterate counts either way), except
      that ``skip`` samples are then attacked too.
    l2_radius: the L2 start's radius law (``Engine``): "uniform" (radius eps * U, the default; see
      the module docstring for the measurement) or "ball" (uniform in the ball's volume).
    eot_iter: expectation over transformation for randomized defenses (AutoAttack's "rand" version
      uses 20): each gradient is the mean of eot_iter input gradients, each from its own forward
      pass; the objective and logits that the step-size rule and the success record use are those of
      the last pass (as AutoAttack's APGD does). 1: one pass, the deterministic attack.

    ``targeted`` is False and ``target_fn`` None: the attack is untargeted. alpha (None), random_start
    (True), record_steps and graph (False) are kept for PGD's interface.
    """

    def __init__(self, model, eps: Param, steps: int = 100, norm: str = "linf", loss: str = "ce",
                 restarts: int = 1, rho: float = 0.75, seed: Optional[int] = None, clip=(0.0, 1.0), mean=None,
                 std=None, dtype=None, early_stop: bool = True, train_mode: bool = False, momentum: float = 0.75,
                 l2_radius: str = "uniform", eot_iter: int = 1):
        if loss not in ("ce", "dlr"):
            raise ValueError(f'loss must be "ce" or "dlr", got {loss!r}')
        super().__init__(model, loss=loss, clip=clip, mean=mean, std=std, seed=seed, train_mode=train_mode,
                         dtype=dtype)
        self.eps = _checks.check_sample_param(eps, "eps")
        self.alpha = None
        self.steps = _checks.check_int(steps, "steps", 1)
        if norm not in ("linf", "l2"):
            raise ValueError(f'norm must be "linf" or "l2", got {norm!r}')
        self.norm = norm
        self.random_start = True
        self.restarts = _checks.check_int(restarts, "restarts", 1)
        self.early_stop = bool(early_stop)
        self.record_steps = self.graph = False
        self.engine = self.make_engine(self.norm, l2_radius)
        self.rho = _checks.check_number(rho, "rho", 0.0, strict=True, maximum=1.0)
        self.momentum = _checks.check_number(momentum, "momentum", 0.0, strict=True, maximum=1.0)
        self.checkpoints = checkpoints(self.steps)
        self.eot_iter = _checks.check_int(eot_iter, "eot_iter", 1)

    def __repr__(self) -> str:
        eps = self.eps if not isinstance(self.eps, torch.Tensor) else f"Tensor[{self.eps.numel()}]"
        return (f"{type(self).__name__}(eps={eps}, steps={self.steps}, norm={self.norm!r}, loss={self.loss!r}, "
                f"restarts={self.restarts}, rho={self.rho}, early_stop={self.early_stop}"
                + (f", eot_iter={self.eot_iter})" if self.eot_iter > 1 else ")"))

    @staticmethod
    def success(logits, y):
        """Untargeted: the model predicts another class than the label (targets, if any, only steer
        the objective). A prediction of NaN logits (-1) is no success."""
        pred = predictions(logits)
        return (pred != y[0]) & (pred >= 0)

    # --------------------------------------------------------------------------------- call

    def perturb(self, images: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor] = None,
                eps: Optional[Param] = None, offset: Optional[int] = None, skip: Optional[torch.Tensor] = None,
                evaluate: bool = True) -> AttackResult:
        """Runs the attack. images [B, ...] in clip; labels [B]. eps overrides the attack's (float
        or Tensor[B]). offset: index of this batch's first sample in the random stream (default:
        the number of samples this attack has seen). skip: BoolTensor[B] of samples counted as
        already fooled (success, step 0); with early_stop they are not attacked. evaluate is
        accepted for PGD's signature: success / loss / pred are always known here at no extra cost.
        ``targets`` must be None (the attack is untargeted)."""
        return super().perturb(images, labels, targets, offset=offset, skip=skip, evaluate=evaluate, eps=eps)

    def prepare(self, x: torch.Tensor, eps: Optional[Param] = None) -> dict:
        """eps per sample: a float32 Tensor[B] on x's device."""
        B, device = x.shape[0], x.device
        eps = _checks.sample_param_on(self.eps if eps is None else eps, "eps", B, device)
        if not isinstance(eps, torch.Tensor):
            eps = torch.full((B,), float(eps), dtype=torch.float32, device=device)
        return {"eps": eps}

    def _run_targets(self, x, y):
        """The per-run extra labels: [None] (untargeted); APGD-T lists its target classes."""
        return [None]

    def attack(self, x, y, targets, *, seed: int, offset: int, skip, evaluate, eps) -> AttackResult:
        """Algorithm 1 per run (target and restart), each on the samples no earlier run fooled."""
        B, device = x.shape[0], x.device
        res = AttackResult(x.clone(memory_format=torch.preserve_format),
                           torch.zeros(B, dtype=torch.bool, device=device),
                           torch.full((B,), -1, dtype=torch.int64, device=device),
                           torch.zeros(B, dtype=torch.int64, device=device),
                           torch.full((B,), float("-inf"), device=device),
                           torch.full((B,), -1, dtype=torch.int64, device=device))
        run = 0
        for t in self._run_targets(x, y):
            for _ in range(self.restarts):
                idx = self.pending(res.success, skip)
                if idx.numel() == 0:
                    break
                self._run(res, run, x, (y, t), eps, idx, _rng.derive_seed(seed, run), offset)
                run += 1
        if skip is not None:
            res.success_step = torch.where(skip & ~res.success, 0, res.success_step)
            res.success = res.success | skip
        return res

    def _run(self, res: AttackResult, run: int, x, y, eps, idx, seed: int, offset: int) -> None:
        """One run of Algorithm 1 on the samples idx (from a start drawn for the whole batch, so a
        sample's start does not depend on which others are attacked); writes their results to res."""
        engine, fmt, steps = self.engine, layout(x), self.steps
        a = self.momentum
        W = self.checkpoints
        s = _Run()
        s.idx = idx
        s.xs = to_layout(x.index_select(0, idx), fmt)
        s.ys = _rows(y, idx)
        s.es = eps.index_select(0, idx)
        s.eta = 2.0 * s.es                                        # eta(0) = 2 eps
        x0 = engine.start(x, eps, "uniform", seed, offset)
        s.xk = to_layout(x0.index_select(0, idx), fmt)
        del x0
        s.g, logits, s.f = self.gradient(s.xk, s.ys)
        s.rec = Recorder(s.xk)
        s.rec.update(0, s.xk, logits, s.f, self.success(logits, s.ys))
        s.x_max, s.f_max, s.g_max, s.pred_max = s.xk.clone(memory_format=torch.preserve_format), s.f, s.g, \
            predictions(logits)
        s.count = torch.zeros_like(s.idx)
        s.reduced = torch.zeros_like(s.idx, dtype=torch.bool)
        s.f_max_ckpt = s.f_max
        s.x_prev, s.f_prev = s.xk, s.f
        if self.early_stop and not self._leave(res, run, s, fmt):      # w_0 = 0
            return
        # Line 1: the first step, plain.
        s.xk = s.xk.clone(memory_format=torch.preserve_format)
        engine.step_(s.xk, s.xs, s.g, s.es, s.eta)
        w_prev = 0
        for k in range(1, steps + 1):
            last = k == steps
            # Evaluate x(k) (Algorithm 1's iteration k - 1 made it).
            if last:
                with torch.no_grad():
                    logits = engine.logits(s.xk)
                s.f = engine.score(logits, s.ys)
            else:
                s.g, logits, s.f = self.gradient(s.xk, s.ys)
            s.rec.update(k, s.xk, logits, s.f, self.success(logits, s.ys))
            up = s.f > s.f_max                                      # lines 2-3 and 7-9
            v = up.view(batch_view_shape(s.xk))
            s.x_max = torch.where(v, s.xk, s.x_max)
            s.f_max = torch.where(up, s.f, s.f_max)
            s.pred_max = torch.where(up, predictions(logits), s.pred_max)
            if last:
                break
            s.g_max = torch.where(v, s.g, s.g_max)
            if k == 1:
                s.f_max_ckpt = s.f_max                              # f_max(w_0): after line 2
            it = k - 1
            at_ckpt = it >= 1 and it in W
            if at_ckpt:                                             # lines 10-13
                cond1 = s.count.float() < self.rho * (it - w_prev)
                cond2 = ~s.reduced & (s.f_max <= s.f_max_ckpt)
                halve = cond1 | cond2
                s.eta = torch.where(halve, 0.5 * s.eta, s.eta)
                hv = halve.view(batch_view_shape(s.xk))
                s.xk = torch.where(hv, s.x_max, s.xk)
                s.g = torch.where(hv, s.g_max, s.g)
                s.f = torch.where(halve, s.f_max, s.f)
                s.reduced = halve
                s.f_max_ckpt = s.f_max
                s.count = torch.zeros_like(s.count)
                w_prev = it
            s.count = s.count + (s.f > s.f_prev).long()             # comparison i = k - 1
            if at_ckpt and self.early_stop and not self._leave(res, run, s, fmt):
                return
            # Lines 5-6: x(k+1) from x(k) and x(k-1).
            z = s.xk.clone(memory_format=torch.preserve_format)
            engine.step_(z, s.xs, s.g, s.es, s.eta)
            nxt = s.xk + a * (z - s.xk) + (1.0 - a) * (s.xk - s.x_prev)
            del z
            engine.step_(nxt, s.xs, s.g, s.es, 0.0)                 # P only
            s.x_prev, s.xk, s.f_prev = s.xk, nxt, s.f
        self._finish(res, run, s)

    def gradient(self, xk: torch.Tensor, ys):
        """(input gradient, logits, objective) at xk: the engine's, averaged over eot_iter passes
        (expectation over transformation) with the last pass's logits and objective."""
        g, logits, f = self.engine.gradient(xk, ys)
        for _ in range(self.eot_iter - 1):
            gi, logits, f = self.engine.gradient(xk, ys)
            g = g + gi
        if self.eot_iter > 1:
            g = g / self.eot_iter
        return g, logits, f

    def _leave(self, res: AttackResult, run: int, s: _Run, fmt) -> bool:
        """Early stop at a checkpoint: samples fooled so far are written to res and leave (one host
        sync). Returns False when none is left."""
        fooled = s.rec.step >= 0
        n = int(fooled.sum())
        if n == 0:
            return True
        self._write(res, run, s, fooled)
        if n == s.idx.numel():
            return False
        s.keep((~fooled).nonzero().squeeze(1), fmt)
        return True

    @staticmethod
    def _write(res: AttackResult, run: int, s: _Run, fooled: torch.Tensor) -> None:
        """Fooled rows of s into res: their first fooling iterate (they had not been fooled before)."""
        ti = s.idx[fooled]
        res.x_adv[ti] = s.rec.x_first[fooled].to(res.x_adv.dtype)
        res.success[ti] = True
        res.success_step[ti] = s.rec.step[fooled]
        res.restart[ti] = run
        res.loss[ti] = s.rec.score_first[fooled]
        res.pred[ti] = s.rec.pred_first[fooled]

    def _finish(self, res: AttackResult, run: int, s: _Run) -> None:
        """End of a run: fooled samples take their first fooling iterate; the others take x_max
        when its objective beats the best of earlier runs."""
        fooled = s.rec.step >= 0
        self._write(res, run, s, fooled)
        better = ~fooled & (s.f_max > res.loss.index_select(0, s.idx))
        ti = s.idx[better]
        res.x_adv[ti] = s.x_max[better].to(res.x_adv.dtype)
        res.success_step[ti] = -1
        res.restart[ti] = run
        res.loss[ti] = s.f_max[better]
        res.pred[ti] = s.pred_max[better]


class APGDT(APGD):
    """APGD-T (Croce & Hein 2020): APGD on the targeted DLR loss
    -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2), run once per target t among the n_target_classes
    classes with the highest clean logits other than the label (``restarts`` random starts each;
    default 9 targets and 1 start). A sample counts as fooled by the first run that makes the model
    misclassify it (success is untargeted: ``targeted`` is False). Needs >= 4 classes; at most
    C - 1 targets are run. ``AttackResult.restart`` is the run, target number * restarts + start.
    Other options as :class:`APGD`."""

    def __init__(self, model, eps: Param, steps: int = 100, norm: str = "linf", n_target_classes: int = 9,
                 restarts: int = 1, **kwargs):
        if "loss" in kwargs and kwargs.pop("loss") != "dlr":
            raise ValueError("APGDT uses the targeted DLR loss; use APGD for cross entropy")
        super().__init__(model, eps, steps=steps, norm=norm, loss="dlr", restarts=restarts, **kwargs)
        self.n_target_classes = _checks.check_int(n_target_classes, "n_target_classes", 1)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", n_target_classes={self.n_target_classes})"

    def _run_targets(self, x, y):
        with torch.no_grad():
            logits = self.engine.logits(x)
        C = logits.shape[1]
        if C < 4:
            raise ValueError(f"APGD-T's targeted DLR loss needs at least 4 classes, the model has {C}")
        others = logits.scatter(1, y[:, None], float("-inf"))
        order = others.argsort(dim=1, descending=True, stable=True)
        return [order[:, t].contiguous() for t in range(min(self.n_target_classes, C - 1))]
