"""The projected-gradient engine: the one implementation of the PGD iteration in robustops.

Attacks (``PGD``, ``FGSM``), adversarial training (PGD-AT, TRADES's KL inner loop) and every inner
maximisation that training methods add run on :class:`Engine`:

    engine = Engine(forward, objective, norm="linf", lo=0.0, hi=1.0)
    result = engine.run(x, y, eps, alpha, steps, start="uniform", seed=s, offset=n)

One iteration is one forward and one backward pass to the input only (``torch.autograd.grad`` with
respect to the iterate) and one fused projection kernel (``ops.pgd_step_``). Around that the engine
provides the start point (the clean input, a uniform draw in the ball with ``random_init``, or
Gaussian noise with ``gaussian_noise``), restarts (per sample the first restart that succeeds is
kept, else the one with the highest score), step recording (the first step at which each sample
succeeded, and that iterate), and early exit (samples that succeed leave the batch, so later steps
compute only on those still standing).

``y`` is whatever the objective needs besides the logits: labels, a tuple (labels, targets), or the
clean prediction's probabilities (TRADES); the engine only selects rows of it. ``context`` (optional) is
per-sample data the forward needs besides the iterate (a Tensor[B, ...] or a tuple of them): the
engine selects its rows exactly as y's and calls ``forward(x_adv, context)``. The latent attack
(``attacks.latent``) iterates a latent offset u and passes (x, mu, sigma) as context. A CUDA-graph runner
(``attacks.graph``) replays :meth:`Engine.gradient` / :meth:`Engine.step_` / :meth:`Recorder.update`
instead of the eager loop; it uses nothing else of the engine (and takes no context).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import torch

from .. import _rng, ops
from ..models import video

__all__ = ["Engine", "Recorder", "AttackResult", "STARTS", "memory_format", "VIDEO_CHANNELS_LAST", "layout",
           "to_layout", "batch_view_shape", "predictions",
           "check_context"]

Labels = Union[torch.Tensor, Tuple[torch.Tensor, ...]]
Param = Union[float, torch.Tensor]
Context = Optional[Union[torch.Tensor, Tuple[torch.Tensor, ...]]]

#: Start points: the clean input, a uniform draw in the eps-ball, or x + start_sigma * N(0, I).
STARTS = ("clean", "uniform", "normal")


def batch_view_shape(x: torch.Tensor):
    """(-1, 1, ..., 1): a per-sample [B] tensor viewed to broadcast against x."""
    return (-1,) + (1,) * (x.dim() - 1)


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """x's torch memory format: channels_last(_3d) when x is laid out so (and not also contiguous). The
    video channels-last layout, which no torch format names, reads contiguous_format here: the engine
    asks :func:`layout`, which knows it."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


#: The video channels-last layout (``models.video.to_channels_last``: [B, T, C, H, W] stored as
#: [B, T, H, W, C]), which no torch memory format names: :func:`layout` gives it, :func:`to_layout` takes it.
VIDEO_CHANNELS_LAST = "video_channels_last"


def layout(x: torch.Tensor):
    """x's layout: VIDEO_CHANNELS_LAST for a video in the video channels-last layout (checked first:
    it is the one a video model asks for), else :func:`memory_format`."""
    if video.is_channels_last(x):
        return VIDEO_CHANNELS_LAST
    return memory_format(x)


def to_layout(x: torch.Tensor, fmt) -> torch.Tensor:
    """x in layout fmt (a torch memory format or VIDEO_CHANNELS_LAST); x itself when it already is."""
    if fmt == VIDEO_CHANNELS_LAST:
        return video.to_channels_last(x)
    return x.contiguous(memory_format=fmt)


def predictions(logits: torch.Tensor) -> torch.Tensor:
    """argmax per row, and -1 (no prediction) for a row whose logits hold a NaN: torch.argmax would
    name the NaN's class, a "prediction" that is neither correct nor a misclassification to claim."""
    return torch.where(torch.isnan(logits).any(1), -1, logits.argmax(1))


def _rows(v, idx: torch.Tensor):
    """Rows idx of a per-sample value: a Tensor[B, ...], a tuple of them, a float or 0-dim (kept)."""
    if v is None or not isinstance(v, (torch.Tensor, tuple)):
        return v
    if isinstance(v, tuple):
        return tuple(_rows(e, idx) for e in v)
    return v if v.dim() == 0 else v.index_select(0, idx)


