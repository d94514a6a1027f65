"""PGD / FGSM attacks and robust-accuracy evaluation, built on the fused ``pgd_step_`` and
``random_init`` ops.

    atk = PGD(model, eps=8/255, alpha=2/255, steps=10, norm="linf")
    x_adv = atk(images, labels)                 # like torchattacks: images in clip=(0, 1)
    res = atk.perturb(images, labels)           # AttackResult: x_adv, success, success_step, ...
    robust_accuracy(model, loader, atk)         # {"clean_acc", "robust_acc", "n", ...}

Per iteration the attack runs one forward and one backward with respect to the input only (the
model's parameters are set not to require gradients for the duration) and one fused projection
kernel. Options: restarts (per sample, the first restart that fools, else the one with the highest
loss), early exit (samples that are already fooled leave the batch), per-sample eps / alpha, targeted
attacks, CE / DLR / custom losses, normalization in front of the model (``mean`` / ``std``),
train-mode attacks, autocast, and on CUDA a CUDA-graph replay of the whole iteration.
"""
from __future__ import annotations

import collections
import contextlib
import csv
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops

__all__ = ["PGD", "FGSM", "AttackResult", "robust_accuracy", "save_results", "dlr_loss", "cli_attack_args",
           "cli_attack"]

Param = Union[float, int, torch.Tensor]

