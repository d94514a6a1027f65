"""The neutral base of every attack (:class:`Attack`) and what all attacks share: the model's state
around a run (:func:`frozen`), the losses (:func:`dlr_loss`, :func:`ce_score`) and the default step
sizes (:func:`madry_step`, :func:`scaled_step`).

Writing a new attack: subclass :class:`Attack`, call ``super().__init__(model, ...)`` with the options
the base owns (loss, targeted / target_fn, clip, mean / std, seed, train_mode, dtype), set
``self.engine = self.make_engine(norm)`` (or an :class:`~robustops.attacks.engine.Engine` of your own),
and override

- :meth:`Attack.attack` (required): the attack proper on checked inputs, called by
  :meth:`Attack.perturb` with the model already in its attack state and the run's seed and offset;
  returns an :class:`~robustops.attacks.engine.AttackResult`.
- :meth:`Attack.prepare` (optional): checks and converts the per-call parameters (eps, alpha, ...)
  that ``perturb(..., **params)`` passes on; they reach ``attack`` and ``empty_result`` as keywords.
- :meth:`Attack.empty_result` (optional): the result for an empty batch (default: x and empty columns).
- :meth:`Attack.objective` / :meth:`Attack.success` (optional): what is ascended and when a sample
  counts as fooled (default: the ``loss`` option; misclassification, or the target when targeted).
- :meth:`Attack.model_state` (optional): extend it (``with super().model_state(), ...``) when the
  attack runs further modules (as LatentPGD's perturbation model).

Give the subclass its own ``perturb`` only to fix a positional signature; it then calls
``super().perturb(images, labels, targets, offset=..., skip=..., evaluate=..., **params)``.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _checks, _rng
from ..models import Normalize
from .engine import AttackResult, Engine, predictions

__all__ = ["Attack", "Param", "frozen", "dlr_loss", "ce_score", "madry_step", "scaled_step",
           "step_params", "MADRY_FACTOR"]

Param = Union[float, int, torch.Tensor]

#: Madry et al.'s rule for the default step size: alpha = MADRY_FACTOR * eps / steps.
MADRY_FACTOR = 2.5


def scaled_step(eps: Param, steps: int, factor: float) -> Param:
    """factor * eps / steps, computed as ``eps * (factor / steps)`` (a float, or a Tensor[B] like
    eps): LatentPGD's default step size (factor 2) and madry_step's for a Tensor eps."""
    return eps * (factor / steps)


def madry_step(eps: Param, steps: int) -> Param:
    """Madry et al.'s default step size 2.5 * eps / steps for eps a float or a Tensor[B] (per sample):
    the one default of PGD, nearest_member and training (threat model and validation attack).

    A float is computed as ``2.5 * eps / steps``, a Tensor as ``eps * (2.5 / steps)`` (one multiply
    per sample, on eps's device)."""
    if isinstance(eps, torch.Tensor):
        return scaled_step(eps, steps, MADRY_FACTOR)
    return MADRY_FACTOR * eps / steps


def step_params(x: torch.Tensor, eps: Param, alpha: Optional[Param], steps: int,
                default_step: Callable[[Param, int], Param] = madry_step) -> dict:
    """A run's {"eps", "alpha"}: floats, or float32 Tensor[B] on x's device (B = x.shape[0]), checked;
    alpha None is ``default_step(eps, steps)`` (:func:`madry_step` unless an attack has its own rule).
    The per-call parameters of PGD and LatentPGD."""
    B, device = x.shape[0], x.device
    eps = _checks.sample_param_on(eps, "eps", B, device)
    if alpha is None:
        alpha = default_step(eps, steps)
    return {"eps": eps, "alpha": _checks.sample_param_on(alpha, "alpha", B, device)}


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


def ce_score(logits: torch.Tensor, y) -> torch.Tensor:
    """Per-sample cross entropy to ascend for y = (labels, targets): the labels' loss, or minus the
    targets' when targets is not None. It ranks restarts when a custom loss returns a scalar."""
    labels, targets = y
    if targets is None:
        return F.cross_entropy(logits, labels, reduction="none")
    return -F.cross_entropy(logits, targets, reduction="none")


def _set_mode(net: nn.Module, training: bool) -> None:
    try:
        net.train(training)
    except (NotImplementedError, RuntimeError):
        pass  # e.g. torch.export modules, whose mode is fixed


@contextlib.contextmanager
def frozen(module, training: bool = False):
    """module (an nn.Module, else nothing happens) in eval mode (train mode with training=True) with its
    parameters not requiring gradients, for an attack that differentiates through it only to the input;
    mode and flags restored afterwards."""
    if not isinstance(module, nn.Module):
        yield
        return
    was_training = module.training
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        _set_mode(module, training)
        for p, rg in flags:
            if rg:
                p.requires_grad_(False)
        yield
    finally:
        for p, rg in flags:
            if rg:
                p.requires_grad_(True)
        _set_mode(module, was_training)


class Attack:
    """The base of every attack: the model and its state during a run, the valid box, normalisation in
    front of the model, targets, seeds and the autocast dtype, and the ``perturb`` template that checks
    a call's inputs before handing them to :meth:`attack` (see the module docstring for how to write
    an attack).

    model: an nn.Module (or callable) mapping inputs to logits; DataParallel / DDP wrappers are
      attacked through their module. loss: "ce", "dlr" or a callable ``loss(logits, y)`` (per-sample
      [B] or a scalar; y the labels, or the targets when targeted), ascended (descended when
      targeted) by :meth:`objective`. targeted / target_fn: targets given at call time, or made by
      ``target_fn(images, labels)``. clip: (lo, hi), the pixel box images must lie in. mean / std:
      the model takes ``(x - mean) / std`` (``models.Normalize``). seed: the random stream's seed (None:
      drawn from torch's default generator at each call). train_mode: attack in train mode (default
      eval); mode and parameter flags are restored after each call. dtype: autocast dtype of the
      model's forward (None or float32: none).
    """

    #: Per-sample fields the attack's result adds to AttackResult's (robust_accuracy keeps them as columns).
    result_fields: tuple = ()

    def __init__(self, model, *, loss: Union[str, Callable] = "ce", targeted: bool = False,
                 target_fn: Optional[Callable] = None, clip=(0.0, 1.0), mean=None, std=None,
                 seed: Optional[int] = None, train_mode: bool = False, dtype=None):
        if not callable(model):
            raise TypeError(f"model must be an nn.Module or a callable returning logits, got {type(model).__name__}")
        self.model = model
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
        self.normalizer = None if mean is None and std is None else Normalize(mean, std)
        if seed is not None and not _checks.is_int(seed):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        self.seed = seed
        self.train_mode = bool(train_mode)
        self.dtype = _checks.autocast_dtype(dtype)
        self.target_fn = target_fn
        self._samples_seen = 0

    def make_engine(self, norm: str = "linf", l2_radius: str = "uniform") -> Engine:
        """A projected-gradient engine on this attack's forward, objective, success, box and dtype."""
        lo, hi = self.clip
        return Engine(self.forward, self.objective, norm=norm, lo=lo, hi=hi, dtype=self.dtype,
                      success=self.success, score=ce_score, l2_radius=l2_radius)

    @property
    def mean(self) -> Optional[torch.Tensor]:
        return None if self.normalizer is None else self.normalizer.mean.flatten()

    @property
    def std(self) -> Optional[torch.Tensor]:
        return None if self.normalizer is None else self.normalizer.std.flatten()

    # ---------------------------------------------------------------------------- the model

    @property
    def net(self):
        """The module attacked: the model, or the module inside a DataParallel / DDP wrapper."""
        m = self.model
        if isinstance(m, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            return m.module  # the reducer expects parameter gradients; the attack needs none
        return m

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The model's input for pixels x: (x - mean) / std when mean / std were given, else x."""
        if self.normalizer is None:
            return x
        if self.normalizer.mean.device != x.device:
            self.normalizer.to(x.device)
        return self.normalizer(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's logits for pixels x (normalized), with gradients."""
        return self.net(self.normalize(x))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The model's logits for pixels x (normalized as the attack does), in the current model mode."""
        return self.engine.logits(x)

    def model_state(self):
        """Model in eval (or train, with train_mode) mode and its parameters not requiring gradients;
        both restored afterwards."""
        return frozen(self.net, self.train_mode)

    # ------------------------------------------------------------------------ the objective
    # The engine's y is the pair (labels, targets); targets is None for untargeted attacks.

    def objective(self, logits, y):
        """Per-sample objective to maximize, [B] (a scalar for a callable returning one)."""
        labels, targets = y
        if self.loss == "ce":
            return ce_score(logits, y)
        if self.loss == "dlr":
            return dlr_loss(logits, labels, targets)
        out = self.loss(logits, labels if targets is None else targets)
        if not isinstance(out, torch.Tensor) or out.dim() > 1 or (out.dim() == 1 and out.shape[0] != logits.shape[0]):
            raise ValueError(f"a custom loss must return a scalar or per-sample losses [B], got "
                             f"{list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
        out = out.float()
        return out if targets is None else -out

    @staticmethod
    def success(logits, y):
        """The model is fooled: it predicts another class than the label (the target when targeted).
        Logits with a NaN predict nothing (engine.predictions): no success to claim."""
        labels, targets = y
        pred = predictions(logits)
        return ((pred != labels) & (pred >= 0)) if targets is None else (pred == targets)

    # ------------------------------------------------------------------------------- checks

    def check_images(self, images) -> torch.Tensor:
        """images detached, after checking they are a float batch [B, ...] in clip."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor [B, ...], got {type(images).__name__}")
        if images.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"images must be float32, float16 or bfloat16 pixels in clip={self.clip}, "
                            f"got {images.dtype}"
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

    def resolve_targets(self, x: torch.Tensor, y: torch.Tensor, targets) -> Optional[torch.Tensor]:
        """The run's targets [B] on x's device (given, else target_fn(x, y)); None when untargeted,
        which refuses given targets."""
        if not self.targeted:
            if targets is not None:
                raise ValueError("targets were given to an untargeted attack; build it with targeted=True")
            return None
        if targets is None and self.target_fn is not None:
            targets = self.target_fn(x, y)
        if targets is None:
            raise ValueError("a targeted attack needs targets: call atk(images, labels, targets) with a "
                             "Tensor[B] of target classes, or give target_fn")
        return _checks.check_labels(targets, x.shape[0], x.device, "targets")

    # --------------------------------------------------------------------------------- call

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor] = None,
                 **kwargs) -> torch.Tensor:
        """Adversarial examples for (images, labels): a tensor like images."""
        return self.perturb(images, labels, targets, evaluate=False, **kwargs).x_adv

    def perturb(self, images: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor] = None, *,
                offset: Optional[int] = None, skip: Optional[torch.Tensor] = None, evaluate: bool = True,
                **params) -> AttackResult:
        """Runs the attack on images [B, ...] in clip with labels [B] (targets [B] when targeted).

        offset: index of this batch's first sample in the random stream (default: the number of
        samples this attack has seen), so that every batch draws different random numbers,
        reproducibly from ``seed``. skip: BoolTensor[B] of samples counted as already fooled.
        evaluate: also compute success / loss / prediction at x_adv. params: the attack's per-call
        parameters (:meth:`prepare`)."""
        x = self.check_images(images)
        y = _checks.check_labels(labels, x.shape[0], x.device, "labels")
        t = self.resolve_targets(x, y, targets)
        params = self.prepare(x, **params)
        skip, offset = self._start_run(x, skip, offset)
        if x.shape[0] == 0:
            return self.empty_result(x, **params)
        seed = _rng.resolve_seed(self.seed)
        with self.model_state():
            return self.attack(x, y, t, seed=seed, offset=offset, skip=skip, evaluate=evaluate, **params)

    def prepare(self, x: torch.Tensor, **params) -> dict:
        """The per-call parameters checked (and made per-sample on x's device): a hook, called
        before the run is counted. Default: none are accepted."""
        if params:
            raise TypeError(f"{type(self).__name__}.perturb got unexpected arguments {sorted(params)}")
        return params

    def empty_result(self, x: torch.Tensor, **params) -> AttackResult:
        """The result for an empty batch (B = 0): x and empty columns."""
        none = torch.zeros(0, dtype=torch.int64, device=x.device)
        return AttackResult(x.clone(), none.bool(), none, none, torch.zeros(0, device=x.device), none)

    def attack(self, x: torch.Tensor, y: torch.Tensor, targets: Optional[torch.Tensor], *, seed: int, offset: int,
               skip: Optional[torch.Tensor], evaluate: bool, **params) -> AttackResult:
        """The attack proper on checked inputs (B >= 1), in the model's attack state: x [B, ...] in
        clip (detached), y [B] int64 labels and targets [B] (None when untargeted) on x's device; seed
        and offset key the run's random stream; skip: None or a BoolTensor[B] on x's device; params
        as :meth:`prepare` returned them. Subclasses implement it."""
        raise NotImplementedError(f"{type(self).__name__} must implement attack()")

    def pending(self, success: torch.Tensor, skip: Optional[torch.Tensor]) -> torch.Tensor:
        """Indices of the samples a further run (restart, target) attacks: those no earlier run fooled,
        less those in skip when the attack exits early (``early_stop``)."""
        todo = ~success
        if skip is not None and getattr(self, "early_stop", False):
            todo &= ~skip
        return todo.nonzero().squeeze(1)

    def _start_run(self, x: torch.Tensor, skip, offset):
        """(skip on x's device, the run's random-stream offset): the bookkeeping every perturb starts
        with. offset None continues after the samples this attack has seen."""
        B = x.shape[0]
        if skip is not None:
            if not isinstance(skip, torch.Tensor) or skip.dtype != torch.bool or skip.shape != (B,):
                raise ValueError(f"skip must be a BoolTensor[B] with B = {B}, got "
                                 f"{list(skip.shape) if isinstance(skip, torch.Tensor) else type(skip).__name__}")
            skip = skip.to(x.device)
        if offset is None:
            offset = self._samples_seen
        self._samples_seen = offset + B
        return skip, offset
