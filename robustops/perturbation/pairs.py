"""Pair data (x, x_tilde[, y]) to learn a perturbation set from: :class:`DigitsPairs` (the embedded
digits and a known family of perturbations, with the true parameters of every pair) and
:class:`NpzPairs` (a user's pairs); :class:`CropFlipPairs` (a joint random crop / flip of both images of
a pair); :func:`set_pairs_epoch` (what ``fit_perturbation`` calls each epoch); :func:`batch_pairs`
checks a loader's batches.

Sampling as Wong and Kolter's reference code does (locuslab/perturbation_learning): its pair datasets
draw a new perturbation of each image at every access, and its CIFAR-10-C pairs may be padded, cropped
and flipped jointly. Here every draw is keyed by (seed, epoch, index) instead of a global RNG, so a
DataLoader may shuffle or use workers and a resumed run sees the same pairs as an uninterrupted one:
the datasets have ``set_epoch(e)`` (as ``DistributedSampler``), and epoch 0, the state before any
call, is the fixed pair of each index (held-out pairs and evaluation use it)."""
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

__all__ = ["transform_images", "DigitsPairs", "NpzPairs", "CropFlipPairs", "crop_flip", "set_pairs_epoch", "pairs_per_epoch",
           "batch_pairs"]


def _epoch_key(seed: int, i: int, epoch: int) -> int:
    """The generator key of item i at an epoch: derive_seed(derive_seed(seed, i + 1), epoch), which for
    epoch 0 is the key of the fixed pair (derive_seed(k, 0) = k)."""
    return _rng.derive_seed(_rng.derive_seed(seed, i + 1), epoch)


#: The salt of the L-inf family's noise stream (ASCII "linf"): far from any epoch number.
_LINF_SALT = 0x6C696E66
#: The salt of CropFlipPairs' crop / flip stream (ASCII "crop"), so that it never reuses the digits'
#: perturbation draws of the same (seed, index, epoch) when both wrap one dataset with one seed.
_CROP_SALT = 0x63726F70