_MASK63 = (1 << 63) - 1
_DTYPES = {"float32": None, "fp32": None, "none": None, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def _derive_seed(seed: int, k: int) -> int:
    """Seed of sub-stream k (restart k, rank k): seed itself for k = 0, else a splitmix64 mix."""
    if k == 0:
        return seed & _MASK63
    z = (seed + k * 0x9E3779B97F4A7C15) & ((1 << 64) - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (z ^ (z >> 31)) & _MASK63


def _check_int(v, name: str, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")
    return v


def _check_param(p, name: str, allow_none: bool = False):
    """A float >= 0 or a Tensor[B] of values >= 0 (checked at call time against the batch)."""
    if p is None and allow_none:
        return None
    if isinstance(p, bool) or not isinstance(p, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a float >= 0 or a Tensor[B], got {type(p).__name__}")
    if isinstance(p, torch.Tensor):
        if p.dim() > 1:
            raise ValueError(f"{name} must be a float or a 1-D Tensor[B] (one value per sample), got shape {list(p.shape)}")
        if p.dim() == 0:
            p = float(p)
    if not isinstance(p, torch.Tensor):
        p = float(p)
        if not (p >= 0 and math.isfinite(p)):
            raise ValueError(f"{name} must be a finite float >= 0, got {p}")
    return p


def _dtype_arg(dtype) -> Optional[torch.dtype]:
    if dtype is None or dtype == torch.float32:
        return None
    if isinstance(dtype, str):
        key = dtype.lower()
        if key not in _DTYPES:
            raise ValueError(f"dtype must be one of float32, bfloat16, float16 (or a torch.dtype), got {dtype!r}")
        return _DTYPES[key]
    if dtype in (torch.bfloat16, torch.float16):
        return dtype
    raise ValueError(f"dtype (the autocast dtype) must be None, torch.float32, torch.bfloat16 or torch.float16, "
                     f"got {dtype!r}")


def dlr_loss(logits: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Croce & Hein's difference-of-logits-ratio loss, per sample (higher = closer to a misclassification).
    Untargeted: -(z_y - max_{i != y} z_i) / (z_(1) - z_(3)); targeted: -(z_y - z_t) / (z_(1) - (z_(3) + z_(4)) / 2),
    z_(k) being the k-th largest logit. Needs 3 classes (4 when targeted)."""
    C = logits.shape[1]
    z = logits.float()
    srt = z.sort(dim=1, descending=True).values
    zy = z.gather(1, labels[:, None]).squeeze(1)
    if targets is None:
        if C < 3:
            raise ValueError(f"the DLR loss needs at least 3 classes, the model has {C}")
        top_is_y = z.argmax(1) == labels
        other = torch.where(top_is_y, srt[:, 1], srt[:, 0])
        return -(zy - other) / (srt[:, 0] - srt[:, 2] + 1e-12)
    if C < 4:
        raise ValueError(f"the targeted DLR loss needs at least 4 classes, the model has {C}")
    zt = z.gather(1, targets[:, None]).squeeze(1)
    return -(zy - zt) / (srt[:, 0] - 0.5 * (srt[:, 2] + srt[:, 3]) + 1e-12)


@dataclass
class AttackResult:
    """What :meth:`PGD.perturb` returns, per sample of the batch.

    x_adv: the adversarial inputs (the first iterate that fooled the model when early_stop /
      record_steps is on, else the final iterate of the chosen restart).
    success: BoolTensor[B], the model is fooled (untargeted: prediction != label; targeted:
      prediction == target) by x_adv.
    success_step: LongTensor[B], the step (0 = start point, steps = final iterate) at which the chosen
      restart first fooled the model; -1 where it never did (without early_stop / record_steps only
      the final iterate is examined).
    restart: LongTensor[B], the restart that produced x_adv.
    loss: FloatTensor[B] the attack objective at x_adv (None when not evaluated).
    pred: LongTensor[B] the model's prediction at x_adv (None when not evaluated).
    """
    x_adv: torch.Tensor
    success: Optional[torch.Tensor] = None
    success_step: Optional[torch.Tensor] = None
    restart: Optional[torch.Tensor] = None
    loss: Optional[torch.Tensor] = None
    pred: Optional[torch.Tensor] = None


class _Run:
    """Per-sample state of one attack run (one restart) over a set of samples."""

    def __init__(self, x_adv, success, step, loss, pred):
        self.x_adv, self.success, self.step, self.loss, self.pred = x_adv, success, step, loss, pred


def _bshape(x: torch.Tensor):
    return (-1,) + (1,) * (x.dim() - 1)


def _memory_format(x: torch.Tensor):
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


class PGD:
    """Projected gradient descent (Madry et al. 2018), L-inf or L2, in pixel space.

    model: an nn.Module (or callable) mapping inputs to logits. If it expects normalized inputs, give
      ``mean`` / ``std`` (per channel): the attack then works on [clip] pixels and feeds the model
      ``(x - mean) / std``. A model that normalizes inside takes the pixels as they are.
    eps: radius, a float or a Tensor[B] (per sample); alpha: step size (float or Tensor[B]; default
      2.5 * eps / steps); steps >= 1; norm: "linf" or "l2".
    random_start: start from a uniform draw in the eps-ball (``random_init``), seeded by ``seed``
      (None: a seed drawn from torch's default generator at each call, so torch.manual_seed governs it).
    restarts: independent random starts; per sample the first restart that fools the model is kept,
      else the one with the highest final loss. So more restarts never weaken the attack.
    targeted: minimize the loss towards ``targets`` (given at call time, or made by ``target_fn(images,
      labels)``); success means predicting the target.
    loss: "ce" (cross entropy), "dlr" (Croce & Hein) or a callable ``loss(logits, y)`` returning
      per-sample losses [B] (or a scalar); y is the labels, or the targets when targeted. The attack
      ascends it, or descends it when targeted.
    clip: (lo, hi) valid pixel range; images must lie in it.
    early_stop: evaluation mode: samples that are fooled leave the batch (their x_adv is the iterate
      that fooled), so later steps compute only on samples still standing; a success at any step counts.
    record_steps: keep the full batch but record, per sample, the first step that fooled (and return
      that iterate): the same answer as early_stop, without the early exit.
    train_mode: attack with the model in train mode (as fast adversarial training does; batch-norm
      running statistics are then updated); default eval mode. The model's mode is restored afterwards.
    dtype: autocast dtype for the model's forward (torch.bfloat16 / torch.float16 / their names; None or
      float32: no autocast).
    graph: on CUDA, capture one full iteration (forward, backward to the input, projection) into a
      CUDA graph on static buffers and replay it; new shapes re-capture (a few graphs are cached),
      early exit runs inside the graph as step recording; where capture fails, a warning and the
      eager path.
    """

    max_graphs = 3

    def __init__(self, model, eps: Param, alpha: Optional[Param] = None, steps: int = 10, norm: str = "linf",
                 random_start: bool = True, restarts: int = 1, targeted: bool = False,
                 loss: Union[str, Callable] = "ce", clip=(0.0, 1.0), mean=None, std=None, early_stop: bool = False,
                 record_steps: bool = False, seed: Optional[int] = None, train_mode: bool = False, dtype=None,
                 graph: bool = False, target_fn: Optional[Callable] = None):
        if not callable(model):
            raise TypeError(f"model must be an nn.Module or a callable returning logits, got {type(model).__name__}")
        self.model = model
        self.eps = _check_param(eps, "eps")
        self.alpha = _check_param(alpha, "alpha", allow_none=True)
        self.steps = _check_int(steps, "steps", 1)
        if norm not in ("linf", "l2"):
            raise ValueError(f'norm must be "linf" or "l2", got {norm!r}')
        self.norm = norm
        self.random_start = bool(random_start)
        self.restarts = _check_int(restarts, "restarts", 1)
        self.targeted = bool(targeted)
        if not (callable(loss) or loss in ("ce", "dlr")):
            raise ValueError(f'loss must be "ce", "dlr" or a callable loss(logits, y), got {loss!r}')
        self.loss = loss
        try:
            lo, hi = (float(c) for c in clip)
        except (TypeError, ValueError):
            raise ValueError(f"clip must be a pair (lo, hi) of floats, got {clip!r}") from None
        if not lo < hi:
            raise ValueError(f"clip must be (lo, hi) with lo < hi, got {clip!r}")
        self.clip = (lo, hi)
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std (per-channel normalization in front of the model), or neither")
        self.mean = None if mean is None else torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        self.std = None if std is None else torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if self.std is not None and not bool((self.std > 0).all()):
            raise ValueError(f"std must be > 0 for every channel, got {self.std.tolist()}")
        self.early_stop = bool(early_stop)
        self.record_steps = bool(record_steps)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        self.seed = seed
        self.train_mode = bool(train_mode)
        self.dtype = _dtype_arg(dtype)
        self.graph = bool(graph)
        self.target_fn = target_fn
        self._samples_seen = 0
        self._norm_cache = {}
        self._graphs = collections.OrderedDict()
        self._graph_failed = set()
        self._warned = set()

    # ---------------------------------------------------------------------------- model helpers

    def __repr__(self) -> str:
        eps = self.eps if not isinstance(self.eps, torch.Tensor) else f"Tensor[{self.eps.numel()}]"
        return (f"{type(self).__name__}(eps={eps}, alpha={self.alpha}, steps={self.steps}, norm={self.norm!r}, "
                f"random_start={self.random_start}, restarts={self.restarts}, targeted={self.targeted}, "
                f"loss={self.loss!r}, early_stop={self.early_stop}, graph={self.graph})")

    @property
    def _net(self):
        m = self.model
        if isinstance(m, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            return m.module  # the reducer expects parameter gradients; the attack needs none
        return m

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The model's input for pixels x: (x - mean) / std when mean / std were given, else x."""
        if self.mean is None:
            return x
        key = (x.device, x.dtype, x.dim())
        if key not in self._norm_cache:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            self._norm_cache[key] = (self.mean.to(x.device, x.dtype).reshape(shape),
                                     self.std.to(x.device, x.dtype).reshape(shape))
        m, s = self._norm_cache[key]
        return (x - m) / s

    def _autocast(self, device: torch.device, cache: bool = True):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype, cache_enabled=cache)

    def _logits(self, x: torch.Tensor, cache: bool = True) -> torch.Tensor:
        with self._autocast(x.device, cache):
            out = self._net(self.normalize(x))
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the model must return a logits tensor [B, classes], got {type(out).__name__}")
        return out.float()

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The model's logits for pixels x (normalized as the attack does), in the current model mode."""
        return self._logits(x)

    @contextlib.contextmanager
    def _model_state(self):
        """Model in eval (or train, with train_mode) mode and its parameters not requiring gradients;
        both restored afterwards."""
        net = self._net
        is_module = isinstance(net, nn.Module)
        was_training = net.training if is_module else None
        flags = [(p, p.requires_grad) for p in net.parameters()] if is_module else []
        try:
            if is_module:
                try:
                    net.train(self.train_mode)
                except (NotImplementedError, RuntimeError):
                    pass  # e.g. torch.export modules, whose mode is fixed
            for p, rg in flags:
                if rg:
                    p.requires_grad_(False)
            yield
        finally:
            for p, rg in flags:
                if rg:
                    p.requires_grad_(True)
            if is_module:
                try:
                    net.train(was_training)
                except (NotImplementedError, RuntimeError):
                    pass

    # ------------------------------------------------------------------------------ objective

    def _objective(self, logits, y, t):
        """Per-sample objective to maximize, [B] (a scalar for a callable returning one)."""
        if self.loss == "ce":
            if t is None:
                return F.cross_entropy(logits, y, reduction="none")
            return -F.cross_entropy(logits, t, reduction="none")
        if self.loss == "dlr":
            return dlr_loss(logits, y, t)
        out = self.loss(logits, y if t is None else t)
        if not isinstance(out, torch.Tensor) or out.dim() > 1 or (out.dim() == 1 and out.shape[0] != logits.shape[0]):
            raise ValueError(f"a custom loss must return a scalar or per-sample losses [B], got "
                             f"{list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
        out = out.float()
        return out if t is None else -out

    def _sample_objective(self, logits, y, t):
        obj = self._objective(logits, y, t)
        if obj.dim() == 0:  # a scalar custom loss: rank restarts by cross entropy
            return F.cross_entropy(logits, y, reduction="none") if t is None \
                else -F.cross_entropy(logits, t, reduction="none")
        return obj

    def _success(self, logits, y, t):
        pred = logits.argmax(1)
        return (pred != y) if t is None else (pred == t)

    def _grad(self, xa, y, t):
        """Gradient of the objective with respect to the input only, plus logits and objective."""
        xin = xa.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = self._logits(xin, cache=not self._capturing)
            obj = self._objective(logits, y, t)
            total = obj.sum() if obj.dim() else obj
            (g,) = torch.autograd.grad(total, xin, allow_unused=True)
        if g is None:
            g = torch.zeros_like(xa)
        return g, logits.detach(), obj.detach()

    _capturing = False

    # ------------------------------------------------------------------------------- validation

    def _per_sample(self, p, name: str, B: int, device) -> Union[float, torch.Tensor]:
        p = _check_param(p, name)
        if isinstance(p, torch.Tensor):
            if p.shape[0] != B:
                raise ValueError(f"{name} must be a float or a Tensor[B] with B = {B} (the batch size), "
                                 f"got shape {list(p.shape)}")
            if not p.dtype.is_floating_point and p.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"{name} must hold floating-point values, got {p.dtype}")
            p = p.to(device=device, dtype=torch.float32)
            bad = ~((p >= 0) & torch.isfinite(p))
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise ValueError(f"{name} must be finite and >= 0 for every sample, got {p[i].item()} at index {i}")
        return p

    def _labels(self, labels, B: int, device, name: str) -> torch.Tensor:
        if not isinstance(labels, torch.Tensor):
            try:
                labels = torch.as_tensor(labels)
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(f"{name} must be an integer Tensor[B], got {type(labels).__name__}") from None
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
            raise TypeError(f"{name} must be an integer (int64) Tensor[B] of class indices, got {labels.dtype}")
        if labels.dim() != 1 or labels.shape[0] != B:
            raise ValueError(f"{name} must be a Tensor[B] with B = {B} (one per image), got shape {list(labels.shape)}")
        return labels.to(device=device, dtype=torch.int64)

    def _check_images(self, images):
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor [B, ...], got {type(images).__name__}")
        if images.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"images must be float32, float16 or bfloat16 pixels in clip={self.clip}, got {images.dtype}"
                            + (" (divide uint8 images by 255)" if images.dtype == torch.uint8 else ""))
        if images.dim() < 2:
            raise ValueError(f"images must have a batch dimension [B, ...], got shape {list(images.shape)}")
        if images.numel():
            lo, hi = torch.aminmax(images.detach())
            lo, hi = float(lo), float(hi)
            if not (lo >= self.clip[0] and hi <= self.clip[1]):
                raise ValueError(f"images must lie in clip=({self.clip[0]}, {self.clip[1]}) (pixel space; give "
                                 f"mean/std for a model that takes normalized inputs), got values in [{lo}, {hi}]")
        return images.detach()

    # ------------------------------------------------------------------------------------ call

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor] = None,
                 **kwargs) -> torch.Tensor:
        """Adversarial examples for (images, labels): a tensor like images."""
        return self.perturb(images, labels, targets, evaluate=False, **kwargs).x_adv

    def perturb(self, images: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor] = None,
                eps: Optional[Param] = None, alpha: Optional[Param] = None, offset: Optional[int] = None,
                skip: Optional[torch.Tensor] = None, evaluate: bool = True) -> AttackResult:
        """Runs the attack. images [B, ...] in clip; labels [B]; targets [B] (targeted attacks).

        eps / alpha override the attack's (floats or Tensor[B]). offset: index of this batch's first
        sample in the random stream (default: the number of samples this attack has seen), so that
        every batch draws different random starts, reproducibly from ``seed``. skip: BoolTensor[B] of
        samples counted as already fooled (e.g. misclassified clean inputs); with early_stop they are
        not attacked. evaluate: also compute success / loss / prediction at x_adv (one more forward
        when neither early_stop nor record_steps is on)."""
        x = self._check_images(images)
        B, device = x.shape[0], x.device
        y = self._labels(labels, B, device, "labels")
        t = None
        if self.targeted:
            if targets is None and self.target_fn is not None:
                targets = self.target_fn(x, y)
            if targets is None:
                raise ValueError("a targeted attack needs targets: call atk(images, labels, targets) with a "
                                 "Tensor[B] of target classes, or give target_fn")
            t = self._labels(targets, B, device, "targets")
        elif targets is not None:
            raise ValueError("targets were given to an untargeted attack; build it with targeted=True")
        eps = self._per_sample(self.eps if eps is None else eps, "eps", B, device)
        if alpha is None:
            alpha = self.alpha
        if alpha is None:
            alpha = (eps * (2.5 / self.steps)) if isinstance(eps, torch.Tensor) else 2.5 * eps / self.steps
        alpha = self._per_sample(alpha, "alpha", B, device)
        if skip is not None:
            if not isinstance(skip, torch.Tensor) or skip.dtype != torch.bool or skip.shape != (B,):
                raise ValueError(f"skip must be a BoolTensor[B] with B = {B}, got "
                                 f"{list(skip.shape) if isinstance(skip, torch.Tensor) else type(skip).__name__}")
            skip = skip.to(device)
        if offset is None:
            offset = self._samples_seen
        self._samples_seen = offset + B
        if B == 0:
            empty = torch.zeros(0, dtype=torch.int64, device=device)
            return AttackResult(x.clone(), empty.bool(), empty, empty, torch.zeros(0, device=device), empty)
        base_seed = ops._seed(self.seed)
        with self._model_state():
            if self.early_stop and not self._use_graph(x):
                return self._run_early_stop(x, y, t, eps, alpha, base_seed, offset, skip)
            return self._run_full(x, y, t, eps, alpha, base_seed, offset, skip, evaluate)

    # ---------------------------------------------------------------------------------- starts

    def _start(self, x, eps, seed: int, offset: int) -> torch.Tensor:
        if not self.random_start:
            return x.clone(memory_format=torch.preserve_format)
        D = x[0].numel()
        philox_offset = offset * ((D + 3) // 4)
        return ops.random_init(x, eps, self.norm, self.clip[0], self.clip[1], seed=seed, offset=philox_offset)

    @staticmethod
    def _kparam(p, device):
        """A per-sample parameter in the kernels' form: 0-dim CPU float32 tensor or float32 Tensor[B]."""
        if isinstance(p, torch.Tensor):
            return p
        return torch.tensor(float(p), dtype=torch.float32)

    def _step(self, xa, x, g, eps_k, alpha_k):
        torch.ops.robustops.pgd_step_(xa, x, g, eps_k, alpha_k, self.norm, self.clip[0], self.clip[1])

    # ------------------------------------------------------------------------------ full batch

    def _n_restarts(self) -> int:
        return self.restarts if self.random_start else 1

    def _run_full(self, x, y, t, eps, alpha, base_seed, offset, skip, evaluate) -> AttackResult:
        B = x.shape[0]
        record = self.record_steps or self.early_stop
        n_restarts = self._n_restarts()
        need_eval = evaluate or n_restarts > 1
        use_graph = self._use_graph(x)
        best = None
        best_restart = torch.zeros(B, dtype=torch.int64, device=x.device)
        for r in range(n_restarts):
            if best is not None and self.early_stop:
                done = best.success if skip is None else (best.success | skip)
                if bool(done.all()):
                    break
            xa0 = self._start(x, eps, _derive_seed(base_seed, r), offset)
            run = None
            if use_graph:
                run = self._graph_run(x, xa0, y, t, eps, alpha, record, need_eval, skip)
            if run is None:
                run = self._eager_full(x, xa0, y, t, eps, alpha, record, need_eval)
            if best is None:
                best = run
                continue
            if not need_eval:
                best = run
                continue
            take = ~best.success & (run.success | (run.loss > best.loss))
            tb = take.view(_bshape(x))
            best.x_adv = torch.where(tb, run.x_adv, best.x_adv)
            best.success = torch.where(take, run.success, best.success)
            best.step = torch.where(take, run.step, best.step)
            best.loss = torch.where(take, run.loss, best.loss)
            best.pred = torch.where(take, run.pred, best.pred)
            best_restart = torch.where(take, torch.full_like(best_restart, r), best_restart)
        res = AttackResult(best.x_adv, best.success, best.step, best_restart, best.loss, best.pred)
        if skip is not None and res.success is not None:
            res.success = res.success | skip
            res.success_step = torch.where(skip & (res.success_step < 0), torch.zeros_like(res.success_step),
                                           res.success_step)
        return res

    def _eager_full(self, x, xa, y, t, eps, alpha, record, need_eval) -> _Run:
        eps_k, alpha_k = self._kparam(eps, x.device), self._kparam(alpha, x.device)
        B = x.shape[0]
        if record:
            step = torch.full((B,), -1, dtype=torch.int64, device=x.device)
            x_first = torch.empty_like(xa)
            obj_first = torch.zeros(B, device=x.device)
            pred_first = torch.zeros(B, dtype=torch.int64, device=x.device)
        for k in range(self.steps):
            g, logits, obj = self._grad(xa, y, t)
            if record:
                new = self._success(logits, y, t) & (step < 0)
                step = torch.where(new, torch.full_like(step, k), step)
                x_first = torch.where(new.view(_bshape(x)), xa, x_first)
                so = obj if obj.dim() else self._sample_objective(logits, y, t)
                obj_first = torch.where(new, so, obj_first)
                pred_first = torch.where(new, logits.argmax(1), pred_first)
            self._step(xa, x, g, eps_k, alpha_k)
        if not (need_eval or record):
            return _Run(xa, None, None, None, None)
        with torch.no_grad():
            logits = self._logits(xa)
        succ = self._success(logits, y, t)
        obj = self._sample_objective(logits, y, t)
        pred = logits.argmax(1)
        if not record:
            step = torch.where(succ, torch.full((B,), self.steps, dtype=torch.int64, device=x.device),
                               torch.full((B,), -1, dtype=torch.int64, device=x.device))
            return _Run(xa, succ, step, obj, pred)
        new = succ & (step < 0)
        step = torch.where(new, torch.full_like(step, self.steps), step)
        found = step >= 0
        fb = (found & ~new).view(_bshape(x))
        return _Run(torch.where(fb, x_first, xa), found, step, torch.where(found & ~new, obj_first, obj),
                    torch.where(found & ~new, pred_first, pred))

    # ------------------------------------------------------------------------------ early exit

    def _run_early_stop(self, x, y, t, eps, alpha, base_seed, offset, skip) -> AttackResult:
        B, device = x.shape[0], x.device
        fmt = _memory_format(x)
        out_x = x.clone(memory_format=torch.preserve_format)
        success = torch.zeros(B, dtype=torch.bool, device=device) if skip is None else skip.clone()
        step = torch.full((B,), -1, dtype=torch.int64, device=device)
        if skip is not None:
            step[skip] = 0
        restart = torch.zeros(B, dtype=torch.int64, device=device)
        loss = torch.full((B,), float("-inf"), device=device)
        pred = torch.full((B,), -1, dtype=torch.int64, device=device)
        n_restarts = self._n_restarts()
        for r in range(n_restarts):
            idx = (~success).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            xa_full = self._start(x, eps, _derive_seed(base_seed, r), offset)
            sel = lambda v: v if not isinstance(v, torch.Tensor) or v.dim() == 0 else v.index_select(0, idx)  # noqa: E731
            xs = sel(x).contiguous(memory_format=fmt)
            xa = sel(xa_full).contiguous(memory_format=fmt)
            del xa_full
            ys, ts = sel(y), (None if t is None else sel(t))
            es, als = self._kparam(sel(eps), device), self._kparam(sel(alpha), device)
            for k in range(self.steps + 1):
                if k < self.steps:
                    g, logits, obj = self._grad(xa, ys, ts)
                else:
                    with torch.no_grad():
                        logits = self._logits(xa)
                    obj = None
                fooled = self._success(logits, ys, ts)
                last = k == self.steps
                if obj is None or obj.dim() == 0:
                    obj = self._sample_objective(logits, ys, ts)
                if last:
                    # Samples still standing: keep this restart's final iterate if its loss is higher.
                    take = fooled | (obj > loss.index_select(0, idx))
                    ti = idx[take]
                    out_x[ti] = xa[take].to(out_x.dtype)
                    success[ti] = fooled[take]
                    step[ti] = torch.where(fooled[take], torch.full_like(ti, k), torch.full_like(ti, -1))
                    restart[ti] = r
                    loss[ti] = obj[take]
                    pred[ti] = logits.argmax(1)[take]
                    break
                n_fooled = int(fooled.sum())
                if n_fooled:
                    fi = idx[fooled]
                    out_x[fi] = xa[fooled]
                    success[fi] = True
                    step[fi] = k
                    restart[fi] = r
                    loss[fi] = obj[fooled]
                    pred[fi] = logits.argmax(1)[fooled]
                    if n_fooled == idx.numel():
                        break
                    keep = (~fooled).nonzero().squeeze(1)
                    ksel = lambda v: v if v is None or v.dim() == 0 else v.index_select(0, keep)  # noqa: E731
                    idx, ys, ts, es, als, g = ksel(idx), ksel(ys), ksel(ts), ksel(es), ksel(als), ksel(g)
                    xs = ksel(xs).contiguous(memory_format=fmt)
                    xa = ksel(xa).contiguous(memory_format=fmt)
                self._step(xa, xs, g, es, als)
        return AttackResult(out_x, success, step, restart, loss, pred)

    # ------------------------------------------------------------------------------- CUDA graph

    def _use_graph(self, x) -> bool:
        if not self.graph:
            return False
        if x.device.type != "cuda":
            if "device" not in self._warned:
                self._warned.add("device")
                warnings.warn(f"graph=True needs CUDA inputs, got {x.device}: running the eager path", stacklevel=4)
            return False
        return True

    def _graph_key(self, x, record):
        net = self._net
        # The graph reads the model's parameters and buffers where they were at capture: a model moved
        # or re-allocated since (.to(), new tensors) gets a new graph.
        storage = tuple(t.data_ptr() for t in net.parameters()) + tuple(t.data_ptr() for t in net.buffers()) \
            if isinstance(net, nn.Module) else ()
        return (tuple(x.shape), x.dtype, x.device, _memory_format(x), record, self.targeted, self.norm, self.clip,
                id(self.loss) if callable(self.loss) else self.loss, self.dtype, self.train_mode, self.steps,
                id(net), hash(storage),
                None if self.mean is None else (tuple(self.mean.tolist()), tuple(self.std.tolist())))

    def _graph_run(self, x, xa0, y, t, eps, alpha, record, need_eval, skip) -> Optional[_Run]:
        key = self._graph_key(x, record)
        if key in self._graph_failed:
            return None
        runner = self._graphs.get(key)
        if runner is not None:
            self._graphs.move_to_end(key)
        try:
            if runner is None:
                runner = _GraphIteration(self, x, y, t, record)
                runner.load(x, xa0, y, t, eps, alpha)
                runner.capture()
                self._graphs[key] = runner
                while len(self._graphs) > self.max_graphs:
                    self._graphs.popitem(last=False)
        except Exception as e:  # noqa: BLE001 -- any capture failure falls back to eager
            self._graph_failed.add(key)
            warnings.warn(f"robustops PGD: CUDA-graph capture failed for input shape {list(x.shape)} "
                          f"({type(e).__name__}: {e}); using the eager path for it", stacklevel=4)
            try:
                torch.cuda.synchronize(x.device)
            except RuntimeError:
                pass
            return None
        runner.load(x, xa0, y, t, eps, alpha)
        check_every = 4 if self.early_stop else 0
        for k in range(self.steps):
            runner.graph.replay()
            if check_every and (k + 1) % check_every == 0 and k + 1 < self.steps:
                done = runner.step >= 0
                if skip is not None:
                    done = done | skip
                if bool(done.all()):
                    break
        xa = runner.xa.clone(memory_format=torch.preserve_format)
        if not record:
            if not need_eval:
                return _Run(xa, None, None, None, None)
            return self._eval_final(xa, y, t)
        # Record mode: the graph kept the first fooling iterate of each sample.
        with torch.no_grad():
            logits = self._logits(xa)
        succ = self._success(logits, y, t)
        obj = self._sample_objective(logits, y, t)
        step = runner.step.clone()
        new = succ & (step < 0)
        step = torch.where(new, torch.full_like(step, self.steps), step)
        found = step >= 0
        old = found & ~new
        return _Run(torch.where(old.view(_bshape(x)), runner.x_first, xa), found, step,
                    torch.where(old, runner.obj_first, obj), torch.where(old, runner.pred_first, logits.argmax(1)))

    def _eval_final(self, xa, y, t) -> _Run:
        with torch.no_grad():
            logits = self._logits(xa)
        succ = self._success(logits, y, t)
        step = torch.where(succ, torch.full_like(y, self.steps), torch.full_like(y, -1))
        return _Run(xa, succ, step, self._sample_objective(logits, y, t), logits.argmax(1))


class _GraphIteration:
    """One PGD iteration captured into a CUDA graph over static buffers:
    x (clean), xa (iterate), y, t, eps[B], alpha[B] (+ step-recording state). Replaying it advances
    xa by one step; the caller loads new inputs by copying into the buffers."""

    def __init__(self, attack: PGD, x, y, t, record: bool):
        self.attack = attack
        self.record = record
        B, dev = x.shape[0], x.device
        self.x = torch.empty_like(x, memory_format=torch.preserve_format)
        self.xa = torch.empty_like(x, memory_format=torch.preserve_format)
        self.y = torch.empty_like(y)
        self.t = None if t is None else torch.empty_like(t)
        self.eps = torch.empty(B, dtype=torch.float32, device=dev)
        self.alpha = torch.empty(B, dtype=torch.float32, device=dev)
        if record:
            self.step = torch.full((B,), -1, dtype=torch.int64, device=dev)
            self.k = torch.zeros((), dtype=torch.int64, device=dev)
            self.x_first = torch.empty_like(self.xa)
            self.obj_first = torch.zeros(B, device=dev)
            self.pred_first = torch.zeros(B, dtype=torch.int64, device=dev)
        self.graph = None

    def load(self, x, xa0, y, t, eps, alpha):
        self.x.copy_(x)
        self.xa.copy_(xa0)
        self.y.copy_(y)
        if self.t is not None:
            self.t.copy_(t)
        self.eps.copy_(eps if isinstance(eps, torch.Tensor) else torch.full_like(self.eps, float(eps)))
        self.alpha.copy_(alpha if isinstance(alpha, torch.Tensor) else torch.full_like(self.alpha, float(alpha)))
        if self.record:
            self.step.fill_(-1)
            self.k.zero_()

    def iteration(self):
        atk = self.attack
        g, logits, obj = atk._grad(self.xa, self.y, self.t)
        if self.record:
            new = atk._success(logits, self.y, self.t) & (self.step < 0)
            self.step.copy_(torch.where(new, self.k, self.step))
            self.x_first.copy_(torch.where(new.view(_bshape(self.xa)), self.xa, self.x_first))
            so = obj if obj.dim() else atk._sample_objective(logits, self.y, self.t)
            self.obj_first.copy_(torch.where(new, so, self.obj_first))
            self.pred_first.copy_(torch.where(new, logits.argmax(1), self.pred_first))
            self.k.add_(1)
        atk._step(self.xa, self.x, g, self.eps, self.alpha)

    def capture(self):
        atk = self.attack
        net = atk._net
        dev = self.x.device
        # Warm-up iterations run for real: the model's buffers (batch-norm statistics in train mode)
        # and the loaded inputs are put back as they were, whether capture succeeds or not.
        saved_buffers = [(b, b.detach().clone()) for b in net.buffers()] if isinstance(net, nn.Module) else []
        saved_xa = self.xa.clone(memory_format=torch.preserve_format)
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        atk._capturing = True
        try:
            with torch.cuda.stream(side):
                for _ in range(3):
                    self.iteration()
            torch.cuda.current_stream(dev).wait_stream(side)
            self._restore(saved_buffers, saved_xa)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.iteration()
            self.graph = graph
        finally:
            atk._capturing = False
            torch.cuda.current_stream(dev).wait_stream(side)
            self._restore(saved_buffers, saved_xa)

    def _restore(self, saved_buffers, saved_xa):
        with torch.no_grad():
            for b, v in saved_buffers:
                b.copy_(v)
            self.xa.copy_(saved_xa)
            if self.record:
                self.step.fill_(-1)
                self.k.zero_()


class FGSM(PGD):
    """Fast gradient sign method (Goodfellow et al. 2015): one step of size alpha = eps (L-inf) from
    the clean input. With random_start=True it is FGSM-RS (Wong et al. 2020): a uniform start in the
    ball and a step of alpha = 1.25 * eps by default. Other options as :class:`PGD`."""

    def __init__(self, model, eps: Param, alpha: Optional[Param] = None, norm: str = "linf",
                 random_start: bool = False, **kwargs):
        if "steps" in kwargs and kwargs.pop("steps") != 1:
            raise ValueError("FGSM takes exactly one step; use PGD for more")
        eps = _check_param(eps, "eps")
        if alpha is None:
            alpha = eps * (1.25 if random_start else 1.0)
        super().__init__(model, eps=eps, alpha=alpha, steps=1, norm=norm, random_start=random_start, **kwargs)


# ----------------------------------------------------------------------------- robust accuracy

def _model_device(model) -> torch.device:
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
        for b in model.buffers():
            return b.device
    return torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(model):
    was = model.training if isinstance(model, nn.Module) else None
    try:
        if was:
            model.eval()
        yield
    finally:
        if was:
            model.train(True)


def robust_accuracy(model, loader, attack: PGD, device=None, progress: bool = True, desc: str = "attack",
                    max_samples: Optional[int] = None) -> dict:
    """Clean and robust accuracy of model over loader under attack.

    loader yields (images, labels) or (images, labels, indices) batches (indices: the samples' dataset
    indices, e.g. from ``robustops.data.IndexedDataset``). A sample is robust when it is classified
    correctly clean and the attack does not succeed (with early_stop / record_steps: at no step).
    With attack.early_stop, misclassified clean samples are not attacked.

    Returns {"clean_acc", "robust_acc", "n", "clean_correct", "robust_correct", "time_s",
    "samples_per_s", "samples"} where samples is a dict of per-sample CPU tensors (index, label,
    clean_pred, adv_pred, clean_correct, robust_correct, success, success_step, restart, linf, l2,
    and target for targeted attacks), ready for :func:`save_results`."""
    from tqdm.auto import tqdm

    if device is None:
        device = _model_device(attack.model if model is None else model)
    device = torch.device(device)
    model = attack.model if model is None else model
    cols = collections.defaultdict(list)
    n = clean_ok_total = robust_ok_total = 0
    t0 = time.perf_counter()
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True, file=sys.stderr)
    for batch in bar:
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            raise ValueError("the loader must yield (images, labels) or (images, labels, indices) batches")
        x, y = batch[0], batch[1]
        idx = batch[2] if len(batch) > 2 else torch.arange(n, n + x.shape[0])
        if max_samples is not None and n + x.shape[0] > max_samples:
            keep = max_samples - n
            x, y, idx = x[:keep], y[:keep], idx[:keep]
        if x.shape[0] == 0:
            break
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True).long()
        idx = torch.as_tensor(idx).long()
        with torch.no_grad(), _eval_mode(model):
            clean_pred = model(attack.normalize(x)).argmax(1)
        clean_ok = clean_pred == y
        targets = None
        if attack.targeted:
            if len(batch) > 3:
                targets = torch.as_tensor(batch[3]).to(device).long()
            elif attack.target_fn is not None:
                targets = torch.as_tensor(attack.target_fn(x, y)).to(device).long()
            else:
                raise ValueError("a targeted attack in robust_accuracy needs attack.target_fn (or a loader that "
                                 "yields (images, labels, indices, targets))")
        res = attack.perturb(x, y, targets, offset=int(idx[0]) if len(batch) > 2 else n,
                             skip=~clean_ok if attack.early_stop else None, evaluate=True)
        if attack.train_mode or res.pred is None:
            with torch.no_grad(), _eval_mode(model):
                adv_pred = model(attack.normalize(res.x_adv)).argmax(1)
        else:
            adv_pred = res.pred
        if attack.targeted:
            robust_ok = clean_ok & (adv_pred == y)
        else:
            robust_ok = clean_ok & ~res.success & (adv_pred == y)
        delta = (res.x_adv.float() - x.float()).flatten(1)
        cols["index"].append(idx.cpu())
        cols["label"].append(y.cpu())
        cols["clean_pred"].append(clean_pred.cpu())
        cols["adv_pred"].append(adv_pred.cpu())
        cols["clean_correct"].append(clean_ok.cpu())
        cols["robust_correct"].append(robust_ok.cpu())
        cols["success"].append(res.success.cpu())
        cols["success_step"].append(res.success_step.cpu())
        cols["restart"].append(res.restart.cpu())
        cols["linf"].append(delta.abs().amax(1).cpu() if delta.shape[1] else torch.zeros(delta.shape[0]))
        cols["l2"].append(delta.norm(dim=1).cpu())
        if attack.targeted:
            cols["target"].append(targets.cpu())
        n += x.shape[0]
        clean_ok_total += int(clean_ok.sum())
        robust_ok_total += int(robust_ok.sum())
        bar.set_postfix(clean=f"{clean_ok_total / n:.4f}", robust=f"{robust_ok_total / n:.4f}")
        if max_samples is not None and n >= max_samples:
            break
    bar.close()
    elapsed = time.perf_counter() - t0
    samples = {k: torch.cat(v) for k, v in cols.items()}
    return {"clean_acc": clean_ok_total / n if n else float("nan"),
            "robust_acc": robust_ok_total / n if n else float("nan"),
            "n": n, "clean_correct": clean_ok_total, "robust_correct": robust_ok_total,
            "time_s": elapsed, "samples_per_s": n / elapsed if elapsed > 0 else float("nan"),
            "samples": samples}


