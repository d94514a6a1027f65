"""Adversarial training: natural, PGD-AT, free-AT, FGSM-RS, TRADES and Gaussian-noise training.

``fit(model, train_loader, method, ...)`` trains a model in place and returns a :class:`FitResult`.
The inner attack loops call the fused ops directly (``random_init`` + ``pgd_step_`` with
``torch.autograd.grad`` taken with respect to the input only; ``recycle_step_`` for the persistent
perturbation of free-AT and FGSM with "previous" init; ``gaussian_noise`` for noise augmentation),
so no attack object, no weight-gradient work and no temporaries are spent on them.

Methods (Madry et al. 2018; Shafahi et al. 2019; Wong et al. 2020; Zhang et al. 2019; Cohen et al. 2019):

- ``natural``: cross-entropy on clean inputs.
- ``pgd``: PGD-k adversarial training (``eps``, ``alpha``, ``steps``, ``norm`` "linf" or "l2",
  ``random_start``); the model is trained on the attack's output only.
- ``free``: gradient recycling. Each minibatch is replayed ``m`` times; every replay is one
  forward/backward pass that yields the weight gradient (an optimizer step) and the input gradient
  (a ``recycle_step_`` of the perturbation, step ``alpha`` = eps by default). The perturbation
  persists across minibatches. ``epochs`` counts forward/backward passes like natural training:
  the data are traversed ``ceil(epochs / m)`` times.
- ``fgsm``: FGSM with random start, ``alpha`` = 1.25 eps by default; ``fgsm_init`` = "random",
  "zero" or "previous" (keep the perturbation of the previous minibatch).
- ``trades``: TRADES with ``beta``: the inner loop maximises KL(f(x) || f(x')) with the fused step
  (model in eval mode, as in the paper), the outer loss is CE(f(x), y) + beta KL(f(x) || f(x')).
- ``gaussian``: Gaussian noise augmentation at ``sigma`` (models to be certified by randomized
  smoothing).

Shared: SGD / Adam; "cyclic" (one cycle, Wong et al.), "multistep", "cosine" and "constant"
learning-rate schedules, stepped every optimizer step; bf16 / fp16 autocast (fp16 with a
GradScaler); channels_last; validation every epoch (clean, PGD and, for ``gaussian``, noisy
accuracy) with selection and early stopping on the robust metric (robust overfitting, Rice et al.
2020) that keeps the best checkpoint; a checkpoint every epoch (written atomically) and ``resume=``
that continues exactly (model, optimizer, scheduler, GradScaler, every RNG, the persistent
perturbation, the early-stopping state); a CSV log; tqdm progress.

Distributed: when ``torch.distributed`` is initialised with more than one process, ``fit`` wraps
the model in DistributedDataParallel (nccl on GPU, gloo on CPU). Give it a train loader whose
sampler is a ``DistributedSampler`` (its ``set_epoch`` is called every epoch); validation counts
are summed over the processes. ``robustops train`` run under ``torchrun`` sets all of this up.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops

METHODS = ("natural", "pgd", "free", "fgsm", "trades", "gaussian")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cyclic", "multistep", "cosine", "constant")
AMP_MODES = ("none", "bf16", "fp16")
FGSM_INITS = ("random", "zero", "previous")
NORMS = ("linf", "l2")
METRICS = ("robust_acc", "clean_acc", "noise_acc", "last")

CHECKPOINT_FORMAT = "robustops.train/1"


# ------------------------------------------------------------------------------------ config

@dataclass
class FitConfig:
    """Every hyperparameter of a training run (saved in its checkpoints)."""
    method: str = "natural"
    epochs: int = 10
    # threat model / attack used in training
    eps: float = 8 / 255
    alpha: Optional[float] = None          # pgd/trades: 2.5*eps/steps; fgsm: 1.25*eps; free: eps
    steps: int = 7
    norm: str = "linf"
    random_start: bool = True
    m: int = 8                             # free: replays per minibatch
    fgsm_init: str = "random"
    beta: float = 6.0                      # trades
    sigma: float = 0.25                    # gaussian
    lo: float = 0.0
    hi: float = 1.0
    mean: Optional[Sequence[float]] = None  # optional input normalisation applied inside the forward
    std: Optional[Sequence[float]] = None
    # optimisation
    optimizer: str = "sgd"
    lr: Optional[float] = None             # sgd: 0.1, adam: 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "cyclic"
    milestones: Optional[Sequence[float]] = None  # multistep, in epochs of `epochs`; default 50% and 75%
    gamma: float = 0.1
    amp: Optional[str] = None              # None/"none", "bf16", "fp16"
    channels_last: bool = False
    seed: Optional[int] = None
    # validation / early stopping
    val_eps: Optional[float] = None        # default eps; 0 disables the PGD evaluation
    val_alpha: Optional[float] = None      # default 2.5*val_eps/val_steps
    val_steps: int = 10
    val_norm: Optional[str] = None         # default norm
    val_every: int = 1
    select: Optional[str] = None           # robust_acc (adversarial methods), clean_acc (natural), noise_acc (gaussian)
    patience: Optional[int] = None         # stop after this many validations without improvement
    restore_best: bool = True
    keep_all: bool = False                 # also keep epoch_<k>.pt

    def resolved(self) -> "FitConfig":
        """A copy with the defaults that depend on other fields filled in, validated."""
        c = dataclasses.replace(self)
        _validate(c)
        if c.amp == "none":
            c.amp = None
        if c.alpha is None:
            c.alpha = {"pgd": 2.5 * c.eps / c.steps, "trades": 2.5 * c.eps / c.steps, "fgsm": 1.25 * c.eps,
                       "free": c.eps}.get(c.method, 2.5 * c.eps / c.steps)
        if c.lr is None:
            c.lr = 0.1 if c.optimizer == "sgd" else 1e-3
        if c.val_eps is None:
            c.val_eps = c.eps
        if c.val_norm is None:
            c.val_norm = c.norm
        if c.val_alpha is None:
            c.val_alpha = 2.5 * c.val_eps / c.val_steps
        if c.milestones is None:
            c.milestones = (0.5 * c.epochs, 0.75 * c.epochs)
        c.milestones = tuple(float(v) for v in c.milestones)
        if c.select is None:
            c.select = {"natural": "clean_acc", "gaussian": "noise_acc"}.get(c.method, "robust_acc")
        if c.select == "robust_acc" and c.val_eps == 0:
            c.select = "clean_acc"
        if c.mean is not None:
            c.mean = tuple(float(v) for v in np.atleast_1d(np.asarray(c.mean, dtype=np.float64)))
        if c.std is not None:
            c.std = tuple(float(v) for v in np.atleast_1d(np.asarray(c.std, dtype=np.float64)))
        return c

    @property
    def passes(self) -> int:
        """Traversals of the training data: epochs, or ceil(epochs / m) for free-AT."""
        return math.ceil(self.epochs / self.m) if self.method == "free" else self.epochs


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _validate(c: FitConfig) -> None:
    def need(cond, msg):
        if not cond:
            raise ValueError(msg)

    need(c.method in METHODS, f"method must be one of {', '.join(METHODS)}; got {c.method!r}")
    need(_is_int(c.epochs) and c.epochs >= 1, f"epochs must be an int >= 1, got {c.epochs!r}")
    need(_is_num(c.eps) and c.eps >= 0, f"eps must be a number >= 0, got {c.eps!r}")
    need(c.alpha is None or (_is_num(c.alpha) and c.alpha >= 0), f"alpha must be a number >= 0, got {c.alpha!r}")
    need(_is_int(c.steps) and c.steps >= 1, f"steps must be an int >= 1, got {c.steps!r}")
    need(c.norm in NORMS, f'norm must be "linf" or "l2", got {c.norm!r}')
    need(_is_int(c.m) and c.m >= 1, f"m (free-AT replays per minibatch) must be an int >= 1, got {c.m!r}")
    need(c.fgsm_init in FGSM_INITS, f"fgsm_init must be one of {', '.join(FGSM_INITS)}; got {c.fgsm_init!r}")
    need(_is_num(c.beta) and c.beta >= 0, f"beta must be a number >= 0, got {c.beta!r}")
    need(_is_num(c.sigma) and c.sigma >= 0, f"sigma must be a number >= 0, got {c.sigma!r}")
    need(_is_num(c.lo) and _is_num(c.hi) and c.lo <= c.hi, f"lo must be <= hi, got lo={c.lo!r}, hi={c.hi!r}")
    need(c.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {c.optimizer!r}")
    need(c.lr is None or (_is_num(c.lr) and c.lr > 0), f"lr must be a number > 0, got {c.lr!r}")
    need(_is_num(c.momentum) and c.momentum >= 0, f"momentum must be >= 0, got {c.momentum!r}")
    need(_is_num(c.weight_decay) and c.weight_decay >= 0, f"weight_decay must be >= 0, got {c.weight_decay!r}")
    need(c.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}; got {c.schedule!r}")
    if c.milestones is not None:
        need(all(_is_num(v) and v > 0 for v in c.milestones),
             f"milestones must be positive epoch numbers, got {list(c.milestones)!r}")
    need(_is_num(c.gamma) and c.gamma > 0, f"gamma must be > 0, got {c.gamma!r}")
    need(c.amp in (None,) + AMP_MODES, f"amp must be None, 'none', 'bf16' or 'fp16'; got {c.amp!r}")
    need(c.val_eps is None or (_is_num(c.val_eps) and c.val_eps >= 0), f"val_eps must be >= 0, got {c.val_eps!r}")
    need(c.val_alpha is None or (_is_num(c.val_alpha) and c.val_alpha >= 0),
         f"val_alpha must be >= 0, got {c.val_alpha!r}")
    need(_is_int(c.val_steps) and c.val_steps >= 1, f"val_steps must be an int >= 1, got {c.val_steps!r}")
    need(c.val_norm is None or c.val_norm in NORMS, f'val_norm must be "linf" or "l2", got {c.val_norm!r}')
    need(_is_int(c.val_every) and c.val_every >= 1, f"val_every must be an int >= 1, got {c.val_every!r}")
    need(c.select is None or c.select in METRICS, f"select must be one of {', '.join(METRICS)}; got {c.select!r}")
    need(c.patience is None or (_is_int(c.patience) and c.patience >= 1),
         f"patience must be None or an int >= 1, got {c.patience!r}")
    need(c.seed is None or _is_int(c.seed), f"seed must be an int or None, got {c.seed!r}")
    if c.std is not None:
        need(all(v > 0 for v in np.atleast_1d(np.asarray(c.std, dtype=np.float64))), f"std must be > 0, got {c.std!r}")


# ---------------------------------------------------------------------------------- helpers

class Normalized(nn.Module):
    """``model((x - mean) / std)``: attacks and noise act on inputs in [lo, hi], the model sees
    normalised inputs. Its state_dict is the wrapped model's under ``model.``; ``fit`` saves the
    wrapped model's own state_dict."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        return self.model((x - self.mean) / self.std)


