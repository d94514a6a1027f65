"""The conditional VAE of Wong and Kolter (2021) (:class:`CVAE`: prior network p(z|x), encoder
q(z|x, x~), decoder g(z, x)) and its objective, the beta-weighted ELBO (:func:`perturbation_loss`)

    log p(x~|x) >= E_q[log p(x~|z, x)] - beta * KL(q(z|x, x~) || p(z|x)),

with a Gaussian decoder of fixed variance, so that -E_q[log p(x~|z, x)] is, up to constants, the
squared error ||g(z, x) - x~||^2 at one reparameterised draw z = mu_q + sigma_q * n, n ~ N(0, I), and
the closed-form KL between two diagonal Gaussians (:func:`kl_gaussians`)

    KL = 1/2 * sum_d [ log s_p^2 - log s_q^2 + (s_q^2 + (mu_q - mu_p)^2) / s_p^2 - 1 ].

The decoder variance is absorbed into beta (loss per pair = sum over pixels of the squared error +
beta * KL, averaged over the batch; beta = 2 s^2 for decoder variance s^2).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

__all__ = ["CVAE", "kl_gaussians", "perturbation_loss"]


def _split_gaussian(out, D: int, what: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mu, logvar) from a network's output: a pair of [B, D] tensors or one [B, 2D] tensor."""
    if isinstance(out, (tuple, list)) and len(out) == 2:
        mu, logvar = out
    elif isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] == 2 * D:
        mu, logvar = out[:, :D], out[:, D:]
    else:
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{what} must return (mu, logvar) of shape [B, {D}] each, or one [B, {2 * D}] tensor, "
                         f"got {got}")
    if mu.dim() != 2 or mu.shape[1] != D or logvar.shape != mu.shape:
        raise ValueError(f"{what} must return mu and logvar of shape [B, {D}], got {list(mu.shape)} and "
                         f"{list(logvar.shape)}")
    return mu, logvar


def _downsamplings(input_size: int) -> int:
    k = int(round(math.log2(input_size / 4))) if input_size >= 4 else -1
    if k < 0 or 4 * 2 ** k != input_size:
        raise ValueError(f"input_size must be a power of two >= 4 (8 for the digits, 32 for CIFAR-10) for the default "
                         f"CVAE networks, got {input_size}; pass your own prior / encoder / decoder modules otherwise")
    return k


def _trunk(in_ch: int, width: int, input_size: int) -> Tuple[nn.Sequential, int]:
    """Convolutions from [B, in_ch, S, S] down to [B, F, 4, 4]; returns (module, F)."""
    layers: List[nn.Module] = [nn.Conv2d(in_ch, width, 3, padding=1), nn.ReLU()]
    ch = width
    for j in range(_downsamplings(input_size)):
        out = min(2 * ch, 4 * width)
        layers += [nn.Conv2d(ch, out, 4 if j else 3, stride=2, padding=1), nn.ReLU()]
        ch = out
    if len(layers) == 2:  # input_size 4: no downsampling
        layers += [nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers), ch


class _GaussianNet(nn.Module):
    """Convolutional trunk, then an MLP to (mu, logvar) [B, D] each."""

    def __init__(self, in_ch: int, input_size: int, latent_dim: int, width: int, hidden: int):
        super().__init__()
        self.trunk, ch = _trunk(in_ch, width, input_size)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(ch * 16, hidden), nn.ReLU(),
                                  nn.Linear(hidden, 2 * latent_dim))
        nn.init.zeros_(self.head[-1].weight)  # start at N(0, I): the KL starts at 0
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(torch.cat(xs, 1) if len(xs) > 1 else xs[0]))


class _Decoder(nn.Module):
    """g(z, x): x's features at 4x4 and z mapped to a 4x4 map, upsampled by transposed convolutions, a
    last convolution that also sees x at full resolution; output x + that (a residual; its last layer
    starts at zero, so an untrained decoder is the identity map x~ = x)."""

    def __init__(self, channels: int, input_size: int, latent_dim: int, width: int):
        super().__init__()
        self.trunk, ch = _trunk(channels, width, input_size)
        self.from_z = nn.Linear(latent_dim, ch * 16)
        self.ch = ch
        layers: List[nn.Module] = [nn.Conv2d(2 * ch, ch, 3, padding=1), nn.ReLU()]
        c = ch
        for _ in range(_downsamplings(input_size)):
            out = max(c // 2, width)
            layers += [nn.ConvTranspose2d(c, out, 4, stride=2, padding=1), nn.ReLU()]
            c = out
        self.up = nn.Sequential(*layers)
        self.out = nn.Conv2d(c + channels, channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.trunk(x), self.from_z(z).view(z.shape[0], self.ch, 4, 4)], 1)
        return x + self.out(torch.cat([self.up(h), x], 1))


