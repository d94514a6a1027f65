"""Image helpers the corruptions share (one implementation of each: the Gaussian filter, the motion-blur
kernel, the centre zoom), written to the border and rounding rules of the libraries make_cifar_c.py
calls (scipy / skimage, OpenCV, PIL, ImageMagick), on batches of any device."""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np
import torch

__all__ = ["border_index", "pad2d", "filter_sep", "gaussian_smooth", "box_blur", "luma", "pil_box_matrix",
           "pil_box_resize", "zoom_matrix", "clipped_zoom", "motion_offsets", "motion_smear"]


def border_index(n: int, p: int, mode: str, device=None) -> torch.Tensor:
    """Indices of a length-n axis padded by p on both sides. mode: "symmetric" (scipy's and skimage's
    "reflect": d c b a | a b c d), "reflect101" (OpenCV's default and torch's "reflect": d c b | a b c
    d), "nearest" (a a a | a b c d); works for any p, also p >= n."""
    i = torch.arange(-p, n + p, device=device)
    if mode == "nearest":
        return i.clamp(0, n - 1)
    if mode == "symmetric":
        j = i.remainder(2 * n)
        return torch.where(j >= n, 2 * n - 1 - j, j)
    if mode == "reflect101":
        if n == 1:
            return torch.zeros_like(i)
        j = i.remainder(2 * n - 2)
        return torch.where(j >= n, 2 * n - 2 - j, j)
    raise ValueError(f"mode must be 'symmetric', 'reflect101' or 'nearest', got {mode!r}")


def pad2d(x: torch.Tensor, ph: int, pw: int, mode: str) -> torch.Tensor:
    """x [..., H, W] padded by ph rows and pw columns on each side with border_index's mode."""
    hi = border_index(x.shape[-2], ph, mode, x.device)
    wi = border_index(x.shape[-1], pw, mode, x.device)
    return x.index_select(-2, hi).index_select(-1, wi)


def filter_sep(x: torch.Tensor, kh: torch.Tensor, kw: torch.Tensor, mode: str) -> torch.Tensor:
    """Separable correlation of x [B, C, H, W] with the odd 1-D kernels kh (rows) and kw (columns),
    borders by ``mode`` (see border_index)."""
    H, W = x.shape[-2:]
    y = pad2d(x, kh.numel() // 2, kw.numel() // 2, mode)
    # shifted adds rather than conv2d: the same taps, ~4x faster on the CPU, where torch's one-channel
    # conv2d is slow for these short kernels
    y = sum(w * y[..., i:i + H, :] for i, w in enumerate(kh.tolist()))
    return sum(w * y[..., i:i + W] for i, w in enumerate(kw.tolist()))


def gaussian_smooth(x: torch.Tensor, sigma: float, truncate: float = 4.0, mode: str = "nearest") -> torch.Tensor:
    """skimage.filters.gaussian / scipy.ndimage.gaussian_filter of each [H, W] plane of x [B, C, H, W]:
    radius int(truncate * sigma + 0.5), normalised kernel, borders by ``mode`` (the default "nearest"
    replicates the edge, as skimage's gaussian); sigma <= 0: a copy of x."""
    if sigma <= 0:
        return x.clone()
    r = int(truncate * sigma + 0.5)
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).float()
    return filter_sep(x, k, k, mode)


def box_blur(x: torch.Tensor, size: int = 3) -> torch.Tensor:
    """cv2.blur(x, (size, size)): the normalised box filter, OpenCV's reflect-101 border."""
    k = torch.full((size,), 1.0 / size)
    return filter_sep(x, k, k, "reflect101")


