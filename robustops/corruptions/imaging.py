"""Image helpers the weather and digital corruptions share, written to the border and rounding rules of
the libraries make_cifar_c.py calls (scipy / skimage, OpenCV, PIL), on batches of any device."""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = ["border_index", "pad2d", "filter_sep", "gaussian_smooth", "box_blur", "luma", "bilinear_resize",
           "pil_box_matrix", "pil_box_resize", "clipped_zoom"]


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
    B, C, H, W = x.shape
    ph, pw = kh.numel() // 2, kw.numel() // 2
    y = pad2d(x.reshape(B * C, 1, H, W), ph, pw, mode)
    y = F.conv2d(y, kh.to(x).view(1, 1, -1, 1))
    y = F.conv2d(y, kw.to(x).view(1, 1, 1, -1))
    return y.reshape(B, C, H, W)


def gaussian_smooth(x: torch.Tensor, sigma: float, truncate: float = 4.0, mode: str = "nearest") -> torch.Tensor:
    """skimage.filters.gaussian / scipy.ndimage.gaussian_filter of each [H, W] plane of x [B, C, H, W]:
    radius int(truncate * sigma + 0.5), normalised kernel, borders by ``mode``; sigma <= 0: x."""
    if sigma <= 0:
        return x
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


def bilinear_resize(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """scipy.ndimage.zoom(order=1) of x [B, C, h, w] to ``size``: output corners on input corners."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def clipped_zoom(x: torch.Tensor, z: float) -> torch.Tensor:
    """make_cifar_c.py's clipped_zoom of x [B, C, H, W]: the central ceil(H / z) x ceil(W / z) crop,
    zoomed by z (scipy zoom, order 1, output size round(crop * z)), trimmed back to H x W around the
    centre."""
    H, W = x.shape[-2:]
    ch, cw = int(math.ceil(H / z)), int(math.ceil(W / z))
    top, left = (H - ch) // 2, (W - cw) // 2
    crop = x[..., top:top + ch, left:left + cw]
    y = bilinear_resize(crop, (max(1, int(round(ch * z))), max(1, int(round(cw * z)))))
    th, tw = max(0, (y.shape[-2] - H) // 2), max(0, (y.shape[-1] - W) // 2)
    return y[..., th:th + H, tw:tw + W]


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