RESULT_COLUMNS = ("index", "label", "clean_pred", "adv_pred", "clean_correct", "robust_correct", "success",
                  "success_step", "restart", "linf", "l2", "target")


def _rows(samples: dict) -> list:
    cols = [c for c in RESULT_COLUMNS if c in samples]
    data = [samples[c].tolist() for c in cols]
    rows = []
    for vals in zip(*data):
        row = {}
        for c, v in zip(cols, vals):
            row[c] = int(v) if isinstance(v, bool) else (f"{v:.6g}" if isinstance(v, float) else v)
        rows.append(row)
    return rows


def save_results(path: str, samples_or_rows) -> str:
    """Writes per-sample results (robust_accuracy's "samples" dict, or a list of row dicts) as a TSV
    sorted by index, with a header line. Returns path."""
    rows = _rows(samples_or_rows) if isinstance(samples_or_rows, dict) else list(samples_or_rows)
    rows.sort(key=lambda r: int(r["index"]))
    cols = [c for c in RESULT_COLUMNS if rows and c in rows[0]] or list(RESULT_COLUMNS[:-1])
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(cols)
        for r in rows:
            w.writerow([r[c] for c in cols])
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------ CLI

def _fraction(s: str) -> float:
    try:
        v = float(Fraction(s))
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"expected a number or a fraction like 8/255, got {s!r}") from None
    return v


