"""Learned perturbation sets (Wong and Kolter 2021, "Learning perturbation sets for robust machine
learning", ICLR): a conditional VAE whose prior p(z|x) = N(mu(x), diag(sigma(x)^2)) and decoder g(z, x)
define the set

    S(x) = { g(mu(x) + sigma(x) * u, x) : ||u||_2 <= eps }

of perturbed versions of x. Attacks, training and certification then work in the latent ball of u
(``robustops.attacks.latent``, the ``learned`` training method, latent randomized smoothing).

The perturbation-model protocol (what every other module relies on; any nn.Module that has it works,
not only :class:`CVAE`):

- ``latent_dim``: int, the dimension D of z and u;
- ``prior(x) -> (mu, logvar)``: the prior's mean and log-variance, [B, D] each;
- ``posterior(x, x_tilde) -> (mu, logvar)``: the encoder q(z | x, x_tilde), [B, D] each (training and
  the quality metrics only);
- ``decode(z, x) -> x_hat``: the decoder g(z, x), x's shape (not clamped: :func:`member` clamps).

What this module adds, and which parts of the paper it follows:

- Pair data: :class:`DigitsPairs` (the embedded digits and a known family of perturbations, with the
  true parameters of every pair) and :class:`NpzPairs` (a user's pairs).
- :class:`CVAE`: prior network p(z|x), encoder q(z|x, x~), decoder g(z, x).
- :func:`fit_perturbation`: maximises the beta-weighted ELBO of the paper (its CVAE objective)

      log p(x~|x) >= E_q[log p(x~|z, x)] - beta * KL(q(z|x, x~) || p(z|x)),

  with a Gaussian decoder of fixed variance, so that -E_q[log p(x~|z, x)] is, up to constants, the
  squared error ||g(z, x) - x~||^2 at one reparameterised draw z = mu_q + sigma_q * n, n ~ N(0, I),
  and the closed-form KL between two diagonal Gaussians

      KL = 1/2 * sum_d [ log s_p^2 - log s_q^2 + (s_q^2 + (mu_q - mu_p)^2) / s_p^2 - 1 ].

  Choices the paper leaves open (or that this implementation makes for small images): the decoder
  variance is absorbed into beta (loss per pair = sum over pixels of the squared error + beta * KL,
  averaged over the batch; beta = 2 s^2 for decoder variance s^2); beta may be warmed up linearly from
  0 over the first ``warmup`` epochs (off by default); Adam; one latent draw per pair.
- :func:`quality`, :func:`choose_eps`: the paper's measures of a learned set. Its "necessary subset"
  property asks that every true perturbation x~ of x be close to some member of S(x); it is measured
  by the *approximation error* min_{||u|| <= eps} ||g(mu + sigma u, x) - x~||^2 (found by latent PGD,
  ``robustops.attacks.latent.nearest_member``), by the *coverage* (how often the posterior mean,
  written in the prior's standardised coordinates u = (mu_q - mu_p) / sigma_p, lies in the eps-ball)
  and by the *reconstruction error* of x~ through the posterior mean. eps is chosen as a percentile of
  ||u|| over the training pairs (:func:`choose_eps`), so that held-out coverage is close to that
  percentile when the model generalises.
- :func:`sample`, :func:`plot_perturbations`: members of S(x) drawn uniformly in the eps-ball, and a
  picture of them next to true perturbations.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from ._runfiles import resume_path, write_csv_log

__all__ = ["prior_scale", "member", "check_perturbation_model", "DigitsPairs", "NpzPairs", "transform_images",
           "CVAE", "kl_gaussians", "perturbation_loss", "fit_perturbation", "PerturbationFit",
           "load_perturbation_model", "save_perturbation_model", "latent_norms", "choose_eps", "quality",
           "sample", "plot_perturbations", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "robustops.perturbation/1"
LOG_COLUMNS = ("epoch", "lr", "beta", "loss", "recon_mse", "kl", "val_loss", "val_recon_mse", "val_kl", "train_time")


def check_perturbation_model(model: nn.Module, name: str = "perturbation model") -> nn.Module:
    """model if it has the protocol (latent_dim, prior, decode), else a TypeError naming what is missing."""
    missing = [a for a in ("latent_dim", "prior", "decode") if not hasattr(model, a)]
    if missing:
        raise TypeError(f"{name} must have latent_dim, prior(x) -> (mu, logvar) and decode(z, x) (the "
                        f"perturbation-model protocol of robustops.perturbation); {type(model).__name__} lacks "
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


# ------------------------------------------------------------------------------------ pair data

def transform_images(x: torch.Tensor, angle: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor, scale: torch.Tensor,
                     thickness: torch.Tensor) -> torch.Tensor:
    """The known perturbation family of :class:`DigitsPairs`, batched: x [B, C, H, W] in [0, 1] and
    per-sample parameters [B] each.

    1. stroke thickness t in [-1, 1]: x + t * (dilate(x) - x) for t > 0 and x + |t| * (erode(x) - x) for
       t < 0, with the grey dilation / erosion a 3x3 max / min filter (a continuous thickening or
       thinning of the strokes);
    2. an affine warp about the image centre: rotation by ``angle`` degrees (positive: clockwise on
       screen, y pointing down), scaling by ``scale`` (> 1 enlarges), then translation by (tx, ty) pixels,
       sampled bilinearly (``affine_grid`` + ``grid_sample``, align_corners=False, zeros outside).

    Returns a new tensor in [0, 1], x's shape and dtype."""
    if x.dim() != 4:
        raise ValueError(f"x must be images [B, C, H, W], got shape {list(x.shape)}")
    B, _, H, W = x.shape
    p = [torch.as_tensor(v, dtype=torch.float32, device=x.device).reshape(-1).expand(B)
         for v in (angle, tx, ty, scale, thickness)]
    angle, tx, ty, scale, thickness = p
    xf = x.float()
    t = thickness.view(B, 1, 1, 1)
    dil = F.max_pool2d(xf, 3, 1, 1)
    ero = -F.max_pool2d(-xf, 3, 1, 1)
    xf = torch.where(t >= 0, xf + t * (dil - xf), xf - t * (ero - xf))
    rad = angle * (math.pi / 180.0)
    c, s = torch.cos(rad) / scale, torch.sin(rad) / scale
    # output o = scale * R(angle) i + t  =>  input i = R(-angle) (o - t) / scale, in normalised coordinates
    bx, by = tx * (2.0 / W), ty * (2.0 / H)
    theta = torch.stack([torch.stack([c, s, -(c * bx + s * by)], 1),
                         torch.stack([-s, c, -(-s * bx + c * by)], 1)], 1)
    grid = F.affine_grid(theta, list(xf.shape), align_corners=False)
    out = F.grid_sample(xf, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.clamp(0.0, 1.0).to(x.dtype)


def _range(v, name: str, symmetric: bool, lo_limit: float = -math.inf, hi_limit: float = math.inf):
    """(low, high) of a parameter range: a number r >= 0 means [-r, r] when symmetric; a pair is taken as is."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if not symmetric:
            raise TypeError(f"{name} must be a pair (low, high), got {v!r}")
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be a finite number >= 0 (the range [-{name}, {name}]) or a pair "
                             f"(low, high), got {v!r}")
        lo, hi = -float(v), float(v)
    else:
        try:
            lo, hi = (float(a) for a in v)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a number or a pair (low, high) of numbers, got {v!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
            raise ValueError(f"{name} must be a finite range with low <= high, got {v!r}")
    if lo < lo_limit or hi > hi_limit:
        raise ValueError(f"{name} must lie within [{lo_limit}, {hi_limit}], got ({lo}, {hi})")
    return lo, hi


class DigitsPairs(Dataset):
    """Pairs (x, x_tilde, y) of the embedded 8x8 digits (``robustops.data.load_digits``) and a known
    perturbation of each: random rotation, translation, scaling and stroke thickness
    (:func:`transform_images`), each parameter uniform in its range.

    split: "train", "test" or "all"; seed: the draws; item i of a dataset with seed s is always the
    same pair (its parameters come from a generator keyed by ``derive_seed(s, i + 1)``), so a
    DataLoader may shuffle, split or use workers freely. repeats: pairs per image (item i perturbs image
    i mod N; repeats > 1 gives each image several true perturbations: items i, i + N, i + 2N, ...).
    rotation (degrees), translation (pixels): a bound r (range [-r, r]) or a pair (low, high);
    scale: (low, high), > 0; thickness: a bound or a pair within [-1, 1] (see transform_images).
    ``params(i)`` gives the true parameters of item i, ``pair(indices)`` a batch of pairs at once."""

    PARAM_NAMES = ("angle", "tx", "ty", "scale", "thickness")

    def __init__(self, split: str = "train", seed: int = 0, rotation=20.0, translation=1.0, scale=(0.9, 1.1),
                 thickness=0.5, repeats: int = 1):
        from . import _rng
        from .data import load_digits

        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
        self.seed = _rng.resolve_seed(seed)
        ds = load_digits(split)
        self.images, self.labels = ds.tensors
        self.split, self.repeats = split, repeats
        self.ranges = {"angle": _range(rotation, "rotation", True),
                       "tx": _range(translation, "translation", True),
                       "ty": _range(translation, "translation", True),
                       "scale": _range(scale, "scale", False, 1e-3),
                       "thickness": _range(thickness, "thickness", True, -1.0, 1.0)}

    def __len__(self) -> int:
        return self.images.shape[0] * self.repeats

    def _index(self, i: int) -> int:
        n = len(self)
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not -n <= i < n:
            raise IndexError(f"index {i!r} out of range for DigitsPairs of length {n}")
        return int(i) % n

    def _draw(self, i: int) -> torch.Tensor:
        from . import _rng

        g = torch.Generator().manual_seed(_rng.derive_seed(self.seed, i + 1))
        u = torch.rand(len(self.PARAM_NAMES), generator=g, dtype=torch.float64)
        lo = torch.tensor([self.ranges[k][0] for k in self.PARAM_NAMES], dtype=torch.float64)
        hi = torch.tensor([self.ranges[k][1] for k in self.PARAM_NAMES], dtype=torch.float64)
        return (lo + (hi - lo) * u).float()

    def params(self, i: int) -> Dict[str, float]:
        """The true parameters of item i: angle (degrees), tx, ty (pixels), scale, thickness."""
        v = self._draw(self._index(i))
        return {k: float(a) for k, a in zip(self.PARAM_NAMES, v)}

    def pair(self, indices: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x [B, 1, 8, 8], x_tilde, y [B]) of several items, warped in one batch."""
        idx = [self._index(i) for i in indices]
        n_img = self.images.shape[0]
        img = torch.tensor([i % n_img for i in idx], dtype=torch.long)
        x = self.images[img]
        p = torch.stack([self._draw(i) for i in idx]) if idx else torch.zeros(0, len(self.PARAM_NAMES))
        return x, transform_images(x, *p.unbind(1)), self.labels[img]

    def __getitem__(self, i: int):
        x, xt, y = self.pair([i])
        return x[0], xt[0], y[0]

    def __repr__(self) -> str:
        r = ", ".join(f"{k} {lo:g}..{hi:g}" for k, (lo, hi) in self.ranges.items())
        return f"DigitsPairs(split={self.split!r}, seed={self.seed}, n={len(self)}, {r})"


def _pair_images(a: np.ndarray, what: str) -> torch.Tensor:
    """uint8 (scaled by 1/255) or floating images [N, H, W], [N, C, H, W] or [N, H, W, C] (C in 1, 3)
    to float32 NCHW; a clear error for other dtypes and shapes."""
    expected = "images [N, H, W], [N, C, H, W] or [N, H, W, C] (C = 1 or 3)"
    if a.dtype == np.uint8:
        t = torch.from_numpy(a.astype(np.float32) / 255.0)
    elif np.issubdtype(a.dtype, np.floating):
        t = torch.from_numpy(a.astype(np.float32))
        if t.numel() and (not torch.isfinite(t).all() or t.min() < 0 or t.max() > 1):
            raise ValueError(f"{what} must hold pixel values in [0, 1] (or uint8 0..255), got values in "
                             f"[{float(t.min())}, {float(t.max())}]")
    else:
        raise TypeError(f"{what} must be uint8 or floating-point {expected}, got dtype {a.dtype}")
    if t.dim() == 3:
        t = t.unsqueeze(1)
    elif t.dim() == 4:
        if t.shape[1] not in (1, 3) and t.shape[-1] in (1, 3):
            t = t.permute(0, 3, 1, 2)
    else:
        raise ValueError(f"{what} must be {expected}, got shape {list(a.shape)}")
    return t.contiguous()


class NpzPairs(Dataset):
    """Pairs (x, x_tilde, y) from a .npz file with the arrays ``x`` (clean images), ``x_perturbed`` (a
    perturbed version of each, same shape) and, optionally, ``y`` (int labels, one per image; -1 when
    absent). Images are [N, H, W], [N, C, H, W] or [N, H, W, C]; uint8 is scaled to [0, 1], floats
    must already lie in [0, 1]."""

    def __init__(self, path: str):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no .npz file at {path!r}")
        name = os.path.basename(path)
        with np.load(path, allow_pickle=False) as f:
            files = set(f.files)
            for key in ("x", "x_perturbed"):
                if key not in files:
                    raise KeyError(f"{name} has no array {key!r}: a pairs file needs x (clean images [N, H, W], "
                                   f"[N, C, H, W] or [N, H, W, C]) and x_perturbed (the same shape), optionally y "
                                   f"(labels [N]); it has {sorted(files)}")
            xa, pa = f["x"], f["x_perturbed"]
            ya = f["y"] if "y" in files else None
        if xa.ndim < 1 or pa.ndim < 1 or xa.shape[0] != pa.shape[0]:
            raise ValueError(f"{name}: x and x_perturbed must hold the same number of images, got "
                             f"{xa.shape[0] if xa.ndim else 0} and {pa.shape[0] if pa.ndim else 0}")
        if xa.shape != pa.shape:
            raise ValueError(f"{name}: x_perturbed must have x's shape {list(xa.shape)} (one perturbed image per "
                             f"clean image), got {list(pa.shape)}")
        self.x = _pair_images(xa, f"{name}['x']")
        self.x_perturbed = _pair_images(pa, f"{name}['x_perturbed']")
        n = self.x.shape[0]
        if n == 0:
            raise ValueError(f"{name}: x holds no images")
        if ya is None:
            self.y = torch.full((n,), -1, dtype=torch.long)
        else:
            ya = np.asarray(ya).reshape(-1) if ya.ndim <= 1 or ya.size == n else ya
            if ya.ndim != 1 or ya.shape[0] != n:
                raise ValueError(f"{name}['y'] must be labels [N] with N = {n} (one per image), got shape "
                                 f"{list(ya.shape)}")
            if not (np.issubdtype(ya.dtype, np.integer) or np.issubdtype(ya.dtype, np.floating)
                    and np.all(np.isfinite(ya)) and np.all(ya == np.round(ya))):
                raise TypeError(f"{name}['y'] must hold integer labels [N], got dtype {ya.dtype}")
            self.y = torch.from_numpy(ya.astype(np.int64))
        self.path = path

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int):
        return self.x[i], self.x_perturbed[i], self.y[i]

    @property
    def input_shape(self) -> Tuple[int, ...]:
        return tuple(self.x.shape[1:])


