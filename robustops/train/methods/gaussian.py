"""Gaussian noise augmentation (Cohen et al. 2019): cross-entropy on x + sigma * N(0, I), one
fused ``gaussian_noise`` call per minibatch; the models that randomized smoothing certifies.

``sigma_dist`` (``--sigma-dist``) chooses the noise level of each training sample:

- "fixed" (the default): every sample at ``sigma``, as Cohen et al. train (unchanged: the same call,
  the same seeds, the same numbers as before the option existed).
- "uniform:MAX": sigma_i ~ U(0, MAX) drawn per sample, against the sigma-overfitting of Kireev,
  Andriushchenko & Flammarion (UAI 2022, arXiv 2103.02325, section 4): a model trained at one fixed
  sigma is accurate on noise of about that level and loses accuracy away from it (common corruptions'
  noise at other severities); sampling sigma uniformly spreads the training over [0, MAX]. Choices the
  paper leaves open, taken here: sigma is drawn per sample (not per batch), every sample of the batch
  is augmented (the paper also reports augmenting only 50% of each batch, which is not an option here),
  no clamping to the box (as the fixed-sigma method). The noise is ``gaussian_noise`` at sigma = 1
  (which takes one sigma per call) scaled per sample, the sigmas drawn on the CPU from a seed of the
  run's checkpointed stream, so a resumed run continues exactly.

What a uniform-sigma model records: validation still measures ``noise_acc`` at ``sigma`` (the --sigma
flag, which selects the best epoch) and the checkpoint's ``sigma`` entry is that level, the one
``certify`` smooths at by default; the distribution itself is recorded as the ``sigma_dist`` entry.
Choose --sigma inside [0, MAX] for that figure to describe the training range.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ... import ops
from ...smoothing.soft import draw_noise
from ..registry import Hyper, Method, register


#: the noise level every smoothing-training method shares (one --sigma flag)
SIGMA = Hyper("sigma", 0.25, "Gaussian noise level (training and smoothing)", minimum=0.0, strict=True)
NOISE_COPIES_HELP = "Gaussian-noise copies of each input per training step"
SIGMA_DIST = Hyper("sigma_dist", "fixed", 'training noise level per sample: "fixed" (sigma) or "uniform:MAX" '
                   "(sigma_i ~ U(0, MAX), Kireev et al. 2022)", kind="str")


def noise_copies(default: int) -> Hyper:
    """The number of noisy copies per input (one --noise-copies flag; its default is the method's)."""
    return Hyper("noise_copies", default, NOISE_COPIES_HELP, kind="int", minimum=1)


def parse_sigma_dist(spec) -> Optional[float]:
    """The MAX of a "uniform:MAX" spelling (a finite float > 0), None for "fixed"; otherwise a
    ValueError naming sigma_dist and the expected spelling."""
    if spec == "fixed":
        return None
    head, _, tail = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    try:
        top = float(tail) if head == "uniform" else math.nan
    except ValueError:
        top = math.nan
    if not (0.0 < top < math.inf):
        raise ValueError(f'sigma_dist must be "fixed" or "uniform:MAX" with MAX a finite float > 0 '
                         f'(e.g. "uniform:0.5"), got {spec!r}')
    return top


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
    help = "Gaussian noise augmentation at sigma, or sigma ~ U(0, MAX) per sample (Cohen et al. 2019; Kireev et al.)"
    hyper = (SIGMA, SIGMA_DIST)
    sample_weights = True

    @classmethod
    def check_config(cls, cfg) -> None:
        parse_sigma_dist(cfg.sigma_dist)

    @classmethod
    def checkpoint_entries(cls, cfg):
        return {"sigma_dist": cfg.sigma_dist}

    @classmethod
    def label(cls, cfg) -> str:
        top = parse_sigma_dist(cfg.sigma_dist)
        return f"Gaussian noise (sigma={cfg.sigma:g})" if top is None else f"Gaussian noise (sigma~U(0,{top:g}))"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.sigma_top = parse_sigma_dist(self.cfg.sigma_dist)  # None: fixed sigma

    def step(self, x, y):
        c, ctx = self.cfg, self.ctx
        if self.sigma_top is not None:
            return ctx.natural_step(ctx.fmt(self.uniform_noise(x, self.sigma_top)), y)
        xn = ctx.fmt(ops.gaussian_noise(x, 1, c.sigma, seed=ctx.seed())) if c.sigma > 0 else x
        return ctx.natural_step(xn, y)

    def uniform_noise(self, x: torch.Tensor, top: float) -> torch.Tensor:
        """x + sigma_i * N(0, I) with sigma_i ~ U(0, top) per sample (two seeds of the run's stream)."""
        gen = torch.Generator().manual_seed(self.ctx.seed())
        sigma = torch.rand(x.shape[0], generator=gen, dtype=torch.float64) * top
        sigma = sigma.to(x.dtype).to(x.device, non_blocking=True)
        unit = draw_noise(x, 1, 1.0, self.ctx.seed()).view(x.shape).to(x.dtype)
        return x + sigma.view(-1, *([1] * (x.dim() - 1))) * unit