def cli_attack_args(parser) -> None:
    p = parser
    p.add_argument("--checkpoint", required=True, help="model file: a robustops checkpoint, a raw state dict "
                   "(with --model), a TorchScript or a torch.export file")
    p.add_argument("--model", default=None, help="model name for a raw state dict (small_cnn, preact_resnet18, "
                   "resnet20, resnet110)")
    p.add_argument("--data", default="digits", help='"digits" (embedded), a .npz file, "cifar10:DIR" or '
                   '"imagefolder:DIR" (default: digits)')
    p.add_argument("--split", default="test", help="train or test (default: test)")
    p.add_argument("--norm", default="linf", choices=["linf", "l2"])
    p.add_argument("--eps", type=_fraction, default=None, help="radius, e.g. 0.1 or 8/255 (default: 8/255 "
                   "for linf, 0.5 for l2)")
    p.add_argument("--alpha", type=_fraction, default=None, help="step size (default: 2.5 * eps / steps)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--restarts", type=int, default=1)
    p.add_argument("--loss", default="ce", choices=["ce", "dlr"])
    p.add_argument("--fgsm", action="store_true", help="FGSM instead of PGD (one step of size eps)")
    p.add_argument("--no-random-start", dest="random_start", action="store_false")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--max", "--max-samples", dest="max", type=int, default=None,
                   help="attack only the first MAX samples (--max-samples: the same, for use under torchrun, "
                        "whose own --max-restarts option makes --max ambiguous)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--out", default=None, help="per-sample results TSV")
    p.add_argument("--early-stop", action="store_true", help="samples that are fooled leave the batch")
    p.add_argument("--graph", action="store_true", help="CUDA-graph replay of the attack iteration (CUDA only)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "bf16", "float16", "fp16"],
                   help="autocast dtype of the model's forward")
    p.add_argument("--normalize", action="store_true", help="the model takes inputs normalized with the "
                   "dataset's mean/std: the attack normalizes in front of it")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def _dist_setup(device_arg):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        dev = device_arg or ("cuda" if torch.cuda.is_available() else "cpu")
        return 0, 1, torch.device(dev), False
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    dev = device_arg or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(dev)
    if device.type == "cuda":
        device = torch.device("cuda", local if device.index is None else device.index)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device, True


