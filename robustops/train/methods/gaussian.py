"""Gaussian noise augmentation (Cohen et al. 2019): cross-entropy on x + sigma * N(0, I), one
fused ``gaussian_noise`` call per minibatch; the models that randomized smoothing certifies."""
from __future__ import annotations

from ... import ops
from ..registry import Hyper, Method, register


#: the noise level every smoothing-training method shares (one --sigma flag)
SIGMA = Hyper("sigma", 0.25, "Gaussian noise level (training and smoothing)", minimum=0.0, strict=True)
NOISE_COPIES_HELP = "Gaussian-noise copies of each input per training step"


def noise_copies(default: int) -> Hyper:
    """The number of noisy copies per input (one --noise-copies flag; its default is the method's)."""
    return Hyper("noise_copies", default, NOISE_COPIES_HELP, kind="int", minimum=1)


class SmoothingMethod(Method):
    """Base of the methods that train for randomized smoothing at ``cfg.sigma``: validation measures
    accuracy under that noise and selects by it, checkpoints record sigma for ``certify``."""

    select = "noise_acc"

    @classmethod
    def noise_sigma(cls, cfg):
        return cfg.sigma


@register
class Gaussian(SmoothingMethod):
    name = "gaussian"
    help = "Gaussian noise augmentation at sigma, for randomized smoothing (Cohen et al. 2019)"
    hyper = (SIGMA,)
    sample_weights = True

    @classmethod
    def label(cls, cfg) -> str:
        return f"Gaussian noise (sigma={cfg.sigma:g})"

    def step(self, x, y):
        c, ctx = self.cfg, self.ctx
        xn = ctx.fmt(ops.gaussian_noise(x, 1, c.sigma, seed=ctx.seed())) if c.sigma > 0 else x
        return ctx.natural_step(xn, y)
