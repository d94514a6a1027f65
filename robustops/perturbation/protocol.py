"""The perturbation-model protocol: what every other module relies on (any nn.Module that has it
works, not only :class:`robustops.perturbation.CVAE`), and the members of the set S(x) it defines:

- ``latent_dim``: int, the dimension D of z and u;
- ``prior(x) -> (mu, logvar)``: the prior's mean and log-variance, [B, D] each;
- ``posterior(x, x_tilde) -> (mu, logvar)``: the encoder q(z | x, x_tilde), [B, D] each (training and
  the quality metrics only);
- ``decode(z, x) -> x_hat``: the decoder g(z, x), x's shape (not clamped: :func:`member` clamps).

The flow protocol (a normalising flow: an exact bijection between images and latents, with an exact
log-likelihood; :class:`robustops.perturbation.Flow` has it, the joint-space attack relies on it):

- ``image_shape``: tuple (C, H, W) of the images it models; D = C * H * W is the latent dimension;
- ``encode(x) -> z``: float32 [B, D], the latent of images x [B, C, H, W] (values in [0, 1]);
- ``decode(z) -> x``: the images [B, C, H, W] of latents z [B, D], decode(encode(x)) = x (to float
  rounding; not clamped: callers clamp to their box);
- ``log_prob(x) -> [B]``: the exact log-density of x in nats (change of variables, dequantisation
  and any pre-processing included), from which bits/dim = -log_prob / (D ln 2) (+ 8 for 8-bit data).

The attacks (``robustops.attacks.latent``) import this file only: the rest of the package (the quality
metrics) uses the attacks.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn

__all__ = ["check_perturbation_model", "check_flow", "prior_scale", "member"]


def check_perturbation_model(model: nn.Module, name: str = "perturbation model") -> nn.Module:
    """model if it has the protocol (latent_dim, prior, decode), else a TypeError naming what is missing."""
    missing = [a for a in ("latent_dim", "prior", "decode") if not hasattr(model, a)]
    if missing:
        raise TypeError(f"{name} must have latent_dim, prior(x) -> (mu, logvar) and decode(z, x) (the "
                        f"perturbation-model protocol of robustops.perturbation); {type(model).__name__} lacks "
                        f"{', '.join(missing)}")
    return model


def check_flow(model: nn.Module, name: str = "flow") -> nn.Module:
    """model if it has the flow protocol (image_shape, encode, decode, log_prob), else a TypeError naming
    what is missing."""
    missing = [a for a in ("image_shape", "encode", "decode", "log_prob") if not hasattr(model, a)]
    if missing:
        raise TypeError(f"{name} must have image_shape, encode(x) -> z [B, D], decode(z) -> x and log_prob(x) "
                        f"(the flow protocol of robustops.perturbation); {type(model).__name__} lacks "
                        f"{', '.join(missing)}")
    return model


def prior_scale(model: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mu, sigma) of the prior at x, float32 [B, D] each, sigma = exp(logvar / 2); without gradient
    (the set is fixed while it is attacked, sampled or certified)."""
    check_perturbation_model(model)
    with torch.no_grad():
        mu, logvar = model.prior(x)
    if mu.shape != logvar.shape or mu.dim() != 2 or mu.shape[0] != x.shape[0]:
        raise ValueError(f"prior(x) must return (mu, logvar) of shape [B, D] with B = {x.shape[0]}, got "
                         f"{list(mu.shape)} and {list(logvar.shape)}")
    return mu.float(), torch.exp(0.5 * logvar.float())


def member(model: nn.Module, x: torch.Tensor, u: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor,
           lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """The member of S(x) at latent offset u: clamp(g(mu + sigma * u, x), lo, hi), in x's dtype.
    Differentiable with respect to u (and the decoder's parameters); mu, sigma from :func:`prior_scale`."""
    z = mu + sigma * u.to(mu.dtype)
    out = model.decode(z, x)
    if out.shape != x.shape:
        raise ValueError(f"decode(z, x) must return x's shape {list(x.shape)}, got {list(out.shape)}")
    return out.clamp(lo, hi).to(x.dtype)