def luma(x: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W]: ITU-R 601 luma (0.299 R + 0.587 G + 0.114 B; cv2 RGB2GRAY, PIL "L") of RGB x, or x
    itself when it has one channel."""
    if x.shape[1] == 1:
        return x
    w = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def pil_box_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """[n_out, n_in]: the weights of PIL's resample with the BOX filter along one axis
    (Resample.c's precompute_coeffs: support 0.5 * max(scale, 1), box(x) = 1 on (-0.5, 0.5]), float64."""
    scale = n_in / n_out
    fscale = max(scale, 1.0)
    support = 0.5 * fscale
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for o in range(n_out):
        center = (o + 0.5) * scale
        lo, hi = max(0, int(center - support + 0.5)), min(n_in, int(center + support + 0.5))
        for i in range(lo, hi):
            t = (i - center + 0.5) / fscale
            m[o, i] = 1.0 if -0.5 < t <= 0.5 else 0.0
        s = m[o].sum()
        if s > 0:
            m[o] /= s
    return m


def pil_box_resize(x: torch.Tensor, size: Tuple[int, int], quantize: bool = True) -> torch.Tensor:
    """PIL's ``Image.resize(size[::-1], Image.BOX)`` of x [B, C, H, W] in [0, 1]: the horizontal pass,
    then the vertical one, each rounded to 8 bits as PIL does on uint8 images when ``quantize``."""
    H, W = x.shape[-2:]
    h, w = size
    y = x
    if w != W:
        y = y @ pil_box_matrix(W, w).to(x).t()
        y = torch.round(y * 255) / 255 if quantize else y
    if h != H:
        y = pil_box_matrix(H, h).to(x) @ y
        y = torch.round(y * 255) / 255 if quantize else y
    return y


def zoom_matrix(n: int, z: float, exact: bool = True) -> torch.Tensor:
    """Tensor[n, n]: row o holds the linear-interpolation weights of output o of one axis zoomed by z
    about the centre. exact: make_cifar_c.py's ``clipped_zoom`` -- crop ch = ceil(n / z) from
    top = (n - ch) // 2, ``scipy.ndimage.zoom(order=1)`` to out = round(ch z) samples (input
    coordinate o (ch - 1) / (out - 1)), keep out[trim:trim + n], trim = (out - n) // 2. Otherwise the
    continuous zoom, coordinate (n - 1) / 2 + (o - (n - 1) / 2) / z."""
    o = np.arange(n, dtype=np.float64)
    if exact:
        ch = int(math.ceil(n / z))
        out = int(round(ch * z))
        top, trim = (n - ch) // 2, (out - n) // 2
        coord = top + (o + trim) * ((ch - 1) / (out - 1) if out > 1 else 0.0)
    else:
        coord = (n - 1) / 2 + (o - (n - 1) / 2) / z
    coord = np.clip(coord, 0.0, n - 1)
    i0 = np.minimum(np.floor(coord).astype(np.int64), n - 1)
    f = coord - i0
    m = np.zeros((n, n))
    m[np.arange(n), i0] += 1.0 - f
    i1 = np.minimum(i0 + 1, n - 1)
    m[np.arange(n), i1] += f
    return torch.from_numpy(m).float()


def clipped_zoom(x: torch.Tensor, z: float, exact: bool = True) -> torch.Tensor:
    """make_cifar_c.py's clipped_zoom of x [B, C, H, W] by z >= 1 (the central ceil(H / z) x ceil(W / z)
    crop, scipy zoom order 1, trimmed back to H x W around the centre): zoom_matrix(H) x zoom_matrix(W)^T
    per plane (dense: BLAS beats two-tap gathers, ~2.5x on the CPU). exact=False: the continuous zoom."""
    H, W = x.shape[-2:]
    return zoom_matrix(H, z, exact).to(x) @ x @ zoom_matrix(W, z, exact).to(x).T


def motion_offsets(radius: float, sigma: float, angle: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """ImageMagick's MotionBlurImage kernel (what make_cifar_c.py calls through Wand): width
    T = 2 ceil(radius) + 1 taps, weights exp(-i^2 / (2 sigma^2)) normalised (i = 0..T-1: one-sided,
    the blur trails from the pixel), tap i read at (row, col) offset (ceil(i sin a - 0.5),
    ceil(i cos a - 0.5)) for the angle a in degrees. angle: Tensor[B]. Returns (weights Tensor[T],
    offsets int64 Tensor[B, T, 2])."""
    T = 2 * int(math.ceil(radius)) + 1
    i = torch.arange(T, dtype=torch.float64)
    w = torch.exp(-i ** 2 / (2.0 * sigma ** 2))
    a = torch.deg2rad(angle.detach().cpu().double())[:, None]
    off = torch.stack([torch.ceil(i * torch.sin(a) - 0.5), torch.ceil(i * torch.cos(a) - 0.5)], dim=-1)
    return (w / w.sum()).float(), off.long()


def motion_smear(x: torch.Tensor, radius: float, sigma: float, angle: torch.Tensor) -> torch.Tensor:
    """sum_i w_i x[y + dy_i, x + dx_i] of x [B, C, H, W] with :func:`motion_offsets` (angle: Tensor[B]
    in degrees, per sample), not clipped. The one border rule: a tap outside the image reads the
    nearest edge pixel, as ImageMagick's edge virtual pixels do (imagecorruptions' replica instead stops
    summing once a tap leaves the image, dropping the remaining weight; with CIFAR-10-C's radii that
    happens only on images under 32 pixels)."""
    w, off = motion_offsets(radius, sigma, angle)
    B, C, H, W = x.shape
    off = off.to(x.device)
    rows = torch.arange(H, device=x.device)
    cols = torch.arange(W, device=x.device)
    flat = x.reshape(B, C, H * W)
    out = torch.zeros_like(flat)
    for i in range(w.numel()):
        r = (rows[None, :] + off[:, i, :1]).clamp_(0, H - 1)
        c = (cols[None, :] + off[:, i, 1:]).clamp_(0, W - 1)
        idx = (r[:, :, None] * W + c[:, None, :]).reshape(B, 1, H * W).expand(B, C, H * W)
        out += float(w[i]) * flat.gather(2, idx)
    return out.reshape(B, C, H, W)