# ------------------------------------------------------------------------------------------ CVAE

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


# -------------------------------------------------------------------------------------- training

@dataclass
class PerturbationFit:
    """What :func:`fit_perturbation` returns (the model is trained in place)."""
    history: List[Dict[str, Any]] = field(default_factory=list)
    epochs_run: int = 0                    # epochs run by this call (not those restored by resume)
    resumed_from: Optional[int] = None     # the epoch of the checkpoint it resumed from
    train_time: float = 0.0
    out_dir: Optional[str] = None

    @property
    def last(self) -> Dict[str, Any]:
        return self.history[-1] if self.history else {}


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _batch_pairs(batch, what: str = "loader"):
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ValueError(f"{what} must yield batches (x, x_tilde[, y]) of pairs (e.g. DigitsPairs, NpzPairs), got "
                         f"{type(batch).__name__}")
    x, xt = batch[0], batch[1]
    if not isinstance(x, torch.Tensor) or not isinstance(xt, torch.Tensor) or x.shape != xt.shape:
        raise ValueError(f"{what} must yield x and x_tilde tensors of one shape, got "
                         f"{getattr(x, 'shape', type(x).__name__)} and {getattr(xt, 'shape', type(xt).__name__)}")
    return x, xt


def save_perturbation_model(path: str, model: nn.Module, **extra) -> str:
    """A checkpoint of a :class:`CVAE` with default networks (``models.save_checkpoint``: weights, their
    SHA-256, "model": "cvae", "model_kwargs": its config) plus ``extra`` (eps, percentile, ...); the
    model's eps is stored unless extra gives one. Loads with :func:`load_perturbation_model`."""
    from .models import save_checkpoint

    base = _unwrap(model)
    config = getattr(base, "config", None)
    extra.setdefault("eps", getattr(base, "eps", None))
    extra.setdefault("format", CHECKPOINT_FORMAT)
    return save_checkpoint(path, base, "cvae" if config is not None else "custom", dict(config or {}), **extra)