class CVAE(nn.Module):
    """The conditional VAE of Wong and Kolter (2021) with the perturbation-model protocol.

    - prior p(z | x) = N(mu_p(x), diag(exp(logvar_p(x)))): ``prior(x)``;
    - encoder q(z | x, x~) = N(mu_q, diag(exp(logvar_q))): ``posterior(x, x_tilde)`` (x and x~ stacked
      along the channels);
    - decoder g(z, x): ``decode(z, x)``; a Gaussian of fixed variance around it models x~ (the paper's
      choice), trained with the squared error. The default decoder predicts a residual added to x (a
      choice of this implementation: a perturbation is a change of x; the paper's decoders also see x).

    Default networks (small convolutional ones, for in_channels 1 and input_size 8 (digits) or 3 and 32
    (CIFAR-10); any power-of-two size >= 4 works): width channels in the first convolution, doubling at
    each stride-2 convolution down to 4x4, an MLP of ``hidden`` units to (mu, logvar) (default hidden:
    128 for inputs up to 16x16, else 256). The prior and encoder start at N(0, I), the decoder at the
    identity map.

    User networks: ``prior`` (x -> (mu, logvar) or [B, 2D]), ``encoder`` ((x, x~) -> the same),
    ``decoder`` ((z, x) -> x~ of x's shape) replace the defaults one by one. A CVAE with user networks
    saves its weights, but :func:`load_perturbation_model` needs the model passed in to load them.

    Log-variances are soft-clamped to (-logvar_limit, logvar_limit) by limit * tanh(v / limit), so that
    neither the KL nor exp() can overflow (in fp16 autocast too)."""

    def __init__(self, in_channels: int = 1, input_size: int = 8, latent_dim: int = 8, width: int = 32,
                 hidden: Optional[int] = None, prior: Optional[nn.Module] = None, encoder: Optional[nn.Module] = None,
                 decoder: Optional[nn.Module] = None, logvar_limit: float = 10.0):
        super().__init__()
        for name, v, lo in (("in_channels", in_channels, 1), ("input_size", input_size, 1),
                            ("latent_dim", latent_dim, 1), ("width", width, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if hidden is None:
            hidden = 128 if input_size <= 16 else 256
        if not (isinstance(logvar_limit, (int, float)) and logvar_limit > 0):
            raise ValueError(f"logvar_limit must be a number > 0, got {logvar_limit!r}")
        self.latent_dim = latent_dim
        self.logvar_limit = float(logvar_limit)
        for name, m in (("prior", prior), ("encoder", encoder), ("decoder", decoder)):
            if m is not None and not isinstance(m, nn.Module):
                raise TypeError(f"{name} must be an nn.Module, got {type(m).__name__}")
        self.prior_net = prior if prior is not None else _GaussianNet(in_channels, input_size, latent_dim, width,
                                                                      hidden)
        self.encoder_net = encoder if encoder is not None else _GaussianNet(2 * in_channels, input_size, latent_dim,
                                                                            width, hidden)
        self.decoder_net = decoder if decoder is not None else _Decoder(in_channels, input_size, latent_dim, width)
        custom = prior is not None or encoder is not None or decoder is not None
        # what rebuilds the model from a checkpoint (None: user networks, which cannot be rebuilt)
        self.config: Optional[Dict[str, Any]] = None if custom else {
            "in_channels": in_channels, "input_size": input_size, "latent_dim": latent_dim, "width": width,
            "hidden": hidden, "logvar_limit": self.logvar_limit}
        self.eps: Optional[float] = None  # the set's radius, when chosen (choose_eps) or loaded from a checkpoint

    def _limit(self, logvar: torch.Tensor) -> torch.Tensor:
        return self.logvar_limit * torch.tanh(logvar / self.logvar_limit)

    def prior(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = _split_gaussian(self.prior_net(x), self.latent_dim, "the prior network")
        return mu, self._limit(logvar)

    def posterior(self, x: torch.Tensor, x_tilde: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if x_tilde.shape != x.shape:
            raise ValueError(f"x_tilde must have x's shape {list(x.shape)}, got {list(x_tilde.shape)}")
        mu, logvar = _split_gaussian(self.encoder_net(x, x_tilde), self.latent_dim, "the encoder network")
        return mu, self._limit(logvar)

    def decode(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.decoder_net(z, x)

    def forward(self, x: torch.Tensor, x_tilde: torch.Tensor, generator: Optional[torch.Generator] = None):
        """(x_hat, mu_q, logvar_q, mu_p, logvar_p): the decoding of one reparameterised posterior draw."""
        mu_q, logvar_q = self.posterior(x, x_tilde)
        mu_p, logvar_p = self.prior(x)
        noise = torch.randn(mu_q.shape, generator=generator, device=mu_q.device, dtype=torch.float32)
        z = mu_q + torch.exp(0.5 * logvar_q) * noise.to(mu_q.dtype)
        return self.decode(z, x), mu_q, logvar_q, mu_p, logvar_p


def kl_gaussians(mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor,
                 logvar_p: torch.Tensor) -> torch.Tensor:
    """KL(N(mu_q, diag e^logvar_q) || N(mu_p, diag e^logvar_p)) per sample [B], in float32:
    1/2 sum_d [logvar_p - logvar_q + (e^logvar_q + (mu_q - mu_p)^2) / e^logvar_p - 1]."""
    mu_q, logvar_q, mu_p, logvar_p = (t.float() for t in (mu_q, logvar_q, mu_p, logvar_p))
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p) ** 2) * torch.exp(-logvar_p) - 1).sum(1)


def perturbation_loss(model: nn.Module, x: torch.Tensor, x_tilde: torch.Tensor, beta: float = 0.01,
                      generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, squared error [B], KL [B]) of the beta-weighted negative ELBO: mean over the batch of
    ||g(z, x) - x~||^2 (summed over pixels, z one reparameterised draw from q(z|x, x~)) + beta * KL(q || p).
    Works with any model that has the protocol plus posterior()."""
    mu_q, logvar_q = model.posterior(x, x_tilde)
    mu_p, logvar_p = model.prior(x)
    noise = torch.randn(mu_q.shape, generator=generator, device=mu_q.device, dtype=torch.float32)
    z = mu_q + torch.exp(0.5 * logvar_q) * noise.to(mu_q.dtype)
    x_hat = model.decode(z, x)
    if x_hat.shape != x.shape:
        raise ValueError(f"decode(z, x) must return x's shape {list(x.shape)}, got {list(x_hat.shape)}")
    sq = (x_hat.float() - x_tilde.float()).pow(2).flatten(1).sum(1)
    kl = kl_gaussians(mu_q, logvar_q, mu_p, logvar_p)
    return (sq + beta * kl).mean(), sq, kl