def check_context(context: Context, B: int) -> Context:
    """context as given, if it is None, a Tensor[B, ...] or a tuple of them; else a clear error."""
    if context is None:
        return None
    parts = context if isinstance(context, tuple) else (context,)
    for k, c in enumerate(parts):
        what = "context" if not isinstance(context, tuple) else f"context[{k}]"
        if not isinstance(c, torch.Tensor):
            raise TypeError(f"{what} must be a Tensor[B, ...] (or context a tuple of them), got {type(c).__name__}")
        if c.dim() == 0 or c.shape[0] != B:
            raise ValueError(f"{what} must have the batch dimension B = {B} first, got shape {list(c.shape)}")
    return context


def _kernel_param(p: Param) -> torch.Tensor:
    """A per-sample parameter in the op's form, built once per run: a 0-dim CPU float32 tensor for
    a float (read on the host, no transfer), or the float32 Tensor[B] as given."""
    return p if isinstance(p, torch.Tensor) else torch.tensor(float(p), dtype=torch.float32)


@dataclass
class AttackResult:
    """What a run returns, per sample of the batch.

    x_adv: the adversarial inputs (the first iterate that succeeded when steps were recorded or the
      run exited early, else the final iterate of the chosen restart).
    success: BoolTensor[B], the success criterion (untargeted: prediction != label; targeted:
      prediction == target) holds at x_adv.
    success_step: LongTensor[B], the step (0 = start point, steps = final iterate) at which the chosen
      restart first succeeded; -1 where it never did (without recording only the final iterate is examined).
    restart: LongTensor[B], the restart that produced x_adv.
    loss: FloatTensor[B], the score (per-sample objective) at x_adv (None when not evaluated).
    pred: LongTensor[B], the model's prediction at x_adv (None when not evaluated).
    """
    x_adv: torch.Tensor
    success: Optional[torch.Tensor] = None
    success_step: Optional[torch.Tensor] = None
    restart: Optional[torch.Tensor] = None
    loss: Optional[torch.Tensor] = None
    pred: Optional[torch.Tensor] = None


class Recorder:
    """The first success of each sample in a loop of steps: the step, that iterate, its score and
    its prediction. Updated in place on fixed buffers, so a CUDA graph can replay the update."""

    def __init__(self, xa: torch.Tensor):
        B, dev = xa.shape[0], xa.device
        self.step = torch.full((B,), -1, dtype=torch.int64, device=dev)
        self.x_first = torch.empty_like(xa, memory_format=torch.preserve_format)
        self.score_first = torch.zeros(B, device=dev)
        self.pred_first = torch.zeros(B, dtype=torch.int64, device=dev)

    def reset(self) -> None:
        self.step.fill_(-1)

    def update(self, k, xa: torch.Tensor, logits: torch.Tensor, score: torch.Tensor, success: torch.Tensor) -> None:
        """Step k (an int, or a 0-dim int64 device tensor inside a graph) evaluated iterate xa."""
        new = success & (self.step < 0)
        self.step.copy_(torch.where(new, k, self.step))
        self.x_first.copy_(torch.where(new.view(batch_view_shape(xa)), xa, self.x_first))
        self.score_first.copy_(torch.where(new, score, self.score_first))
        self.pred_first.copy_(torch.where(new, predictions(logits), self.pred_first))

    def finish(self, xa: torch.Tensor, steps: int, success, score, pred) -> AttackResult:
        """The result after the last step: a sample that first succeeds at the final iterate xa
        records step ``steps``; one that succeeded earlier keeps that iterate."""
        new = success & (self.step < 0)
        step = torch.where(new, steps, self.step)
        found = step >= 0
        old = found & ~new
        return AttackResult(torch.where(old.view(batch_view_shape(xa)), self.x_first, xa), found, step, None,
                            torch.where(old, self.score_first, score), torch.where(old, self.pred_first, pred))