def _train_settings(epochs, lr, beta, warmup, schedule, weight_decay, amp, grad_clip) -> Dict[str, Any]:
    return {"epochs": epochs, "lr": lr, "beta": beta, "warmup": warmup, "schedule": schedule,
            "weight_decay": weight_decay, "amp": amp or "none", "grad_clip": grad_clip}


def _evaluate_loss(model, loader, beta, device, amp_dtype, seed) -> Dict[str, float]:
    g = torch.Generator(device=device).manual_seed(seed)
    tot = {"loss": 0.0, "sq": 0.0, "kl": 0.0}
    n = numel = 0
    was = model.training
    model.eval()
    with torch.no_grad():
        for batch in loader:
            x, xt = (t.to(device) for t in _batch_pairs(batch, "val_loader"))
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                _, sq, kl = perturbation_loss(model, x, xt, beta, g)
            tot["sq"] += sq.sum().item()
            tot["kl"] += kl.sum().item()
            tot["loss"] += (sq + beta * kl).sum().item()
            n += x.shape[0]
            numel = x[0].numel()
    model.train(was)
    n = max(n, 1)
    return {"val_loss": tot["loss"] / n, "val_recon_mse": tot["sq"] / n / max(numel, 1), "val_kl": tot["kl"] / n}


def fit_perturbation(model: nn.Module, loader, epochs: int = 20, lr: float = 2e-3, *, beta: float = 0.01,
                     warmup: float = 0.0, schedule: str = "constant", weight_decay: float = 0.0,
                     amp: Optional[str] = None, device=None, out_dir: Optional[str] = None,
                     resume: Union[bool, str] = False, progress: bool = True, seed: Optional[int] = 0,
                     val_loader=None, grad_clip: Optional[float] = None, stop_after: Optional[int] = None,
                     verbose: bool = False) -> PerturbationFit:
    """Trains a perturbation model (a :class:`CVAE`, or any module with prior / posterior / decode) on
    a loader of pairs (x, x_tilde[, y]) by the beta-weighted ELBO (:func:`perturbation_loss`), with Adam.

    beta: the KL weight (loss per pair = squared error summed over pixels + beta * KL; see the module's
    docstring); warmup: epochs over which beta rises linearly from 0 (per step; 0: none);
    schedule: "constant" or "cosine" (cosine annealing of lr to 0 over all steps); amp: None / "none",
    "bf16" or "fp16" (autocast; fp16 with gradient scaling); grad_clip: max gradient norm (None: off);
    seed: seeds torch's generator (the loader's shuffling) and the latent noise (None: not seeded).

    out_dir: after every epoch, ``last.pt`` (weights, optimizer, scheduler, gradient scaler, RNG states,
    epoch, history; written atomically) and ``log.csv`` (one row per epoch: LOG_COLUMNS) there.
    resume: True continues from out_dir/last.pt when it exists (else starts afresh), a path continues from
    that checkpoint; the run then continues exactly (the same weights as an uninterrupted run, to
    float rounding), provided the settings are the same (checked) and the loader is built the same way.
    stop_after: end this call after that epoch (a planned interruption: a later call with resume
    continues the same schedule); None: run to ``epochs``.
    Returns a :class:`PerturbationFit`; the model ends in eval mode."""
    from tqdm.auto import tqdm

    from . import _checks, _rng
    from .models import verify_checkpoint

    check_perturbation_model(model)
    if not hasattr(model, "posterior"):
        raise TypeError("model must have posterior(x, x_tilde) -> (mu, logvar) to be trained (the encoder q(z|x, x~))")
    epochs = _checks.check_int(epochs, "epochs", 1)
    lr = _checks.check_number(lr, "lr", 0.0, strict=True)
    beta = _checks.check_number(beta, "beta", 0.0)
    warmup = _checks.check_number(warmup, "warmup", 0.0)
    weight_decay = _checks.check_number(weight_decay, "weight_decay", 0.0)
    if grad_clip is not None:
        grad_clip = _checks.check_number(grad_clip, "grad_clip", 0.0, strict=True)
    if stop_after is not None:
        stop_after = _checks.check_int(stop_after, "stop_after", 1)
    if schedule not in ("constant", "cosine"):
        raise ValueError(f'schedule must be "constant" or "cosine", got {schedule!r}')
    amp_dtype = _checks.autocast_dtype(amp, "amp")
    amp_name = {None: "none", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError("loader is empty")
    dev = torch.device(device) if device is not None else _model_device(model)
    model.to(dev)
    settings = _train_settings(epochs, lr, beta, warmup, schedule, weight_decay, amp_name, grad_clip)

    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    total = epochs * steps_per_epoch
    if schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp_dtype == torch.float16)
    base_seed = _rng.resolve_seed(seed)
    if seed is not None:
        torch.manual_seed(seed)
    noise_gen = torch.Generator(device=dev).manual_seed(_rng.derive_seed(base_seed, 1))
    loader_gen = getattr(loader, "generator", None)

    res = PerturbationFit(out_dir=out_dir)
    start = 0
    ckpt_path = resume_path(resume, out_dir)
    if ckpt_path is not None:
        try:
            ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a truncated or corrupt file: any unpickling error
            raise ValueError(f"resume: cannot read {ckpt_path!r} ({type(e).__name__}); the file is damaged") from None
        if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT or "optimizer" not in ck:
            raise ValueError(f"resume: {ckpt_path!r} is not a training checkpoint of fit_perturbation (last.pt)")
        verify_checkpoint(ck, ckpt_path)
        diff = [f"{k}={ck['settings'].get(k)!r} (now {v!r})" for k, v in settings.items()
                if ck["settings"].get(k) != v]
        if diff:
            raise ValueError("resume: the checkpoint was trained with different settings: " + ", ".join(diff))
        if ck.get("steps_per_epoch") != steps_per_epoch:
            raise ValueError(f"resume: the checkpoint's loader had {ck.get('steps_per_epoch')} batches per epoch, "
                             f"this one has {steps_per_epoch}")
        _unwrap(model).load_state_dict(ck["state_dict"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        rng = ck["rng"]
        torch.set_rng_state(rng["torch"])
        if dev.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], dev)
        noise_gen.set_state(rng["noise"].to(noise_gen.get_state().device))
        if loader_gen is not None and rng.get("loader") is not None:
            loader_gen.set_state(rng["loader"])
        start = int(ck["epoch"])
        res.history = list(ck["history"])
        res.train_time = float(ck.get("train_time", 0.0))
        res.resumed_from = start
        if verbose:
            print(f"resumed from {ckpt_path} after epoch {start}/{epochs}", flush=True)
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)

    warm_steps = warmup * steps_per_epoch
    model.train()
    last_epoch = epochs if stop_after is None else min(epochs, stop_after)
    for epoch in range(start + 1, last_epoch + 1):
        t0 = time.perf_counter()
        sums = torch.zeros(3, dtype=torch.float64, device=dev)
        seen, numel = 0, 1
        bar = tqdm(iter(loader), total=steps_per_epoch, desc=f"perturbation {epoch}/{epochs}", leave=False,
                   disable=not progress, dynamic_ncols=True)
        step = (epoch - 1) * steps_per_epoch
        b = beta
        for batch in bar:
            x, xt = (t.to(dev, non_blocking=True) for t in _batch_pairs(batch))
            b = beta * min(1.0, (step + 1) / warm_steps) if warm_steps > 0 else beta
            with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss, sq, kl = perturbation_loss(model, x, xt, b, noise_gen)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if grad_clip is not None:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(opt)
            scaler.update()
            sched.step()
            step += 1
            with torch.no_grad():
                sums += torch.stack([(sq + b * kl).sum(), sq.sum(), kl.sum()]).double()
            seen += x.shape[0]
            numel = x[0].numel()
            if progress and (step % 20 == 0):
                bar.set_postfix(loss=f"{sums[0].item() / seen:.4f}")
        bar.close()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t_train = time.perf_counter() - t0
        res.train_time += t_train
        s = (sums / max(seen, 1)).tolist()
        row = {"epoch": epoch, "lr": opt.param_groups[0]["lr"], "beta": b, "loss": s[0], "recon_mse": s[1] / numel,
               "kl": s[2], "val_loss": float("nan"), "val_recon_mse": float("nan"), "val_kl": float("nan"),
               "train_time": t_train}
        rng_after = {"torch": torch.get_rng_state(), "noise": noise_gen.get_state().cpu(),
                     "cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
                     "loader": loader_gen.get_state() if loader_gen is not None else None}
        if val_loader is not None:  # its own generator: validating does not change the training stream
            row.update(_evaluate_loss(model, val_loader, beta, dev, amp_dtype, _rng.derive_seed(base_seed, 2)))
        res.history.append(row)
        res.epochs_run += 1
        if verbose:
            msg = f"[perturbation] epoch {epoch}/{epochs} loss {row['loss']:.4f} recon_mse {row['recon_mse']:.5f} " \
                  f"kl {row['kl']:.3f}"
            if val_loader is not None:
                msg += f" | val loss {row['val_loss']:.4f} recon_mse {row['val_recon_mse']:.5f}"
            print(msg + f" | {t_train:.1f}s", flush=True)
        if out_dir is not None:
            save_perturbation_model(os.path.join(out_dir, "last.pt"), model, epoch=epoch, settings=settings,
                                    steps_per_epoch=steps_per_epoch, optimizer=opt.state_dict(),
                                    scheduler=sched.state_dict(), scaler=scaler.state_dict(), rng=rng_after,
                                    history=res.history, train_time=res.train_time)
            write_csv_log(os.path.join(out_dir, "log.csv"), res.history, LOG_COLUMNS)
    model.eval()
    return res


