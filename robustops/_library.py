"""Loading the compiled library (robustops/_C) into torch, once, with the checks that its torch and
CUDA versions are the running torch's. robustops.ops calls :func:`load` at import."""
from __future__ import annotations

import glob
import importlib.machinery
import json
import os
from typing import Optional

import torch

__all__ = ["load", "build_info", "check_versions"]

_HERE = os.path.dirname(os.path.abspath(__file__))
_PATH: Optional[str] = None

_REBUILD = ("Rebuild it against the torch you run:\n"
            "    pip install --no-build-isolation -e .      (or: make build)\n"
            "from the repository root.")


def _base_version(v: str) -> str:
    return v.split("+")[0]


def _find() -> str:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(_HERE, "_C" + suffix)
        if os.path.exists(path):
            return path
    found = glob.glob(os.path.join(_HERE, "_C*.so"))
    hint = (f" (found {', '.join(os.path.basename(f) for f in found)}, built for another Python)" if found else "")
    raise ImportError(
        "robustops: the compiled library robustops/_C is missing" + hint + ". Build it with\n"
        "    pip install --no-build-isolation -e .      (or: make build)\n"
        "from the repository root, with torch already installed.")


def load() -> str:
    """Loads the library into torch.ops.robustops (once) and checks its versions; returns its path."""
    global _PATH
    if _PATH is not None:
        return _PATH
    path = _find()
    try:
        torch.ops.load_library(path)
    except OSError as e:
        raise ImportError(f"robustops: cannot load the compiled library {path} ({e}). It was most likely built "
                          f"against another torch or CUDA than the running torch {torch.__version__}. "
                          + _REBUILD) from e
    _PATH = path
    check_versions(build_info())
    return path


def build_info() -> dict:
    """What the loaded library was compiled with: cuda (bool), cuda_archs, cuda_version,
    torch_version, compiler, cpu_capability, openmp, plus the path of the library and the running torch."""
    load()
    info = json.loads(torch.ops.robustops.build_info())
    info["library"] = _PATH
    info["runtime_torch_version"] = torch.__version__
    return info


def check_versions(info: dict) -> None:
    """The library must come from the running torch (its C++ ABI) and, when it has CUDA kernels,
    from the CUDA major version torch was built with."""
    built, running = _base_version(info["torch_version"]), _base_version(torch.__version__)
    if built != running:
        raise ImportError(f"robustops: the compiled library {info['library']} was built against torch {built}, "
                          f"but torch {running} is running. " + _REBUILD)
    torch_cuda = torch.version.cuda
    if info.get("cuda") and torch_cuda and info.get("cuda_version"):
        if info["cuda_version"].split(".")[0] != torch_cuda.split(".")[0]:
            raise ImportError(f"robustops: the CUDA kernels were compiled with CUDA {info['cuda_version']}, but "
                              f"torch was built with CUDA {torch_cuda}. " + _REBUILD)
