"""robustops: fused C++/CUDA kernels for robust machine learning in PyTorch."""
import glob as _glob
import importlib.machinery as _machinery
import json as _json
import os as _os

import torch as _torch

__version__ = "0.1.0"

_HERE = _os.path.dirname(_os.path.abspath(__file__))


def _load_library():
    for suffix in _machinery.EXTENSION_SUFFIXES:
        path = _os.path.join(_HERE, "_C" + suffix)
        if _os.path.exists(path):
            _torch.ops.load_library(path)
            return path
    found = _glob.glob(_os.path.join(_HERE, "_C*.so"))
    hint = (f" (found {', '.join(_os.path.basename(f) for f in found)}, built for another Python)"
            if found else "")
    raise ImportError(
        "robustops: the compiled library robustops/_C is missing" + hint + ". Build it with\n"
        "    pip install --no-build-isolation -e .      (or: make build)\n"
        "from the repository root, with torch already installed.")


_LIBRARY = _load_library()


def build_info() -> dict:
    """What the loaded library was compiled with: cuda (bool), cuda_archs, cuda_version,
    torch_version, compiler, openmp, plus the path of the library and the running torch."""
    info = _json.loads(_torch.ops.robustops.build_info())
    info["library"] = _LIBRARY
    info["runtime_torch_version"] = _torch.__version__
    return info


from . import ops, reference  # noqa: E402
from .ops import count_votes_, gaussian_noise, pgd_step_, random_init, recycle_step_  # noqa: E402

__all__ = ["build_info", "ops", "reference", "pgd_step_", "random_init", "recycle_step_", "gaussian_noise",
           "count_votes_"]

_SUBMODULES = ("attacks", "smoothing", "train", "data", "models", "cli")


def __getattr__(name):
    # ro.attacks, ro.smoothing, ro.train, ... load on first use, keeping `import robustops` light.
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'robustops' has no attribute {name!r}")
