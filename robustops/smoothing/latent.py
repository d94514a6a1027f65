"""Randomized smoothing in the latent space of a learned perturbation set (Wong and Kolter 2021,
"Learning perturbation sets for robust machine learning", their certification section).

A perturbation model (``robustops.perturbation``: ``prior(x) -> (mu, logvar)``, ``decode(z, x)``)
defines the members of S(x) by a latent offset u: m(x, u) = clamp(g(mu(x) + sigma(x) * u, x), lo, hi).
For a fixed x, the classifier composed with the decoder is a classifier of u,

    h_x(u) = f(m(x, u)),

and Cohen et al.'s smoothing applies to it unchanged: with u ~ N(0, s^2 I) the smoothed classifier
G_x(u) = argmax_c P(h_x(u + s * e) = c) is constant on the L2 ball of radius s * Phi^-1(pA_lower) around
u = 0. So the certified radius here is a *latent* radius: no member m(x, u) with ||u||_2 below it
changes the smoothed prediction, and an input is certified against the whole learned set
S_eps(x) when the radius is at least eps.

:class:`LatentSmooth` is a thin layer on :class:`~robustops.smoothing.Smooth`: the noise is
``Smooth``'s (``gaussian_noise`` on the zero latent codes), the votes, the statistics and the result
types are ``Smooth``'s, and the image, mu(x) and sigma(x) travel to each noisy row as Smooth's per-input
``context``. Results depend only on (seed, input index), as in ``Smooth``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .. import _checks
from ..models import Normalize
from ..perturbation import check_perturbation_model, member, prior_scale
from .smooth import CertifyResult, Smooth

__all__ = ["LatentSmooth", "LatentClassifier"]


class LatentClassifier(nn.Module):
    """h(u, (x, mu, sigma)) = classifier(normalize(member(x, u))): the base classifier of latent smoothing,
    called by Smooth with a batch of latent offsets u [R, D] and the per-row context (x, mu, sigma)."""

    def __init__(self, classifier, perturbation_model: nn.Module, lo: float = 0.0, hi: float = 1.0,
                 mean=None, std=None, autocast=None):
        super().__init__()
        self.classifier = classifier
        self.perturbation_model = perturbation_model
        self.lo, self.hi = float(lo), float(hi)
        self.normalize = None if mean is None and std is None else Normalize(mean, std)
        self.autocast = autocast

    def forward(self, u: torch.Tensor, context) -> torch.Tensor:
        x, mu, sigma = context
        images = member(self.perturbation_model, x, u.float(), mu, sigma, self.lo, self.hi)
        if self.normalize is not None:
            images = self.normalize.to(images.device)(images)
        if self.autocast is None:
            return self.classifier(images)
        with torch.autocast(device_type=images.device.type, dtype=self.autocast):
            return self.classifier(images)


class LatentSmooth:
    """Randomized smoothing of ``classifier`` over the latent offsets u of a learned perturbation set.

    classifier: maps images [R, *x.shape[1:]] (in [lo, hi]) to logits [R, num_classes]; call .eval() first.
    perturbation_model: an nn.Module with the perturbation-model protocol (``latent_dim``, ``prior``,
        ``decode``), frozen: it is put in eval mode and used without gradient.
    num_classes: int >= 2.  sigma: the latent noise level s > 0 (in units of u, i.e. of the prior's
        standard deviations).
    lo, hi: the image range members are clamped to. mean, std: optional normalization applied to the
        members before the classifier. autocast: None, "bf16" or "fp16": decoder and classifier under
        torch.autocast (the latent noise itself stays float32). device: where both models run (default:
        the classifier's parameters', else the inputs').

    ``certify`` / ``predict`` return ``Smooth``'s :class:`CertifyResult` / prediction tensors; the radius
    of a CertifyResult is the certified latent L2 radius around u = 0. ``smooth`` is the underlying Smooth.
    """

    def __init__(self, classifier, perturbation_model: nn.Module, num_classes: int, sigma: float,
                 lo: float = 0.0, hi: float = 1.0, *, mean=None, std=None, autocast=None, device=None):
        if not callable(classifier):
            raise TypeError(f"classifier must be a module or callable, got {type(classifier).__name__}")
        if not isinstance(perturbation_model, nn.Module):
            raise TypeError(f"perturbation_model must be an nn.Module with the perturbation-model protocol, got "
                            f"{type(perturbation_model).__name__}")
        check_perturbation_model(perturbation_model, "perturbation_model")
        lo = _checks.check_number(lo, "lo")
        hi = _checks.check_number(hi, "hi")
        if not lo <= hi:
            raise ValueError(f"lo must be <= hi, got lo={lo}, hi={hi}")
        self.perturbation_model = perturbation_model.eval()
        for p in self.perturbation_model.parameters():
            p.requires_grad_(False)
        self.latent_dim = _checks.check_int(perturbation_model.latent_dim, "perturbation_model.latent_dim", 1)
        dtype = _checks.autocast_dtype(autocast, "autocast")
        if device is None and isinstance(classifier, nn.Module):
            for t in list(classifier.parameters()) + list(classifier.buffers()):
                device = t.device
                break
        self.device = None if device is None else torch.device(device)
        if self.device is not None:
            self.perturbation_model.to(self.device)
        self.lo, self.hi = lo, hi
        self.base = LatentClassifier(classifier, self.perturbation_model, lo, hi, mean, std, dtype)
        self.smooth = Smooth(self.base, num_classes, sigma, device=self.device)
        self.num_classes, self.sigma = self.smooth.num_classes, self.smooth.sigma

    def _prepare(self, x: torch.Tensor):
        """(u0 [B, D] zeros, the context (x, mu, sigma)); u0 is NaN for an input x with NaN / Inf values,
        so that Smooth lets it abstain (with its warning)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor [B, ...], got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"x must hold floating-point inputs, got {x.dtype}")
        if x.dim() < 2:
            raise ValueError(f"x must be a batch of inputs [B, ...] with at least 2 dimensions, got shape "
                             f"{list(x.shape)}")
        device = self.device or x.device
        x = x.to(device).float().contiguous()
        finite = torch.isfinite(x).flatten(1).all(1)
        clean = torch.nan_to_num(x, nan=0.0, posinf=self.hi, neginf=self.lo)
        mu, sigma = prior_scale(self.perturbation_model, clean)
        D = self.latent_dim
        if mu.shape[1] != D:
            raise ValueError(f"perturbation_model.prior(x) returned codes of dimension {mu.shape[1]}, but its "
                             f"latent_dim is {D}")
        u0 = torch.zeros(x.shape[0], D, device=device)
        u0 = u0.masked_fill(~finite[:, None], float("nan"))
        return u0, (clean, mu, sigma)

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int, *,
                seed: Optional[int] = None, indices=None) -> CertifyResult:
        """CERTIFY at u = 0 for a batch of images x [B, ...]: ``Smooth.certify`` of h_x over latent noise
        N(0, sigma^2 I); the radius is the certified latent L2 radius (sigma * Phi^-1(pA_lower)).
        n0, n, alpha, batch_size (noisy latent codes per forward pass), seed, indices: as in
        ``Smooth.certify``."""
        u0, ctx = self._prepare(x)
        return self.smooth.certify(u0, n0, n, alpha, batch_size, seed=seed, indices=indices, context=ctx)

    def predict(self, x: torch.Tensor, n: int, alpha: float, batch_size: int, *, seed: Optional[int] = None,
                indices=None, return_details: bool = False):
        """PREDICT of the latent-smoothed classifier at u = 0 (``Smooth.predict``'s arguments and results)."""
        u0, ctx = self._prepare(x)
        return self.smooth.predict(u0, n, alpha, batch_size, seed=seed, indices=indices,
                                   return_details=return_details, context=ctx)
