"""robustops: fused C++/CUDA kernels for robust machine learning in PyTorch.

``import robustops`` is light: the compiled library (and torch) load when first needed: when any
of ``robustops.ops``, the op functions (``robustops.pgd_step_``, ...), ``build_info`` or a module
(``robustops.attacks``, ``.train``, ``.smoothing``, ...) is used, or right away when torch is already
imported. So ``robustops --help`` answers without importing torch.
"""
import sys as _sys

__version__ = "0.1.0"

__all__ = ["build_info", "evaluate", "robustify", "ops", "reference", "pgd_step_", "random_init", "recycle_step_", "langevin_step_",
           "gaussian_noise", "count_votes_", "gaussian_noise_rows", "count_votes_segments_"]

_OPS = ("pgd_step_", "random_init", "recycle_step_", "langevin_step_", "gaussian_noise", "count_votes_",
        "gaussian_noise_rows", "count_votes_segments_")
_SUBMODULES = ("ops", "attacks", "smoothing", "train", "data", "models", "cli", "reference", "bounds",
               "perturbation", "proxy", "preemptive")


def build_info() -> dict:
    """What the loaded library was compiled with: cuda (bool), cuda_archs, cuda_version,
    torch_version, compiler, cpu_capability, openmp, plus the path of the library and the running torch."""
    from . import _library

    return _library.build_info()


def _check_versions(info: dict) -> None:
    from . import _library

    _library.check_versions(info)


def __getattr__(name):
    # Modules and ops load on first use, keeping `import robustops` (and the CLI's --help) light.
    import importlib

    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _OPS:
        return getattr(importlib.import_module(".ops", __name__), name)
    if name == "evaluate":  # robustops.evaluate(model, data, suite="autoattack", eps=..., norm=...)
        return importlib.import_module(".attacks.suites", __name__).evaluate
    if name == "robustify":  # robustops.robustify(model, x, eps_pre, eps_adv, ...): preemptive robustification
        return importlib.import_module(".preemptive", __name__).robustify
    raise AttributeError(f"module 'robustops' has no attribute {name!r}")


if "torch" in _sys.modules:  # torch is there anyway: register the ops now, as users of torch.ops expect
    from . import ops  # noqa: E402,F401
