"""Trainer: one training method bound to a model, with the optimizer, schedule, mixed precision,
the processes' random streams, the projected-gradient engine on the model, and evaluation; and the
training options that any method's step goes through: adversarial weight perturbation (``awp``,
:mod:`.awp`), weight averaging (``ema``, :mod:`.ema`) and mixup (``mixup``, :meth:`Trainer.mixup`)."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _checks, _rng, bounds, ops
from ..attacks.engine import Engine
from ..models import Normalize
from . import registry
from .awp import WeightPerturbation
from .config import FitConfig
from .ema import WeightAverage
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


def dist_info():
    """(rank, world size) of the initialised process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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


def _mean_ce(logits, y):
    return F.cross_entropy(logits, y)


class Trainer:
    """One training method bound to a model: ``train_step(x, y)`` does the work of one minibatch
    (the method's step: attack, forward/backward passes, optimizer and scheduler steps) and
    ``evaluate`` measures clean / PGD / noisy accuracy. ``fit`` drives it; the benchmark times it.

    cfg: a FitConfig, or its fields and the method's hyperparameters as keyword arguments.
    steps_per_epoch: minibatches per data pass (sets the length of the learning-rate schedule)."""

    def __init__(self, model: nn.Module, cfg: Optional[FitConfig] = None, *, steps_per_epoch: int = 1,
                 device=None, ddp: Optional[bool] = None, **kwargs):
        if cfg is None:
            cfg = FitConfig.make(**kwargs)
        elif kwargs:
            cfg = FitConfig.make(**{**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                                       if f.name != "params"}, **cfg.params, **kwargs})
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
        self.fwd = nn.Sequential(Normalize(cfg.mean, cfg.std), model).to(self.device) \
            if cfg.mean is not None else model
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
        self._build_optimizer(int(steps_per_epoch))
        self.amp_dtype = _checks.autocast_dtype(cfg.amp, "amp")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        # Seeds of the ops' Philox streams: one generator per process, saved in checkpoints.
        self.gen = _rng.process_generator(cfg.seed, self.rank)
        self._engines: Dict[str, Engine] = {}
        # Methods that train for deterministic certification also report cert_acc in validation.
        self.certified = bool(cfg.method_class.certified)
        if cfg.select == "cert_acc" and not self.certified:
            certified = [n for n in registry.names() if registry.get(n).certified]
            raise ValueError(f"select='cert_acc' needs a certified training method ({', '.join(certified)}); "
                             f"{cfg.method!r} is not one")
        # Further validation accuracies a method measures itself (e.g. set_acc of the learned-set methods).
        self.val_metrics = tuple(cfg.method_class.val_metrics)
        own = ("clean_acc", "robust_acc", "noise_acc", "cert_acc", "last")
        if cfg.select not in own and cfg.select not in self.val_metrics:
            having = [n for n in registry.names() if cfg.select in registry.get(n).val_metrics]
            raise ValueError(f"select={cfg.select!r} is measured by the methods {', '.join(having) or '(none)'}; "
                             f"{cfg.method!r} does not measure it")
        self.method = cfg.method_class(self)
        # The training options (None: off). AWP has no state of its own; the weight average is
        # checkpointed with the model; mixup draws from its own generator (saved per rank), so that
        # it leaves the seeds of the attacks as they are without it.
        self.awp = WeightPerturbation(self, cfg.awp) if cfg.awp is not None else None
        self.ema = WeightAverage(self.model, cfg.ema) if cfg.ema is not None else None
        self.mix_gen = torch.Generator().manual_seed(_rng.derive_seed(self.gen.initial_seed(), 1)) \
            if cfg.mixup is not None else None

    def _build_optimizer(self, steps_per_epoch: int) -> None:
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
        self.total_steps = cfg.passes * self.steps_per_epoch * cfg.updates_per_batch
        factor = LRFactor(cfg.schedule, self.total_steps, [min(1.0, ms / cfg.epochs) for ms in cfg.milestones],
                          cfg.gamma)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)

    # ---- what methods use

    def seed(self) -> int:
        """A fresh Philox seed from this process's generator."""
        return int(torch.randint(0, 1 << 62, (1,), generator=self.gen))

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def fmt(self, x: torch.Tensor) -> torch.Tensor:
        """x in the configured layout (channels_last for 4-D inputs when asked)."""
        if self.cfg.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def prepare(self, x: torch.Tensor, y: torch.Tensor):
        """A minibatch on the device, float32, in the configured layout."""
        x = x.to(self.device, non_blocking=True)
        if x.dtype != torch.float32:
            x = x.float()
        return self.fmt(x), y.to(self.device, non_blocking=True)

    def engine(self, norm: Optional[str] = None, objective=None) -> Engine:
        """The projected-gradient engine on the model (with its normalisation, under the run's
        autocast, fp16 loss scaling): the same engine as ``attacks.PGD``. The default objective is
        the mean cross-entropy; norm defaults to the configured one."""
        norm = self.cfg.norm if norm is None else norm
        if objective is not None:
            return Engine(self.fwd, objective, norm=norm, lo=self.cfg.lo, hi=self.cfg.hi, dtype=self.amp_dtype,
                          scaler=self.scaler)
        if norm not in self._engines:
            self._engines[norm] = Engine(self.fwd, _mean_ce, norm=norm, lo=self.cfg.lo, hi=self.cfg.hi,
                                         dtype=self.amp_dtype, scaler=self.scaler)
        return self._engines[norm]

    def attack(self, x, y, eps, alpha, steps: int, norm: Optional[str] = None, random_start: bool = True,
               engine: Optional[Engine] = None) -> torch.Tensor:
        """PGD on the model in its current mode (training's adversary): a uniform random start
        (when random_start and eps > 0) and ``steps`` fused steps. Returns x_adv."""
        engine = self.engine(norm) if engine is None else engine
        rand = random_start and eps > 0
        return engine.run(x, y, eps, alpha, steps, start="uniform" if rand else "clean",
                          seed=self.seed() if rand else 0, evaluate=False).x_adv

    def update(self, loss: torch.Tensor) -> None:
        """Backward of the (scaled) loss, optimizer and scheduler step."""
        self.scaler.scale(loss).backward()
        self.optimizer_step()

    def loss_update(self, closure: Callable[[nn.Module], Tuple[torch.Tensor, torch.Tensor]]):
        """One training update on the loss ``closure(net)`` returns as (loss, logits), with the
        training options applied: under ``awp`` the weights are first perturbed in the direction
        that raises closure's loss (``closure(trainer.local)``, see :mod:`.awp`), the training
        gradient is taken there (``closure(trainer.net)``, under autocast), the weights are
        restored exactly, then the optimizer steps (and the weight average, under ``ema``, follows).
        Without ``awp`` it is ``update(loss)`` on closure's loss. Returns (loss, logits)."""
        awp = self.awp
        try:
            if awp is not None:
                awp.perturb(closure)
            with self.autocast():
                loss, logits = closure(self.net)
            self.scaler.scale(loss).backward()
        finally:
            if awp is not None:
                awp.restore()
        self.optimizer_step()
        return loss, logits

    def optimizer_step(self) -> None:
        """Optimizer and scheduler step after a backward pass (gradients scaled by the scaler), then
        the weight average's update when the run keeps one."""
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update()

    def mixup(self, x: torch.Tensor, y: torch.Tensor):
        """Mixup of a minibatch (Zhang et al. 2018): lam ~ Beta(alpha, alpha) once per batch
        (alpha = cfg.mixup), folded to max(lam, 1 - lam) so that every mixed sample is dominated by
        its own input, and a uniform permutation pi of the batch:

            x_mix = lam * x + (1 - lam) * x[pi],   loss = lam * L(x_mix, y) + (1 - lam) * L(x_mix, y[pi]).

        The fold leaves the distribution of the mixed batch unchanged (Beta(alpha, alpha) is
        symmetric and pi^-1 is as uniform as pi) and makes lam = 1 return x itself: as alpha -> 0
        mixup turns into no mixup exactly. lam and pi come from the trainer's mixup generator (saved in
        checkpoints). Returns (x_mix, y, y[pi], lam), lam a Python float (no host synchronisation)."""
        seed = int(torch.randint(0, 1 << 62, (1,), generator=self.mix_gen))
        lam = float(np.random.default_rng(seed).beta(self.cfg.mixup, self.cfg.mixup))
        lam = max(lam, 1.0 - lam)
        perm = torch.randperm(x.shape[0], generator=self.mix_gen).to(x.device, non_blocking=True)
        if lam == 1.0:
            return x, y, y[perm], 1.0
        x_mix = self.fmt(torch.lerp(x[perm], x, lam))  # lam * x + (1 - lam) * x[perm]
        return x_mix, y, y[perm], lam

    @staticmethod
    def mixed_ce(logits: torch.Tensor, y: torch.Tensor, y2: torch.Tensor, lam: float) -> torch.Tensor:
        """lam * CE(logits, y) + (1 - lam) * CE(logits, y2) (CE(logits, y) when lam = 1)."""
        if lam == 1.0:
            return F.cross_entropy(logits, y)
        return lam * F.cross_entropy(logits, y) + (1.0 - lam) * F.cross_entropy(logits, y2)

    @staticmethod
    def stats(loss, logits, y) -> StepStats:
        return loss.detach().float() * y.shape[0], (logits.detach().argmax(1) == y).sum(), y.shape[0]

    def natural_step(self, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        """A cross-entropy step on x as given; methods end in it on the inputs they made (through
        :meth:`loss_update`, so with AWP when the run asks for it)."""
        def closure(net):
            logits = net(x)
            return F.cross_entropy(logits, y), logits

        loss, logits = self.loss_update(closure)
        return self.stats(loss, logits, y)

    # ---- public

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        """One minibatch of the configured method (model in train mode). Returns (sum of losses,
        number correct, number of samples); the first two are device tensors (no host sync)."""
        self.fwd.train()
        x, y = self.prepare(x, y)
        return self.method.step(x, y)

    def evaluate(self, loader, eps: Optional[float] = None, progress: bool = False) -> Dict[str, float]:
        """Clean accuracy, PGD accuracy (val_eps / val_alpha / val_steps / val_norm; skipped when the
        eps is 0), for methods that train for smoothing, accuracy on noisy inputs (their sigma), and
        for certified methods ``cert_acc``: the fraction of samples whose label interval bound
        propagation proves on the L-inf box of radius eps (every margin bound > 0, in fp32 without
        autocast; at eps 0 the fraction whose label is the strict argmax), and the method's own
        ``val_metrics`` (e.g. ``set_acc``), in eval mode. Counts are
        summed over the processes when the trainer runs distributed (ddp): every process must call it
        then, each on its part of the data (or all on the same data). Under ``ema`` these are the
        metrics of the averaged weights (swapped into the model for the evaluation, then back)."""
        c = self.cfg
        eps = c.val_eps if eps is None else eps
        sigma = c.noise_sigma
        was = self.fwd.training
        self.fwd.eval()
        # n, clean, robust, noise, loss, cert, then the method's val_metrics
        sums = torch.zeros(6 + len(self.val_metrics), dtype=torch.float64, device=self.device)
        try:
            with self.ema.applied() if self.ema is not None else contextlib.nullcontext():
                self._evaluate_loop(loader, sums, eps, sigma, progress)
        finally:
            self.fwd.train(was)
        if self.ddp and self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(sums)
        n, clean, robust, noise, loss, cert, *own = sums.tolist()
        n = max(n, 1.0)
        out = {"clean_acc": clean / n, "robust_acc": robust / n if eps > 0 else float("nan"), "val_loss": loss / n}
        if sigma is not None:
            out["noise_acc"] = noise / n
        if self.certified:
            out["cert_acc"] = cert / n
        out.update({name: v / n for name, v in zip(self.val_metrics, own)})
        return out

    def _evaluate_loop(self, loader, sums, eps, sigma, progress) -> None:
        from tqdm.auto import tqdm

        it = tqdm(iter(loader), total=len(loader), desc="  validate", leave=False,
                  disable=not progress or self.rank != 0)
        for batch in it:
            x, y = self.prepare(batch[0], batch[1])
            sums += self._evaluate_batch(x, y, eps, sigma)

    def _evaluate_batch(self, x, y, eps, sigma) -> torch.Tensor:
        c = self.cfg
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        with torch.no_grad(), self.autocast():
            logits = self.fwd(x)
            loss = F.cross_entropy(logits.float(), y, reduction="sum").double()
        clean = (logits.argmax(1) == y).sum()
        robust = noise = cert = zero
        if eps > 0:
            x_adv = self.attack(x, y, eps, c.val_alpha, c.val_steps, c.val_norm, True)
            with torch.no_grad(), self.autocast():
                robust = (self.fwd(x_adv).argmax(1) == y).sum()
        if sigma is not None:
            with torch.no_grad(), self.autocast():
                xn = self.fmt(ops.gaussian_noise(x, 1, sigma, seed=self.seed()))
                noise = (self.fwd(xn).argmax(1) == y).sum()
        if self.certified:
            with torch.no_grad():  # outside autocast: the proof is computed in fp32
                cert = bounds.verified(self.fwd, x, y, eps, c.lo, c.hi, num_classes=logits.shape[1]).sum()
        counts = self.method.validation_counts(x, y) if self.val_metrics else {}
        missing = [k for k in self.val_metrics if k not in counts]
        if missing:
            raise RuntimeError(f"method {c.method!r}: validation_counts returned no {', '.join(missing)}")
        return torch.stack([zero + y.shape[0], zero + clean, zero + robust, zero + noise, loss, zero + cert]
                           + [zero + counts[k] for k in self.val_metrics])

    # ---- checkpoint parts

    def rank_state(self) -> Dict[str, Any]:
        """What differs between processes: the RNG states (the mixup generator's too) and the method's
        persistent state."""
        st = {"rng": _rng_state(self.device), "gen": self.gen.get_state(), "method": self.method.state_dict()}
        if self.mix_gen is not None:
            st["mix_gen"] = self.mix_gen.get_state()
        return st

    def load_rank_state(self, st: Dict[str, Any]) -> None:
        _set_rng_state(st["rng"], self.device)
        self.gen.set_state(st["gen"])
        if self.mix_gen is not None:
            if st.get("mix_gen") is None:
                raise ValueError("resume: the checkpoint holds no mixup generator state (written without mixup)")
            self.mix_gen.set_state(st["mix_gen"])
        self.method.load_state_dict(st.get("method") or {})

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
