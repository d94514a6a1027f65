"""Gaussian noise augmentation (Cohen et al. 2019): cross-entropy on x + sigma * N(0, I), one
fused ``gaussian_noise`` call per minibatch; the models that randomized smoothing certifies."""
from __future__ import annotations

from ... import ops
from ..registry import Hyper, Method, register


@register
class Gaussian(Method):
    name = "gaussian"
    help = "Gaussian noise augmentation at sigma, for randomized smoothing (Cohen et al. 2019)"
    hyper = (Hyper("sigma", 0.25, "Gaussian noise level (training and smoothing)", minimum=0.0),)
    select = "noise_acc"

    @classmethod
    def noise_sigma(cls, cfg):
        return cfg.sigma

    @classmethod
    def label(cls, cfg) -> str:
        return f"Gaussian noise (sigma={cfg.sigma:g})"

    def step(self, x, y):
        c, tr = self.cfg, self.trainer
        xn = tr.fmt(ops.gaussian_noise(x, 1, c.sigma, seed=tr.seed())) if c.sigma > 0 else x
        return tr.natural_step(xn, y)