def load_perturbation_model(path: str, device="cpu", model: Optional[nn.Module] = None) -> nn.Module:
    """The perturbation model of a checkpoint (:func:`save_perturbation_model`, or fit_perturbation's
    last.pt), on device, in eval mode, with ``model.eps`` set from the checkpoint (None when it has
    none). A CVAE with default networks is rebuilt from the checkpoint's config; for one with user
    networks pass ``model`` (the same architecture) and the weights are loaded into it."""
    from .models import verify_checkpoint

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no perturbation-model checkpoint at {path!r}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"cannot read {path!r} as a perturbation-model checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT or "state_dict" not in ck:
        raise ValueError(f"{path!r} is not a perturbation-model checkpoint (robustops perturbation train / "
                         f"save_perturbation_model write them)")
    verify_checkpoint(ck, path)
    if model is None:
        if ck.get("model") != "cvae":
            raise ValueError(f"{path!r} holds a perturbation model with user networks; pass model= (the same "
                             f"architecture) to load its weights")
        model = CVAE(**ck.get("model_kwargs", {}))
    try:
        _unwrap(model).load_state_dict(ck["state_dict"])
    except RuntimeError as e:
        raise ValueError(f"{path!r}: the weights do not fit the model ({str(e).splitlines()[0]})") from None
    eps = ck.get("eps")
    model.eps = float(eps) if eps is not None else None
    for k in ("percentile", "data"):
        if k in ck:
            setattr(model, f"checkpoint_{k}", ck[k])
    return model.to(device).eval()