def cli_attack(args) -> int:
    from torch.utils.data import DataLoader, Subset

    from .data import IndexedDataset, get_dataset, shard
    from .models import load_model

    for name in ("steps", "restarts", "batch"):
        if getattr(args, name) < 1:
            print(f"robustops attack: --{name} must be >= 1, got {getattr(args, name)}", file=sys.stderr)
            return 2
    rank, world, device, distributed = _dist_setup(args.device)
    try:
        try:
            model = load_model(args.checkpoint, name=args.model).to(device)
            dataset, info = get_dataset(args.data, args.split)
        except (ValueError, FileNotFoundError, KeyError) as e:
            print(f"robustops attack: error: {e}", file=sys.stderr)
            return 2
        if args.max is not None:
            dataset = Subset(dataset, list(range(min(args.max, len(dataset)))))
        part = shard(dataset, rank, world) if world > 1 else dataset
        loader = DataLoader(IndexedDataset(part), batch_size=args.batch, shuffle=False)
        eps = args.eps if args.eps is not None else (8 / 255 if args.norm == "linf" else 0.5)
        mean = std = None
        if args.normalize:
            if info.get("mean") is None:
                print(f"robustops attack: --normalize: dataset {info['name']} has no mean/std", file=sys.stderr)
                return 2
            mean, std = info["mean"], info["std"]
        common = dict(norm=args.norm, loss=args.loss, mean=mean, std=std, early_stop=args.early_stop,
                      seed=_derive_seed(args.seed, rank), graph=args.graph, dtype=args.dtype,
                      random_start=args.random_start, restarts=args.restarts)
        if args.fgsm:
            attack = FGSM(model, eps=eps, alpha=args.alpha, **common)
        else:
            attack = PGD(model, eps=eps, alpha=args.alpha, steps=args.steps, **common)
        res = robust_accuracy(model, loader, attack, device=device, progress=args.progress and rank == 0)
        rows = _rows(res["samples"])
        stats = [res["n"], res["clean_correct"], res["robust_correct"], res["time_s"]]
        if distributed:
            import torch.distributed as dist

            gathered = [None] * world if rank == 0 else None
            dist.gather_object((rows, stats), gathered, dst=0)
            if rank == 0:
                rows = [r for part_rows, _ in gathered for r in part_rows]
                parts = [s for _, s in gathered]
                stats = [sum(s[0] for s in parts), sum(s[1] for s in parts), sum(s[2] for s in parts),
                         max(s[3] for s in parts)]
        if rank == 0:
            n, clean, robust, elapsed = stats
            if args.out:
                save_results(args.out, rows)
            what = "FGSM" if args.fgsm else f"PGD-{args.steps}"
            print(f"{what} {args.norm} eps={eps:.6g} restarts={args.restarts} on {info['name']}/{args.split} "
                  f"({n} samples, {world} rank{'s' if world > 1 else ''}, {device.type}, {elapsed:.1f}s)")
            print(f"clean_acc {clean / max(n, 1):.4f}  robust_acc {robust / max(n, 1):.4f}  n {n}  "
                  f"clean_correct {clean}  robust_correct {robust}")
            if args.out:
                print(f"per-sample results: {args.out}")
    finally:
        if distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()
                dist.destroy_process_group()
    return 0
