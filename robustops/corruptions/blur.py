"""The blur family: defocus, glass, motion, zoom and Gaussian blur, with CIFAR-10-C's per-severity
constants (Hendrycks & Dietterich 2019, ``make_cifar_c.py``; the ImageNet-C values of the
``imagecorruptions`` package are quoted beside each table, and the tests swap them in to compare).

The size rule is base's :func:`~robustops.corruptions.base.pixel_width`: CIFAR-10-C's defocus, glass and
Gaussian blurs are at the pixel scale (radii 0.3-1.5, sigmas 0.05-1, moves of 1 pixel), so the 8 x 8
digits get them unchanged: scaling them by 1/4 would make every severity invisible (a Gaussian of sigma
0.1 moves e^-50 of a pixel's mass); motion blur's longer kernels do shrink. Zoom factors are ratios, not
widths. The Gaussian filter, the motion kernel and the zoom are imaging's (one implementation each).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from .._checks import LazyModule
from .base import SampleRNG, pixel_width, register, size_scale
from .imaging import clipped_zoom, gaussian_smooth, motion_smear

KF = LazyModule("kornia.filters", "the defocus blur corruption")  # imported at first use

__all__ = ["DEFOCUS_BLUR", "GLASS_BLUR", "MOTION_BLUR", "ZOOM_BLUR", "GAUSSIAN_BLUR", "disk_kernel", "glass_sources",
           "zoom_factors", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur", "gaussian_blur"]

#: (disk radius, anti-aliasing sigma) per severity (CIFAR-10-C; ImageNet-C: (3, .1), (4, .5), (6, .5),
#: (8, .5), (10, .5))
DEFOCUS_BLUR = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1))
#: (sigma, largest move, passes) per severity (CIFAR-10-C; ImageNet-C: (.7, 1, 2), (.9, 2, 1), (1, 2, 3),
#: (1.1, 3, 2), (1.5, 4, 2))
GLASS_BLUR = ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2))
#: (radius, sigma) of ImageMagick's motion blur per severity (CIFAR-10-C; ImageNet-C: (10, 3), (15, 5),
#: (15, 8), (15, 12), (20, 15))
MOTION_BLUR = ((6, 1.0), (6, 1.5), (6, 2.0), (8, 2.0), (9, 2.5))
#: zoom factors np.arange(start, stop, step) per severity (CIFAR-10-C; ImageNet-C: (1, 1.11, .01),
#: (1, 1.16, .01), (1, 1.21, .02), (1, 1.26, .02), (1, 1.31, .03))
ZOOM_BLUR = ((1, 1.06, 0.01), (1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.01), (1, 1.26, 0.01))
#: sigma per severity (CIFAR-10-C; ImageNet-C: 1, 2, 3, 4, 6)
GAUSSIAN_BLUR = (0.4, 0.6, 0.7, 0.8, 1.0)


def disk_kernel(radius: float, alias_blur: float) -> torch.Tensor:
    """The defocus kernel of make_cifar_c.py's ``disk``: the aliased disk X^2 + Y^2 <= radius^2 on the
    grid -8..8 (-ceil(radius)..ceil(radius) past radius 8), normalised, then smoothed by a 3 x 3 (5 x 5
    past radius 8) Gaussian of sigma alias_blur with OpenCV's default reflect-101 edges, as
    ``cv2.GaussianBlur`` does; cropped to its support (only zeros go: the disk reaches floor(radius)). Returns Tensor[K, K], sum 1.
    (The reference's grid past radius 8 is np.arange(-radius, radius + 1), off-centre for a fractional
    radius; an integer grid is used instead.)"""
    g = 8 if radius <= 8 else int(math.ceil(radius))
    k = 3 if radius <= 8 else 5
    L = torch.arange(-g, g + 1, dtype=torch.float64)
    disk = ((L[:, None] ** 2 + L[None, :] ** 2) <= radius ** 2).to(torch.float32)
    disk /= disk.sum()
    t = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
    taps = torch.exp(-t ** 2 / (2.0 * alias_blur ** 2))
    taps = (taps / taps.sum()).to(torch.float32)[None]
    kern = KF.filter2d_separable(disk[None, None], taps, taps, border_type="reflect")[0, 0]
    half = min(g, int(math.floor(radius)) + k // 2)
    return kern[g - half:g + half + 1, g - half:g + half + 1].contiguous()


@register("defocus_blur")
def defocus_blur(x: torch.Tensor, severity: int, rng: SampleRNG) -> torch.Tensor:
    """clip(x * disk_kernel(r, a), 0, 1), (r, a) = DEFOCUS_BLUR[severity - 1], both through pixel_width
    (so unchanged under 32 pixels: CIFAR's disks are at most 3 x 3), each channel filtered with
    reflect-101 edges as ``cv2.filter2D``. Deterministic."""
    r, a = DEFOCUS_BLUR[severity - 1]
    kern = disk_kernel(pixel_width(r, x), pixel_width(a, x))
    H, W = x.shape[-2:]
    h = kern.shape[0] // 2
    y = torch.nn.functional.pad(x, (h, h, h, h), mode="reflect")
    # shifted adds over the kernel's taps (at most 25 at CIFAR's radii): ~2x kornia's filter2d on the CPU
    out = sum(float(w) * y[..., i:i + H, j:j + W] for (i, j), w in np.ndenumerate(kern.numpy()) if w != 0)
    return out.clamp_(0.0, 1.0)


def glass_sources(moves: np.ndarray, H: int, W: int, delta: int) -> np.ndarray:
    """Where each pixel ends up taking its value from after make_cifar_c.py's pixel loop, for a batch.

    moves: int array [B, passes, P, 2] of (dx, dy) in [-delta, delta), one per visited position in the
    loop's order (rows H - delta down to delta + 1, in each row columns W - delta down to delta + 1,
    P = (H - 2 delta) (W - 2 delta)). Returns int64 [B, H * W]: flat source index of each pixel.

    The reference writes ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` on an H x W x 3 array, where both
    sides are numpy views: the first assignment overwrites x[h, w] and the second writes it back, so
    the 'swap' is the copy x[h, w] <- x[h', w'] (a true swap only on 2-D grey arrays). CIFAR-10-C was
    made with that copy; it is reproduced here for every channel count, sequentially (a later position
    may copy an earlier one's new value), batched over the samples."""
    B = moves.shape[0]
    src = np.tile(np.arange(H * W, dtype=np.int64), (B, 1))
    ar = np.arange(B)
    hs = np.arange(H - delta, delta, -1)
    ws = np.arange(W - delta, delta, -1)
    pos = (hs[:, None] * W + ws[None, :]).reshape(-1)
    for it in range(moves.shape[1]):
        step = moves[:, it, :, 1].astype(np.int64) * W + moves[:, it, :, 0]
        for j, p in enumerate(pos):
            src[:, p] = src[ar, p + step[:, j]]
    return src


@register("glass_blur")
def glass_blur(x: torch.Tensor, severity: int, rng: SampleRNG) -> torch.Tensor:
    """make_cifar_c.py's glass blur: v = floor(255 gaussian_smooth(x, sigma)) / 255 (its np.uint8
    truncation, 1e-3 of a level allowed for rounding error), then ``passes`` sweeps of the pixel loop
    (:func:`glass_sources`: each visited pixel copies the one (dx, dy) away, dx, dy uniform integers in
    [-delta, delta): numpy's randint excludes delta, so moves lean up and left as in the release), then
    clip(gaussian_smooth(., sigma), 0, 1). (sigma, delta, passes) = GLASS_BLUR[severity - 1]; sigma
    through pixel_width, delta = max(1, round(pixel_width(delta))), passes unchanged.

    Batched: the moves are drawn per sample on its generator (shape [passes, P, 2]); the sequential
    loop runs once over positions on index arrays for the whole batch (numpy, on the CPU, so every
    device sees the same permutation) and the pixels move in one gather. Same outputs as the
    reference for the same moves (tested against its loop). CIFAR-10-C's severities 2 -> 3 and
    4 -> 5 change only sigma, whose second blur smooths the moved pixels back toward the image: mean
    |x' - x| falls by about 1% there on smooth 32 x 32 images, for the reference as here."""
    sigma, delta, passes = GLASS_BLUR[severity - 1]
    sigma = pixel_width(sigma, x)
    delta = max(1, int(round(pixel_width(delta, x))))
    B, C, H, W = x.shape
    v = torch.floor(gaussian_smooth(x, sigma).clamp_(0.0, 1.0) * 255.0 + 1e-3) / 255.0
    P = max(H - 2 * delta, 0) * max(W - 2 * delta, 0)
    moves = torch.stack([torch.randint(-delta, delta, (passes, P, 2), generator=rng.generator(b))
                         for b in range(B)]).numpy()
    src = torch.from_numpy(glass_sources(moves, H, W, delta)).to(x.device)
    v = v.reshape(B, C, H * W).gather(2, src[:, None].expand(B, C, H * W)).reshape(B, C, H, W)
    return gaussian_smooth(v, sigma).clamp_(0.0, 1.0)


@register("motion_blur")
def motion_blur(x: torch.Tensor, severity: int, rng: SampleRNG) -> torch.Tensor:
    """imaging.motion_smear (ImageMagick's one-sided kernel; a tap outside the image reads the edge, as
    ImageMagick's edge virtual pixels do, not the ``imagecorruptions`` replica's early stop), clipped to
    [0, 1]; the angle is uniform in [-45, 45) degrees per sample. (radius, sigma) = MOTION_BLUR[severity
    - 1], both through pixel_width (8 x 8: radius 2.6-3.4, sigma 1-1.75). The output is not rounded to 8
    bits (Wand's PNG round trip is). CIFAR's severities 3 and 4 differ only by taps of weight < 0.3%."""
    radius, sigma = MOTION_BLUR[severity - 1]
    angle = rng.uniform(low=-45.0, high=45.0)
    return motion_smear(x, pixel_width(radius, x), pixel_width(sigma, x), angle).clamp_(0.0, 1.0)


def zoom_factors(severity: int) -> Sequence[float]:
    """The zoom factors of a severity: np.arange over ZOOM_BLUR[severity - 1], as the reference."""
    return [float(z) for z in np.arange(*ZOOM_BLUR[severity - 1])]


@register("zoom_blur")
def zoom_blur(x: torch.Tensor, severity: int, rng: SampleRNG) -> torch.Tensor:
    """clip((x + sum_z zoom_z(x)) / (len(factors) + 1), 0, 1) over :func:`zoom_factors` (centre zooms,
    imaging.clipped_zoom). Deterministic. On images of 32
    pixels and more the reference's geometry (whole-pixel crop, ``exact=True``); under 32
    the continuous zoom, since the whole-pixel crop of an 8-pixel side is the identity for every factor
    under 8/7 (severities 1-2) and off centre above."""
    exact = size_scale(x) >= 1.0
    out = x.clone()
    factors = zoom_factors(severity)
    for z in factors:
        out += clipped_zoom(x, z, exact)
    return (out / (len(factors) + 1)).clamp_(0.0, 1.0)


@register("gaussian_blur")
def gaussian_blur(x: torch.Tensor, severity: int, rng: SampleRNG) -> torch.Tensor:
    """clip(imaging.gaussian_smooth(x, sigma), 0, 1) (scipy's kernel truncated at 4 sigma, edges
    replicated, as skimage's filters.gaussian), sigma = pixel_width(GAUSSIAN_BLUR[severity - 1])
    (unchanged under 32 pixels). Deterministic."""
    return gaussian_smooth(x, pixel_width(GAUSSIAN_BLUR[severity - 1], x)).clamp_(0.0, 1.0)