# ------------------------------------------------------------------------------- quality of a set

def _check_eps(eps, name: str = "eps") -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (the radius of the latent L2 ball), got {eps!r}")
    return float(eps)


def _check_percentile(p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 100:
        raise ValueError(f"percentile must be a number in [0, 100], got {p!r}")
    return float(p)


def _posterior_u(model, x, x_tilde):
    """(u, mu_p, sigma_p, mu_q, logvar_q, logvar_p) with u = (mu_q - mu_p) / sigma_p, float32, no gradient."""
    with torch.no_grad():
        mu_p, logvar_p = model.prior(x)
        mu_q, logvar_q = model.posterior(x, x_tilde)
    mu_p, logvar_p, mu_q, logvar_q = (t.float() for t in (mu_p, logvar_p, mu_q, logvar_q))
    sigma_p = torch.exp(0.5 * logvar_p)
    return (mu_q - mu_p) / sigma_p, mu_p, sigma_p, mu_q, logvar_q, logvar_p


def latent_norms(model: nn.Module, loader, device=None, max_batches: Optional[int] = None) -> torch.Tensor:
    """||u||_2 of every pair of a loader, u = (mu_q(x, x~) - mu_p(x)) / sigma_p(x): where the posterior
    mean lies in the prior's standardised coordinates (the coordinates of S(x)'s ball). CPU float32 [N]."""
    check_perturbation_model(model)
    dev = torch.device(device) if device is not None else _model_device(model)
    was = model.training
    model.eval()
    out = []
    for k, batch in enumerate(loader):
        if max_batches is not None and k >= max_batches:
            break
        x, xt = (t.to(dev) for t in _batch_pairs(batch))
        out.append(_posterior_u(model, x, xt)[0].norm(dim=1).cpu())
    model.train(was)
    if not out:
        raise ValueError("loader is empty")
    return torch.cat(out)


def choose_eps(model: nn.Module, loader, percentile: float = 95.0, device=None) -> float:
    """eps of the set S(x): the ``percentile``-th percentile (linear interpolation between order
    statistics, torch.quantile) of ||u|| over the (training) pairs of loader, as Wong and Kolter choose
    the radius; about that percentage of pairs then has its posterior mean inside the ball."""
    q = _check_percentile(percentile) / 100.0
    norms = latent_norms(model, loader, device)
    return float(torch.quantile(norms.double(), q))


def quality(model: nn.Module, loader, eps: Optional[float] = None, percentile: float = 95.0, *, train_loader=None,
            approx_steps: int = 50, device=None, lo: float = 0.0, hi: float = 1.0,
            max_batches: Optional[int] = None) -> Dict[str, Any]:
    """The measures of a learned perturbation set on (held-out) pairs (x, x~) of loader.

    eps: the set's radius; None: ``model.eps`` (set by load_perturbation_model / the CLI), else chosen
    by :func:`choose_eps` at ``percentile`` on ``train_loader`` (one of them is needed: choosing eps on
    the evaluated pairs themselves would make the coverage equal the percentile by construction).

    Returns a dict (means over the pairs; errors are per-pixel mean squared errors):

    - ``recon_mse``: ||clamp(g(mu_q(x, x~), x)) - x~||^2, x~ reconstructed through the posterior mean;
    - ``identity_mse``: ||x - x~||^2, the error of the identity map, for comparison;
    - ``prior_mean_mse``: ||clamp(g(mu_p(x), x)) - x~||^2, the set's centre (u = 0);
    - ``coverage``: the fraction of pairs with ||u|| <= eps, u = (mu_q - mu_p) / sigma_p;
    - ``projected_mse``: the error of the member at u projected onto the eps-ball (an upper bound on
      the approximation error that needs no search);
    - ``approx_mse``: the approximation error min over ||u|| <= eps of ||member(u) - x~||^2, by latent PGD
      (``robustops.attacks.latent.nearest_member``, ``approx_steps`` steps; None when approx_steps is 0);
    - ``kl``: KL(q || p) per pair; ``latent_norm_mean``, ``latent_norm_median``; ``eps``, ``n``."""
    check_perturbation_model(model)
    if not hasattr(model, "posterior"):
        raise TypeError("quality needs the model's posterior(x, x_tilde) (the encoder)")
    if isinstance(approx_steps, bool) or not isinstance(approx_steps, int) or approx_steps < 0:
        raise ValueError(f"approx_steps must be an int >= 0 (0: no latent search), got {approx_steps!r}")
    dev = torch.device(device) if device is not None else _model_device(model)
    if eps is None:
        eps = getattr(model, "eps", None)
    if eps is None:
        if train_loader is None:
            raise ValueError("quality needs eps, a model with eps set (load_perturbation_model), or train_loader to "
                             "choose eps on the training pairs (choose_eps)")
        eps = choose_eps(model, train_loader, percentile, dev)
    eps = _check_eps(eps)
    nearest = None
    if approx_steps > 0:
        from .attacks.latent import nearest_member as nearest  # another module's public API: imported on use

    was = model.training
    model.eval()
    sums = {k: 0.0 for k in ("recon_mse", "identity_mse", "prior_mean_mse", "projected_mse", "approx_mse", "kl")}
    norms = []
    n = 0
    for k, batch in enumerate(loader):
        if max_batches is not None and k >= max_batches:
            break
        x, xt = (t.to(dev) for t in _batch_pairs(batch))
        u, mu_p, sigma_p, mu_q, logvar_q, logvar_p = _posterior_u(model, x, xt)
        norm = u.norm(dim=1)

        def err(a):
            return (a.float() - xt.float()).pow(2).flatten(1).mean(1).sum().item()

        with torch.no_grad():
            sums["recon_mse"] += err(member(model, x, u, mu_p, sigma_p, lo, hi))
            sums["identity_mse"] += err(x)
            sums["prior_mean_mse"] += err(member(model, x, torch.zeros_like(u), mu_p, sigma_p, lo, hi))
            u_proj = u * torch.clamp(eps / norm.clamp_min(1e-12), max=1.0).unsqueeze(1)
            sums["projected_mse"] += err(member(model, x, u_proj, mu_p, sigma_p, lo, hi))
            sums["kl"] += kl_gaussians(mu_q, logvar_q, mu_p, logvar_p.float()).sum().item()
        if nearest is not None:
            x_best, _ = nearest(model, x, xt, eps, steps=approx_steps, lo=lo, hi=hi)
            sums["approx_mse"] += err(x_best.detach())
        norms.append(norm.cpu())
        n += x.shape[0]
    model.train(was)
    if n == 0:
        raise ValueError("loader is empty")
    norms_t = torch.cat(norms)
    out: Dict[str, Any] = {k: v / n for k, v in sums.items()}
    if nearest is None:
        out["approx_mse"] = None
    out.update({"coverage": float((norms_t <= eps).double().mean()), "eps": eps, "n": n,
                "latent_norm_mean": float(norms_t.mean()), "latent_norm_median": float(norms_t.median()),
                "approx_steps": approx_steps})
    return out


# ---------------------------------------------------------------------------------- sampling, plot

def sample(model: nn.Module, x: torch.Tensor, eps: float, n: int = 8, seed: Optional[int] = None, offset: int = 0,
           lo: float = 0.0, hi: float = 1.0, return_u: bool = False):
    """n members of S(x) per input, u uniform in the eps-ball: [B, n, *x.shape[1:]] (and u [B, n, D] with
    return_u). u is drawn by ``ops.random_init`` (L2 ball, radius eps * U^(1/D), a normalised Gaussian
    direction) around zero, keyed by (seed, offset + b * n + j) for draw j of input b: the same seed
    gives the same members, for any split of the inputs into calls (pass offset = index of the first
    input * n). seed None: from torch's generator."""
    from . import _rng, ops

    check_perturbation_model(model)
    eps = _check_eps(eps)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1 (members per input), got {n!r}")
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"x must be a batch [B, ...] of inputs, got {getattr(x, 'shape', type(x).__name__)}")
    seed = _rng.resolve_seed(seed)
    B = x.shape[0]
    mu, sigma = prior_scale(model, x)
    zero = torch.zeros(B * n, mu.shape[1], device=mu.device, dtype=torch.float32)
    u = ops.random_init(zero, eps, "l2", lo=-math.inf, hi=math.inf, seed=seed, offset=offset)
    xr = x.repeat_interleave(n, 0)
    with torch.no_grad():
        out = member(model, xr, u, mu.repeat_interleave(n, 0), sigma.repeat_interleave(n, 0), lo, hi)
    out = out.view(B, n, *x.shape[1:])
    return (out, u.view(B, n, -1)) if return_u else out


