"""The noise family: Gaussian, shot (Poisson), impulse (salt and pepper) and speckle noise, with
CIFAR-10-C's per-severity constants (Hendrycks & Dietterich 2019, make_cifar_c.py)."""
from __future__ import annotations

import torch

from .base import SampleRNG, register

__all__ = ["GAUSSIAN_NOISE", "gaussian_noise"]

#: std of the additive noise per severity (CIFAR-10-C; ImageNet-C uses .08, .12, .18, .26, .38)
GAUSSIAN_NOISE = (0.04, 0.06, 0.08, 0.09, 0.10)


@register("gaussian_noise")
def gaussian_noise(x: torch.Tensor, severity: int, rng: SampleRNG) -> torch.Tensor:
    """clip(x + N(0, c^2), 0, 1), c = GAUSSIAN_NOISE[severity - 1], i.i.d. per pixel and channel."""
    c = GAUSSIAN_NOISE[severity - 1]
    return (x + rng.normal(*x.shape[1:], std=c)).clamp_(0.0, 1.0)
