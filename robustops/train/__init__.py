"""Adversarial training: ``fit(model, train_loader, method, ...)`` trains a model in place and
returns a :class:`FitResult`.

Methods come from a registry (``robustops.train.registry``), one file each under
``robustops/train/methods/``: natural, pgd (Madry et al. 2018), free (Shafahi et al. 2019), fgsm
(Wong et al. 2020), trades (Zhang et al. 2019), gaussian (Cohen et al. 2019), and the certified
ones on interval bound propagation (``robustops.bounds``): ibp (Gowal et al. 2018) and acert (Nurlanov
et al. 2023, per-sample certified radii), validated and selected by IBP-certified accuracy
(``cert_acc``). ``METHODS`` lists the
registered names; :func:`describe_methods` their one-line descriptions. A method sees its run only
through a :class:`MethodContext` (its forward, seeds, autocast, the one step path ``update(closure)``,
the run's progress, per-sample loss weights); :func:`evaluate` measures a model as validation does.
Inner maximisations run on the projected-gradient engine the attacks use
(``robustops.attacks.Engine``); free-AT and FGSM with
the "previous" start update a persistent perturbation with ``recycle_step_``; noise comes from one
fused ``gaussian_noise`` call per minibatch.

Shared by every method: SGD / Adam; "cyclic" (one cycle, Wong et al.), "multistep", "cosine" and
"constant" learning-rate schedules, stepped every optimizer step; bf16 / fp16 autocast (fp16 with a
GradScaler); channels_last; validation every epoch (clean, PGD and, for methods that train for
smoothing, noisy accuracy) with selection and early stopping on the robust metric (robust
overfitting, Rice et al. 2020) that keeps the best checkpoint; a checkpoint every epoch (written
atomically) and ``resume=`` that continues exactly (model, optimizer, scheduler, GradScaler, every
RNG, the method's persistent state, the early-stopping state); a CSV log; tqdm progress.

Distributed: when ``torch.distributed`` is initialised with more than one process, ``fit`` wraps
the model in DistributedDataParallel (nccl on GPU, gloo on CPU). Give it a train loader whose
sampler is a ``DistributedSampler`` (its ``set_epoch`` is called every epoch); validation counts
are summed over the processes. ``robustops train`` run under ``torchrun`` sets all of this up.
"""
from . import methods as _methods  # noqa: F401  (registers the built-in methods)
from . import registry
from .config import AMP_MODES, METRICS, NORMS, OPTIMIZERS, SCHEDULES, FitConfig
from .context import MethodContext
from .discrimination import robust_discrimination
from .evaluation import evaluate
from .fit import CHECKPOINT_FORMAT, FitResult, NonFiniteLoss, fit
from .registry import Hyper, Method, register
from .trainer import LRFactor, Trainer

__all__ = ["fit", "evaluate", "FitConfig", "FitResult", "Trainer", "MethodContext", "METHODS", "Method", "Hyper",
           "register", "registry", "NonFiniteLoss",
           "describe_methods", "methods_table", "LRFactor", "CHECKPOINT_FORMAT", "OPTIMIZERS", "SCHEDULES",
           "AMP_MODES", "NORMS", "METRICS", "robust_discrimination"]


def describe_methods():
    """{method name: one-line description} of the registered training methods."""
    return registry.describe()


def methods_table() -> str:
    """The registered methods as the Markdown table README.md shows (a test keeps the two equal)."""
    lines = ["| method | what it does | hyperparameters (default) |", "|---|---|---|"]
    for name, cls in ((n, registry.get(n)) for n in registry.names()):
        hyper = ", ".join(f"`{h.name}` ({h.default})" for h in cls.hyper) or "-"
        lines.append(f"| `{name}` | {cls.help} | {hyper} |")
    return "\n".join(lines)


def __getattr__(name):
    if name == "METHODS":  # live: includes methods registered after import
        return registry.names()
    raise AttributeError(f"module 'robustops.train' has no attribute {name!r}")
