"""robustops: fused C++/CUDA kernels for robust machine learning in PyTorch."""
import glob as _glob
import importlib.machinery as _machinery
import json as _json
import os as _os

import torch as _torch

__version__ = "0.1.0"

_HERE = _os.path.dirname(_os.path.abspath(__file__))


_REBUILD = ("Rebuild it against the torch you run:\n"
            "    pip install --no-build-isolation -e .      (or: make build)\n"
            "from the repository root.")


def _base_version(v: str) -> str:
    return v.split("+")[0]


def _load_library():
    for suffix in _machinery.EXTENSION_SUFFIXES:
        path = _os.path.join(_HERE, "_C" + suffix)
        if _os.path.exists(path):
            try:
                _torch.ops.load_library(path)
            except OSError as e:
                raise ImportError(f"robustops: cannot load the compiled library {path} ({e}). It was most likely "
                                  f"built against another torch or CUDA than the running torch "
                                  f"{_torch.__version__}. " + _REBUILD) from e
            return path
    found = _glob.glob(_os.path.join(_HERE, "_C*.so"))
    hint = (f" (found {', '.join(_os.path.basename(f) for f in found)}, built for another Python)"
            if found else "")
    raise ImportError(
        "robustops: the compiled library robustops/_C is missing" + hint + ". Build it with\n"
        "    pip install --no-build-isolation -e .      (or: make build)\n"
        "from the repository root, with torch already installed.")


_LIBRARY = _load_library()

from . import ops  # noqa: E402


def build_info() -> dict:
    """What the loaded library was compiled with: cuda (bool), cuda_archs, cuda_version,
    torch_version, compiler, openmp, plus the path of the library and the running torch."""
    info = _json.loads(ops.build_info_json())
    info["library"] = _LIBRARY
    info["runtime_torch_version"] = _torch.__version__
    return info


def _check_versions(info: dict) -> None:
    """The library must come from the running torch (its C++ ABI) and, when it has CUDA kernels,
    from the CUDA major version torch was built with."""
    built, running = _base_version(info["torch_version"]), _base_version(_torch.__version__)
    if built != running:
        raise ImportError(f"robustops: the compiled library {info['library']} was built against torch {built}, "
                          f"but torch {running} is running. " + _REBUILD)
    torch_cuda = _torch.version.cuda
    if info.get("cuda") and torch_cuda and info.get("cuda_version"):
        if info["cuda_version"].split(".")[0] != torch_cuda.split(".")[0]:
            raise ImportError(f"robustops: the CUDA kernels were compiled with CUDA {info['cuda_version']}, but "
                              f"torch was built with CUDA {torch_cuda}. " + _REBUILD)


_check_versions(build_info())

from .ops import count_votes_, gaussian_noise, pgd_step_, random_init, recycle_step_  # noqa: E402

__all__ = ["build_info", "ops", "reference", "pgd_step_", "random_init", "recycle_step_", "gaussian_noise",
           "count_votes_"]

_SUBMODULES = ("attacks", "smoothing", "train", "data", "models", "cli", "reference")


def __getattr__(name):
    # ro.attacks, ro.smoothing, ro.train, ro.reference ... load on first use, keeping `import robustops` light.
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'robustops' has no attribute {name!r}")
