"""The noise family: Gaussian, shot (Poisson), impulse (salt and pepper) and speckle noise, with
CIFAR-10-C's per-severity constants (Hendrycks & Dietterich 2019, ``make_cifar_c.py``; the ImageNet-C
values of ``make_imagenet_c.py`` / the ``imagecorruptions`` package are quoted beside each table).

Noise has no spatial constant, so the size rule does not apply: every image size gets the same
per-pixel noise. Each pixel and channel draws independently, from the sample's own generator.
"""
from __future__ import annotations

import torch

from .base import SampleRNG, register

__all__ = ["GAUSSIAN_NOISE", "SHOT_NOISE", "IMPULSE_NOISE", "SPECKLE_NOISE", "gaussian_noise", "shot_noise",
           "impulse_noise", "speckle_noise"]

#: std of the additive noise per severity (CIFAR-10-C; ImageNet-C uses .08, .12, .18, .26, .38)
GAUSSIAN_NOISE = (0.04, 0.06, 0.08, 0.09, 0.10)
#: photon count c of a white pixel per severity (CIFAR-10-C; ImageNet-C uses 60, 25, 12, 5, 3)
SHOT_NOISE = (500, 250, 100, 75, 50)
#: fraction of values replaced by 0 or 1 per severity (CIFAR-10-C; ImageNet-C uses .03, .06, .09, .17, .27)
IMPULSE_NOISE = (0.01, 0.02, 0.03, 0.05, 0.07)
#: std of the multiplicative noise per severity (CIFAR-10-C; ImageNet-C uses .15, .2, .35, .45, .6)
SPECKLE_NOISE = (0.06, 0.10, 0.12, 0.16, 0.20)


@register("gaussian_noise")
def gaussian_noise(x: torch.Tensor, severity: int, rng: SampleRNG) -> torch.Tensor:
    """clip(x + N(0, c^2), 0, 1), c = GAUSSIAN_NOISE[severity - 1], i.i.d. per pixel and channel."""
    c = GAUSSIAN_NOISE[severity - 1]
    return (x + rng.normal(*x.shape[1:], std=c)).clamp_(0.0, 1.0)


@register("shot_noise")
def shot_noise(x: torch.Tensor, severity: int, rng: SampleRNG) -> torch.Tensor:
    """clip(Poisson(c x) / c, 0, 1), c = SHOT_NOISE[severity - 1]: photon noise, whose variance x / c
    grows with the intensity (make_cifar_c.py's shot_noise)."""
    c = float(SHOT_NOISE[severity - 1])
    return (rng.poisson(x * c) / c).clamp_(0.0, 1.0)


@register("impulse_noise")
def impulse_noise(x: torch.Tensor, severity: int, rng: SampleRNG) -> torch.Tensor:
    """Salt and pepper: each value (pixel and channel) is replaced with probability a =
    IMPULSE_NOISE[severity - 1], by 1 or 0 with equal odds: scikit-image's ``random_noise(mode='s&p',
    amount=a)`` as written since 0.19 (what ``imagecorruptions`` calls).

    The scikit-image of 2018 that made CIFAR-10-C drew instead ceil(a * size / 2) salt and as many
    pepper positions with replacement from ``randint(0, n - 1)`` per axis, which never hit the last
    row, column or channel (blue); this follows the documented per-value definition, which gives the
    same expected fraction a (slightly more, since draws with replacement collide) everywhere."""
    a = IMPULSE_NOISE[severity - 1]
    # one uniform u per value decides both: replaced iff u < a, salt iff u < a / 2 (odds 1/2 given a flip)
    u = rng.uniform(*x.shape[1:])
    return torch.where(u < a, (u < a / 2).to(x.dtype), x)


@register("speckle_noise")
def speckle_noise(x: torch.Tensor, severity: int, rng: SampleRNG) -> torch.Tensor:
    """clip(x + x N(0, c^2), 0, 1), c = SPECKLE_NOISE[severity - 1]: multiplicative noise, zero on
    black pixels."""
    c = SPECKLE_NOISE[severity - 1]
    return (x + x * rng.normal(*x.shape[1:], std=c)).clamp_(0.0, 1.0)
