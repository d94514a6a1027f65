"""Trainer: one training method bound to a model, with the optimizer, schedule, mixed precision,
the processes' random streams and evaluation; the method sees it through its :class:`.MethodContext`,
whose ``update(closure)`` is the one step path, with the training options that any method's step
goes through: adversarial weight perturbation (``awp``, :mod:`.awp`) and weight averaging (``ema``,
:mod:`.ema`); mixup (``mixup``) and CutMix (``cutmix``, :mod:`.cutmix`) are the context's ``mixup`` and ``cutmix``."""
from __future__ import annotations

import contextlib
import math
import random
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from .. import _rng
from . import registry
from .awp import WeightPerturbation
from .budget import make_schedule
from .config import CERTIFIED_METRICS, FitConfig, resolve_config
from .context import Closure, MethodContext, bind_model, dist_info, prepare_batch
from .ema import WeightAverage
from .evaluation import evaluate_context
from .registry import StepStats

__all__ = ["Trainer", "LRFactor", "dist_info"]


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


class LRFactor:
    """Learning-rate factor as a function of the optimizer step (a picklable LambdaLR callable)."""

    def __init__(self, schedule: str, total_steps: int, milestones: Sequence[float], gamma: float = 0.1):
        self.schedule = schedule
        self.total = max(1, int(total_steps))
        self.milestones = sorted(float(v) for v in milestones)  # fractions of training
        self.gamma = gamma

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