def plot_perturbations(model: nn.Module, x: torch.Tensor, x_tilde_true: torch.Tensor, eps_list: Sequence[float],
                       path: str, adversarial: Optional[torch.Tensor] = None, n: int = 4, seed: int = 0,
                       title: Optional[str] = None) -> List[str]:
    """A grid of images, one row per input: x, its true perturbations (x_tilde_true [B, ...] or
    [B, k, ...]), n samples of S(x) (:func:`sample`) at each eps of eps_list, and, when given, the
    adversarial member (adversarial [B, ...], found by the caller). Written at 200 dpi as a PNG at path and
    a PDF beside it (matplotlib's Agg canvas; pyplot's global state is not touched). Returns both paths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be images [B, C, H, W], got {getattr(x, 'shape', type(x).__name__)}")
    B = x.shape[0]
    true = x_tilde_true.unsqueeze(1) if x_tilde_true.dim() == x.dim() else x_tilde_true
    if true.dim() != 5 or true.shape[0] != B or true.shape[2:] != x.shape[1:]:
        raise ValueError(f"x_tilde_true must be [B, ...] or [B, k, ...] with x's image shape {list(x.shape[1:])} and "
                         f"B = {B}, got {list(x_tilde_true.shape)}")
    if adversarial is not None and adversarial.shape != x.shape:
        raise ValueError(f"adversarial must have x's shape {list(x.shape)}, got {list(adversarial.shape)}")
    eps_list = [_check_eps(e, "eps_list entries") for e in eps_list]
    dev = _model_device(model)
    cols: List[Tuple[str, torch.Tensor]] = [("x", x.detach().cpu().unsqueeze(1))]
    cols.append(("true", true.detach().cpu()))
    for e in eps_list:
        cols.append((f"eps={e:.3g}", sample(model, x.to(dev), e, n, seed=seed).cpu()))
    if adversarial is not None:
        cols.append(("adversarial", adversarial.detach().cpu().unsqueeze(1)))
    ncols = sum(c.shape[1] for _, c in cols)
    fig = Figure(figsize=(0.75 * ncols + 0.2, 0.75 * B + 0.5), dpi=200)
    FigureCanvasAgg(fig)
    col = 0
    for name, imgs in cols:
        for j in range(imgs.shape[1]):
            for b in range(B):
                ax = fig.add_subplot(B, ncols, b * ncols + col + 1)
                im = imgs[b, j].float().clamp(0, 1)
                if im.shape[0] == 1:
                    ax.imshow(im[0].numpy(), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
                else:
                    ax.imshow(im.permute(1, 2, 0).numpy(), interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if b == 0 and j == 0:
                    ax.set_title(name, fontsize=6, loc="left")
            col += 1
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout(pad=0.3)
    stem, ext = os.path.splitext(os.fspath(path))
    png = path if ext.lower() == ".png" else stem + ".png"
    pdf = stem + ".pdf"
    d = os.path.dirname(os.path.abspath(png))
    os.makedirs(d, exist_ok=True)
    fig.savefig(png, format="png", dpi=200)
    fig.savefig(pdf, format="pdf")
    return [png, pdf]
