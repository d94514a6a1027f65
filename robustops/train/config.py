"""FitConfig: every setting of a training run, checked once, with the defaults that depend on the
method filled in from the registry."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence

from .. import _checks
from ..attacks.base import madry_step
from ..models import channel_stats
from . import registry
from .budget import budget_label, check_budget_spelling, check_schedule

__all__ = ["FitConfig", "OPTIMIZERS", "SCHEDULES", "AMP_MODES", "NORMS", "METRICS", "CERTIFIED_METRICS", "OPTIONS", "ModelObject",
           "resolve_config"]

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cyclic", "multistep", "cosine", "constant", "onecycle")
AMP_MODES = ("none", "bf16", "fp16")
NORMS = ("linf", "l2")
METRICS = ("robust_acc", "clean_acc", "noise_acc", "cert_acc", "acr", "acceps", "set_acc", "latent_noise_acc", "last")
#: The validation metrics of the methods that train for deterministic certification: IBP-certified
#: accuracy at val_eps, the mean IBP radius capped at eps, and sqrt(clean_acc * acr / eps).
CERTIFIED_METRICS = ("cert_acc", "acr", "acceps")

#: The training options that any method may accept: {name: what it is}. A method lists those it
#: supports in its class attribute ``Method.options`` (a tuple of names); ``ema`` applies to every method.
OPTIONS = {"awp": "adversarial weight perturbation", "ema": "weight averaging decay",
           "mixup": "mixup Beta(alpha, alpha)", "cutmix": "CutMix Beta(alpha, alpha)",
           "robust_mixup": "robust mixup Beta(alpha, alpha)"}


def method_options(cls) -> tuple:
    """The training options a registered method class accepts."""
    return ("ema",) + tuple(o for o in cls.options if o != "ema")


def options_label(cfg) -> str:
    """The options of a config for a run's label: " + AWP (gamma=0.005) + EMA (0.999) + mixup (alpha=1)"."""
    parts = []
    if cfg.awp is not None:
        parts.append(f"AWP (gamma={cfg.awp:g})")
    if cfg.mixup is not None:
        parts.append(("IAT" if cfg.method_class.adversarial else "mixup") + f" (alpha={cfg.mixup:g})")
    if getattr(cfg, "cutmix", None) is not None:
        parts.append(f"CutMix (alpha={cfg.cutmix:g})")
    if getattr(cfg, "robust_mixup", None) is not None:
        parts.append(f"robust mixup (alpha={cfg.robust_mixup:g})")
    if cfg.ema is not None:
        parts.append(f"EMA ({cfg.ema:g})")
    if getattr(cfg, "coreset", None) is not None:
        name = {"craig": "CRAIG", "gradmatch": "GradMatch"}.get(cfg.coreset, cfg.coreset)
        parts.append(f"{name} coreset ({cfg.coreset_frac:g})")
    if getattr(cfg, "ood_ratio", 0):
        parts.append(f"OOD (ratio={cfg.ood_ratio:g}, lambda={cfg.ood_weight:g})")
    return "".join(" + " + p for p in parts)


class ModelObject(str):
    """A model given to a config as an object (``perturbation_model=module``): it reads as a short
    description (a str, "<CVAE object>") and copies / pickles as that plain str, so configs stored in
    checkpoints stay plain data that loads with ``weights_only=True``; ``.module`` is the object. A run
    resumed from Python gets the object again from its caller (give a checkpoint path instead to make
    the run resumable from the command line)."""

    module: Any

    def __new__(cls, module):
        if isinstance(module, ModelObject):
            return module
        out = super().__new__(cls, f"<{type(module).__name__} object>")
        out.module = module
        return out

    def __deepcopy__(self, memo):
        return str(self)

    def __reduce__(self):
        return (str, (str(self),))