def _check_epoch(epoch) -> int:
    if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
        raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
    return int(epoch)


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

    split: "train", "test" or "all"; seed: the draws. fresh (the default, as the reference code samples):
    item i at epoch e (``set_epoch(e)``; 0 before any call) is perturbed with parameters from a generator
    keyed by (seed, i, e), so every epoch brings new perturbations of every image; fresh=False: one fixed
    pair per item whatever the epoch (the epoch-0 pair). Either way item i at epoch e is always the same
    pair, so a DataLoader may shuffle, split or use workers freely and a resumed run continues exactly.
    repeats: pairs per image and epoch (item i perturbs image i mod N; repeats > 1 gives each image
    several true perturbations: items i, i + N, i + 2N, ...).
    rotation (degrees), translation (pixels): a bound r (range [-r, r]) or a pair (low, high);
    scale: (low, high), > 0; thickness: a bound or a pair within [-1, 1] (see transform_images).
    ``params(i)`` gives the true parameters of item i (at the current epoch), ``pair(indices)`` a batch of
    pairs at once.

    family: "all" (every parameter above at once, the default) or one known family alone -- "rotation",
    "translation", "scaling", "thickness" (the other parameters at the identity) or "linf" (x + uniform
    noise in the L-inf ball of radius linf_eps, clamped to [0, 1]) -- or several (a comma list or a
    sequence: item i comes from family i mod k, ``family_of(i)``); see ``robustops.perturbation.families``."""

    PARAM_NAMES = ("angle", "tx", "ty", "scale", "thickness")

    def __init__(self, split: str = "train", seed: int = 0, rotation=20.0, translation=1.0, scale=(0.9, 1.1),
                 thickness=0.5, repeats: int = 1, fresh: bool = True, family="all",
                 linf_eps: float = 0.2):
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
        if not isinstance(fresh, bool):
            raise TypeError(f"fresh must be a bool (new perturbations every epoch, or one fixed pair per item), got "
                            f"{fresh!r}")
        self.seed = _rng.resolve_seed(seed)
        self.fresh, self.epoch = fresh, 0
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

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose perturbations the items hold (no effect when fresh=False)."""
        self.epoch = _check_epoch(epoch)

    def _draw(self, i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(_epoch_key(self.seed, i, self.epoch if self.fresh else 0))
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
        """xt with the rows of L-inf items replaced by x + their noise: item i's own stream at the epoch,
        salted so that it never meets a parameter draw's key (the epoch keys are derive_seed(k, e))."""
        rows = [j for j, i in enumerate(idx) if self.families[i % len(self.families)] == "linf"]
        if rows:
            epoch = self.epoch if self.fresh else 0
            seeds = [_rng.derive_seed(_epoch_key(self.seed, idx[j], epoch), _LINF_SALT) for j in rows]
            xt[rows] = _families.linf_noise(x[rows], self.linf_eps, seeds)
        return xt

    def __getitem__(self, i: int):
        x, xt, y = self.pair([i])
        return x[0], xt[0], y[0]

    def __repr__(self) -> str:
        r = ", ".join(f"{k} {lo:g}..{hi:g}" for k, (lo, hi) in self.ranges.items())
        draws = f"fresh, epoch {self.epoch}" if self.fresh else "fixed"
        fam = "" if self.families == ("all",) else f", family {','.join(self.families)} (linf_eps {self.linf_eps:g})"
        return f"DigitsPairs(split={self.split!r}, seed={self.seed}, n={len(self)}, {draws}, {r}{fam})"


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


def crop_flip(x: torch.Tensor, top: int, left: int, flip: bool, padding: int) -> torch.Tensor:
    """One image [C, H, W] zero-padded by ``padding`` on each side, cropped back to H x W at (top, left) of
    the padded image (0 <= top, left <= 2 * padding) and mirrored left-right when flip."""
    H, W = x.shape[-2:]
    out = F.pad(x, (padding, padding, padding, padding))[..., top:top + H, left:left + W]
    return out.flip(-1) if flip else out


class CropFlipPairs(Dataset):
    """A pair dataset (items (x, x_tilde, ...)) with one random crop and horizontal flip applied identically
    to both images of each pair, as the reference code's joint transform of image pairs (zero padding by
    ``padding`` pixels, a crop back to the image size at an offset uniform in [0, 2 * padding]^2, a
    left-right flip with probability 1/2 when ``flip``; torchvision's RandomCrop(size, padding) /
    RandomHorizontalFlip). Unlike the reference, whose tensor version discards the transformed images,
    the transform is applied. The offsets and the flip of item i at epoch e come from a generator keyed
    by (seed, i, e) (:meth:`set_epoch`, forwarded to the inner dataset when it has one): deterministic,
    fresh every epoch. Items past the first two (labels) are passed through."""

    def __init__(self, pairs, padding: int = 4, flip: bool = True, seed: int = 0):
        if isinstance(padding, bool) or not isinstance(padding, (int, np.integer)) or padding < 0:
            raise ValueError(f"padding must be an int >= 0 (pixels of zero padding before the crop), got {padding!r}")
        if not isinstance(flip, bool):
            raise TypeError(f"flip must be a bool, got {flip!r}")
        self.pairs, self.padding, self.flip = pairs, int(padding), flip
        self.seed = _rng.resolve_seed(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose crops and flips the items get (and the inner dataset's epoch)."""
        self.epoch = _check_epoch(epoch)
        set_pairs_epoch(self.pairs, epoch)

    def params(self, i: int) -> Tuple[int, int, bool]:
        """(top, left, flip) of item i at the current epoch."""
        g = torch.Generator().manual_seed(_rng.derive_seed(_epoch_key(self.seed, int(i), self.epoch), _CROP_SALT))
        top, left = (int(v) for v in torch.randint(0, 2 * self.padding + 1, (2,), generator=g))
        flipped = bool(torch.rand((), generator=g) < 0.5) and self.flip
        return top, left, flipped

    def __getitem__(self, i: int):
        item = self.pairs[i]
        x, xt = item[0], item[1]
        if x.dim() != 3 or x.shape != xt.shape:
            raise ValueError(f"CropFlipPairs: items must hold two images [C, H, W] of one shape, got "
                             f"{list(x.shape)} and {list(xt.shape)}")
        top, left, flipped = self.params(i % len(self) if i < 0 else i)
        return (crop_flip(x, top, left, flipped, self.padding), crop_flip(xt, top, left, flipped, self.padding),
                *item[2:])


def set_pairs_epoch(dataset, epoch: int) -> None:
    """``dataset.set_epoch(epoch)`` when the dataset (or the dataset a ``Subset`` wraps, at any depth) has
    one; otherwise nothing: datasets of fixed pairs need no epoch."""
    while dataset is not None:
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
            return
        dataset = getattr(dataset, "dataset", None)


def pairs_per_epoch(dataset) -> bool:
    """Whether dataset (or the dataset a ``Subset`` wraps, at any depth) draws its pairs per epoch
    (``set_epoch`` with fresh pairs, or joint crops and flips)."""
    while dataset is not None:
        if hasattr(dataset, "set_epoch"):
            return bool(getattr(dataset, "fresh", True))
        dataset = getattr(dataset, "dataset", None)
    return False


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
