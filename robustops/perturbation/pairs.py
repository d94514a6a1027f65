"""Pair data (x, x_tilde[, y]) to learn a perturbation set from: :class:`DigitsPairs` (the embedded
digits and a known family of perturbations, with the true parameters of every pair) and
:class:`NpzPairs` (a user's pairs); :func:`batch_pairs` checks a loader's batches."""
from __future__ import annotations

import math
import os
from typing import Dict, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .. import _rng
from ..data import as_nchw, load_digits
from . import families as _families

__all__ = ["transform_images", "DigitsPairs", "NpzPairs", "batch_pairs"]


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
    ``params(i)`` gives the true parameters of item i, ``pair(indices)`` a batch of pairs at once.
    family: "all" (every parameter above at once, the default) or one known family alone -- "rotation",
    "translation", "scaling", "thickness" (the other parameters at the identity) or "linf" (x + uniform
    noise in the L-inf ball of radius linf_eps, clamped to [0, 1]) -- or several (a comma list or a
    sequence: item i comes from family i mod k, ``family_of(i)``); see ``robustops.perturbation.families``."""

    PARAM_NAMES = ("angle", "tx", "ty", "scale", "thickness")

    def __init__(self, split: str = "train", seed: int = 0, rotation=20.0, translation=1.0, scale=(0.9, 1.1),
                 thickness=0.5, repeats: int = 1, family="all", linf_eps: float = 0.2):
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
        self.families = _families.parse_families(family)
        self.linf_eps = _families.check_linf_eps(linf_eps)

    def __len__(self) -> int:
        return self.images.shape[0] * self.repeats

    def _index(self, i: int) -> int:
        n = len(self)
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not -n <= i < n:
            raise IndexError(f"index {i!r} out of range for DigitsPairs of length {n}")
        return int(i) % n

    def _draw(self, i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(_rng.derive_seed(self.seed, i + 1))
        u = torch.rand(len(self.PARAM_NAMES), generator=g, dtype=torch.float64)
        lo = torch.tensor([self.ranges[k][0] for k in self.PARAM_NAMES], dtype=torch.float64)
        hi = torch.tensor([self.ranges[k][1] for k in self.PARAM_NAMES], dtype=torch.float64)
        return (lo + (hi - lo) * u).float()

    def params(self, i: int) -> Dict[str, float]:
        """The true parameters of item i: angle (degrees), tx, ty (pixels), scale, thickness."""
        v = self._family_draw(self._index(i))
        return {k: float(a) for k, a in zip(self.PARAM_NAMES, v)}

    def pair(self, indices: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x [B, 1, 8, 8], x_tilde, y [B]) of several items, warped in one batch."""
        idx = [self._index(i) for i in indices]
        n_img = self.images.shape[0]
        img = torch.tensor([i % n_img for i in idx], dtype=torch.long)
        x = self.images[img]
        p = torch.stack([self._family_draw(i) for i in idx]) if idx else torch.zeros(0, len(self.PARAM_NAMES))
        return x, self._add_linf(idx, x, transform_images(x, *p.unbind(1))), self.labels[img]

    def family_of(self, i: int) -> str:
        """The family item i is drawn from: the given families' (i mod k)-th."""
        return self.families[self._index(i) % len(self.families)]

    def _family_draw(self, i: int) -> torch.Tensor:
        return _families.restrict_params(self._draw(i), self.families[i % len(self.families)], self.PARAM_NAMES)

    def _add_linf(self, idx, x: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
        """xt with the rows of L-inf items replaced by x + their noise (item i's own stream)."""
        rows = [j for j, i in enumerate(idx) if self.families[i % len(self.families)] == "linf"]
        if rows:
            seeds = [_rng.derive_seed(_rng.derive_seed(self.seed, idx[j] + 1), 1) for j in rows]
            xt[rows] = _families.linf_noise(x[rows], self.linf_eps, seeds)
        return xt

    def __getitem__(self, i: int):
        x, xt, y = self.pair([i])
        return x[0], xt[0], y[0]

    def __repr__(self) -> str:
        r = ", ".join(f"{k} {lo:g}..{hi:g}" for k, (lo, hi) in self.ranges.items())
        fam = "" if self.families == ("all",) else f", family {','.join(self.families)} (linf_eps {self.linf_eps:g})"
        return f"DigitsPairs(split={self.split!r}, seed={self.seed}, n={len(self)}, {r}{fam})"


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
    out = as_nchw(t)
    if out is None:
        raise ValueError(f"{what} must be {expected}, got shape {list(a.shape)}")
    return out


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


def batch_pairs(batch, what: str = "loader") -> Tuple[torch.Tensor, torch.Tensor]:
    """(x, x_tilde) of a loader's batch (x, x_tilde[, y]), or a ValueError naming ``what`` yields it."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ValueError(f"{what} must yield batches (x, x_tilde[, y]) of pairs (e.g. DigitsPairs, NpzPairs), got "
                         f"{type(batch).__name__}")
    x, xt = batch[0], batch[1]
    if not isinstance(x, torch.Tensor) or not isinstance(xt, torch.Tensor) or x.shape != xt.shape:
        raise ValueError(f"{what} must yield x and x_tilde tensors of one shape, got "
                         f"{getattr(x, 'shape', type(x).__name__)} and {getattr(xt, 'shape', type(xt).__name__)}")
    return x, xt