class Trainer:
    """One training method bound to a model: ``train_step(x, y)`` does the work of one minibatch
    (the method's step: attack, forward/backward passes, optimizer and scheduler steps) and
    ``evaluate`` measures clean / PGD / noisy accuracy. ``fit`` drives it; the benchmark times it.
    The method is handed ``ctx`` (a :class:`.MethodContext` whose steps go through :meth:`update`).

    cfg: a FitConfig, or its fields and the method's hyperparameters as keyword arguments.
    steps_per_epoch: minibatches per data pass (sets the length of the learning-rate schedule).
    total_steps: the schedule's length in optimizer steps when the passes differ in length (a
    coreset run's full and subset epochs); None: passes * steps_per_epoch * updates per batch."""

    def __init__(self, model: nn.Module, cfg: Optional[FitConfig] = None, *, steps_per_epoch: int = 1,
                 device=None, ddp: Optional[bool] = None, total_steps: Optional[int] = None, **kwargs):
        self.cfg = cfg = resolve_config(cfg, kwargs)
        self.device, self.fwd = bind_model(model, cfg, device)
        self.model = model
        # the method's initialisation of the weights, on a stream of its own (the same on every process)
        init_gen = torch.Generator().manual_seed(_rng.derive_seed(cfg.seed, 2)) if cfg.seed is not None else None
        cfg.method_class.init_model(model, cfg, init_gen)
        self.rank, self.world = dist_info()
        self.ddp = (self.world > 1) if ddp is None else bool(ddp)
        # local: the forward without DDP (AWP's ascent gradient must not start DDP's gradient reduction)
        self.local = _Forward(self.fwd)
        if self.ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
                if self.device.type == "cuda" else None
            self.net = DDP(self.local, device_ids=ids)
        else:
            self.net = self.local
        self._build_optimizer(int(steps_per_epoch), total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        # Seeds of the ops' Philox streams: one generator per process, saved in checkpoints.
        self.gen = _rng.process_generator(cfg.seed, self.rank)
        # Methods that train for deterministic certification also report cert_acc in validation.
        self.certified = bool(cfg.method_class.certified)
        if cfg.select in CERTIFIED_METRICS and not self.certified:
            certified = [n for n in registry.names() if registry.get(n).certified]
            raise ValueError(f"select={cfg.select!r} needs a certified training method ({', '.join(certified)}); "
                             f"{cfg.method!r} is not one")
        # Further validation accuracies a method measures itself (e.g. set_acc of the learned-set methods).
        self.val_metrics = tuple(cfg.method_class.val_metrics)
        own = ("clean_acc", "robust_acc", "noise_acc", "last") + CERTIFIED_METRICS
        if cfg.select not in own and cfg.select not in self.val_metrics:
            having = [n for n in registry.names() if cfg.select in registry.get(n).val_metrics]
            raise ValueError(f"select={cfg.select!r} is measured by the methods {', '.join(having) or '(none)'}; "
                             f"{cfg.method!r} does not measure it")
        # The training options (None: off). AWP has no state of its own; the weight average is
        # checkpointed with the model; mixup draws from its own generator (saved per rank), so that
        # it leaves the seeds of the attacks as they are without it.
        self.mix_gen = torch.Generator().manual_seed(_rng.derive_seed(self.gen.initial_seed(), 1)) \
            if cfg.mixup is not None or cfg.cutmix is not None or cfg.robust_mixup is not None \
            else None  # cutmix, robust_mixup: the same stream
        # the attack-budget schedule (budget_schedule): the context hands it to the method, the trainer
        # checkpoints its state and logs the budgets it gave
        self.budget = make_schedule(cfg)
        self.ctx = MethodContext(cfg, self.fwd, self.device, self.gen, scaler=self.scaler, rank=self.rank,
                                 world_size=self.world if self.ddp else 1, mix_gen=self.mix_gen, owner=self,
                                 budget=self.budget)
        self.amp_dtype = self.ctx.amp_dtype
        self.method = cfg.method_class(self.ctx)
        self.awp = WeightPerturbation(self, cfg.awp) if cfg.awp is not None else None
        self.ema = WeightAverage(self.model, cfg.ema) if cfg.ema is not None else None

    def _build_optimizer(self, steps_per_epoch: int, total_steps: Optional[int] = None) -> None:
        cfg = self.cfg
        params = [p for p in self.model.parameters() if p.requires_grad]
        # On CUDA the fused optimizer kernels: one launch for all parameters.
        fused = {"fused": True} if self.device.type == "cuda" and all(p.is_cuda and p.is_floating_point()
                                                                       for p in params) else {}
        if cfg.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                             nesterov=cfg.nesterov and cfg.momentum > 0, **fused)
        else:
            self.optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.pass_index: Optional[int] = None  # set by fit: the 0-based pass now running (see ``epoch``)
        self.total_steps = cfg.passes * self.steps_per_epoch * cfg.updates_per_batch if total_steps is None \
            else max(1, int(total_steps))
        if cfg.schedule == "onecycle":
            # torch's one-cycle policy (Smith & Topin 2019) with its defaults (30% warm-up from lr / 25,
            # cosine annealing to lr / 25e4, momentum / Adam's beta1 cycled inversely), stepped per
            # optimizer step like the others; its state_dict holds the step count, so resume is exact
            # (momentum only cycled where there is one: plain SGD keeps momentum 0)
            cycle = cfg.optimizer != "sgd" or cfg.momentum > 0
            self.scheduler = torch.optim.lr_scheduler.OneCycleLR(self.optimizer, max_lr=cfg.lr,
                                                                 total_steps=self.total_steps, cycle_momentum=cycle)
            return
        factor = LRFactor(cfg.schedule, self.total_steps, [min(1.0, ms / cfg.epochs) for ms in cfg.milestones],
                          cfg.gamma)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)

    # ---- the step path and the run's clock (what the method context reaches)

    def update(self, closure: Closure):
        """The one training step: ``closure(net)`` returns (loss, aux). Under ``awp`` the weights are
        first perturbed in the direction that raises closure's loss (``closure(trainer.local)``, see
        :mod:`.awp`); the training gradient is taken by ``closure(trainer.net)`` under autocast, the
        weights are restored exactly, the gradient's norm is clipped to ``cfg.grad_clip`` (if set), then the
        optimizer and the scheduler step (and the weight average, under ``ema``, follows). Returns (loss, aux)."""
        awp = self.awp
        try:
            if awp is not None:
                awp.perturb(closure)
            with self.autocast():
                out = closure(self.net)
            self.scaler.scale(out[0]).backward()
        finally:
            if awp is not None:
                awp.restore()
        self._optimizer_step()
        return out

    def _optimizer_step(self) -> None:
        if self.cfg.grad_clip is not None:
            # the norm of the true gradient: under fp16 the scaled one is unscaled first (scaler.step
            # then skips its own unscale); a step with inf / NaN gradients is still skipped by the scaler
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                           self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        # OneCycleLR refuses steps past its total (a Trainer stepped beyond its schedule, e.g. in a
        # benchmark): it then stays at its last learning rate and the run's progress at 1
        if not (self.cfg.schedule == "onecycle" and self.scheduler.last_epoch >= self.total_steps):
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update()

    @property
    def progress(self) -> float:
        """The fraction of the run's optimizer steps done, in [0, 1]: the scheduler's step count over
        all steps (the count is restored with the scheduler on resume)."""
        return min(1.0, self.scheduler.last_epoch / max(1, self.total_steps))

    @property
    def epoch(self) -> int:
        """The 0-based data pass of the next step: ``pass_index`` when the loop driving the trainer sets it
        (``fit`` does, at the start of each pass: a coreset run's passes are shorter than the data), else
        optimizer steps done // optimizer steps per pass (a Trainer built without steps_per_epoch counts
        each minibatch as a pass)."""
        if self.pass_index is not None:
            return self.pass_index
        return int(self.scheduler.last_epoch) // (self.steps_per_epoch * self.cfg.updates_per_batch)

    # ---- the context's helpers the options (awp: autocast) and the tests use on the trainer

    def autocast(self):
        """The run's autocast context (:meth:`.MethodContext.autocast`)."""
        return self.ctx.autocast()

    def mixup(self, x: torch.Tensor, y: torch.Tensor):
        """The context's mixup of a minibatch (:meth:`.MethodContext.mixup`): (x_mix, y, y[pi], lam)."""
        return self.ctx.mixup(x, y)

    stats = staticmethod(MethodContext.stats)

    def natural_step(self, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        """A cross-entropy step on x as given, through :meth:`update` (so with AWP when the run asks for it)."""
        return self.ctx.natural_step(x, y)

    # ---- public

    def train_step(self, x: torch.Tensor, y: torch.Tensor, weights: Optional[torch.Tensor] = None,
                   ood: Optional[torch.Tensor] = None) -> StepStats:
        """One minibatch of the configured method (model in train mode). Returns (sum of losses,
        number correct, number of samples); the first two are device tensors (no host sync).
        weights: per-sample loss weights (Tensor[B], >= 0) for a method with ``sample_weights``: its
        cross-entropy becomes the weighted mean sum_i w_i CE_i / sum_i w_i; None (the default) is the plain mean.
        ood: BoolTensor[B], the OOD rows (:mod:`.ood`) for a method with ``ood_data``; None or no True: none."""
        self.fwd.train()
        x, y = prepare_batch(self.ctx, x, y)
        if weights is not None:
            if not self.cfg.method_class.sample_weights:
                having = [n for n in registry.names() if registry.get(n).sample_weights]
                raise ValueError(f"per-sample loss weights are applied by the methods {', '.join(having)}, "
                                 f"not by {self.cfg.method!r}")
            weights = torch.as_tensor(weights).to(self.device, torch.float32, non_blocking=True)
            if weights.shape != (x.shape[0],):
                raise ValueError(f"weights must be a Tensor[B] with B = {x.shape[0]}, got shape {list(weights.shape)}")
        self.ctx.weights = weights
        self.ctx.ood, self.ctx.ood_count = self._ood_mask(ood, x.shape[0])
        try:
            return self.method.step(x, y)
        finally:
            self.ctx.weights, self.ctx.ood, self.ctx.ood_count = None, None, 0

    def _ood_mask(self, ood: Optional[torch.Tensor], n: int):
        """(the OOD mask on the device, or None when it marks no row; its count), read on the host (the
        loader's mask is a CPU tensor)."""
        if ood is None:
            return None, 0
        ood = torch.as_tensor(ood)
        if ood.dtype != torch.bool or ood.shape != (n,):
            raise ValueError(f"ood must be a BoolTensor[B] with B = {n}, got {ood.dtype} of shape {list(ood.shape)}")
        count = int(ood.sum())
        if count == 0:
            return None, 0
        if not self.cfg.method_class.ood_data:
            having = [m for m in registry.names() if registry.get(m).ood_data]
            raise ValueError(f"OOD rows are trained by the methods {', '.join(having)}, not by {self.cfg.method!r}")
        return ood.to(self.device, non_blocking=True), count

    def evaluate(self, loader, eps: Optional[float] = None, progress: bool = False) -> Dict[str, float]:
        """Clean accuracy, PGD accuracy (val_eps / val_alpha / val_steps / val_norm; skipped when the
        eps is 0), for methods that train for smoothing, accuracy on noisy inputs (their sigma), and
        for certified methods ``cert_acc``: the fraction of samples whose label interval bound
        propagation proves on the L-inf box of radius eps (every margin bound > 0, in fp32 without
        autocast; at eps 0 the fraction whose label is the strict argmax), ``acr`` (the mean IBP
        radius capped at the training eps, :func:`.evaluation.capped_radii`) and ``acceps``
        (sqrt(clean_acc * acr / eps)), and the method's own
        ``val_metrics`` (e.g. ``set_acc``), in eval mode (:func:`~robustops.train.evaluate`, with this
        trainer's seeds). Counts are
        summed over the processes when the trainer runs distributed (ddp): every process must call it
        then, each on its part of the data (or all on the same data). Under ``ema`` these are the
        metrics of the averaged weights (swapped into the model for the evaluation, then back)."""
        with self.ema.applied() if self.ema is not None else contextlib.nullcontext():
            return evaluate_context(self.ctx, loader, eps=eps, progress=progress, method=self.method)

    # ---- checkpoint parts

    def rank_state(self) -> Dict[str, Any]:
        """What differs between processes: the RNG states (the mixup generator's too), the method's
        persistent state and the budget schedule's."""
        st = {"rng": _rng_state(self.device), "gen": self.gen.get_state(), "method": self.method.state_dict(),
              "budget": self.budget.state_dict()}
        if self.mix_gen is not None:
            st["mix_gen"] = self.mix_gen.get_state()
        return st

    def load_rank_state(self, st: Dict[str, Any]) -> None:
        _set_rng_state(st["rng"], self.device)
        self.gen.set_state(st["gen"])
        if self.mix_gen is not None:
            if st.get("mix_gen") is None:
                raise ValueError("resume: the checkpoint holds no mixup / cutmix generator state (written without "
                                 "mixup or cutmix)")
            self.mix_gen.set_state(st["mix_gen"])
        self.method.load_state_dict(st.get("method") or {})
        self.budget.load_state_dict(st.get("budget") or {})

    def evaluated_state_dict(self) -> Dict[str, torch.Tensor]:
        """A CPU copy of the weights validation measures: the weight average under ``ema``, else the model's."""
        if self.ema is not None:
            return self.ema.averaged_state_dict()
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def state_dict(self, ema_weights: bool = True) -> Dict[str, Any]:
        """Optimizer, scheduler, GradScaler and, under ``ema``, the weight average's update count and (unless
        ema_weights=False: ``fit`` stores them as the checkpoint's state_dict) its weights."""
        sd = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
              "scaler": self.scaler.state_dict()}
        if self.ema is not None:
            st = self.ema.state_dict()
            if not ema_weights:
                del st["state_dict"]
            sd["ema"] = st
        return sd

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        """The inverse of state_dict; under ``ema`` the averaged weights are sd["ema"]["state_dict"], else
        sd["state_dict"] (a ``fit`` checkpoint)."""
        self.optimizer.load_state_dict(sd["optimizer"])
        self.scheduler.load_state_dict(sd["scheduler"])
        if sd.get("scaler"):
            self.scaler.load_state_dict(sd["scaler"])
        if self.ema is not None:
            st = sd.get("ema")
            if not isinstance(st, dict):
                raise ValueError("resume: the checkpoint holds no weight average (written without ema)")
            weights = st.get("state_dict", sd.get("state_dict"))
            self.ema.load_state_dict({"updates": st["updates"], "state_dict": weights})