class Engine:
    """Projected gradient ascent of ``objective(forward(x'), y)`` over x' in the eps-ball around x
    (L-inf or L2, per-sample eps) intersected with the box [lo, hi].

    forward: x -> logits [B, C] (the model, with any normalisation in front); called as
      ``forward(x, context)`` when a run is given a per-sample context. It runs under autocast when
      ``dtype`` (torch.bfloat16 / torch.float16) is given; logits are used in float32.
    objective: (logits, y) -> per-sample values [B] (their sum is ascended) or a scalar.
    success: (logits, y) -> BoolTensor[B], needed for recording, early exit and restarts.
    score: (logits, y) -> [B], ranks restarts and is reported as the loss; default the objective
      (which must then be per-sample).
    scaler: a torch.amp.GradScaler for fp16: the objective is scaled before the input gradient is
      taken and non-finite gradient entries are zeroed (their sign is what the step uses).
    step: the projection op, ``step(x_adv, x, grad, eps, alpha, norm, lo, hi)`` in place; default
      ``ops.pgd_step_``.
    l2_radius: the radius law of L2 uniform starts: "uniform" (radius eps * U, the default: measured
      the stronger attack, benchmarks/l2_start.py) or "ball" (uniform in the ball's volume, radius
      eps * U^(1/D), which in D dimensions starts almost on the sphere).
    capturing: set by the CUDA-graph runner while it captures (autocast's weight cache is off then).
    """

    def __init__(self, forward: Callable, objective: Callable, *, norm: str = "linf", lo: float = 0.0,
                 hi: float = 1.0, dtype: Optional[torch.dtype] = None, success: Optional[Callable] = None,
                 score: Optional[Callable] = None, scaler=None, step: Optional[Callable] = None,
                 l2_radius: str = "uniform"):
        if norm not in ("linf", "l2"):
            raise ValueError(f'norm must be "linf" or "l2", got {norm!r}')
        self.forward = forward
        self.objective = objective
        self.norm = norm
        self.lo, self.hi = float(lo), float(hi)
        self.dtype = dtype
        self.success = success
        self.score_fn = score
        self.scaler = scaler
        self.step_op = ops.pgd_step_ if step is None else step
        if l2_radius not in ("uniform", "ball"):
            raise ValueError(f'l2_radius must be "uniform" or "ball", got {l2_radius!r}')
        self.l2_radius = l2_radius
        self.capturing = False

    # ------------------------------------------------------------------------ one iteration

    def _autocast(self, device: torch.device):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype, cache_enabled=not self.capturing)

    def logits(self, x: torch.Tensor, context: Context = None) -> torch.Tensor:
        """forward(x) (forward(x, context) with a context) under the engine's autocast, as float32 logits."""
        with self._autocast(x.device):
            out = self.forward(x) if context is None else self.forward(x, context)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the model must return a logits tensor [B, classes], got {type(out).__name__}")
        return out.float()

    def score(self, logits: torch.Tensor, y: Labels, obj: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-sample score [B] that ranks restarts: the objective (obj, when already computed at
        these logits) when it is per-sample, else score_fn."""
        if obj is None:
            obj = self.objective(logits, y)
        if obj.dim() == 1:
            return obj
        if self.score_fn is None:
            raise ValueError("an objective that returns a scalar needs a per-sample score function")
        return self.score_fn(logits, y)

    def gradient(self, xa: torch.Tensor, y: Labels, context: Context = None):
        """(gradient of the objective with respect to the input only, logits, objective), at xa.
        The gradient has xa's layout."""
        xin = xa.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = self.logits(xin, context)
            obj = self.objective(logits, y)
            total = obj.sum() if obj.dim() else obj
            if self.scaler is not None and self.scaler.is_enabled():
                total = self.scaler.scale(total)
            # an objective that does not depend on the input (a piecewise-constant model) has no gradient
            (g,) = torch.autograd.grad(total, xin, allow_unused=True) if total.requires_grad else (None,)
        if g is None:
            g = torch.zeros_like(xa)
        elif self.scaler is not None and self.scaler.is_enabled():
            g = torch.nan_to_num(g, nan=0.0, posinf=1.0, neginf=-1.0)
        fmt = layout(xa)
        if fmt is not torch.contiguous_format:  # the step op wants g in xa's layout (a no-op if it is)
            g = to_layout(g, fmt)
        return g, logits.detach(), obj.detach()

    def step_(self, xa: torch.Tensor, x: torch.Tensor, g: torch.Tensor, eps, alpha) -> torch.Tensor:
        """The projection step, in place on xa."""
        return self.step_op(xa, x, g, eps, alpha, self.norm, self.lo, self.hi)

    def start(self, x: torch.Tensor, eps: Param, start: str = "uniform", seed: int = 0, offset: int = 0,
              start_sigma: float = 0.0) -> torch.Tensor:
        """The start point for x (a new tensor in x's layout). offset: the index of x[0] among all
        samples drawn with this seed, so batches at different offsets draw independent starts."""
        if start == "clean":
            return x.clone(memory_format=torch.preserve_format)
        if start == "uniform":
            return ops.random_init(x, eps, self.norm, self.lo, self.hi, seed=seed, offset=offset,
                                   radius=self.l2_radius)
        if start == "normal":
            fmt = layout(x)
            # the op writes torch's channels_last(_3d) only; the noise is drawn by logical index, so a
            # video layout is a copy of the contiguous draw
            noisy = ops.gaussian_noise(x, 1, start_sigma, seed=seed, offset=offset,
                                       channels_last=fmt not in (torch.contiguous_format, VIDEO_CHANNELS_LAST))
            return to_layout(noisy, fmt) if fmt == VIDEO_CHANNELS_LAST else noisy
        raise ValueError(f"start must be one of {', '.join(STARTS)}, got {start!r}")

    def evaluate(self, xa: torch.Tensor, y: Labels, context: Context = None):
        """(logits, success, score, prediction) at xa, without gradients."""
        with torch.no_grad():
            logits = self.logits(xa, context)
        success = self._success(logits, y)
        return logits, success, self.score(logits, y), predictions(logits)

    def _success(self, logits, y):
        if self.success is None:
            raise ValueError("this engine has no success criterion (needed for recording, early exit "
                             "and restarts)")
        return self.success(logits, y)

    # -------------------------------------------------------------------------------- loops

    def iterate(self, x: torch.Tensor, xa: torch.Tensor, y: Labels, eps, alpha, steps: int,
                recorder: Optional[Recorder] = None, context: Context = None) -> torch.Tensor:
        """``steps`` iterations from xa, in place (the eager loop). With a recorder, each iterate is
        checked for success before its step."""
        eps_k, alpha_k = _kernel_param(eps), _kernel_param(alpha)
        for k in range(steps):
            g, logits, obj = self.gradient(xa, y, context)
            if recorder is not None:
                recorder.update(k, xa, logits, self.score(logits, y, obj), self._success(logits, y))
            self.step_(xa, x, g, eps_k, alpha_k)
        return xa

    def run(self, x: torch.Tensor, y: Labels, eps: Param, alpha: Param, steps: int, *, start: str = "uniform",
            seed: int = 0, offset: int = 0, start_sigma: float = 0.0, restarts: int = 1, record: bool = False,
            early_exit: bool = False, evaluate: bool = True, skip: Optional[torch.Tensor] = None,
            loop: Optional[Callable] = None, context: Context = None) -> AttackResult:
        """The attack on x [B, ...] (in [lo, hi]) with y, eps / alpha floats or Tensor[B] (float32 on
        x's device), ``steps`` >= 1.

        start / seed / offset / start_sigma: the start point (restart r draws with
        ``_rng.derive_seed(seed, r)``); restarts apply to random starts only. record: record the
        first step at which each sample succeeded. early_exit: samples that succeeded (or are in
        ``skip``, a BoolTensor[B] of samples counted as already done) leave the batch. evaluate:
        also compute success / score / prediction at the result when nothing else needs them.
        loop: a replacement for the eager loop (the CUDA-graph runner), called as
        ``loop(x, xa0, y, eps, alpha, record, skip)`` and returning (x_adv, recorder or None), or
        None to fall back to the eager loop. context: per-sample data for ``forward(x_adv, context)``
        (a Tensor[B, ...] or a tuple of them), row-selected with y when samples leave the batch; the
        CUDA-graph loop takes none.

        Without success, record, early exit, restarts or evaluate, only x_adv is filled in."""
        context = check_context(context, x.shape[0])
        if context is not None and loop is not None:
            raise ValueError("the CUDA-graph loop does not take a per-sample context: run eagerly (loop=None)")
        n_restarts = restarts if start != "clean" else 1
        if early_exit and loop is None:
            return self._run_early_exit(x, y, eps, alpha, steps, start, seed, offset, start_sigma, n_restarts, skip,
                                        context)
        record = record or early_exit
        need_eval = evaluate or n_restarts > 1
        best, best_restart = None, None
        for r in range(n_restarts):
            if best is not None and early_exit:
                done = best.success if skip is None else (best.success | skip)
                if bool(done.all()):
                    break
            xa0 = self.start(x, eps, start, _rng.derive_seed(seed, r), offset, start_sigma)
            out = loop(x, xa0, y, eps, alpha, record, skip) if loop is not None else None
            if out is None:
                recorder = Recorder(xa0) if record else None
                out = (self.iterate(x, xa0, y, eps, alpha, steps, recorder, context), recorder)
            run = self._finish(out[0], y, steps, out[1], need_eval, context)
            if best is None or not need_eval:
                best = run
                best_restart = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
                continue
            take = ~best.success & (run.success | (run.loss > best.loss))
            best.x_adv = torch.where(take.view(batch_view_shape(x)), run.x_adv, best.x_adv)
            best.success = torch.where(take, run.success, best.success)
            best.success_step = torch.where(take, run.success_step, best.success_step)
            best.loss = torch.where(take, run.loss, best.loss)
            best.pred = torch.where(take, run.pred, best.pred)
            best_restart = torch.where(take, r, best_restart)
        best.restart = best_restart
        if skip is not None and best.success is not None:
            best.success = best.success | skip
            best.success_step = torch.where(skip & (best.success_step < 0), 0, best.success_step)
        return best

    def _finish(self, xa, y, steps: int, recorder: Optional[Recorder], need_eval: bool,
                context: Context = None) -> AttackResult:
        if recorder is None and not need_eval:
            return AttackResult(xa)
        _, success, score, pred = self.evaluate(xa, y, context)
        if recorder is not None:
            return recorder.finish(xa, steps, success, score, pred)
        step = torch.where(success, steps, -1)
        return AttackResult(xa, success, step, None, score, pred)

    def _run_early_exit(self, x, y, eps, alpha, steps, start, seed, offset, start_sigma, n_restarts,
                        skip, context=None) -> AttackResult:
        """Early exit by compaction: the batch shrinks to the samples still standing after every
        step that fooled some, and later restarts attack only those."""
        B, device = x.shape[0], x.device
        fmt = layout(x)
        res = AttackResult(x.clone(memory_format=torch.preserve_format),
                           torch.zeros(B, dtype=torch.bool, device=device) if skip is None else skip.clone(),
                           torch.full((B,), -1, dtype=torch.int64, device=device),
                           torch.zeros(B, dtype=torch.int64, device=device),
                           torch.full((B,), float("-inf"), device=device),
                           torch.full((B,), -1, dtype=torch.int64, device=device))
        if skip is not None:
            res.success_step[skip] = 0
        for r in range(n_restarts):
            idx = (~res.success).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            xa_full = self.start(x, eps, start, _rng.derive_seed(seed, r), offset, start_sigma)
            xs = to_layout(_rows(x, idx), fmt)
            xa = to_layout(_rows(xa_full, idx), fmt)
            del xa_full
            ys, cs = _rows(y, idx), _rows(context, idx)
            es, als = _kernel_param(_rows(eps, idx)), _kernel_param(_rows(alpha, idx))
            self._early_exit_restart(res, r, idx, xs, xa, ys, es, als, steps, fmt, cs)
        return res

    def _early_exit_restart(self, res: AttackResult, r: int, idx, xs, xa, ys, es, als, steps: int, fmt,
                            cs: Context = None) -> None:
        for k in range(steps + 1):
            last = k == steps
            if not last:
                g, logits, obj = self.gradient(xa, ys, cs)
            else:
                with torch.no_grad():
                    logits = self.logits(xa, cs)
                obj = None
            fooled = self._success(logits, ys)
            score = self.score(logits, ys, obj)
            if last:
                # Samples still standing: keep this restart's final iterate if its score is higher.
                take = fooled | (score > res.loss.index_select(0, idx))
                self._keep(res, idx[take], xa[take], fooled[take], torch.where(fooled[take], k, -1), r,
                           score[take], predictions(logits)[take])
                return
            n_fooled = int(fooled.sum())
            if n_fooled:
                self._keep(res, idx[fooled], xa[fooled], True, k, r, score[fooled], predictions(logits)[fooled])
                if n_fooled == idx.numel():
                    return
                keep = (~fooled).nonzero().squeeze(1)
                idx, ys, cs, g = _rows(idx, keep), _rows(ys, keep), _rows(cs, keep), _rows(g, keep)
                es, als = _rows(es, keep), _rows(als, keep)
                xs = to_layout(_rows(xs, keep), fmt)
                xa = to_layout(_rows(xa, keep), fmt)
            self.step_(xa, xs, g, es, als)

    @staticmethod
    def _keep(res: AttackResult, ti, x_adv, success, step, r, score, pred) -> None:
        res.x_adv[ti] = x_adv.to(res.x_adv.dtype)
        res.success[ti] = success
        res.success_step[ti] = step
        res.restart[ti] = r
        res.loss[ti] = score
        res.pred[ti] = pred