class _Forward(nn.Module):
    """What DistributedDataParallel wraps: one call may run the model on several inputs (TRADES'
    clean and adversarial batches), so each parameter's gradient is accumulated and all-reduced once."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, *xs):
        if len(xs) == 1:
            return self.net(xs[0])
        return tuple(self.net(x) for x in xs)


class _LRFactor:
    """Learning-rate factor as a function of the optimizer step (a picklable LambdaLR callable)."""

    def __init__(self, schedule: str, total_steps: int, milestones: Sequence[float]):
        self.schedule = schedule
        self.total = max(1, int(total_steps))
        self.milestones = sorted(float(v) for v in milestones)  # fractions of training
        self.gamma = 0.1

    def __call__(self, step: int) -> float:
        t = min(1.0, (step + 1) / self.total)  # progress after this step
        if self.schedule == "cyclic":  # 0 -> peak at 40% -> 0 (Wong et al.'s one cycle)
            return t / 0.4 if t <= 0.4 else max(0.0, (1.0 - t) / 0.6)
        if self.schedule == "multistep":
            done = step / self.total
            return self.gamma ** sum(1 for ms in self.milestones if done >= ms)
        if self.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * step / self.total))
        return 1.0


def _dist_info():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _atomic_save(obj, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rng_state(device: torch.device) -> Dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    # numpy's state as a tensor and plain numbers, so that checkpoints load with weights_only=True
    st = {"torch": torch.get_rng_state(), "python": random.getstate(),
          "numpy": (str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_state(st: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    name, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


# ---------------------------------------------------------------------------------- trainer

class Trainer:
    """One training method bound to a model: ``train_step(x, y)`` does the work of one minibatch
    (the attack, the forward/backward passes, the optimizer and scheduler steps) and ``evaluate``
    measures clean / PGD / noisy accuracy. ``fit`` drives it; the benchmark times it directly.

    cfg: a FitConfig (or its fields as keyword arguments). steps_per_epoch: minibatches per data pass
    (sets the length of the learning-rate schedule)."""

    def __init__(self, model: nn.Module, cfg: Optional[FitConfig] = None, *, steps_per_epoch: int = 1,
                 device=None, ddp: Optional[bool] = None, **kwargs):
        if cfg is None:
            cfg = FitConfig(**kwargs)
        elif kwargs:
            cfg = dataclasses.replace(cfg, **kwargs)
        self.cfg = cfg = cfg.resolved()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if device is None:
            p = next(model.parameters(), None)
            device = p.device if p is not None else torch.device("cpu")
        self.device = torch.device(device)
        model.to(self.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.fwd = Normalized(model, cfg.mean, cfg.std).to(self.device) if cfg.mean is not None else model
        self.rank, self.world = _dist_info()
        self.ddp = (self.world > 1) if ddp is None else bool(ddp)
        if self.ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
                if self.device.type == "cuda" else None
            self.net = DDP(_Forward(self.fwd), device_ids=ids)
        else:
            self.net = _Forward(self.fwd)

        params = [p for p in model.parameters() if p.requires_grad]
        # On CUDA the fused optimizer kernels: one launch for all parameters.
        fused = {"fused": True} if self.device.type == "cuda" and all(p.is_cuda and p.is_floating_point()
                                                                       for p in params) else {}
        if cfg.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                             nesterov=cfg.nesterov and cfg.momentum > 0, **fused)
        else:
            self.optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        per_batch = cfg.m if cfg.method == "free" else 1
        self.total_steps = cfg.passes * self.steps_per_epoch * per_batch
        factor = _LRFactor(cfg.schedule, self.total_steps,
                           [min(1.0, ms / cfg.epochs) for ms in cfg.milestones])
        factor.gamma = cfg.gamma
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)

        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        # Seeds of the ops' Philox streams: one generator per process, saved in checkpoints.
        base = 0x5EED if cfg.seed is None else cfg.seed
        self.gen = torch.Generator().manual_seed((base * 1_000_003 + 7919 * self.rank) & ((1 << 62) - 1))
        self.delta: Optional[torch.Tensor] = None  # persistent perturbation (free, fgsm "previous")
        self._step = {"natural": self._natural, "pgd": self._pgd, "free": self._free, "fgsm": self._fgsm,
                      "trades": self._trades, "gaussian": self._gaussian}[cfg.method]

    # ---- small pieces

    def _seed(self) -> int:
        return int(torch.randint(0, 1 << 62, (1,), generator=self.gen))

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def _fmt(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def prepare(self, x: torch.Tensor, y: torch.Tensor):
        """A minibatch on the device, float32, in the configured layout."""
        x = x.to(self.device, non_blocking=True)
        if x.dtype != torch.float32:
            x = x.float()
        return self._fmt(x), y.to(self.device, non_blocking=True)

    def _input_grad(self, loss: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
        if self.cfg.amp == "fp16":  # fp16 input gradients underflow unscaled; sign / direction is unchanged
            loss = self.scaler.scale(loss)
        (g,) = torch.autograd.grad(loss, x_adv)
        if self.cfg.amp == "fp16":
            g = torch.nan_to_num(g, nan=0.0, posinf=1.0, neginf=-1.0)
        return g.contiguous(memory_format=torch.channels_last) if (self.cfg.channels_last and g.dim() == 4) else g

    def _update(self, loss: torch.Tensor) -> None:
        """Backward of the (scaled) loss, optimizer and scheduler step."""
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def pgd_attack(self, x, y, eps, alpha, steps, norm="linf", random_start=True, model=None,
                   loss_fn=None) -> torch.Tensor:
        """Fused PGD on the un-wrapped model in its current mode: random_init + steps x
        (input-only gradient, pgd_step_). loss_fn(logits, y) defaults to cross-entropy."""
        c = self.cfg
        model = self.fwd if model is None else model
        loss_fn = F.cross_entropy if loss_fn is None else loss_fn
        if random_start and eps > 0:
            x_adv = self._fmt(ops.random_init(x, eps, norm, c.lo, c.hi, seed=self._seed()))
        else:
            x_adv = x.clone()
        for _ in range(steps):
            xa = x_adv.detach().requires_grad_(True)
            with self._autocast():
                loss = loss_fn(model(xa), y)
            g = self._input_grad(loss, xa)
            ops.pgd_step_(x_adv, x, g, eps, alpha, norm, c.lo, c.hi)
        return x_adv

    def _persistent(self, x: torch.Tensor) -> torch.Tensor:
        """The persistent perturbation for this minibatch (a view of the first B rows)."""
        B = x.shape[0]
        if self.delta is None or self.delta.shape[1:] != x.shape[1:] or self.delta.shape[0] < B \
                or self.delta.device != x.device:
            old = self.delta
            self.delta = self._fmt(torch.zeros_like(x, memory_format=torch.contiguous_format))
            if old is not None and old.shape[1:] == x.shape[1:]:
                k = min(old.shape[0], B)
                self.delta[:k].copy_(old[:k])
        return self.delta[:B]

    @staticmethod
    def _stats(loss, logits, y):
        return loss.detach().float() * y.shape[0], (logits.detach().argmax(1) == y).sum(), y.shape[0]

    # ---- methods: each returns (loss sum, correct count, samples) as device tensors / int

    def _natural(self, x, y):
        """A cross-entropy step on x as given; the other methods call it on the inputs they made."""
        with self._autocast():
            logits = self.net(x)
            loss = F.cross_entropy(logits, y)
        self._update(loss)
        return self._stats(loss, logits, y)

    def _pgd(self, x, y):
        c = self.cfg
        return self._natural(self.pgd_attack(x, y, c.eps, c.alpha, c.steps, c.norm, c.random_start), y)

    def _free(self, x, y):
        c = self.cfg
        delta = self._persistent(x)
        tot_loss, tot_correct, n = 0.0, 0, 0
        for _ in range(c.m):
            xa = (x + delta).requires_grad_(True)
            with self._autocast():
                logits = self.net(xa)
                loss = F.cross_entropy(logits, y)
            self.scaler.scale(loss).backward()  # one pass: weight gradients and the input gradient
            g = xa.grad
            if c.amp == "fp16":
                g = torch.nan_to_num(g, nan=0.0, posinf=1.0, neginf=-1.0)
            ops.recycle_step_(delta, self._fmt(g), x, c.eps, c.alpha, c.lo, c.hi)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            l, k, b = self._stats(loss, logits, y)
            tot_loss, tot_correct, n = tot_loss + l, tot_correct + k, n + b
        return tot_loss, tot_correct, n

    def _fgsm(self, x, y):
        c = self.cfg
        if c.fgsm_init == "previous":  # the perturbation left by the previous minibatch, updated in place
            delta = self._persistent(x)
            xa = (x + delta).requires_grad_(True)
        elif c.fgsm_init == "random" and c.eps > 0:
            xa = self._fmt(ops.random_init(x, c.eps, "linf", c.lo, c.hi, seed=self._seed())).requires_grad_(True)
        else:
            xa = x.clone().requires_grad_(True)
        with self._autocast():
            loss0 = F.cross_entropy(self.fwd(xa), y)
        g = self._input_grad(loss0, xa)
        if c.fgsm_init == "previous":
            ops.recycle_step_(delta, g, x, c.eps, c.alpha, c.lo, c.hi)
            x_adv = x + delta
        else:  # one L-inf step from the start point: x + clamp(start - x + alpha*sign(g), -eps, eps)
            x_adv = xa.detach()
            ops.pgd_step_(x_adv, x, g, c.eps, c.alpha, "linf", c.lo, c.hi)
        return self._natural(x_adv, y)

    def _trades(self, x, y):
        c = self.cfg
        self.fwd.eval()
        with torch.no_grad(), self._autocast():
            p_nat = F.softmax(self.fwd(x).float(), dim=1)

        def kl(logits, _y):
            return F.kl_div(F.log_softmax(logits.float(), dim=1), p_nat, reduction="sum")

        x_adv = self._fmt(ops.gaussian_noise(x, 1, 0.001, seed=self._seed()))
        for _ in range(c.steps):  # fused step on the KL objective, from x + 0.001 N(0, I)
            xa = x_adv.detach().requires_grad_(True)
            with self._autocast():
                loss_in = kl(self.fwd(xa), y)
            g = self._input_grad(loss_in, xa)
            ops.pgd_step_(x_adv, x, g, c.eps, c.alpha, c.norm, c.lo, c.hi)
        self.fwd.train()
        with self._autocast():
            logits, logits_adv = self.net(x, x_adv)
            loss = F.cross_entropy(logits, y) + c.beta * F.kl_div(
                F.log_softmax(logits_adv.float(), dim=1), F.softmax(logits.float(), dim=1), reduction="batchmean")
        self._update(loss)
        return self._stats(loss, logits, y)

    def _gaussian(self, x, y):
        c = self.cfg
        xn = self._fmt(ops.gaussian_noise(x, 1, c.sigma, seed=self._seed())) if c.sigma > 0 else x
        return self._natural(xn, y)

    # ---- public

    def train_step(self, x: torch.Tensor, y: torch.Tensor):
        """One minibatch of the configured method (model in train mode). Returns (sum of losses,
        number correct, number of samples); the first two are device tensors (no host sync)."""
        self.fwd.train()
        x, y = self.prepare(x, y)
        return self._step(x, y)

    def evaluate(self, loader, eps: Optional[float] = None, progress: bool = False) -> Dict[str, float]:
        """Clean accuracy, PGD accuracy (val_eps / val_alpha / val_steps / val_norm; skipped when the
        eps is 0) and, for gaussian training, accuracy on noisy inputs (sigma), in eval mode.
        Counts are summed over the processes when the trainer runs distributed (ddp): every process
        must call it then, each on its part of the data (or all on the same data)."""
        c = self.cfg
        eps = c.val_eps if eps is None else eps
        was = self.fwd.training
        self.fwd.eval()
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        sums = {"n": zero.clone(), "clean": zero.clone(), "robust": zero.clone(), "noise": zero.clone(),
                "loss": zero.clone()}
        try:
            from tqdm.auto import tqdm

            it = tqdm(iter(loader), total=len(loader), desc="  validate", leave=False,
                      disable=not progress or self.rank != 0)
            for batch in it:
                x, y = self.prepare(batch[0], batch[1])
                with torch.no_grad(), self._autocast():
                    logits = self.fwd(x)
                    sums["loss"] += F.cross_entropy(logits.float(), y, reduction="sum").double()
                sums["clean"] += (logits.argmax(1) == y).sum()
                sums["n"] += y.shape[0]
                if eps > 0:
                    with torch.enable_grad():
                        x_adv = self.pgd_attack(x, y, eps, c.val_alpha, c.val_steps, c.val_norm, True)
                    with torch.no_grad(), self._autocast():
                        sums["robust"] += (self.fwd(x_adv).argmax(1) == y).sum()
                if c.method == "gaussian":
                    with torch.no_grad(), self._autocast():
                        xn = self._fmt(ops.gaussian_noise(x, 1, c.sigma, seed=self._seed()))
                        sums["noise"] += (self.fwd(xn).argmax(1) == y).sum()
        finally:
            self.fwd.train(was)
        vec = torch.stack([sums[k] for k in ("n", "clean", "robust", "noise", "loss")])
        if self.ddp and self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(vec)
        n, clean, robust, noise, loss = vec.tolist()
        n = max(n, 1.0)
        out = {"clean_acc": clean / n, "robust_acc": robust / n if eps > 0 else float("nan"),
               "val_loss": loss / n}
        if c.method == "gaussian":
            out["noise_acc"] = noise / n
        return out

    # ---- checkpoint parts

    def rank_state(self) -> Dict[str, Any]:
        """What differs between processes: the RNG states and the persistent perturbation."""
        return {"rng": _rng_state(self.device), "gen": self.gen.get_state(),
                "delta": None if self.delta is None else self.delta.detach().cpu()}

    def load_rank_state(self, st: Dict[str, Any]) -> None:
        _set_rng_state(st["rng"], self.device)
        self.gen.set_state(st["gen"])
        d = st.get("delta")
        self.delta = None if d is None else self._fmt(d.to(self.device))

    def state_dict(self) -> Dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        self.optimizer.load_state_dict(sd["optimizer"])
        self.scheduler.load_state_dict(sd["scheduler"])
        if sd.get("scaler"):
            self.scaler.load_state_dict(sd["scaler"])


# ------------------------------------------------------------------------------------- fit

@dataclass
class FitResult:
    """What ``fit`` returns. The model itself is trained in place (holding the best weights when
    validation ran and ``restore_best``)."""
    history: List[Dict[str, Any]] = field(default_factory=list)
    best_epoch: Optional[int] = None
    best_metric: Optional[float] = None
    select: str = "robust_acc"
    epochs_run: int = 0
    stopped_early: bool = False
    train_time: float = 0.0                # seconds spent training (validation excluded)
    out_dir: Optional[str] = None
    config: Optional[FitConfig] = None

    @property
    def last(self) -> Dict[str, Any]:
        return self.history[-1] if self.history else {}


LOG_COLUMNS = ("epoch", "equiv_epochs", "lr", "train_loss", "train_acc", "clean_acc", "robust_acc", "noise_acc",
               "val_loss", "train_time", "val_time", "total_train_time", "best")


def _write_log(path: str, history: List[Dict[str, Any]]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=LOG_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for row in history:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    os.replace(tmp, path)


def _resume_path(resume, out_dir: Optional[str]) -> Optional[str]:
    if resume is None or resume is False:
        return None
    if resume is True:
        if out_dir is None:
            raise ValueError("resume=True needs out_dir (the run's directory holding last.pt)")
        p = os.path.join(out_dir, "last.pt")
        return p if os.path.exists(p) else None  # nothing to resume yet: start fresh
    p = os.fspath(resume)
    if os.path.isdir(p):
        p = os.path.join(p, "last.pt")
    if not os.path.isfile(p):
        raise FileNotFoundError(f"resume: no checkpoint at {p!r}")
    return p


_RESUME_MUST_MATCH = ("method", "epochs", "eps", "alpha", "steps", "norm", "m", "fgsm_init", "beta", "sigma",
                      "optimizer", "lr", "schedule", "amp")


def fit(model: nn.Module, train_loader, method: str = "natural", *, val_loader=None, out_dir: Optional[str] = None,
        resume=None, progress: bool = True, verbose: bool = True, device=None, model_name: Optional[str] = None,
        model_kwargs: Optional[Dict[str, Any]] = None, extra: Optional[Dict[str, Any]] = None,
        **hparams) -> FitResult:
    """Train ``model`` in place with ``method`` on ``train_loader`` (batches ``(x, y, ...)``, x in
    [lo, hi]); returns a :class:`FitResult`.

    method: "natural", "pgd", "free", "fgsm", "trades" or "gaussian".
    hparams: the fields of :class:`FitConfig`: epochs, eps, alpha, steps, norm ("linf"/"l2"),
    random_start, m (free replays), fgsm_init ("random"/"zero"/"previous"), beta (trades), sigma
    (gaussian), lo, hi, mean/std (input normalisation inside the forward), optimizer ("sgd"/"adam"),
    lr, momentum, weight_decay, nesterov, schedule ("cyclic"/"multistep"/"cosine"/"constant"),
    milestones, gamma, amp (None/"bf16"/"fp16"), channels_last, seed, val_eps, val_alpha, val_steps,
    val_norm, val_every, select, patience, restore_best, keep_all.
    val_loader: validation data (clean / PGD / noisy accuracy every ``val_every`` epochs; selection of
    the best epoch and early stopping after ``patience`` validations without improvement).
    out_dir: where last.pt (every epoch), best.pt, epoch_<k>.pt (keep_all) and log.csv go.
    resume: a checkpoint path, a run directory, or True (out_dir/last.pt when it exists): continue
    that run exactly where its last finished epoch left it.
    model_name / model_kwargs / extra: stored in the checkpoints (``models.load_model`` rebuilds
    the model from them).
    """
    cfg = FitConfig(method=method, **hparams).resolved()
    rank, world = _dist_info()
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError("train_loader is empty")
    trainer = Trainer(model, cfg, steps_per_epoch=steps_per_epoch, device=device)
    dev = trainer.device
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed + rank)
        random.seed(cfg.seed + rank)
        np.random.seed((cfg.seed + rank) % (1 << 32))
    if out_dir is not None and rank == 0:
        os.makedirs(out_dir, exist_ok=True)
    say = (lambda msg: print(msg, flush=True)) if (verbose and rank == 0) else (lambda msg: None)

    res = FitResult(select=cfg.select, out_dir=out_dir, config=cfg)
    best_state = None
    bad = 0
    start = 0
    ckpt_path = _resume_path(resume, out_dir)
    if ckpt_path is not None:
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ck.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"resume: {ckpt_path!r} is not a robustops.train checkpoint")
        old = ck["config"]
        diff = [k for k in _RESUME_MUST_MATCH if old.get(k) != getattr(cfg, k)]
        if diff:
            raise ValueError("resume: the checkpoint was trained with different settings: " +
                             ", ".join(f"{k}={old.get(k)!r} (now {getattr(cfg, k)!r})" for k in diff))
        model.load_state_dict(ck["state_dict"])
        trainer.load_state_dict(ck)
        states = ck["rank_states"]
        if len(states) != world:
            raise ValueError(f"resume: the checkpoint was written by {len(states)} processes, this run has {world}")
        trainer.load_rank_state(states[rank])
        start = ck["epoch"]
        res.history = list(ck["history"])
        res.best_epoch, res.best_metric = ck["best_epoch"], ck["best_metric"]
        res.stopped_early = ck.get("stopped_early", False)
        res.train_time = ck["train_time"]
        bad = ck["bad_epochs"]
        if res.best_epoch is not None and out_dir is not None:
            bp = os.path.join(out_dir, "best.pt")
            if os.path.exists(bp):
                best_state = torch.load(bp, map_location="cpu", weights_only=True)["state_dict"]
        say(f"resumed from {ckpt_path} after epoch {start}/{cfg.passes}")

    def payload(state_dict, **more):
        d = {"format": CHECKPOINT_FORMAT, "model": model_name, "model_kwargs": dict(model_kwargs or {}),
             "state_dict": state_dict, "method": cfg.method, "eps": cfg.eps, "norm": cfg.norm, "sigma": cfg.sigma,
             "mean": cfg.mean, "std": cfg.std, "lo": cfg.lo, "hi": cfg.hi, "config": dataclasses.asdict(cfg)}
        d.update(extra or {})
        d.update(more)
        return d

    from tqdm.auto import tqdm

    sampler = getattr(train_loader, "sampler", None)
    batch_sampler = getattr(train_loader, "batch_sampler", None)
    for epoch in range(start + 1, cfg.passes + 1):
        if res.stopped_early:
            break
        for s in (sampler, batch_sampler, getattr(batch_sampler, "sampler", None)):
            if hasattr(s, "set_epoch"):
                s.set_epoch(epoch)
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        correct = torch.zeros((), dtype=torch.int64, device=dev)
        seen = 0
        # tqdm wraps the loader's iterator, not the loader: handed a DataLoader it draws from the
        # global RNG itself, which would make the shuffling depend on whether the bar exists.
        bar = tqdm(iter(train_loader), total=steps_per_epoch, desc=f"{cfg.method} {epoch}/{cfg.passes}",
                   leave=False, disable=not progress or rank != 0, dynamic_ncols=True)
        for i, batch in enumerate(bar):
            l, k, b = trainer.train_step(batch[0], batch[1])
            loss_sum += l
            correct += k
            seen += b
            if progress and rank == 0 and (i % 20 == 0 or i == steps_per_epoch - 1):
                bar.set_postfix(loss=f"{loss_sum.item() / max(seen, 1):.3f}",
                                acc=f"{correct.item() / max(seen, 1):.3f}")
        bar.close()
        _sync(dev)
        t_train = time.perf_counter() - t0
        res.train_time += t_train
        stats = torch.stack([loss_sum, correct.double(), torch.tensor(float(seen), dtype=torch.float64, device=dev)])
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(stats)
        row = {"epoch": epoch, "equiv_epochs": epoch * (cfg.m if cfg.method == "free" else 1),
               "lr": trainer.optimizer.param_groups[0]["lr"],
               "train_loss": stats[0].item() / max(stats[2].item(), 1),
               "train_acc": stats[1].item() / max(stats[2].item(), 1),
               "clean_acc": float("nan"), "robust_acc": float("nan"), "noise_acc": float("nan"),
               "val_loss": float("nan"), "train_time": t_train, "val_time": 0.0,
               "total_train_time": res.train_time, "best": False}
        improved = False
        if val_loader is not None and (epoch % cfg.val_every == 0 or epoch == cfg.passes):
            t1 = time.perf_counter()
            row.update(trainer.evaluate(val_loader, progress=progress))
            row["val_time"] = time.perf_counter() - t1
            value = row["epoch"] if cfg.select == "last" else row.get(cfg.select, float("nan"))
            if res.best_metric is None or value > res.best_metric:
                res.best_metric, res.best_epoch, improved, bad = value, epoch, True, 0
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            else:
                bad += 1
            if cfg.patience is not None and bad >= cfg.patience and epoch < cfg.passes:
                res.stopped_early = True
        row["best"] = improved
        res.history.append(row)
        msg = (f"[{cfg.method}] epoch {epoch}/{cfg.passes} loss {row['train_loss']:.4f} "
               f"train_acc {row['train_acc']:.4f}")
        if val_loader is not None and row["val_time"] > 0:
            msg += f" | clean {row['clean_acc']:.4f}"
            if not math.isnan(row["robust_acc"]):
                msg += f" robust {row['robust_acc']:.4f}"
            if "noise_acc" in row and not math.isnan(row["noise_acc"]):
                msg += f" noisy {row['noise_acc']:.4f}"
            msg += " *" if improved else ""
        msg += f" | {t_train:.1f}s"
        say(msg)
        if res.stopped_early:
            say(f"early stopping: no improvement of {cfg.select} in {bad} validations; best epoch {res.best_epoch}")

        # Checkpoint: everything needed to continue exactly, captured after this epoch's last RNG use.
        rank_states = [trainer.rank_state()]
        if world > 1:
            import torch.distributed as dist

            gathered = [None] * world
            dist.all_gather_object(gathered, rank_states[0])
            rank_states = gathered
        if out_dir is not None and rank == 0:
            if improved:
                _atomic_save(payload(best_state, epoch=epoch, metrics=row), os.path.join(out_dir, "best.pt"))
            ck = payload(model.state_dict(), epoch=epoch, rank_states=rank_states, history=res.history,
                         best_epoch=res.best_epoch, best_metric=res.best_metric, bad_epochs=bad,
                         stopped_early=res.stopped_early, train_time=res.train_time, **trainer.state_dict())
            _atomic_save(ck, os.path.join(out_dir, "last.pt"))
            if cfg.keep_all:
                _atomic_save(ck, os.path.join(out_dir, f"epoch_{epoch}.pt"))
            _write_log(os.path.join(out_dir, "log.csv"), res.history)
        if world > 1:
            import torch.distributed as dist

            dist.barrier()

    res.epochs_run = len(res.history)
    if cfg.restore_best and best_state is not None and res.best_epoch != res.epochs_run:
        model.load_state_dict(best_state)
        say(f"restored the best epoch ({res.best_epoch}, {cfg.select} {res.best_metric:.4f})")
    return res


# ------------------------------------------------------------------------------------ CLI

def _parse_float(s: str) -> float:
    """A float, also written as a fraction ("8/255")."""
    try:
        return float(Fraction(s.strip())) if "/" in s else float(s)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number or a fraction like 8/255, got {s!r}")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def cli_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and model")
    g.add_argument("--data", default="digits",
                   help='"digits" (embedded), a .npz file, "cifar10:DIR" or "imagefolder:DIR" (default digits)')
    g.add_argument("--model", default=None,
                   help="small_cnn, preact_resnet18, resnet20, resnet110 (default: small_cnn for 8x8 data, "
                        "preact_resnet18 otherwise)")
    g.add_argument("--val-size", type=int, default=None,
                   help="training samples held out for validation / early stopping (default 10%% up to 1000; 0: none)")
    g.add_argument("--batch-size", type=int, default=128, help="global batch size (split over torchrun processes)")
    g = p.add_argument_group("method")
    g.add_argument("--method", default="pgd", help=f"{', '.join(METHODS)} (default pgd)")
    g.add_argument("--epochs", type=int, default=10,
                   help="epochs; for free, forward/backward passes counted as epochs (data passes = ceil(epochs/m))")
    g.add_argument("--eps", type=_parse_float, default=None, help="perturbation budget (default 8/255; digits 0.2)")
    g.add_argument("--alpha", type=_parse_float, default=None,
                   help="step size (default pgd/trades 2.5*eps/steps, fgsm 1.25*eps, free eps)")
    g.add_argument("--steps", type=int, default=7, help="PGD / TRADES inner steps (default 7)")
    g.add_argument("--norm", default="linf", help="linf or l2")
    g.add_argument("--no-random-start", action="store_true", help="PGD training without a random start")
    g.add_argument("-m", "--m", "--replays", dest="m", type=int, default=8, help="free-AT replays per minibatch")
    g.add_argument("--fgsm-init", default="random", help="fgsm start: random, zero or previous")
    g.add_argument("--beta", type=float, default=6.0, help="TRADES beta (default 6)")
    g.add_argument("--sigma", type=float, default=0.25, help="gaussian noise level (default 0.25)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", default="sgd", help="sgd or adam")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default sgd 0.1, adam 1e-3)")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--nesterov", action="store_true")
    g.add_argument("--schedule", default="cyclic", help=f"{', '.join(SCHEDULES)} (default cyclic)")
    g.add_argument("--milestones", type=float, nargs="*", default=None,
                   help="multistep milestones in epochs (default 50%% and 75%% of --epochs)")
    g.add_argument("--gamma", type=float, default=0.1, help="multistep factor")
    g.add_argument("--amp", default="none", help="none, bf16 or fp16 autocast")
    g.add_argument("--channels-last", action="store_true")
    g = p.add_argument_group("validation, checkpoints")
    g.add_argument("--val-eps", type=_parse_float, default=None, help="validation PGD eps (default eps; 0: none)")
    g.add_argument("--val-steps", type=int, default=10, help="validation PGD steps (default 10)")
    g.add_argument("--patience", type=int, default=None, help="early stopping after this many epochs without "
                                                              "improvement of the robust validation accuracy")
    g.add_argument("--keep-all", action="store_true", help="keep a checkpoint file per epoch")
    g.add_argument("--out", default="runs/train", help="run directory: last.pt, best.pt, log.csv (default runs/train)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last finished epoch")
    g.add_argument("--test-steps", type=int, default=20, help="PGD steps of the final test evaluation (0: skip)")
    _add_common(p)


def _err(msg: str) -> int:
    print(f"robustops: error: {msg}", file=sys.stderr)
    return 2


def _check_data_spec(spec: str) -> Optional[str]:
    """A clear message when the data spec names a path that does not exist."""
    if spec == "digits":
        return None
    kind, sep, rest = spec.partition(":")
    path = spec
    if sep and kind.lower() in ("cifar10", "cifar-10", "npz", "imagefolder", "folder"):
        path = rest
        if kind.lower() in ("imagefolder", "folder"):
            head, s2, tail = rest.rpartition(":")
            if s2 and tail.isdigit() and head:
                path = head
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        return f"--data: {path!r} does not exist (expected \"digits\", a .npz file, cifar10:DIR or imagefolder:DIR)"
    return None


def _pick_device(name: Optional[str]) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _default_model(info: Dict[str, Any]) -> str:
    C, H, W = info["input_shape"]
    return "small_cnn" if H <= 16 else "preact_resnet18"


def _build_model(name: str, info: Dict[str, Any]):
    """models.get_model for the data; with the data's mean / std the model normalises inside
    (``Sequential(Normalize, net)``), so it takes [0, 1] pixels and its checkpoint rebuilds it."""
    from . import models

    C, H, W = info["input_shape"]
    kw: Dict[str, Any] = {"num_classes": int(info["num_classes"]), "in_channels": int(C)}
    if name.lower().replace("-", "_") in ("small_cnn", "smallcnn"):
        kw["input_size"] = int(H)
    if info.get("mean") is not None and info.get("std") is not None:
        kw["mean"], kw["std"] = [float(v) for v in info["mean"]], [float(v) for v in info["std"]]
    return models.get_model(name, **kw), kw


def _split_holdout(ds, val_size: int, seed: int):
    from torch.utils.data import Subset

    n = len(ds)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(ds, perm[val_size:]), Subset(ds, perm[:val_size])


def _init_distributed(device_arg: Optional[str]):
    """Process group from torchrun's environment (nccl on GPU, gloo on CPU); returns (rank, world, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, _pick_device(device_arg)
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device_arg)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), dev


