"""The registry of training methods: each method is one :class:`Method` subclass in its own file
under ``robustops/train/methods/``, registered by name with :func:`register`.

A method declares its own hyperparameters (:class:`Hyper`: name, default, check, help), the
defaults that depend on them (step size, validation metric, passes over the data), and its
per-batch ``step``; its persistent state (free-AT's perturbation, a dual variable, ...) goes in
``state_dict`` / ``load_state_dict`` so that a resumed run continues exactly. ``fit``, the
``FitConfig`` checks, the CLI's ``--method`` choices and flags, and the README's list all read the
registry: adding a method is a new file plus its line in ``methods/__init__.py``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, Optional, Sequence, Tuple, Type

import torch

from .. import _checks
from ..attacks.base import madry_step

__all__ = ["Hyper", "Method", "register", "require_linf", "unregister", "get", "names", "hyperparameters", "describe", "StepStats"]

#: What a method's step returns: (sum of losses, number correct, number of samples); the first two
#: are device tensors, so a step needs no host synchronization.
StepStats = Tuple[torch.Tensor, torch.Tensor, int]


@dataclass(frozen=True)
class Hyper:
    """One hyperparameter of a training method.

    kind: "int", "float", "choice", "path" (a file name, e.g. a network a method loads: a
    non-empty str; None when the default is None) or "str" (a spelling the method parses in its
    ``check_config``, e.g. gaussian's "uniform:MAX": a non-empty str); minimum: the smallest allowed
    value (strict: excluded); maximum: the largest allowed value of a "float" (included); choices: the allowed values of a
    "choice"; flags: the command-line spellings (default
    ``--<name with dashes>``); help: one line for ``--help``.
    """
    name: str
    default: Any
    help: str
    kind: str = "float"
    minimum: Optional[float] = None
    strict: bool = False
    choices: Sequence[str] = ()
    flags: Sequence[str] = ()
    maximum: Optional[float] = None

    def check(self, value):
        """value checked and converted; otherwise a ValueError that starts with the name (and says
        what it is: "m (free-AT replays per minibatch) must be an int >= 1, got 0")."""
        what = f"{self.name} ({self.help})"
        if self.kind == "int":
            return _checks.check_int(value, what, None if self.minimum is None else int(self.minimum))
        if self.kind == "str":
            if not isinstance(value, str) or not value:
                raise ValueError(f"{what} must be a non-empty str, got {value!r}")
            return value
        if self.kind == "path":
            if value is None and self.default is None:
                return None
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{what} must be a file name (a non-empty str), got {value!r}")
            return value
        if self.kind == "choice":
            if value not in self.choices:
                raise ValueError(f"{what} must be one of {', '.join(self.choices)}; got {value!r}")
            return value
        return _checks.check_number(value, what, self.minimum, strict=self.strict, maximum=self.maximum)

    @property
    def cli_flags(self) -> Sequence[str]:
        return tuple(self.flags) or ("--" + self.name.replace("_", "-"),)


class Method:
    """One training method bound to a :class:`~robustops.train.MethodContext` (``self.ctx``).

    Class attributes: ``name`` (the registry key), ``help`` (one line), ``hyper`` (its
    hyperparameters), ``select`` (the validation metric that picks the best epoch by default),
    ``adversarial`` (whether it uses the threat model eps / alpha / steps / norm), ``certified``
    (whether it trains for deterministic L-inf certification: validation then also reports
    ``cert_acc``, the fraction of samples that interval bound propagation verifies at val_eps),
    ``val_metrics`` (names of further validation accuracies the method measures itself: validation
    sums the counts :meth:`validation_counts` returns per batch and reports count / n; each may be
    selected with ``select``), ``log_metrics`` (names of the per-epoch values :meth:`log_values`
    returns, e.g. a dual variable: columns of the epoch log), ``options`` (the training options of
    ``FitConfig`` it supports: "awp", "ema", "mixup", "cutmix"; ``ema`` applies to every method),
    ``uses_perturbation_model`` (whether it trains against the learned perturbation set of
    ``cfg.perturbation_model``: the CLI's --perturbation-model) and ``sample_weights`` (whether its
    loss applies per-sample loss weights: every loss goes through the context's ``cross_entropy`` /
    ``mixed_ce`` / ``natural_step``; the trainer refuses weights for the other methods) and
    ``budget_schedules`` (whether it attacks with ``ctx.budget(x, y)``, so that ``budget_schedule`` applies)
    and ``ood_data`` (whether it trains the OOD rows of ``ctx.ood`` toward the uniform label, :mod:`.ood`).

    The context is all a method uses of its run: ``ctx.cfg`` (the resolved :class:`FitConfig`; the
    method's hyperparameters are its attributes), ``ctx.forward``, ``ctx.update(closure)`` (the one
    step path), ``ctx.seed()``, ``ctx.autocast()``, ``ctx.progress``, ... (see
    :class:`~robustops.train.MethodContext` for the whole, documented set).
    """

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    hyper: ClassVar[Tuple[Hyper, ...]] = ()
    select: ClassVar[str] = "robust_acc"
    adversarial: ClassVar[bool] = True
    certified: ClassVar[bool] = False
    val_metrics: ClassVar[Tuple[str, ...]] = ()
    log_metrics: ClassVar[Tuple[str, ...]] = ()
    options: ClassVar[Tuple[str, ...]] = ("ema",)
    uses_perturbation_model: ClassVar[bool] = False
    sample_weights: ClassVar[bool] = False
    budget_schedules: ClassVar[bool] = False
    ood_data: ClassVar[bool] = False

    def __init__(self, ctx):
        self.ctx = ctx
        self.cfg = ctx.cfg

    # ---- defaults that depend on the configuration (class methods: no context needed)

    @classmethod
    def default_alpha(cls, cfg) -> float:
        """The step size when none is given: 2.5 * eps / steps (Madry et al.'s rule)."""
        return madry_step(cfg.eps, cfg.steps)

    @classmethod
    def updates_per_batch(cls, cfg) -> int:
        """Optimizer steps per minibatch (free-AT replays each minibatch m times)."""
        return 1

    @classmethod
    def passes(cls, cfg) -> int:
        """Traversals of the training data for ``cfg.epochs`` epochs."""
        return cfg.epochs

    @classmethod
    def noise_sigma(cls, cfg) -> Optional[float]:
        """The noise level of a method that trains for randomized smoothing (validation then also
        measures accuracy under that noise, and checkpoints record it for ``certify``); else None."""
        return None

    @classmethod
    def checkpoint_entries(cls, cfg) -> Dict[str, Any]:
        """Entries the method adds to the run's checkpoints (besides eps, norm, sigma, the config): e.g. the
        latent noise level of ``learned_noise``, which ``certify --threat learned`` reads. None by default."""
        return {}

    @classmethod
    def check_config(cls, cfg) -> None:
        """Refuses (ValueError naming the setting) a configuration the method cannot train with; called
        by ``FitConfig.resolved`` once the hyperparameters are checked, before any work."""

    @classmethod
    def label(cls, cfg) -> str:
        """A short human-readable name of the configured method (tables, plots)."""
        return cls.name

    @classmethod
    def init_model(cls, model: torch.nn.Module, cfg, generator: Optional[torch.Generator]) -> None:
        """Initialises the bare model's weights in place for this method (e.g. Shi et al.'s IBP
        initialisation), or leaves them (the default). The Trainer calls it once, when it is built:
        before the optimizer and the DistributedDataParallel wrapper exist (so DDP broadcasts rank 0's
        initial weights), and before ``fit`` loads a checkpoint's weights over them on resume.
        generator: the run's initialisation stream (from cfg.seed; None without a seed: the global RNG)."""

    # ---- the work

    def validation_counts(self, x: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        """For each name of ``val_metrics``: the number of samples of a validation batch (x in the
        configured layout, model in eval mode) counted as correct under that metric, a device tensor."""
        return {}

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        """One minibatch (x on the device, float32, in the configured layout; y its labels)."""
        raise NotImplementedError

    def coreset_inputs(self, x: torch.Tensor, y: torch.Tensor) -> Dict[str, Any]:
        """What adversarial coreset selection (``FitConfig.coreset``, :mod:`.coreset`) needs to build this
        method's last-layer gradient proxies for a batch: {"adv": x_adv} for a method whose loss is the
        cross-entropy on x_adv; {"clean": x, "adv": x_adv, "beta": beta} for TRADES' loss. Called with
        the model in eval mode and gradients enabled. A method that does not override it cannot train
        on coresets (the config refuses it)."""
        raise NotImplementedError(f"method {self.name!r} has no coreset proxy")

    @classmethod
    def supports_coreset(cls) -> bool:
        """Whether the method can train on weighted coresets: it applies per-sample weights
        (``sample_weights``) and overrides :meth:`coreset_inputs`."""
        return bool(cls.sample_weights) and cls.coreset_inputs is not Method.coreset_inputs

    def log_values(self) -> Dict[str, float]:
        """At the end of each training epoch: {name: value} for each of ``log_metrics`` (plain floats),
        merged into the epoch's log row. Called once per epoch on every process (a collective is
        allowed here), so reading device values costs one sync per epoch, not per step."""
        return {}

    def state_dict(self) -> Dict[str, Any]:
        """This process's persistent state of the method (saved per rank in checkpoints)."""
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


def require_linf(cfg, method: str, why: str) -> None:
    """Refuses (ValueError naming the setting) a config whose norm is not L-inf, for a method that works
    in the L-inf ball only; why: the reason, in the message."""
    if cfg.norm != "linf":
        raise ValueError(f'norm must be "linf" for {method} ({why}), got {cfg.norm!r}')


_REGISTRY: Dict[str, Type[Method]] = {}


def register(cls: Type[Method]) -> Type[Method]:
    """Class decorator: adds a Method subclass to the registry under ``cls.name``. A hyperparameter
    name used by several methods must keep one kind and one set of command-line flags."""
    if not (isinstance(cls, type) and issubclass(cls, Method)) or not cls.name:
        raise TypeError("register() takes a Method subclass with a non-empty name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a training method named {cls.name!r} is already registered")
    known = hyperparameters()
    for h in cls.hyper:
        other = known.get(h.name)
        if other is not None and (other.kind != h.kind or tuple(other.cli_flags) != tuple(h.cli_flags)):
            raise ValueError(f"hyperparameter {h.name!r} of method {cls.name!r} clashes with another method's "
                             f"(kind / flags must agree)")
    _REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Removes a method from the registry (for methods registered by a test or a notebook)."""
    _REGISTRY.pop(name, None)


def get(name: str) -> Type[Method]:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"method must be one of {', '.join(names())}; got {name!r}") from None


def names() -> Tuple[str, ...]:
    """The registered method names, in registration order."""
    return tuple(_REGISTRY)


def hyperparameters() -> Dict[str, Hyper]:
    """Every registered method's hyperparameters by name (the first declaration of a shared name)."""
    out: Dict[str, Hyper] = {}
    for cls in _REGISTRY.values():
        for h in cls.hyper:
            out.setdefault(h.name, h)
    return out


def describe() -> Dict[str, Callable]:
    """{name: one-line help} of the registered methods (for --help and the README)."""
    return {n: c.help for n, c in _REGISTRY.items()}
