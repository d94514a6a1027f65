"""Out-of-distribution (OOD) images for training (Lee et al., "Removing undesirable feature contributions
using out-of-distribution data", ICLR 2021): the images only; the training objective that pushes their
predictions toward the uniform label is ``robustops.train.ood``.

:func:`load_ood` reads an OOD set from a spec string:

- ``"digits-ood"`` / ``"digits-ood:N"``: N (default :data:`DIGITS_OOD_SIZE`) images made on the fly by
  :func:`generated_ood` from a seed, at the training data's shape;
- any dataset spec ``robustops.data.get_dataset`` reads (a ``.npz``, ``cifar10:DIR``,
  ``imagefolder:DIR``, ``digits``, ...): its training split's images, labels dropped. The images must
  have the training data's shape [C, H, W] and lie in [0, 1].

:func:`generated_ood` (the digits' OOD set; Lee et al. use 80M-TinyImages for CIFAR, which has no 8x8
analogue, so this set is ours): four families in equal expectation, each image's family, placement and
contrast drawn from ``numpy.random.default_rng(seed)``, so one seed gives one set on every machine:

1. *letters*: one of eight capital letters drawn as 6x6 strokes (A, H, K, M, N, V, W, X: shapes with no
   closed loop of a 0 / 6 / 8 / 9 and not a single bar like a 1), shifted by up to 2 pixels, with a
   random intensity in [0.6, 1] and half the time softened by a 3x3 box blur;
2. *noise textures*: uniform noise box-blurred once or twice and stretched to [0, 1];
3. *gratings*: a sinusoidal grating of random orientation, frequency (1.5 to 3 cycles per image) and
   phase, contrast in [0.5, 1];
4. *checkerboards / blobs*: a checkerboard of cell 1 or 2 pixels, or a filled disc of radius 1.5 to 3.5
   pixels at a random centre (a blob: no stroke structure).

Images larger than 8x8 scale the letters by ``min(H, W) // 8``; every channel is the same image."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from . import _checks

__all__ = ["DIGITS_OOD_SIZE", "OOD_GENERATED", "generated_ood", "load_ood"]

#: The size of the generated OOD set when the spec gives none (the digits' training set's size).
DIGITS_OOD_SIZE = 1437
#: The spec name of the generated set.
OOD_GENERATED = "digits-ood"

_LETTERS = {
    "A": ("..##..", ".#..#.", "#....#", "######", "#....#", "#....#"),
    "H": ("#....#", "#....#", "######", "#....#", "#....#", "#....#"),
    "K": ("#...#.", "#..#..", "###...", "#..#..", "#...#.", "#....#"),
    "M": ("#....#", "##..##", "#.##.#", "#....#", "#....#", "#....#"),
    "N": ("#....#", "##...#", "#.#..#", "#..#.#", "#...##", "#....#"),
    "V": ("#....#", "#....#", "#....#", ".#..#.", ".#..#.", "..##.."),
    "W": ("#....#", "#....#", "#....#", "#.##.#", "##..##", "#....#"),
    "X": ("#....#", ".#..#.", "..##..", "..##..", ".#..#.", "#....#"),
}
_GLYPHS = np.stack([np.array([[c == "#" for c in row] for row in g], dtype=np.float64) for g in _LETTERS.values()])


def _box_blur(img: np.ndarray) -> np.ndarray:
    """3x3 mean filter with edge replication."""
    p = np.pad(img, 1, mode="edge")
    h, w = img.shape
    return sum(p[i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0


def _stretch(img: np.ndarray) -> np.ndarray:
    lo, hi = img.min(), img.max()
    return (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)


def _letter(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    s = max(1, min(h, w) // 8)
    g = np.kron(_GLYPHS[rng.integers(len(_GLYPHS))], np.ones((s, s)))
    img = np.zeros((h, w))
    dy, dx = rng.integers(0, h - g.shape[0] + 1), rng.integers(0, w - g.shape[1] + 1)
    img[dy:dy + g.shape[0], dx:dx + g.shape[1]] = g * rng.uniform(0.6, 1.0)
    return _box_blur(img) * 1.5 if rng.random() < 0.5 else img


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    img = rng.random((h, w))
    for _ in range(1 + rng.integers(2)):
        img = _box_blur(img)
    return _stretch(img)


def _grating(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    theta, freq, phase = rng.uniform(0, np.pi), rng.uniform(1.5, 3.0), rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)) + phase)
    c = rng.uniform(0.5, 1.0)
    return 0.5 + c * (wave - 0.5)


def _checker_or_blob(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    if rng.random() < 0.5:
        cell = 1 + rng.integers(2)
        return (((yy // cell) + (xx // cell)) % 2).astype(np.float64) * rng.uniform(0.6, 1.0)
    r = rng.uniform(1.5, 3.5) * max(1, min(h, w) // 8)
    cy, cx = rng.uniform(0, h - 1), rng.uniform(0, w - 1)
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.float64) * rng.uniform(0.6, 1.0)


_FAMILIES = (_letter, _texture, _grating, _checker_or_blob)


def generated_ood(n: int, seed: int = 0, image_shape: Sequence[int] = (1, 8, 8)) -> torch.Tensor:
    """n generated OOD images (the families of the module's docstring), float32 [n, C, H, W] in [0, 1],
    the same for the same (n, seed, image_shape). image_shape: (C, H, W) with H, W >= 6."""
    n = _checks.check_int(n, "n", 1)
    if isinstance(seed, bool) or not _checks.is_int(seed):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    shape = tuple(int(s) for s in image_shape)
    if len(shape) != 3 or shape[0] < 1 or shape[1] < 6 or shape[2] < 6:
        raise ValueError(f"image_shape must be (C, H, W) with C >= 1 and H, W >= 6, got {list(image_shape)}")
    c, h, w = shape
    rng = np.random.default_rng(int(seed))
    out = np.empty((n, h, w), dtype=np.float32)
    for i in range(n):
        out[i] = np.clip(_FAMILIES[rng.integers(len(_FAMILIES))](rng, h, w), 0.0, 1.0)
    return torch.from_numpy(out).unsqueeze(1).expand(n, c, h, w).contiguous()


def load_ood(spec: str, image_shape: Optional[Sequence[int]] = None, seed: int = 0) -> torch.Tensor:
    """The OOD images of a spec (see the module's docstring), float32 [N, C, H, W] in [0, 1].
    image_shape: the training data's (C, H, W): the generated set is made at it, a dataset's images
    must have it (a ValueError naming the spec otherwise). seed: the generated set's seed."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"ood_data must be a non-empty dataset spec string, got {spec!r}")
    name, sep, rest = spec.partition(":")
    if name.lower() == OOD_GENERATED:
        if sep and not (rest.isdigit() and int(rest) >= 1):
            raise ValueError(f"ood_data {spec!r}: expected {OOD_GENERATED!r} or '{OOD_GENERATED}:N' with N an int "
                             f">= 1 (the number of images)")
        n = int(rest) if sep else DIGITS_OOD_SIZE
        return generated_ood(n, seed, (1, 8, 8) if image_shape is None else image_shape)
    from .data import get_dataset
    from .proxy import as_tensors, check_images

    try:
        ds, _ = get_dataset(spec, "train")
    except (FileNotFoundError, KeyError, ValueError, OSError) as e:
        raise ValueError(f"ood_data {spec!r}: {e}") from None
    x, _ = as_tensors(ds, f"ood_data {spec!r}")
    x = x.float()
    if image_shape is not None and tuple(x.shape[1:]) != tuple(int(s) for s in image_shape):
        raise ValueError(f"ood_data {spec!r}: images have shape {list(x.shape[1:])}, the training data "
                         f"{list(image_shape)}")
    check_images(x, f"ood_data {spec!r}", 0.0, 1.0)
    return x.contiguous()
