"""Common corruptions (Hendrycks & Dietterich, ICLR 2019): the 15 benchmark corruptions of CIFAR-10-C
and the 4 extra ones, at severities 1..5, batched in torch on any device, deterministic per (seed,
sample index), for any image size (spatial constants scaled by min(H, W) / 32, see ``base``).

``corrupt(x, name, severity, seed=0, indices=None)`` is the one entry point; ``base`` holds the
contract every corruption follows and the registry; the families live in ``noise``, ``blur``,
``weather`` and ``digital``.
"""
from __future__ import annotations

import torch

from . import blur, digital, noise, weather  # noqa: F401  (they register their corruptions)
from .base import ALL, BENCHMARK, EXTRA, FAMILIES, SEVERITIES, SampleRNG, check_names, check_severity, family_of, \
    registered

__all__ = ["corrupt", "ALL", "BENCHMARK", "EXTRA", "FAMILIES", "SEVERITIES", "check_names", "family_of",
           "available", "PIL_OUTPUTS"]

#: the corruptions whose make_cifar_c.py function returns a PIL image (already 8-bit, rounded by PIL):
#: corrupt(quantize=True) rounds them rather than truncating
PIL_OUTPUTS = ("pixelate", "jpeg_compression")


#: the corruptions computed with kornia (an ImportError naming it where it is not installed)
NEEDS_KORNIA = ("defocus_blur", "spatter", "jpeg_compression")


def available() -> tuple:
    """The names of the corruptions implemented, in ALL's order."""
    reg = registered()
    return tuple(n for n in ALL if n in reg)


def runnable() -> tuple:
    """available() less the corruptions whose optional package (kornia, NEEDS_KORNIA) is not installed
    here, e.g. on a machine without the registry."""
    import importlib.util

    if importlib.util.find_spec("kornia") is not None:
        return available()
    return tuple(n for n in available() if n not in NEEDS_KORNIA)


def corrupt(x: torch.Tensor, name: str, severity: int, seed: int = 0, indices=None,
            quantize: bool = False) -> torch.Tensor:
    """The corruption ``name`` at ``severity`` of a batch of images.

    x: Tensor[B, C, H, W] (C = 1 or 3) in [0, 1], float32/float16/bfloat16, any device and memory
    format; name: one of ALL; severity: 1..5; seed: the run's seed; indices: the samples' dataset
    indices (Sequence[int] or an int Tensor[B]; None: 0..B-1), which with seed fix each sample's random
    draws; quantize: to multiples of 1/255 as the released CIFAR-10-C arrays are: make_cifar_c.py stores
    np.uint8(255 * image), which truncates continuous outputs, while the corruptions in PIL_OUTPUTS
    return PIL's 8-bit image (libjpeg's decoder, PIL's resize round), so those are rounded.
    Returns a new tensor of x's shape, dtype, device and memory format."""
    fns = registered()
    if name not in fns:
        raise ValueError(f"name must be one of {available()}, got {name!r}")
    s = check_severity(severity)
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"x must be a Tensor[B, C, H, W] with C = 1 or 3, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor of pixels in [0, 1], got {x.dtype}")
    B = x.shape[0]
    idx = range(B) if indices is None else indices
    if len(idx) != B:
        raise ValueError(f"indices must have one entry per sample ({B}), got {len(idx)}")
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    out = fns[name](x.detach().float().contiguous(), s, SampleRNG(seed, name, s, idx, x.device))
    if quantize and name in PIL_OUTPUTS:
        out = torch.round(out * 255.0) / 255.0
    elif quantize:  # the release's np.uint8(...) truncates; the epsilon keeps exact multiples of 1/255 where they are
        out = torch.floor(out * 255.0 + 1e-4) / 255.0
    out = out.to(x.dtype)
    return out.contiguous(memory_format=torch.channels_last) if cl else out