@dataclass
class FitConfig:
    """Every setting of a training run (saved in its checkpoints).

    The threat model (eps, alpha, steps, norm, random_start) serves the adversarial methods and the
    validation attack; the method's own hyperparameters (free's m, TRADES's beta, Gaussian's sigma,
    ...) live in ``params`` and read as attributes (``cfg.beta``). Build one with
    :meth:`FitConfig.make` (``fit`` and ``Trainer`` do) and call :meth:`resolved` for the checked copy.
    """
    method: str = "natural"
    epochs: int = 10
    # threat model / attack used in training
    eps: float = 8 / 255
    alpha: Optional[float] = None          # default: the method's (pgd/trades 2.5*eps/steps, fgsm 1.25*eps, free eps)
    steps: int = 7
    norm: str = "linf"
    random_start: bool = True
    lo: float = 0.0
    hi: float = 1.0
    mean: Optional[Sequence[float]] = None  # optional input normalisation (models.Normalize) inside the forward
    std: Optional[Sequence[float]] = None
    # optimisation
    optimizer: str = "sgd"
    lr: Optional[float] = None             # sgd: 0.1, adam: 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "cyclic"             # onecycle: torch OneCycleLR (peak lr, per optimizer step)
    milestones: Optional[Sequence[float]] = None  # multistep, in epochs of `epochs`; default 50% and 75%
    gamma: float = 0.1
    # max gradient L2 norm (over all parameters) before each optimizer step; None: no clipping
    grad_clip: Optional[float] = None
    amp: Optional[str] = None              # None/"none", "bf16", "fp16"
    channels_last: bool = False
    seed: Optional[int] = None
    # validation / early stopping
    val_eps: Optional[float] = None        # default eps; 0 disables the PGD evaluation
    val_alpha: Optional[float] = None      # default 2.5*val_eps/val_steps
    val_steps: int = 10
    val_norm: Optional[str] = None         # default norm
    val_every: int = 1
    select: Optional[str] = None           # default: the method's (robust_acc, clean_acc, noise_acc, cert_acc)
    patience: Optional[int] = None         # stop after this many validations without improvement
    restore_best: bool = True
    keep_all: bool = False                 # also keep epoch_<k>.pt
    # learned perturbation sets (methods learned, learned_aug): a perturbation model (nn.Module with the
    # protocol of robustops.perturbation) or the path of its checkpoint; see ModelObject
    perturbation_model: Any = None
    # training options (None: off; see OPTIONS): adversarial weight perturbation of relative size gamma
    # (pgd, trades), an exponential moving average of the weights with this decay (every method),
    # mixup / interpolated adversarial training with lam ~ Beta(alpha, alpha) (natural, pgd)
    awp: Optional[float] = None
    ema: Optional[float] = None
    mixup: Optional[float] = None
    # CutMix with lam ~ Beta(alpha, alpha) (robustops.train.cutmix: the adversarial methods that train on a
    # mixed target, and natural); not with mixup
    cutmix: Optional[float] = None
    # robust mixup with lam ~ Beta(alpha, alpha) (robustops.train.robust_mixup: per sample the more adverse
    # interpolation with a partner; natural, pgd, trades, ijsat); not with mixup or cutmix
    robust_mixup: Optional[float] = None
    # attack-budget schedule of the adversarial methods (robustops.train.budget; None: the default):
    # constant | linear | curriculum | adaptive, the first budget as a fraction of eps, the fraction of the
    # run over which it rises, curriculum's levels (None: epochs), adaptive's grid size, epochs between its
    # estimates and whether each batch or each sample draws its budget
    budget_schedule: Optional[str] = None
    budget_start: Optional[float] = None
    budget_warmup: Optional[float] = None
    budget_stages: Optional[int] = None
    budget_grid: Optional[int] = None
    budget_every: Optional[int] = None
    budget_adapt: Optional[str] = None
    # adversarial coreset selection (robustops.train.coreset; None: off): the rule ("craig", "gradmatch",
    # "random"), the fraction of each class kept, coreset epochs between selections, the warm start kappa
    coreset: Optional[str] = None
    coreset_frac: float = 0.5
    coreset_every: int = 5
    coreset_warmup: float = 0.6
    # out-of-distribution data (robustops.train.ood, Lee et al. 2021): the fraction of OOD rows per batch
    # (0: off) and lambda, the weight of their uniform-label loss; the images are fit's ood_data
    ood_ratio: float = 0.0
    ood_weight: float = 1.0
    # the method's own hyperparameters
    params: Dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str):
        # Only called when normal lookup fails: the method's hyperparameters read as attributes.
        if name != "params" and not name.startswith("__"):
            params = self.__dict__.get("params")
            if params is not None and name in params:
                return params[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @classmethod
    def make(cls, method: str = "natural", **hparams) -> "FitConfig":
        """A config from keyword arguments: FitConfig fields, and hyperparameters of any registered
        method (those of other methods than ``method`` are ignored, so one set of keyword arguments
        can drive several methods). An unknown name is an error that lists the known ones."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"params"}
        known = registry.hyperparameters()
        unknown = sorted(k for k in hparams if k not in fields and k not in known)
        if unknown:
            raise ValueError(f"unknown training argument(s) {', '.join(unknown)}; settings are "
                             f"{', '.join(sorted(fields))} and the methods' hyperparameters "
                             f"{', '.join(sorted(known))}")
        own = {h.name for h in registry.get(method).hyper} if method in registry.names() else set()
        check_budget_spelling(method, hparams)
        params = dict(hparams.pop("params", None) or {})
        params.update({k: v for k, v in hparams.items() if k in own})
        return cls(method=method, params=params, **{k: v for k, v in hparams.items() if k in fields})

    @property
    def method_class(self):
        return registry.get(self.method)

    def resolved(self) -> "FitConfig":
        """A copy with every value checked and the defaults that depend on other fields filled in."""
        c = dataclasses.replace(self, params=dict(self.params))
        _validate(c)
        m = c.method_class
        c.params = {h.name: h.check(c.params.get(h.name, h.default)) for h in m.hyper}
        if isinstance(c.perturbation_model, os.PathLike):
            c.perturbation_model = os.fspath(c.perturbation_model)
        elif c.perturbation_model is not None and not isinstance(c.perturbation_model, str):
            c.perturbation_model = ModelObject(c.perturbation_model)  # checkpoints record a description
        m.check_config(c)
        for opt in OPTIONS:
            if getattr(c, opt) is not None:
                setattr(c, opt, float(getattr(c, opt)))
        if c.amp == "none":
            c.amp = None
        if c.alpha is None:
            c.alpha = m.default_alpha(c)
        check_schedule(c)
        if c.lr is None:
            c.lr = 0.1 if c.optimizer == "sgd" else 1e-3
        if c.val_eps is None:
            c.val_eps = c.eps
        if c.val_norm is None:
            c.val_norm = c.norm
        if c.val_alpha is None:
            c.val_alpha = madry_step(c.val_eps, c.val_steps)
        if c.milestones is None:
            c.milestones = (0.5 * c.epochs, 0.75 * c.epochs)
        c.milestones = tuple(float(v) for v in c.milestones)
        if c.select is None:
            c.select = m.select
        if c.select == "robust_acc" and c.val_eps == 0:
            c.select = "clean_acc"
        if c.mean is not None or c.std is not None:
            mean, std = channel_stats(c.mean, c.std)
            c.mean, c.std = tuple(mean.tolist()), tuple(std.tolist())
        return c

    @property
    def label(self) -> str:
        """The run's short name for tables: the method's label, its options and its budget schedule
        ("PGD-7 AT + AWP (gamma=0.005)", "PGD-7 AT + curriculum budget")."""
        return self.method_class.label(self) + options_label(self) + budget_label(self)

    @property
    def passes(self) -> int:
        """Traversals of the training data (free-AT: ceil(epochs / m))."""
        return self.method_class.passes(self)

    @property
    def updates_per_batch(self) -> int:
        return self.method_class.updates_per_batch(self)

    @property
    def noise_sigma(self) -> Optional[float]:
        return self.method_class.noise_sigma(self)


def _validate(c: FitConfig) -> None:
    def need(cond, msg):
        if not cond:
            raise ValueError(msg)

    num, intg = _checks.is_number, _checks.is_int
    registry.get(c.method)  # "method must be one of ..."
    need(intg(c.epochs) and c.epochs >= 1, f"epochs must be an int >= 1, got {c.epochs!r}")
    fin = _checks.is_finite_number
    need(fin(c.eps) and c.eps >= 0, f"eps must be a finite number >= 0, got {c.eps!r}")
    need(c.alpha is None or (fin(c.alpha) and c.alpha >= 0), f"alpha must be a finite number >= 0, got {c.alpha!r}")
    need(intg(c.steps) and c.steps >= 1, f"steps must be an int >= 1, got {c.steps!r}")
    need(c.norm in NORMS, f'norm must be "linf" or "l2", got {c.norm!r}')
    need(num(c.lo) and num(c.hi) and c.lo <= c.hi, f"lo must be <= hi, got lo={c.lo!r}, hi={c.hi!r}")
    need(c.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {c.optimizer!r}")
    need(c.lr is None or (num(c.lr) and c.lr > 0), f"lr must be a number > 0, got {c.lr!r}")
    need(num(c.momentum) and c.momentum >= 0, f"momentum must be >= 0, got {c.momentum!r}")
    need(num(c.weight_decay) and c.weight_decay >= 0, f"weight_decay must be >= 0, got {c.weight_decay!r}")
    need(c.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}; got {c.schedule!r}")
    if c.milestones is not None:
        need(all(num(v) and v > 0 for v in c.milestones),
             f"milestones must be positive epoch numbers, got {list(c.milestones)!r}")
    need(num(c.gamma) and c.gamma > 0, f"gamma must be > 0, got {c.gamma!r}")
    need(c.grad_clip is None or (fin(c.grad_clip) and c.grad_clip > 0),
         f"grad_clip (max gradient norm) must be None or a finite number > 0, got {c.grad_clip!r}")
    need(c.amp in (None,) + AMP_MODES, f"amp must be None, 'none', 'bf16' or 'fp16'; got {c.amp!r}")
    need(c.val_eps is None or (fin(c.val_eps) and c.val_eps >= 0),
         f"val_eps must be a finite number >= 0, got {c.val_eps!r}")
    need(c.val_alpha is None or (fin(c.val_alpha) and c.val_alpha >= 0),
         f"val_alpha must be a finite number >= 0, got {c.val_alpha!r}")
    need(intg(c.val_steps) and c.val_steps >= 1, f"val_steps must be an int >= 1, got {c.val_steps!r}")
    need(c.val_norm is None or c.val_norm in NORMS, f'val_norm must be "linf" or "l2", got {c.val_norm!r}')
    need(intg(c.val_every) and c.val_every >= 1, f"val_every must be an int >= 1, got {c.val_every!r}")
    need(c.select is None or c.select in METRICS, f"select must be one of {', '.join(METRICS)}; got {c.select!r}")
    need(c.patience is None or (intg(c.patience) and c.patience >= 1),
         f"patience must be None or an int >= 1, got {c.patience!r}")
    need(c.seed is None or intg(c.seed), f"seed must be an int or None, got {c.seed!r}")
    need(c.awp is None or (num(c.awp) and 0 <= c.awp < float("inf")),
         f"awp (adversarial weight perturbation, gamma) must be None or a finite number >= 0, got {c.awp!r}")
    need(c.ema is None or (num(c.ema) and 0 <= c.ema < 1),
         f"ema (weight averaging decay) must be None or a number in [0, 1), got {c.ema!r}")
    need(c.mixup is None or (num(c.mixup) and 0 < c.mixup < float("inf")),
         f"mixup (Beta(alpha, alpha) of mixup) must be None or a finite number > 0, got {c.mixup!r}")
    need(c.cutmix is None or (num(c.cutmix) and 0 < c.cutmix < float("inf")),
         f"cutmix (Beta(alpha, alpha) of CutMix) must be None or a finite number > 0, got {c.cutmix!r}")
    need(c.cutmix is None or c.mixup is None,
         "cutmix and mixup cannot be combined (each batch is mixed one way): give one of them")
    need(c.robust_mixup is None or (num(c.robust_mixup) and 0 < c.robust_mixup < float("inf")),
         f"robust_mixup (Beta(alpha, alpha) of robust mixup) must be None or a finite number > 0, got {c.robust_mixup!r}")
    need(c.robust_mixup is None or (c.mixup is None and c.cutmix is None),
         "robust_mixup cannot be combined with mixup or cutmix (each batch is mixed one way): give one of them")
    _validate_coreset(c)
    _validate_ood(c)
    cls = registry.get(c.method)
    for opt, what in OPTIONS.items():
        if getattr(c, opt) is not None and opt not in method_options(cls):
            having = [n for n in registry.names() if opt in method_options(registry.get(n))]
            raise ValueError(f"{opt} ({what}) is an option of the methods {', '.join(having) or '(none)'}, "
                             f"not of {c.method!r}")


def _validate_coreset(c: FitConfig) -> None:
    """The coreset settings (robustops.train.coreset), and that the method can train on coresets."""
    if c.coreset is None:
        return
    rules = ("craig", "gradmatch", "random")
    if c.coreset not in rules:
        raise ValueError(f"coreset must be None or one of {', '.join(rules)}; got {c.coreset!r}")
    if not (_checks.is_finite_number(c.coreset_frac) and 0 < c.coreset_frac <= 1):
        raise ValueError(f"coreset_frac (the fraction of each class in the coreset) must be in (0, 1], "
                         f"got {c.coreset_frac!r}")
    if not (_checks.is_int(c.coreset_every) and c.coreset_every >= 1):
        raise ValueError(f"coreset_every (coreset epochs between selections) must be an int >= 1, "
                         f"got {c.coreset_every!r}")
    if not (_checks.is_finite_number(c.coreset_warmup) and 0 <= c.coreset_warmup < 1):
        raise ValueError(f"coreset_warmup (the warm start's kappa: full-data epochs round(floor(kappa * epochs) * "
                         f"coreset_frac)) must be in [0, 1), got {c.coreset_warmup!r}")
    cls = registry.get(c.method)
    if not (cls.adversarial and cls.supports_coreset()):
        having = [n for n in registry.names() if registry.get(n).adversarial and registry.get(n).supports_coreset()]
        raise ValueError(f"coreset (adversarial coreset selection) needs an adversarial method with per-sample "
                         f"weights and a coreset proxy ({', '.join(having)}); got {c.method!r}")


def _validate_ood(c: FitConfig) -> None:
    """The OOD-data settings (robustops.train.ood), and that the method and the options can take OOD rows."""
    if not (_checks.is_finite_number(c.ood_ratio) and 0 <= c.ood_ratio < 1):
        raise ValueError(f"ood_ratio (the fraction of OOD images per batch) must be in [0, 1), got {c.ood_ratio!r}")
    if not (_checks.is_finite_number(c.ood_weight) and c.ood_weight >= 0):
        raise ValueError(f"ood_weight (lambda, the weight of the OOD rows' uniform-label loss) must be a finite "
                         f"number >= 0, got {c.ood_weight!r}")
    if c.ood_ratio == 0:
        return
    if not registry.get(c.method).ood_data:
        having = [n for n in registry.names() if registry.get(n).ood_data]
        raise ValueError(f"ood_data (OOD images toward the uniform label) is taken by the methods {', '.join(having)}, "
                         f"not by {c.method!r}")
    for opt in ("mixup", "cutmix", "robust_mixup", "coreset"):
        if getattr(c, opt) is not None:
            raise ValueError(f"ood_data cannot be combined with {opt} (their batches are built differently)")
    if c.budget_schedule == "adaptive":
        raise ValueError("ood_data cannot be combined with budget_schedule='adaptive' (its loss estimate needs a "
                         "label for every row)")


def resolve_config(cfg: Optional[FitConfig] = None, settings: Optional[Dict[str, Any]] = None) -> FitConfig:
    """The resolved config of a FitConfig and / or keyword settings (its fields and the methods'
    hyperparameters; settings override cfg's values), as ``Trainer`` and ``evaluate`` take them."""
    settings = dict(settings or {})
    if cfg is None:
        cfg = FitConfig.make(**settings)
    elif settings:
        cfg = FitConfig.make(**{**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "params"},
                                **cfg.params, **settings})
    return cfg.resolved()
