"""MethodContext: everything a training method may use of the run it is part of, and nothing else.

A :class:`~robustops.train.Method` is handed one context (``method.ctx``) and reaches the model, the
random streams and the optimizer only through it, so that a method cannot take a step that skips the
training options (adversarial weight perturbation, weight averaging) or read the run's progress off
the learning-rate schedule. The :class:`~robustops.train.Trainer` builds the context of a training
run; :func:`~robustops.train.evaluate` builds one that evaluates only (its ``update`` refuses).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _checks
from ..attacks.engine import Engine
from ..models import Normalize, video
from .budget import BudgetSchedule, make_schedule
from .cutmix import MixedTarget, compose, cutmix_box, target_cross_entropy
from .registry import StepStats
from .robust_mixup import robust_interpolation

__all__ = ["MethodContext", "CONTEXT_ATTRIBUTES", "Closure", "weighted_cross_entropy", "bind_model", "prepare_batch",
           "dist_info"]

#: closure(net) -> (loss, aux): a method's training loss computed through ``net`` (under the run's
#: autocast); aux is anything the method wants back (its logits, ...).
Closure = Callable[[nn.Module], Tuple[torch.Tensor, Any]]

#: The public attributes of a MethodContext: the documented set a method may use (a test keeps them equal).
CONTEXT_ATTRIBUTES = ("cfg", "device", "forward", "rank", "world_size", "amp_dtype", "weights", "ood", "ood_count",
                      "progress", "epoch", "seed", "autocast", "fmt", "update", "natural_step", "stats", "cross_entropy", "mixed_ce",
                      "mixup", "cutmix", "robust_mixup", "engine", "attack", "budget")


def mean_ce(logits: torch.Tensor, y) -> torch.Tensor:
    """The mean cross-entropy: the default objective of the context's engines; of a CutMix batch's
    mixed target (a MixedTarget, or the plain tuple the engine makes of its rows), the mixed one."""
    if isinstance(y, tuple):
        return target_cross_entropy(weighted_cross_entropy, logits, MixedTarget(*y), None)
    return F.cross_entropy(logits, y)


def weighted_cross_entropy(logits: torch.Tensor, y: torch.Tensor, weights: Optional[torch.Tensor],
                           label_smoothing: float = 0.0) -> torch.Tensor:
    """The cross-entropy of logits [B, C] and labels y [B], averaged over the batch with the per-sample
    weights [B] (sum_i w_i CE_i / sum_i w_i), or plainly (``F.cross_entropy``) when weights is None.
    Written as nll_loss over log-probabilities scaled per row, whose sum is divided by the weights' sum,
    the division ``F.cross_entropy``'s mean makes by B: weights of ones give its value bit for bit.

    label_smoothing in [0, 1]: ``F.cross_entropy``'s, the target (1 - ls) * onehot(y) + ls / C, so that
    CE_i = (1 - ls) * nll_i + ls * mean_c(-log p_ic), weighted in the same way; 0 (the default) is the
    plain form above, unchanged."""
    if weights is None:
        return F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    logp = F.log_softmax(logits, dim=1)
    wlogp = logp * weights.to(logp.dtype).unsqueeze(1)
    nll = F.nll_loss(wlogp, y, reduction="sum")
    if label_smoothing == 0.0:
        return nll / weights.sum()
    uniform = -wlogp.sum() / logits.shape[1]
    return ((1.0 - label_smoothing) * nll + label_smoothing * uniform) / weights.sum()


def dist_info():
    """(rank, world size) of the initialised process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def prepare_batch(ctx: "MethodContext", x: torch.Tensor, y: torch.Tensor):
    """A minibatch on the context's device, x float32 in the configured layout."""
    x = x.to(ctx.device, non_blocking=True)
    if x.dtype != torch.float32:
        x = x.float()
    return ctx.fmt(x), y.to(ctx.device, non_blocking=True)