def cli_train(args) -> int:
    from torch.utils.data import DataLoader, DistributedSampler

    from . import data as rodata

    msg = _check_data_spec(args.data)
    if msg:
        return _err(msg)
    if args.method not in METHODS:
        return _err(f"--method must be one of {', '.join(METHODS)}; got {args.method!r}")
    if args.batch_size < 1:
        return _err(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        train_ds, info = rodata.get_dataset(args.data, "train")
    except (FileNotFoundError, KeyError, ValueError) as e:
        return _err(f"--data {args.data!r}: {e}")
    eps = args.eps if args.eps is not None else (0.2 if info["name"] == "digits" else 8 / 255)
    hp = dict(epochs=args.epochs, eps=eps, alpha=args.alpha, steps=args.steps, norm=args.norm,
              random_start=not args.no_random_start, m=args.m, fgsm_init=args.fgsm_init, beta=args.beta,
              sigma=args.sigma, optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
              weight_decay=args.weight_decay, nesterov=args.nesterov, schedule=args.schedule,
              milestones=args.milestones, gamma=args.gamma, amp=args.amp, channels_last=args.channels_last,
              seed=args.seed, val_eps=args.val_eps, val_steps=args.val_steps, patience=args.patience,
              keep_all=args.keep_all)
    try:
        FitConfig(method=args.method, **hp).resolved()
    except ValueError as e:
        return _err(f"{e} (see --help)")

    rank, world, dev = _init_distributed(args.device)
    if args.batch_size % world:
        return _err(f"--batch-size {args.batch_size} must be divisible by the number of processes ({world})")
    torch.manual_seed(args.seed)
    name = args.model or _default_model(info)
    try:
        model, model_kwargs = _build_model(name, info)
    except (KeyError, ValueError) as e:
        return _err(f"--model: {e}")
    n = len(train_ds)
    val_size = args.val_size if args.val_size is not None else min(1000, n // 10)
    if not 0 <= val_size < n:
        return _err(f"--val-size must be in [0, {n}), got {val_size}")
    val_ds = None
    if val_size > 0:
        train_ds, val_ds = _split_holdout(train_ds, val_size, args.seed)
    bs = args.batch_size // world
    pin = dev.type == "cuda"
    if world > 1:
        sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
        train_loader = DataLoader(train_ds, batch_size=bs, sampler=sampler, num_workers=args.workers,
                                  pin_memory=pin, drop_last=True)
    else:
        train_loader = DataLoader(train_ds, batch_size=bs, shuffle=True, num_workers=args.workers, pin_memory=pin)
    val_loader = None
    if val_ds is not None:
        val_part = rodata.shard(val_ds, rank, world) if world > 1 else val_ds
        val_loader = DataLoader(val_part, batch_size=max(bs, 64), shuffle=False, num_workers=args.workers)
    if rank == 0:
        print(f"robustops train: {args.method} on {info['name']} ({len(train_ds)} train, {val_size} validation), "
              f"model {name}, {world} process(es) on {dev}", flush=True)
    model.to(dev)
    try:
        res = fit(model, train_loader, args.method, val_loader=val_loader, out_dir=args.out,
                  resume=True if args.resume else None, progress=not args.no_progress, device=dev,
                  model_name=name, model_kwargs=model_kwargs, extra={"data": args.data}, **hp)
    except KeyboardInterrupt:
        if rank == 0:
            print(f"\ninterrupted: every finished epoch is in {args.out}/last.pt; continue with the same "
                  f"command and --resume", file=sys.stderr)
        return 130
    if args.test_steps > 0 and rank == 0:
        test_ds, _ = rodata.get_dataset(args.data, "test")
        test_loader = DataLoader(test_ds, batch_size=256, shuffle=False)
        tr = Trainer(model, FitConfig(method=args.method, **{**hp, "val_steps": args.test_steps}),
                     device=dev, ddp=False)
        m = tr.evaluate(test_loader)
        print(f"test: clean acc {m['clean_acc']:.4f}, PGD-{args.test_steps} acc {m['robust_acc']:.4f} "
              f"(eps {eps:.4g}, {args.norm})" + (f", noisy acc {m['noise_acc']:.4f}" if "noise_acc" in m else ""))
        with open(os.path.join(args.out, "test.csv"), "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["method", "clean_acc", "robust_acc", "eps", "steps", "train_time"])
            w.writerow([args.method, m["clean_acc"], m["robust_acc"], eps, args.test_steps, res.train_time])
    if rank == 0:
        print(f"checkpoints and log in {args.out}/ (best epoch {res.best_epoch})")
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return 0


# ------------------------------------------------------------------------------------ demo

DEMO_METHODS = ("natural", "pgd", "free", "gaussian")


def cli_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--methods", default=",".join(DEMO_METHODS),
                   help=f"comma-separated training methods (default {','.join(DEMO_METHODS)}; "
                        f"any of {', '.join(METHODS)})")
    p.add_argument("--epochs", type=int, default=30,
                   help="epochs per method (default 30; free: counted in forward/backward passes, so the data are "
                        "traversed ceil(epochs/m) times)")
    p.add_argument("--eps", type=_parse_float, default=0.2,
                   help="L-inf budget for training and the attack (default 0.2)")
    p.add_argument("--steps", type=int, default=7, help="PGD-AT / TRADES inner steps (default 7)")
    p.add_argument("-m", "--m", "--replays", dest="m", type=int, default=4, help="free-AT replays (default 4)")
    p.add_argument("--sigma", type=float, default=0.25, help="Gaussian training / smoothing noise (default 0.25)")
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate of the cyclic schedule (default 0.05)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--val-size", type=int, default=144,
                   help="training images held out to pick each method's best epoch (default 144; 0: last epoch)")
    p.add_argument("--attack-steps", type=int, default=20, help="steps of the evaluation PGD attack (default 20)")
    p.add_argument("--n0", type=int, default=100, help="CERTIFY selection samples (default 100)")
    p.add_argument("--n", type=int, default=2000, help="CERTIFY estimation samples (default 2000)")
    p.add_argument("--alpha", type=float, default=0.001, help="CERTIFY failure probability (default 0.001)")
    p.add_argument("--certify-max", type=int, default=None, help="certify only the first N test images (default all)")
    p.add_argument("--certify-batch", type=int, default=2000, help="noisy samples per forward pass (default 2000)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default 1: the digits models are too small to gain from more)")
    _add_common(p)


def _fmt_pct(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}%"


def _max_radius(sigma: float, n: int, alpha: float) -> float:
    """sigma * Phi^-1(pA_lower) when all n samples vote for the class: pA_lower = alpha^(1/n)."""
    from scipy.stats import norm

    return float(sigma * norm.ppf(alpha ** (1.0 / n)))


def _demo_label(method: str, a) -> str:
    return {"natural": "natural", "pgd": f"PGD-{a.steps} AT", "free": f"free AT (m={a.m})",
            "fgsm": "FGSM-RS AT", "trades": f"TRADES (PGD-{a.steps})",
            "gaussian": f"Gaussian noise (sigma={a.sigma:g})"}[method]


def cli_demo(args) -> int:
    from torch.utils.data import DataLoader

    from . import attacks, models, smoothing
    from . import data as rodata

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        return _err(f"--methods must be a comma-separated list of {', '.join(METHODS)}; got {args.methods!r}")
    for name, v, lo in (("--epochs", args.epochs, 1), ("--steps", args.steps, 1), ("-m", args.m, 1),
                        ("--batch-size", args.batch_size, 1), ("--attack-steps", args.attack_steps, 1),
                        ("--n0", args.n0, 1), ("--n", args.n, 1), ("--certify-batch", args.certify_batch, 1),
                        ("--val-size", args.val_size, 0)):
        if v < lo:
            return _err(f"{name} must be >= {lo}, got {v}")
    if not args.eps >= 0:
        return _err(f"--eps must be >= 0, got {args.eps}")
    if not args.sigma > 0:
        return _err(f"--sigma must be > 0, got {args.sigma}")
    if not 0 < args.alpha < 1:
        return _err(f"--alpha must be in (0, 1), got {args.alpha}")
    dev = _pick_device(args.device)
    threads = args.threads if args.threads is not None else 1
    if threads < 1:
        return _err(f"--threads must be >= 1, got {threads}")
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _demo(args, methods, dev, DataLoader, attacks, models, smoothing, rodata)
    finally:
        torch.set_num_threads(old_threads)


def _demo(args, methods, dev, DataLoader, attacks, models, smoothing, rodata) -> int:
    os.makedirs(args.out, exist_ok=True)
    train_ds, info = rodata.get_dataset("digits", "train")
    test_ds, _ = rodata.get_dataset("digits", "test")
    val_loader = None
    if args.val_size > 0:
        train_ds, val_ds = _split_holdout(train_ds, args.val_size, args.seed)
        val_loader = DataLoader(val_ds, batch_size=256, shuffle=False)
    test_loader = DataLoader(test_ds, batch_size=360, shuffle=False)
    x_test, y_test = test_ds.tensors
    k = len(test_ds) if args.certify_max is None else max(1, min(args.certify_max, len(test_ds)))
    print(f"robustops demo: digits 8x8 ({len(train_ds)} train, {args.val_size} validation, {len(test_ds)} test), "
          f"SmallCNN, {args.epochs} epochs, L-inf eps {args.eps:g}, on {dev} ({torch.get_num_threads()} thread(s))",
          flush=True)
    rows = []
    certified = {}
    t_start = time.perf_counter()
    for method in methods:
        torch.manual_seed(args.seed)
        model = models.get_model("small_cnn", num_classes=10, in_channels=1, input_size=8).to(dev)
        label = _demo_label(method, args)
        hp = dict(epochs=args.epochs, eps=args.eps, steps=args.steps, m=args.m, sigma=args.sigma, lr=args.lr,
                  seed=args.seed, val_steps=10)
        loader = DataLoader(train_ds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers)
        res = fit(model, loader, method, val_loader=val_loader, out_dir=os.path.join(args.out, method),
                  progress=not args.no_progress, verbose=False, device=dev, model_name="small_cnn",
                  model_kwargs={"num_classes": 10, "in_channels": 1, "input_size": 8}, extra={"data": "digits"}, **hp)
        model.eval()
        atk = attacks.PGD(model, eps=args.eps, steps=args.attack_steps, norm="linf", random_start=True,
                          seed=args.seed)
        ev = attacks.robust_accuracy(model, test_loader, atk, device=dev, progress=False)
        row = {"method": method, "label": label, "clean_acc": ev["clean_acc"], "robust_acc": ev["robust_acc"],
               "acr": None, "train_time_s": res.train_time, "epochs_run": res.epochs_run,
               "best_epoch": res.best_epoch}
        if method == "gaussian":
            t0 = time.perf_counter()
            smooth = smoothing.Smooth(model, 10, args.sigma)
            cert = smooth.certify(x_test[:k].to(dev), n0=args.n0, n=args.n, alpha=args.alpha,
                                  batch_size=args.certify_batch, seed=args.seed)
            t_cert = time.perf_counter() - t0
            correct = (cert.prediction == y_test[:k]).numpy()
            radius = cert.radius.numpy()
            row["acr"] = smoothing.acr(radius, correct)
            row["certify_time_s"] = t_cert
            certified[label] = (radius, correct)
            with open(os.path.join(args.out, "certify_gaussian.tsv"), "w") as fh:
                fh.write("idx\tlabel\tpredict\tradius\tcorrect\ttime\n")
                for i in range(k):
                    fh.write(f"{i}\t{int(y_test[i])}\t{int(cert.prediction[i])}\t{radius[i]:.4g}\t"
                             f"{int(correct[i])}\t{t_cert / k:.4f}\n")
        rows.append(row)
        extra = (f", ACR {row['acr']:.3f} ({k} images, n={args.n}, certified in {row['certify_time_s']:.1f}s)"
                 if row["acr"] is not None else "")
        print(f"  {label:<28} clean {_fmt_pct(row['clean_acc']):>6}  PGD-{args.attack_steps} "
              f"{_fmt_pct(row['robust_acc']):>6}{extra}  (trained {row['train_time_s']:.1f}s)", flush=True)

    header = ["method", "clean acc", f"PGD-{args.attack_steps} acc (eps={args.eps:g})",
              f"ACR (sigma={args.sigma:g})", "train time"]
    table = [[r["label"], _fmt_pct(r["clean_acc"]), _fmt_pct(r["robust_acc"]),
              "-" if r["acr"] is None else f"{r['acr']:.3f}", f"{r['train_time_s']:.1f} s"] for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(header)]
    md = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
          "|" + "|".join(("-" * (w + 1) + ":") if i else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|"]
    md += ["| " + " | ".join((c.ljust(w) if i == 0 else c.rjust(w)) for i, (c, w) in enumerate(zip(t, widths))) + " |"
           for t in table]
    print()
    print("\n".join(md))
    radii = [0.0, 0.25, 0.5, 0.75, 1.0]
    for label, (radius, correct) in certified.items():
        accs = smoothing.certified_accuracy(radius, correct, radii)
        print(f"\ncertified accuracy of the smoothed {label} model (n0={args.n0}, n={args.n}, alpha={args.alpha:g}): "
              + ", ".join(f"r={r:g}: {_fmt_pct(float(a))}" for r, a in zip(radii, accs))
              + f" (the largest radius n={args.n} samples can certify is "
                f"{_max_radius(args.sigma, args.n, args.alpha):.2f})")
    with open(os.path.join(args.out, "results.md"), "w") as fh:
        fh.write("\n".join(md) + "\n")
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "label", "clean_acc", "robust_acc", "eps", "attack_steps", "acr", "sigma",
                    "train_time_s", "epochs_run", "best_epoch"])
        for r in rows:
            w.writerow([r["method"], r["label"], f"{r['clean_acc']:.4f}", f"{r['robust_acc']:.4f}", args.eps,
                        args.attack_steps, "" if r["acr"] is None else f"{r['acr']:.4f}", args.sigma,
                        f"{r['train_time_s']:.2f}", r["epochs_run"], r["best_epoch"]])
    outputs = ["results.md", "results.csv"]
    if certified:
        smoothing.plot_certified_accuracy(os.path.join(args.out, "certified_accuracy.png"), certified,
                                          title=f"digits, randomized smoothing (n={args.n}, alpha={args.alpha:g})")
        outputs += ["certified_accuracy.png", "certify_gaussian.tsv"]
    print(f"\nwrote {', '.join(os.path.join(args.out, o) for o in outputs)} and one checkpoint directory per method "
          f"({time.perf_counter() - t_start:.0f} s in all)")
    return 0
