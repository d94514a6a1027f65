"""The contract every corruption follows: the registry, the per-sample random streams, the size rule.

A corruption is a function ``fn(x, severity, rng) -> Tensor`` registered under its CIFAR-10-C file
name with :func:`register`:

- ``x``: float32 Tensor[B, C, H, W] in [0, 1] (C = 1 or 3; any H, W; any device), never modified;
- ``severity``: int in 1..5;
- ``rng``: a :class:`SampleRNG`, the corruption's only source of randomness: one CPU generator per
  sample, keyed by (seed, corruption, severity, the sample's dataset index), so a sample's corrupted
  image does not depend on the batch it is in, the batch size, the device or the other samples;
- returns float32 Tensor[B, C, H, W] in [0, 1] on x's device.

Parameters: each corruption keeps CIFAR-10-C's per-severity constants (Hendrycks & Dietterich 2019,
``make_cifar_c.py``, 32 x 32 images). The one size rule: every width in pixels (a blur radius or sigma,
a displacement, a needle's length) goes through :func:`pixel_width`: c * s with s = :func:`size_scale`
= min(H, W) / 32 on images of 32 pixels and more; on smaller ones a width of at most ``PIXEL`` = 1.5
pixels (the 3 x 3 neighbourhood: the finest blur a pixel grid shows) is kept in pixels and a wider one
shrinks toward 1.5 (1.5 + (c - 1.5) s), never below: scaling CIFAR's sub-pixel sigmas by 1/4 on the
8 x 8 digits would make them smooth nothing. Constants given as fractions of the image side
(elastic_transform's) are multiplied by min(H, W); ratios (zoom factors, pixelate's side ratio) are
not scaled.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple, Union

import torch

from .. import _checks
from .._rng import derive_seed, resolve_seed

__all__ = ["BENCHMARK", "EXTRA", "ALL", "FAMILIES", "SEVERITIES", "register", "registered", "family_of",
           "SampleRNG", "size_scale", "PIXEL", "pixel_width", "check_severity", "check_names", "corruption_key"]

#: the 15 benchmark corruptions of CIFAR-10-C / ImageNet-C, in the papers' order
BENCHMARK = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
             "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
             "jpeg_compression")
#: the 4 extra (validation) corruptions of the release
EXTRA = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
ALL = BENCHMARK + EXTRA
#: the families the papers average over (the extra ones join the family they resemble)
FAMILIES = {"noise": ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"),
            "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur", "gaussian_blur"),
            "weather": ("snow", "frost", "fog", "spatter"),
            "digital": ("brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression", "saturate")}
SEVERITIES = (1, 2, 3, 4, 5)

Corruption = Callable[[torch.Tensor, int, "SampleRNG"], torch.Tensor]
_REGISTRY: Dict[str, Corruption] = {}


def register(name: str) -> Callable[[Corruption], Corruption]:
    """Decorator: register ``fn`` as the corruption ``name`` (one of ALL)."""
    if name not in ALL:
        raise ValueError(f"name must be one of the CIFAR-10-C corruptions {ALL}, got {name!r}")

    def deco(fn: Corruption) -> Corruption:
        _REGISTRY[name] = fn
        return fn

    return deco


def registered() -> Dict[str, Corruption]:
    """The registered corruptions, name -> function (importing robustops.corruptions registers all)."""
    return dict(_REGISTRY)


def family_of(name: str) -> str:
    """The family (noise, blur, weather, digital) of a corruption."""
    for fam, names in FAMILIES.items():
        if name in names:
            return fam
    raise ValueError(f"corruption must be one of {ALL}, got {name!r}")


def check_severity(severity) -> int:
    """severity as an int in 1..5, else a ValueError naming it."""
    s = _checks.check_int(severity, "severity", 1)
    if s not in SEVERITIES:
        raise ValueError(f"severity must be an int in 1..5, got {severity!r}")
    return s


def check_names(names: Union[str, Sequence[str], None]) -> Tuple[str, ...]:
    """Corruption names from a name, a family name, "benchmark", "extra", "all", or a sequence of
    those (None: the 15 benchmark corruptions); a ValueError naming the unknown one."""
    if names is None:
        return BENCHMARK
    items = [names] if isinstance(names, str) else list(names)
    out: List[str] = []
    for item in items:
        key = str(item).strip().lower()
        group = {"benchmark": BENCHMARK, "extra": EXTRA, "all": ALL}.get(key) or FAMILIES.get(key) or \
            ((key,) if key in ALL else None)
        if group is None:
            raise ValueError(f"corruptions: unknown name {item!r}; expected one of {ALL}, a family "
                             f"{tuple(FAMILIES)}, 'benchmark', 'extra' or 'all'")
        out += [g for g in group if g not in out]
    if not out:
        raise ValueError("corruptions: expected at least one name")
    return tuple(out)


def corruption_key(seed: int, name: str, severity: int) -> int:
    """The 63-bit key of (seed, corruption, severity): sample n's generator is seeded with
    derive_seed(key, n + 1)."""
    return derive_seed(derive_seed(seed, 1 + ALL.index(name)), severity)


def size_scale(x) -> float:
    """min(H, W) / 32 of x (a Tensor[..., H, W] or an (H, W) size): the factor by which the spatial
    constants of CIFAR-10-C (32 x 32) are scaled."""
    shape = tuple(x.shape) if isinstance(x, torch.Tensor) else tuple(x)
    return min(int(shape[-2]), int(shape[-1])) / 32.0


#: widths up to this many pixels are not shrunk on images under 32 pixels (see pixel_width)
PIXEL = 1.5


def pixel_width(c: float, x) -> float:
    """A CIFAR-10-C width c (pixels of a 32 x 32 image) for x's size (x: a Tensor or (H, W), as for
    size_scale), the size rule: c * s when s = size_scale(x) >= 1; below, min(c, PIXEL + (c - PIXEL) s):
    widths up to PIXEL stay, wider ones shrink toward PIXEL. Increasing in c, continuous in s, and c
    itself at 32 pixels."""
    s = size_scale(x)
    return c * s if s >= 1.0 else min(c, PIXEL + (c - PIXEL) * s)


class SampleRNG:
    """One CPU ``torch.Generator`` per sample of a batch, seeded from (seed, corruption, severity,
    dataset index): draws are made on the CPU sample by sample (so CPU and CUDA runs see the same
    numbers) and moved to ``device``.

    seed: the run's seed; name, severity: the corruption; indices: the samples' dataset indices
    (Sequence[int] or a 1-D int Tensor); device: where draws are returned."""

    def __init__(self, seed: int, name: str, severity: int, indices, device):
        key = corruption_key(resolve_seed(seed), name, severity)
        idx = indices.tolist() if isinstance(indices, torch.Tensor) else [int(i) for i in indices]
        if any(i < 0 for i in idx):
            raise ValueError(f"indices must be >= 0, got {min(idx)}")
        self.indices = idx
        self.device = torch.device(device)
        self.generators = [torch.Generator().manual_seed(derive_seed(key, i + 1)) for i in idx]

    def __len__(self) -> int:
        return len(self.generators)

    def _stack(self, draw) -> torch.Tensor:
        return torch.stack([draw(g) for g in self.generators]).to(self.device)

    def uniform(self, *shape: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        """Tensor[B, *shape] of U(low, high), float32, on the device."""
        return self._stack(lambda g: torch.rand(shape, generator=g) * (high - low) + low)

    def normal(self, *shape: int, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
        """Tensor[B, *shape] of N(mean, std^2), float32, on the device."""
        return self._stack(lambda g: torch.randn(shape, generator=g) * std + mean)

    def poisson(self, rates: torch.Tensor) -> torch.Tensor:
        """Tensor like rates (Tensor[B, ...], any device) of Poisson(rates) draws, sample b from its
        own generator (drawn on the CPU)."""
        r = rates.detach().float().cpu()
        return torch.stack([torch.poisson(r[b], generator=g) for b, g in enumerate(self.generators)]) \
            .to(rates.device)

    def integers(self, low: int, high: int, *shape: int) -> torch.Tensor:
        """Tensor[B, *shape] of ints uniform in [low, high), int64, on the device."""
        return self._stack(lambda g: torch.randint(low, high, shape, generator=g))

    def generator(self, b: int) -> torch.Generator:
        """Sample b's own CPU generator (for draws the helpers above do not cover)."""
        return self.generators[b]
