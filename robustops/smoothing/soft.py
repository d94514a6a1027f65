"""The smoothed *soft* classifier G(x) = E_delta[softmax(f(x + delta))], delta ~ N(0, sigma^2 I), as the
attacks on smoothed classifiers use it (SmoothAdv, Salman et al. 2019; SmoothMix; preemptive
robustification of smoothed classifiers, ``robustops.robustify``): m noise vectors drawn once with the
fused ``gaussian_noise`` op and held fixed, the noisy batch laid out input-major, and the
Monte-Carlo estimate of -log G_y(x)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import ops

__all__ = ["smoothed_nll", "add_noise", "draw_noise"]


def draw_noise(x: torch.Tensor, m: int, sigma: float, seed: int, offset: int = 0) -> torch.Tensor:
    """m noise vectors sigma * N(0, I) per sample of x, as a contiguous float32 Tensor[B, m, ...]: one
    ``ops.gaussian_noise`` call on zeros (so that the noise alone is kept, to add to any iterate).
    offset: the noisy-row offset of the draw (sample b's rows are offset + b * m + j)."""
    z = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    return ops.gaussian_noise(z, m, sigma, seed=seed, offset=offset).view(x.shape[0], m, *x.shape[1:])


def add_noise(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x [B, ...] + noise [B, m, ...] as the input-major batch [B*m, ...] (contiguous)."""
    B, m = noise.shape[:2]
    return (x.unsqueeze(1) + noise).reshape(B * m, *x.shape[1:])


def smoothed_nll(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """-log((1/m) sum_i softmax_y(logits_i)) per sample, [B]: logits [B*m, C] input-major (rows
    b*m .. b*m+m-1 are sample b's noisy copies), y [B] labels. In float32, via logsumexp."""
    B = y.shape[0]
    logp = F.log_softmax(logits.float(), dim=1).view(B, -1, logits.shape[1])
    m = logp.shape[1]
    lp_y = logp.gather(2, y.view(B, 1, 1).expand(B, m, 1)).squeeze(2)  # [B, m]
    return math.log(m) - torch.logsumexp(lp_y, dim=1)