def bind_model(model: nn.Module, cfg, device=None) -> Tuple[torch.device, nn.Module]:
    """The model moved to its device (default: its parameters'; channels_last when cfg asks) and the
    forward methods and evaluation call: the model with cfg's input normalisation in front, if any.
    Returns (device, forward)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    model.to(device)
    if cfg.channels_last:
        video.model_to_channels_last(model)  # 4-D weights channels_last, Conv3d's channels_last_3d
    fwd = nn.Sequential(Normalize(cfg.mean, cfg.std), model).to(device) if cfg.mean is not None else model
    return device, fwd


class MethodContext:
    """What a training method sees of its run (``self.ctx`` of a :class:`~robustops.train.Method`).

    Attributes:
      cfg: the resolved :class:`~robustops.train.FitConfig`; the method's hyperparameters are its attributes.
      device: the torch.device of the model and of every batch.
      forward: the model with its input normalisation in front (an nn.Module): what attacks, bounds and
        validation run, and whose train / eval mode a method may switch. The forward whose loss is
        back-propagated is the one ``update`` hands its closure (the DistributedDataParallel wrapper
        when the run is distributed).
      rank, world_size: this process's rank and the number of processes the training is shared over
        (1 when it is not distributed); a method's collectives (e.g. an all-reduce of a dual variable's
        input) are needed only when world_size > 1.
      amp_dtype: the autocast dtype (torch.bfloat16 / torch.float16) or None: for attacks a method builds.
      weights: the per-sample loss weights of the current minibatch (Tensor[B], float32, on the device)
        or None (the default: every sample counts once). ``cross_entropy``, ``mixed_ce`` and
        ``natural_step`` apply them (a weighted mean); a method that declares ``sample_weights = True``
        promises its losses go through them, and the trainer refuses weights for the others.
      ood: the OOD rows of the current minibatch (BoolTensor[B] on the device, :mod:`robustops.train.ood`) or
        None (no OOD row): a method with ``ood_data = True`` trains them toward the uniform label;
        ``ood_count`` is their number (an int: no host sync).
      progress: the fraction of the run's optimizer steps done, in [0, 1] (restored on resume).
      epoch: the 0-based data pass the next step belongs to (optimizer steps done // steps per pass).

    Methods:
      seed(): a fresh Philox seed from this process's generator (checkpointed).
      autocast(): the run's autocast context.
      fmt(x): x in the configured layout (when asked: channels_last for 4-D inputs; for 5-D videos
        [B, T, C, H, W] memory order [B, T, H, W, C], ``models.video.to_channels_last``).
      update(closure): the one way to take a training step: ``closure(net)`` returns (loss, aux); under
        ``awp`` the weights are first perturbed to raise that loss (a first call through the local,
        non-DDP forward), then closure(net) runs under autocast, its (scaled) loss is back-propagated,
        the weights are restored exactly, the optimizer and the schedule step and, under ``ema``, the
        weight average follows. Returns what the closure returned.
      natural_step(x, y): a (weighted) cross-entropy step on x as given; returns the step's StepStats.
      stats(loss, logits, y): the StepStats of a step (loss * B, number correct, B).
      cross_entropy(logits, y, label_smoothing=0), mixed_ce(logits, y, y2, lam): the shared losses, weighted by ``weights``.
      mixup(x, y): (x_mix, y, y[pi], lam) from the run's mixup generator (the ``mixup`` option).
      cutmix(x, y): (x_mix, target): the CutMix composition of the batch and its mixed target (a
        :class:`~robustops.train.cutmix.MixedTarget`, the ``cutmix`` option), which ``cross_entropy``,
        ``natural_step``, ``stats``, ``budget`` and the engines' default objective take in place of labels.
      robust_mixup(x, y): (x_mix, target): the robust-mixup batch (:mod:`robustops.train.robust_mixup`, the
        ``robust_mixup`` option): per sample the more adverse interpolation with its partner, a MixedTarget.
      engine(norm, objective, forward=, step=), attack(x, y, eps, alpha, steps, norm, random_start):
        the projected-gradient engine on the model (run's box, autocast and fp16 loss scaling) and PGD on it.
      budget(x, y): (eps, alpha) to attack this minibatch with (floats, or Tensor[B] per sample): the
        run's ``budget_schedule`` (:mod:`robustops.train.budget`) at this point of the run; (cfg.eps,
        cfg.alpha) exactly under the default "constant". Call it once per training minibatch (it logs
        the budget); ``budget(x, y, log=False)`` for a pass that trains nothing (coreset selection).
    """

    def __init__(self, cfg, forward: nn.Module, device, gen: torch.Generator, *, scaler=None, rank: int = 0,
                 world_size: int = 1, mix_gen: Optional[torch.Generator] = None, owner=None,
                 budget: Optional[BudgetSchedule] = None):
        # owner: what takes the steps (the Trainer): update(closure), progress and epoch; None evaluates only
        self.cfg = cfg
        self.device = torch.device(device)
        self.forward = forward
        self.rank, self.world_size = int(rank), int(world_size)
        self.amp_dtype = _checks.autocast_dtype(cfg.amp, "amp")
        self.weights: Optional[torch.Tensor] = None
        self.ood: Optional[torch.Tensor] = None
        self.ood_count = 0
        self._gen, self._mix_gen, self._owner = gen, mix_gen, owner
        self._scaler = scaler
        self._engines: Dict[str, Engine] = {}
        # the run's budget schedule (the Trainer's, which checkpoints and logs it)
        self._budget = make_schedule(cfg) if budget is None else budget

    # ---- the run's clock and its one step path

    @property
    def progress(self) -> float:
        return self._need_owner("progress").progress

    @property
    def epoch(self) -> int:
        return self._need_owner("epoch").epoch

    def update(self, closure: Closure):
        return self._need_owner("update").update(closure)

    def _need_owner(self, what: str):
        if self._owner is None:
            raise RuntimeError(f"{what}: this method context evaluates only (it takes no training steps)")
        return self._owner

    def budget(self, x: torch.Tensor, y: torch.Tensor, log: bool = True):
        """(eps, alpha) for this minibatch from the run's budget schedule: floats, or float32 Tensor[B]
        (adaptive, per sample); alpha = cfg.alpha * eps / cfg.eps (the step follows the budget).
        log=False: not counted in ``train_eps`` and no adaptive re-estimate (a selection pass)."""
        return self._budget(self, x, y.dominant if isinstance(y, MixedTarget) else y, log=log)

    def natural_step(self, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        def closure(net):
            logits = net(x)
            return self.cross_entropy(logits, y), logits

        loss, logits = self.update(closure)
        return self.stats(loss, logits, y)

    # ---- randomness, precision, layout

    def seed(self) -> int:
        return int(torch.randint(0, 1 << 62, (1,), generator=self._gen))

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def fmt(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        if self.cfg.channels_last and x.dim() == 5:  # a video [B, T, C, H, W]: memory [B, T, H, W, C]
            return video.to_channels_last(x)
        return x

    # ---- losses

    @staticmethod
    def stats(loss, logits, y) -> StepStats:
        if isinstance(y, MixedTarget):  # a CutMix batch: accuracy against the dominant labels
            y = y.dominant
        return loss.detach().float() * y.shape[0], (logits.detach().argmax(1) == y).sum(), y.shape[0]

    def cross_entropy(self, logits: torch.Tensor, y, label_smoothing: float = 0.0) -> torch.Tensor:
        if isinstance(y, MixedTarget):
            return target_cross_entropy(weighted_cross_entropy, logits, y, self.weights, label_smoothing)
        return weighted_cross_entropy(logits, y, self.weights, label_smoothing)

    def mixed_ce(self, logits: torch.Tensor, y: torch.Tensor, y2: torch.Tensor, lam: float) -> torch.Tensor:
        """lam * CE(logits, y) + (1 - lam) * CE(logits, y2) (CE(logits, y) when lam = 1)."""
        if lam == 1.0:
            return self.cross_entropy(logits, y)
        return lam * self.cross_entropy(logits, y) + (1.0 - lam) * self.cross_entropy(logits, y2)

    def _mix_draw(self, option: str):
        """(numpy generator, lam ~ Beta(a, a)) of a batch-mixing option (a = cfg.<option>), both seeded from the
        run's mixing generator (saved in checkpoints): the draw mixup, robust mixup and CutMix share."""
        alpha = getattr(self.cfg, option)
        if self._mix_gen is None or alpha is None:
            raise RuntimeError(f"{option}: the run has no mixing generator (the {option} option is off)")
        rng = np.random.default_rng(int(torch.randint(0, 1 << 62, (1,), generator=self._mix_gen)))
        return rng, float(rng.beta(alpha, alpha))

    def _mix_perm(self, x: torch.Tensor) -> torch.Tensor:
        """A uniform permutation of the batch (the partners) from the run's mixing generator, on x's device."""
        return torch.randperm(x.shape[0], generator=self._mix_gen).to(x.device, non_blocking=True)

    def mixup(self, x: torch.Tensor, y: torch.Tensor):
        """Mixup of a minibatch (Zhang et al. 2018): lam ~ Beta(alpha, alpha) once per batch
        (alpha = cfg.mixup), folded to max(lam, 1 - lam) so that every mixed sample is dominated by
        its own input, and a uniform permutation pi of the batch:

            x_mix = lam * x + (1 - lam) * x[pi],   loss = lam * L(x_mix, y) + (1 - lam) * L(x_mix, y[pi]).

        The fold leaves the distribution of the mixed batch unchanged (Beta(alpha, alpha) is
        symmetric and pi^-1 is as uniform as pi) and makes lam = 1 return x itself: as alpha -> 0
        mixup turns into no mixup exactly. lam and pi come from the run's mixup generator (saved in
        checkpoints). Returns (x_mix, y, y[pi], lam), lam a Python float (no host synchronisation)."""
        _, lam = self._mix_draw("mixup")
        lam = max(lam, 1.0 - lam)
        perm = self._mix_perm(x)
        if lam == 1.0:
            return x, y, y[perm], 1.0
        x_mix = self.fmt(torch.lerp(x[perm], x, lam))  # lam * x + (1 - lam) * x[perm]
        return x_mix, y, y[perm], lam

    def robust_mixup(self, x: torch.Tensor, y: torch.Tensor):
        """Robust mixup of a minibatch (:mod:`robustops.train.robust_mixup`, Lau et al. 2023): lam ~
        Beta(alpha, alpha) (alpha = cfg.robust_mixup) and a uniform permutation pi from the run's mixing
        generator (saved in checkpoints); each sample takes the interpolation with its partner (lam or
        1 - lam) of larger mixed cross-entropy under the model in eval mode (the mode is restored).
        Returns (x_mix, MixedTarget(y1, y2, lam)) in the configured layout."""
        _, lam = self._mix_draw("robust_mixup")
        perm = self._mix_perm(x)
        was_training = self.forward.training
        self.forward.eval()  # scoring the candidates must not move batch-norm statistics
        try:
            with self.autocast():
                x_mix, target = robust_interpolation(self.forward, x, y, perm, lam)
        finally:
            self.forward.train(was_training)
        return self.fmt(x_mix), target

    def cutmix(self, x: torch.Tensor, y: torch.Tensor):
        """CutMix of a minibatch (:mod:`robustops.train.cutmix`: Yun et al. 2019, as Rebuffi et al. 2021
        use it with adversarial training): lam ~ Beta(alpha, alpha) (alpha = cfg.cutmix), one box of
        about (1 - lam) of the image at a uniform centre and one uniform permutation pi per batch; the
        box's pixels come from x[pi] and lam is recomputed from the box. Returns (x_mix, MixedTarget(y,
        y[pi], lam)); x_mix is x itself when the box is empty. All draws come from the run's mixing
        generator (saved in checkpoints); lam is a Python float (no host synchronisation)."""
        H, W = x.shape[-2:]
        rng, lam = self._mix_draw("cutmix")
        cy, cx = int(rng.integers(H)), int(rng.integers(W))
        y1, y2, x1, x2, lam = cutmix_box(lam, cy, cx, H, W)
        perm = self._mix_perm(x)
        return self.fmt(compose(x, x[perm], (y1, y2, x1, x2))), MixedTarget(y, y[perm], lam)

    # ---- the projected-gradient engine

    def engine(self, norm: Optional[str] = None, objective=None, *, forward=None, step=None) -> Engine:
        """The projected-gradient engine (the one ``attacks.PGD`` runs) on ``forward`` (default: the
        model) with the run's box [lo, hi], autocast and fp16 loss scaling. objective defaults to the
        mean cross-entropy, norm to the configured one; step: the engine's projection op (default
        ``ops.pgd_step_``). The default engine of each norm is built once."""
        c = self.cfg
        norm = c.norm if norm is None else norm
        if objective is None and forward is None and step is None:
            if norm not in self._engines:
                self._engines[norm] = Engine(self.forward, mean_ce, norm=norm, lo=c.lo, hi=c.hi,
                                             dtype=self.amp_dtype, scaler=self._scaler)
            return self._engines[norm]
        return Engine(self.forward if forward is None else forward, mean_ce if objective is None else objective,
                      norm=norm, lo=c.lo, hi=c.hi, dtype=self.amp_dtype, scaler=self._scaler, step=step)

    def attack(self, x, y, eps, alpha, steps: int, norm: Optional[str] = None, random_start: bool = True,
               engine: Optional[Engine] = None, context=None) -> torch.Tensor:
        """PGD on the model in its current mode (training's adversary): a uniform random start
        (when random_start and eps > 0) and ``steps`` fused steps; context: the engine's per-sample
        context (``Engine.run``). Returns x_adv."""
        engine = self.engine(norm) if engine is None else engine
        rand = random_start and (torch.is_tensor(eps) or eps > 0)  # per-sample eps: no host sync
        return engine.run(x, y, eps, alpha, steps, start="uniform" if rand else "clean",
                          seed=self.seed() if rand else 0, evaluate=False, context=context).x_adv

