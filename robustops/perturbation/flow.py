"""A small normalising flow on images (:class:`Flow`): an exact bijection x <-> z between images
[B, C, H, W] in [0, 1] and latents z [B, C*H*W] with an exact log-likelihood; the model G of the
joint-space threat model of IJSAT (Lau et al., TPAMI 2023, arXiv 2112.06323), which needs "exact
manifold information": encode, decode and log_prob of the flow protocol (``protocol.py``).

The architecture is Glow's (Kingma & Dhariwal 2018, arXiv 1807.03039) multi-scale flow, built from
normflows' layers (``normflows.flows.GlowBlock``: affine coupling, invertible 1x1 convolution, ActNorm;
``normflows.flows.Squeeze``), with RealNVP's pre-processing (Dinh et al. 2017, arXiv 1605.08803):

- dequantisation (RealNVP section 4.1, Theis et al. 2016): a pixel x = k / (bins - 1) of a ``bins``-level
  image is trained as y = (x * (bins - 1) + u) / bins, u ~ U[0, 1) per pixel, so that the continuous
  density p(y) on [0, 1]^D bounds the discrete likelihood, -log2 P(k) <= -E_u log2 p(y) + D log2(bins):
  bits/dim = -log p(y) / (D ln 2) + log2(bins) (8 for 8-bit images; :meth:`Flow.bits_per_dim`);
- the logit transform (RealNVP section 4.1): s = logit(alpha + (1 - 2 alpha) y), whose log-determinant
  sum_d [log(1 - 2 alpha) - log y'_d - log(1 - y'_d)] (y' = alpha + (1 - 2 alpha) y) is part of log_prob,
  so the reported bits/dim are those of the images in [0, 1], not of the logits;
- per scale (Glow, Fig. 2): a squeeze (2x2 space to channels), ``depth`` Glow steps (ActNorm, an
  invertible 1x1 convolution in Glow's LU parametrisation, an affine coupling whose scale is
  sigmoid(h + 2), its network conv 3x3 - ReLU - conv 1x1 - ReLU - conv 3x3 with ``hidden`` channels and
  a last layer initialised at zero, so every coupling starts as the identity), then half of the
  channels factored out as latents (all of them after the last scale);
- base: a standard normal N(0, I) for every latent, factored-out ones included, so
  log p(x) = sum_d log N(z_d; 0, 1) + log |det dz/dx|.

Choices this implementation makes (the papers leave them open or use larger models): ``levels`` scales
(default 1 for images up to 8x8, 2 up to 16x16, else 3, Glow's CIFAR-10 count); the factored-out latents
have the standard-normal prior of RealNVP, not Glow's learned conditional prior (split2d), so that every
coordinate of z is N(0, I) under the model and a latent ball has the same meaning everywhere (what a
joint-space attack perturbs); no class conditioning; alpha = 0.05 (RealNVP's CIFAR-10 value); x is not
rounded to the grid before dequantisation, so any image in [0, 1] has a density. ActNorm is initialised
from the first batch it transforms (Glow's data-dependent initialisation, normflows' behaviour): encode a
batch of data before sampling from an untrained flow. Glow trains with Adam at lr 1e-3 and warm-up; here
``fit_perturbation`` trains it (objective: the mean of -log_prob over the batch, in bits/dim).

Numerics: the flow always runs in its parameters' dtype (float32, or float64 after ``.double()``) with
autocast off, since an inverse and a log-determinant in bf16 / fp16 are not exact; inputs are cast to it.
The IJSAT paper's own flow (its architecture and training) could not be read here; this is the closest
standard reading: a Glow on the training images.

Why normflows: a well-kept flow library whose layers fit torch 2.14 (checked: the inverse of a Glow step
matches to float rounding, float64 works); it is imported when a Flow is built
(``robustops._checks.optional_import``), so the rest of the package works without it. Its LU
initialisation calls the deprecated ``Tensor.lu``, whose warning is silenced at construction.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .. import _checks

__all__ = ["Flow", "is_flow"]

_LOG_2PI = math.log(2 * math.pi)


def _default_levels(size: int) -> int:
    return 1 if size <= 8 else (2 if size <= 16 else 3)


class Flow(nn.Module):
    """A Glow-style multi-scale normalising flow with the flow protocol (see the module docstring).

    in_channels, input_size: the images' shape (C, S, S) (1, 8 for the digits; 3, 32 for CIFAR-10);
    S must be divisible by 2**levels. depth: Glow steps per scale; hidden: channels of each coupling
    network; levels: scales (None: 1 up to 8x8, 2 up to 16x16, else 3); alpha: the logit transform's
    margin, in (0, 0.5); bins: the levels of the quantised data (256: 8-bit images), which set the
    dequantisation noise and the log2(bins) of bits/dim.

    - ``image_shape``: (C, S, S); ``latent_dim``: D = C * S * S;
    - ``encode(x) -> z`` float32 [B, D] and ``decode(z) -> x`` [B, C, S, S] (not clamped), exact inverses;
    - ``encode_with_log_det(x) -> (z, log|det dz/dx|)`` and ``decode_with_log_det(z) -> (x, log|det dx/dz|)``
      in the parameters' dtype;
    - ``log_prob(x)``: [B] nats, the density of x in [0, 1]^D (logit and flow log-determinants included);
    - ``bits_per_dim(x, generator)``: [B], of dequantised x (``dequantize``), the training objective;
    - ``sample(n, temperature, generator)``: decoded draws of z ~ N(0, T^2 I).
    ``kind`` ("flow") and ``config`` let ``save_perturbation_model`` / ``load_perturbation_model`` rebuild it."""

    kind = "flow"

    def __init__(self, in_channels: int = 1, input_size: int = 8, depth: int = 4, hidden: int = 64,
                 levels: Optional[int] = None, alpha: float = 0.05, bins: int = 256):
        super().__init__()
        for name, v, lo in (("in_channels", in_channels, 1), ("input_size", input_size, 2), ("depth", depth, 1),
                            ("hidden", hidden, 1), ("bins", bins, 2)):
            _checks.check_int(v, name, lo)
        if levels is None:
            levels = _default_levels(input_size)
        _checks.check_int(levels, "levels", 1)
        if input_size % 2 ** levels:
            raise ValueError(f"input_size must be divisible by 2**levels = {2 ** levels} (a squeeze halves the size "
                             f"at each of the {levels} scales), got {input_size}")
        self.alpha = _checks.check_number(alpha, "alpha", 0.0, strict=True, maximum=0.5)
        if self.alpha >= 0.5:
            raise ValueError(f"alpha must be in (0, 0.5), got {alpha!r}")
        nf = _checks.optional_import("normflows", "robustops.perturbation.Flow (the normalising flow)")
        self.image_shape: Tuple[int, int, int] = (in_channels, input_size, input_size)
        self.latent_dim = in_channels * input_size * input_size
        self.bins = bins
        self.config: Dict[str, Any] = {"in_channels": in_channels, "input_size": input_size, "depth": depth,
                                       "hidden": hidden, "levels": levels, "alpha": self.alpha, "bins": bins}
        self.squeeze = nf.flows.Squeeze()
        self.scales = nn.ModuleList()
        self.latent_shapes: List[Tuple[int, int, int]] = []  # per scale: the latents it leaves, (c, s, s)
        c, s = in_channels, input_size
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.lu is deprecated.*")
            for level in range(levels):
                c, s = 4 * c, s // 2
                self.scales.append(nn.ModuleList(nf.flows.GlowBlock(c, hidden, split_mode="channel", scale=True,
                                                                    scale_map="sigmoid") for _ in range(depth)))
                out = c // 2 if level < levels - 1 else c
                self.latent_shapes.append((out, s, s))
                c -= out if level < levels - 1 else 0

    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def encode_with_log_det(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(z [B, D], log|det dz/dx| [B]) in the parameters' dtype, the logit transform's log-determinant
        included. x: images [B, C, S, S], values in [0, 1] (a margin of alpha / (1 - 2 alpha) beyond works)."""
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"x must be images [B, {', '.join(map(str, self.image_shape))}] (the flow's image_shape), "
                             f"got {list(x.shape)}")
        a = self.alpha
        with torch.autocast(x.device.type, enabled=False):
            y = a + (1 - 2 * a) * x.to(self._dtype())
            log_y, log_1my = torch.log(y), torch.log1p(-y)
            h = log_y - log_1my
            log_det = (math.log(1 - 2 * a) - log_y - log_1my).flatten(1).sum(1)
            zs = []
            for level, steps in enumerate(self.scales):
                h, _ = self.squeeze.inverse(h)
                for step in steps:
                    h, d = step.inverse(h)
                    log_det = log_det + d
                if level < len(self.scales) - 1:
                    z, h = h.split([self.latent_shapes[level][0], h.shape[1] - self.latent_shapes[level][0]], 1)
                    zs.append(z.flatten(1))
            zs.append(h.flatten(1))
            return torch.cat(zs, 1), log_det

    def decode_with_log_det(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(x [B, C, S, S], log|det dx/dz| [B]) in the parameters' dtype: the inverse of
        :meth:`encode_with_log_det` (its log-determinant is minus that one's). x is not clamped."""
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z must be latents [B, {self.latent_dim}] (the flow's latent_dim), got {list(z.shape)}")
        a, B = self.alpha, z.shape[0]
        with torch.autocast(z.device.type, enabled=False):
            pieces = z.to(self._dtype()).split([math.prod(s) for s in self.latent_shapes], 1)
            log_det = torch.zeros(B, dtype=pieces[0].dtype, device=z.device)
            h = None
            for level in range(len(self.scales) - 1, -1, -1):
                piece = pieces[level].reshape(B, *self.latent_shapes[level])
                h = piece if h is None else torch.cat([piece, h], 1)
                for step in reversed(self.scales[level]):
                    h, d = step(h)
                    log_det = log_det + d
                h, _ = self.squeeze(h)
            log_y, log_1my = nn.functional.logsigmoid(h), nn.functional.logsigmoid(-h)
            log_det = log_det + (log_y + log_1my - math.log(1 - 2 * a)).flatten(1).sum(1)
            return (torch.sigmoid(h) - a) / (1 - 2 * a), log_det

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The latents z of images x: float32 [B, D] (the flow protocol)."""
        return self.encode_with_log_det(x)[0].float()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The images [B, C, S, S] of latents z [B, D], in z's floating dtype; decode(encode(x)) = x to float
        rounding; not clamped (callers clamp to their box)."""
        x = self.decode_with_log_det(z)[0]
        return x.to(z.dtype) if z.is_floating_point() else x

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) [B] in nats (float32): the density on [0, 1]^D of the dequantised images at x, i.e.
        sum_d log N(z_d; 0, 1) + log|det dz/dx| with the logit transform's log-determinant included."""
        z, log_det = self.encode_with_log_det(x)
        return (log_det - 0.5 * (z.pow(2) + _LOG_2PI).sum(1)).float()

    def dequantize(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(x * (bins - 1) + u) / bins, float32, with u ~ U[0, 1) per pixel drawn from generator (a generator on
        x's device; None: torch's default one)."""
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        return (x.float() * (self.bins - 1) + u) / self.bins

    def bits_per_dim(self, x: torch.Tensor, generator: Optional[torch.Generator] = None,
                     dequantize: bool = True) -> torch.Tensor:
        """[B]: -log p(y) / (D ln 2) + log2(bins), y = the dequantised x (one draw from generator; x itself
        when dequantize is False): the flow's bound on the bits per dimension of bins-level images."""
        y = self.dequantize(x, generator) if dequantize else x
        return -self.log_prob(y) / (self.latent_dim * math.log(2)) + math.log2(self.bins)

    def sample(self, n: int, temperature: float = 1.0, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """n images decoded from z ~ N(0, temperature^2 I) (Glow samples at a temperature below 1), clamped to
        [0, 1], without gradient."""
        n = _checks.check_int(n, "n", 1)
        temperature = _checks.check_number(temperature, "temperature", 0.0)
        dev = next(self.parameters()).device
        z = torch.randn(n, self.latent_dim, generator=generator, device=generator.device if generator else dev)
        z = z.to(dev) * temperature
        with torch.no_grad():
            return self.decode(z).clamp(0, 1)


def is_flow(model: nn.Module) -> bool:
    """Whether model is a normalising flow trained by maximum likelihood (``kind = "flow"``: :class:`Flow`)."""
    return getattr(model, "kind", None) == "flow"
