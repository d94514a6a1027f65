"""The digital family: brightness, contrast, elastic transform, pixelate, JPEG compression and the extra
saturate, with CIFAR-10-C's per-severity constants (Hendrycks & Dietterich 2019, make_cifar_c.py).

Colour on grey (C = 1) images: brightness adds c to the grey level (HSV V of a grey pixel is the pixel);
contrast works per channel either way; saturate is the IDENTITY on grey images (imagecorruptions'
reading: replicate to RGB, change S, read back the red channel; a grey pixel has hue 0 and its red
channel equals V whatever S becomes); JPEG codes the replicated RGB image and returns its ITU-R 601 luma
(PIL's convert("RGB") ... convert("L")).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import optional_import
from .base import SampleRNG, register, size_scale
from .imaging import gaussian_smooth, luma, pil_box_resize

__all__ = ["BRIGHTNESS", "CONTRAST", "SATURATE", "JPEG_QUALITY", "PIXELATE", "ELASTIC", "brightness", "contrast",
           "saturate", "jpeg_compression", "pixelate", "elastic_transform", "hsv_value_shift", "hsv_saturation"]

#: added to HSV's V (ImageNet-C: .1, .2, .3, .4, .5)
BRIGHTNESS = (0.05, 0.1, 0.15, 0.2, 0.3)
#: factor on the deviation from the per-channel mean (ImageNet-C: .4, .3, .2, .1, .05)
CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)
#: (factor, offset) on HSV's S (ImageNet-C: (.3, 0), (.1, 0), (2, 0), (5, .1), (20, .2))
SATURATE = ((0.3, 0.0), (0.1, 0.0), (1.5, 0.0), (2.0, 0.1), (2.5, 0.2))
#: JPEG quality (ImageNet-C: 25, 18, 15, 10, 7)
JPEG_QUALITY = (80, 65, 58, 50, 40)
#: side ratio of the box-downsampled image (ImageNet-C: .6, .5, .4, .3, .25)
PIXELATE = (0.95, 0.9, 0.85, 0.75, 0.65)
#: (displacement scale, displacement smoothing sigma, affine jitter), in units of the 32-pixel side
ELASTIC = ((0.0, 0.0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03))


def hsv_value_shift(x: torch.Tensor, c: float) -> torch.Tensor:
    """skimage's rgb2hsv -> V = clip(V + c, 0, 1) -> hsv2rgb in closed form: H and S kept, so each
    pixel is scaled by V' / V (a black pixel, S = 0, becomes grey V'). Works for C = 1 (V = x)."""
    v = x.amax(1, keepdim=True)
    v2 = (v + c).clamp(0.0, 1.0)
    return torch.where(v > 0, x * (v2 / v.clamp_min(1e-12)), v2.expand_as(x))


def hsv_saturation(x: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """skimage's rgb2hsv -> S = clip(S * a + b, 0, 1) -> hsv2rgb of RGB x in closed form: H and V
    kept, channel = V - S' V (V - channel) / (V - min); a grey pixel (hue 0 in skimage) becomes
    (V, V (1 - S'), V (1 - S'))."""
    v, m = x.amax(1, keepdim=True), x.amin(1, keepdim=True)
    s = torch.where(v > 0, (v - m) / v.clamp_min(1e-12), torch.zeros_like(v))
    s2 = (s * a + b).clamp(0.0, 1.0)
    coloured = v - s2 * v * (v - x) / (v - m).clamp_min(1e-12)
    grey = torch.cat([v, v * (1 - s2), v * (1 - s2)], 1)
    return torch.where(v > m, coloured, grey)


@register("brightness")
def brightness(x: torch.Tensor, severity: int, rng: SampleRNG) -> torch.Tensor:
    """HSV V + c, c = BRIGHTNESS[severity - 1] (grey: x + c), clipped to [0, 1]."""
    return hsv_value_shift(x, BRIGHTNESS[severity - 1]).clamp_(0.0, 1.0)


@register("contrast")
def contrast(x: torch.Tensor, severity: int, rng: SampleRNG) -> torch.Tensor:
    """(x - mean) c + mean, mean per image and channel, c = CONTRAST[severity - 1], clipped."""
    mean = x.mean((2, 3), keepdim=True)
    return ((x - mean) * CONTRAST[severity - 1] + mean).clamp_(0.0, 1.0)


@register("saturate")
def saturate(x: torch.Tensor, severity: int, rng: SampleRNG) -> torch.Tensor:
    """HSV S a + b, (a, b) = SATURATE[severity - 1], clipped; the identity on grey images (see the
    module docstring)."""
    if x.shape[1] == 1:
        return x.clone()
    a, b = SATURATE[severity - 1]
    return hsv_saturation(x, a, b).clamp_(0.0, 1.0)


@register("pixelate")
def pixelate(x: torch.Tensor, severity: int, rng: SampleRNG) -> torch.Tensor:
    """make_cifar_c.py's pixelate: PIL BOX resize to int(side * c) (c = PIXELATE[severity - 1], a ratio,
    so no size scaling), then PIL BOX resize back, each pass rounded to 8 bits as PIL does on uint8
    images (equal to PIL's output on 8-bit inputs up to 1/255: PIL's fixed-point weights).
    imagecorruptions (ImageNet-C) resizes back with NEAREST instead. The int() of the release is kept on
    small images, so severities can coincide there: on the 8 x 8 digits int(8 c) = 7, 7, 6, 6, 5, i.e.
    severities 1 and 2 are the same corruption, as are 3 and 4 (on 32 x 32: 30, 28, 27, 24, 20, all
    distinct)."""
    H, W = x.shape[-2:]
    c = PIXELATE[severity - 1]
    small = pil_box_resize(x, (max(1, int(H * c)), max(1, int(W * c))))
    return pil_box_resize(small, (H, W)).clamp_(0.0, 1.0)


@register("jpeg_compression")
def jpeg_compression(x: torch.Tensor, severity: int, rng: SampleRNG) -> torch.Tensor:
    """JPEG coding at quality JPEG_QUALITY[severity - 1] with kornia.enhance.jpeg_codec_differentiable
    (Reich et al. 2024: the IJG tables scaled by quality, 4:2:0 chroma, 8 x 8 DCT; its rounding is
    x + (x - round x)^3 rather than a hard round, and its chroma up-sampling is not libjpeg's
    "fancy" one), on the 8-bit input. Against PIL's libjpeg at CIFAR's qualities on 32 x 32 images:
    mean absolute difference 1 to 1.6 / 255, maximum about 20 / 255 (the test bounds them by 2.5 / 255 and
    32 / 255). Grey: the replicated RGB image is coded and its luma returned."""
    jpeg_codec_differentiable = optional_import("kornia.enhance", "jpeg_compression").jpeg_codec_differentiable

    x8 = torch.round(x * 255) / 255
    rgb = x8.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x8
    q = torch.full((x.shape[0],), float(JPEG_QUALITY[severity - 1]), device=x.device)
    out = jpeg_codec_differentiable(rgb.contiguous(), q).clamp(0.0, 1.0)
    return (luma(out) if x.shape[1] == 1 else out).clamp_(0.0, 1.0)


def _affine_inverse_grid(pts1: torch.Tensor, pts2: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """[B, H, W, 2] normalised source coordinates of cv2.warpAffine(M) where M maps pts1 to pts2
    ([B, 3, 2] points, (x, y)), for grid_sample with align_corners=True."""
    B = pts1.shape[0]
    ones = torch.ones(B, 3, 1, dtype=torch.float64, device=pts1.device)
    # dst = M src  <=>  src = M^-1 dst: solve for the affine map pts2 -> pts1 directly
    A = torch.cat([pts2.double(), ones], 2)
    inv = torch.linalg.solve(A, pts1.double())                     # [B, 3, 2]: [x y 1] @ inv = src
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float64, device=pts1.device),
                            torch.arange(W, dtype=torch.float64, device=pts1.device), indexing="ij")
    dst = torch.stack([xs, ys, torch.ones_like(xs)], -1).view(1, H * W, 3).expand(B, -1, -1)
    src = torch.bmm(dst, inv).view(B, H, W, 2)
    scale = torch.tensor([2.0 / max(W - 1, 1), 2.0 / max(H - 1, 1)], dtype=torch.float64, device=pts1.device)
    return (src * scale - 1.0).float()


@register("elastic_transform")
def elastic_transform(x: torch.Tensor, severity: int, rng: SampleRNG) -> torch.Tensor:
    """make_cifar_c.py's elastic transform: (1) a random affine map (cv2.getAffineTransform of three
    points around the centre, square_size = min(H, W) // 3 away, each jittered by U(-c2, c2) pixels),
    bilinear with OpenCV's reflect-101 border (grid_sample, reflection, align_corners=True); (2) a
    displacement field dx, dy = gaussian(U(-1, 1), sigma = c1, skimage "reflect", truncate 3) * c0
    sampled bilinearly (scipy map_coordinates order 1; its "reflect" border is grid_sample's
    reflection with align_corners=False). (c0, c1, c2) = ELASTIC[severity - 1] * min(H, W), i.e.
    CIFAR's IMSIZE * ratio with IMSIZE the image side (32 for CIFAR: the size rule)."""
    B, C, H, W = x.shape
    c0, c1, c2 = (v * 32 * size_scale(x) for v in ELASTIC[severity - 1])
    cy, cx, sq = H // 2, W // 2, min(H, W) // 3
    # make_cifar_c builds the points in (row, col) order and cv2 reads them as (x, y): kept as written
    pts1 = torch.tensor([[cy + sq, cx + sq], [cy + sq, cx - sq], [cy - sq, cx - sq]], dtype=torch.float64)
    pts1 = pts1.to(x.device).expand(B, 3, 2)
    pts2 = pts1 + rng.uniform(3, 2, low=-c2, high=c2).double()
    y = F.grid_sample(x, _affine_inverse_grid(pts1, pts2, H, W), mode="bilinear", padding_mode="reflection",
                      align_corners=True)
    field = rng.uniform(2, H, W, low=-1.0, high=1.0)
    field = gaussian_smooth(field, c1, truncate=3.0, mode="symmetric") * c0   # [B, 2, H, W]: dx, dy
    ys, xs = torch.meshgrid(torch.arange(H, device=x.device, dtype=torch.float32),
                            torch.arange(W, device=x.device, dtype=torch.float32), indexing="ij")
    gx = (2 * (xs + field[:, 0]) + 1) / W - 1
    gy = (2 * (ys + field[:, 1]) + 1) / H - 1
    y = F.grid_sample(y, torch.stack([gx, gy], -1), mode="bilinear", padding_mode="reflection",
                      align_corners=False)
    return y.clamp_(0.0, 1.0)
