"""The weather family: snow, frost, fog and the extra spatter, with CIFAR-10-C's per-severity constants
(Hendrycks & Dietterich 2019, make_cifar_c.py), every random layer drawn from the sample's generator.

Widths in pixels follow base's size rule (pixel_width). Where make_cifar_c.py calls a library this
module cannot (ImageMagick's motion blur through Wand: imaging.motion_smear; OpenCV's Canny / distance
transform / equalizeHist; the frost photographs), the closest torch reading is built and documented at
the function. Grey (C = 1) images follow imagecorruptions' grey branches: the
snow brightening uses the image itself as its grey level, frost and spatter add the luma of their colour
layer.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F

from .._checks import optional_import
from .base import SampleRNG, pixel_width, register
from .imaging import box_blur, clipped_zoom, gaussian_smooth, luma, motion_smear

__all__ = ["SNOW", "FROST", "FOG", "SPATTER", "FROST_TONES", "snow", "frost", "fog", "spatter", "plasma_fractal",
           "frost_texture", "distance_to_mask", "equalize_hist", "water_layer", "EMBOSS"]

#: (mean, std, zoom, threshold, blur radius, blur sigma, blend) of the snow layer
SNOW = ((0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8))
#: (image weight, frost weight)
FROST = ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))
#: (fog strength, plasma wibble decay)
FOG = ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75))
#: (mean, std, sigma, threshold, intensity (water) / mud sigma, 0 water / 1 mud) of the liquid layer
SPATTER = ((0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0), (0.65, 0.3, 1, 0.69, 0.5, 0),
           (0.65, 0.1, 0.7, 0.69, 0.6, 1), (0.65, 0.1, 0.5, 0.68, 0.6, 1))
#: (RGB mean, RGB std) of the five frost photographs make_cifar_c.py draws from (np.random.randint(5):
#: frost1..5; frost6 is never drawn) after its 0.2 resize (cv2.resize, INTER_LINEAR), measured on the
#: files shipped in the imagecorruptions package: the calibration targets of the generated textures.
#: frost2 and frost3 coincide because frost2.png and frost3.png decode to the same 315 x 560 pixels
#: (the files differ only in their PNG encoding), so the release draws that photograph 2 times in 5
#: and so does frost_texture.
FROST_TONES = (((0.304, 0.584, 0.650), (0.105, 0.064, 0.060)), ((0.787, 0.805, 0.841), (0.084, 0.087, 0.089)),
               ((0.787, 0.805, 0.841), (0.084, 0.087, 0.089)), ((0.541, 0.601, 0.649), (0.114, 0.114, 0.119)),
               ((0.440, 0.483, 0.528), (0.174, 0.169, 0.163)))


@register("snow")
def snow(x: torch.Tensor, severity: int, rng: SampleRNG) -> torch.Tensor:
    """make_cifar_c.py's snow: a layer N(c0, c1^2) per pixel, clipped_zoom by c2, set to 0 below c3,
    clipped, motion-blurred (imaging.motion_smear: radius c4, sigma c5, angle U(-135, -45) degrees; both
    widths in pixels through pixel_width, the radius rounded, >= 1) and rounded to 8 bits (the PNG round
    trip); the image is brightened to c6 x + (1 - c6) max(x, 1.5 grey + 0.5) and the layer and its
    180-degree rotation are added, clipped."""
    c = SNOW[severity - 1]
    H, W = x.shape[-2:]
    layer = rng.normal(1, H, W, mean=c[0], std=c[1])
    layer = clipped_zoom(layer, c[2])
    layer = torch.where(layer < c[3], torch.zeros_like(layer), layer).clamp(0.0, 1.0)
    angle = rng.uniform(low=-135.0, high=-45.0)
    layer = motion_smear(layer, max(1, int(round(pixel_width(c[4], x)))), pixel_width(c[5], x), angle)
    layer = torch.round(layer.clamp(0.0, 1.0) * 255) / 255
    y = c[6] * x + (1 - c[6]) * torch.maximum(x, luma(x) * 1.5 + 0.5)
    return (y + layer + layer.flip(-2, -1)).clamp_(0.0, 1.0)


def frost_texture(rng: SampleRNG, size: Tuple[int, int]) -> torch.Tensor:
    """[B, 3, H, W] procedural frost, deterministic per sample: a tone drawn from FROST_TONES (the
    release's five photographs, uniformly as np.random.randint(5) picks them), a structure of fractal
    value noise (octaves of bilinearly up-sampled Gaussian noise, amplitude halving per octave) plus 4 to
    12 ice needles (line segments of length U(3, 10) px, Gaussian profile of width 0.6 px, random angle;
    the widths through pixel_width for ``size`` = (H, W)), normalised to zero mean and unit variance and mapped to the tone's
    per-channel mean and std, clipped to [0, 1]. It matches the photographs' first two moments per
    channel (frosted 32 x 32 images: channel means within .03 of make_cifar_c.py's with the photographs,
    per-image std within 6 %, mean change within 11 %), not their look: real frost has dendritic,
    branching crystals this generator only hints at."""
    H, W = size
    B = len(rng)
    dev = rng.device
    tone = rng.integers(0, len(FROST_TONES))
    mean = torch.tensor([FROST_TONES[int(t)][0] for t in tone.cpu()], device=dev).view(B, 3, 1, 1)
    std = torch.tensor([FROST_TONES[int(t)][1] for t in tone.cpu()], device=dev).view(B, 3, 1, 1)
    noise = torch.zeros(B, 1, H, W, device=dev)
    side, amp = 2, 1.0
    while side <= 2 * max(H, W):
        noise += amp * F.interpolate(rng.normal(1, side, side), size=(H, W), mode="bilinear", align_corners=False)
        side, amp = side * 2, amp * 0.5
    n = 12
    cy, cx = rng.uniform(n, low=0, high=H), rng.uniform(n, low=0, high=W)
    theta = rng.uniform(n, low=0, high=math.pi)
    length = rng.uniform(n, low=pixel_width(3.0, size), high=pixel_width(10.0, size))
    on = (torch.arange(n, device=dev).view(1, n) < rng.integers(4, n + 1).view(B, 1)).float()
    ys = torch.arange(H, device=dev, dtype=torch.float32).view(1, 1, H, 1) + 0.5
    xs = torch.arange(W, device=dev, dtype=torch.float32).view(1, 1, 1, W) + 0.5
    px, py = xs - cx.view(B, n, 1, 1), ys - cy.view(B, n, 1, 1)
    ux, uy = torch.cos(theta).view(B, n, 1, 1), torch.sin(theta).view(B, n, 1, 1)
    half = length.view(B, n, 1, 1) / 2
    along = torch.maximum(torch.minimum(px * ux + py * uy, half), -half)      # the nearest point of the segment
    d2 = (px - along * ux) ** 2 + (py - along * uy) ** 2
    needles = (on.view(B, n, 1, 1) * torch.exp(-d2 / (2 * pixel_width(0.6, size) ** 2))).amax(1, keepdim=True)
    z = noise / noise.flatten(1).std(1).clamp_min(1e-6).view(B, 1, 1, 1) + 2.0 * needles
    z = (z - z.mean((2, 3), keepdim=True)) / z.flatten(1).std(1).clamp_min(1e-6).view(B, 1, 1, 1)
    return (mean + std * z).clamp(0.0, 1.0)


@register("frost")
def frost(x: torch.Tensor, severity: int, rng: SampleRNG) -> torch.Tensor:
    """clip(c0 x + c1 frost, 0, 1), (c0, c1) = FROST[severity - 1], the frost texture generated per
    sample by frost_texture (the release crops 32 x 32 from its photographs scaled by 0.2; here the
    texture is drawn at the image's size, its widths through pixel_width); grey: its luma."""
    f = frost_texture(rng, tuple(x.shape[-2:]))
    c0, c1 = FROST[severity - 1]
    return (c0 * x + c1 * (luma(f) if x.shape[1] == 1 else f)).clamp_(0.0, 1.0)


def plasma_fractal(rng: SampleRNG, mapsize: int, wibbledecay: float) -> torch.Tensor:
    """[B, mapsize, mapsize] diamond-square height map in [0, 1] (make_cifar_c.py's plasma_fractal, a
    modification of FLHerne/mapgen): corners 0, each square and diamond step the mean of its four
    neighbours (wrapping) plus wibble * U(-wibble, wibble), wibble starting at 100 and divided by
    wibbledecay per level; mapsize a power of two."""
    if mapsize < 1 or mapsize & (mapsize - 1):
        raise ValueError(f"mapsize must be a power of two, got {mapsize}")
    B = len(rng)
    m = torch.zeros(B, mapsize, mapsize, device=rng.device)
    step, wibble = mapsize, 100.0
    while step >= 2:
        h = step // 2
        corner = m[:, 0::step, 0::step]
        sq = corner + corner.roll(-1, 1)
        sq = sq + sq.roll(-1, 2)
        m[:, h::step, h::step] = sq / 4 + wibble * rng.uniform(*sq.shape[1:], low=-wibble, high=wibble)
        dr, ul = m[:, h::step, h::step], m[:, 0::step, 0::step]
        lt = dr + dr.roll(1, 1) + ul + ul.roll(-1, 2)
        m[:, 0::step, h::step] = lt / 4 + wibble * rng.uniform(*lt.shape[1:], low=-wibble, high=wibble)
        tt = dr + dr.roll(1, 2) + ul + ul.roll(-1, 1)
        m[:, h::step, 0::step] = tt / 4 + wibble * rng.uniform(*tt.shape[1:], low=-wibble, high=wibble)
        step, wibble = h, wibble / wibbledecay
    m = m - m.flatten(1).amin(1).view(B, 1, 1)
    return m / m.flatten(1).amax(1).clamp_min(1e-12).view(B, 1, 1)


@register("fog")
def fog(x: torch.Tensor, severity: int, rng: SampleRNG) -> torch.Tensor:
    """make_cifar_c.py's fog: x + c0 plasma[:H, :W], the plasma map of side the smallest power of two
    >= max(H, W) (32 for CIFAR; the 8 x 8 digits get an 8-map: its coarse levels, the same wibble
    schedule), then x max / (max + c0) with max the image's maximum, clipped. (c0, decay) =
    FOG[severity - 1]."""
    c0, decay = FOG[severity - 1]
    H, W = x.shape[-2:]
    size = 1 << (max(H, W) - 1).bit_length()
    plasma = plasma_fractal(rng, size, decay)[:, None, :H, :W]
    top = x.flatten(1).amax(1).view(-1, 1, 1, 1)
    return ((x + c0 * plasma) * top / (top + c0)).clamp_(0.0, 1.0)


def distance_to_mask(edges: torch.Tensor) -> torch.Tensor:
    """[B, H, W] exact Euclidean distance from each pixel to the nearest True pixel of edges [B, H, W]
    (two separable passes, one sample at a time to bound the [H, W, W] temporaries; no True pixel:
    inf). cv2.distanceTransform(DIST_L2, 5) is a 5 x 5 chamfer approximation of the same distance."""
    B, H, W = edges.shape
    inf = torch.tensor(float("inf"), device=edges.device)
    xs = torch.arange(W, device=edges.device, dtype=torch.float32)
    dx = (xs.view(1, W, 1) - xs.view(1, 1, W)).abs()                          # [1, W, W']
    ys = torch.arange(H, device=edges.device, dtype=torch.float32)
    dy2 = (ys.view(H, 1, 1) - ys.view(1, H, 1)) ** 2                           # [H, H', 1]
    out = []
    for e in edges:
        g = torch.where(e.unsqueeze(1), dx, inf).amin(-1)                     # [H, W]: along rows
        out.append((dy2 + g.view(1, H, W) ** 2).amin(1).sqrt())
    return torch.stack(out)


def equalize_hist(u8: torch.Tensor) -> torch.Tensor:
    """cv2.equalizeHist of integer-valued [B, H, W] in 0..255, per image: lut(i) = round(255 cdf'(i) /
    (N - h(first))), cdf' counting from the first occupied level (which maps to 0)."""
    B = u8.shape[0]
    v = u8.long().flatten(1)
    hist = torch.zeros(B, 256, device=u8.device).scatter_add_(1, v, torch.ones_like(v, dtype=torch.float32))
    first = (hist > 0).float().argmax(1, keepdim=True)
    h_first = hist.gather(1, first)
    cdf = hist.cumsum(1) - h_first
    scale = 255.0 / (v.shape[1] - h_first).clamp_min(1)
    lut = torch.round(cdf * scale).clamp(0, 255)
    lut = torch.where(torch.arange(256, device=u8.device).view(1, 256) < first, torch.zeros_like(lut), lut)
    out = lut.gather(1, v).view_as(u8)
    const = (h_first == v.shape[1]).view(B, 1, 1)
    return torch.where(const, first.view(B, 1, 1).float().expand_as(out), out)


#: OpenCV filter2D kernel make_cifar_c.py embosses the water's distance map with
EMBOSS = ((-2.0, -1.0, 0.0), (-1.0, 1.0, 1.0), (0.0, 1.0, 2.0))
WATER_RGB, MUD_RGB = (175 / 255, 238 / 255, 238 / 255), (63 / 255, 42 / 255, 20 / 255)


def water_layer(liquid: torch.Tensor, cap: float) -> torch.Tensor:
    """[B, 1, H, W] water weight of make_cifar_c.py's spatter from the thresholded liquid layer [B, 1, H,
    W]: Canny edges of its 8-bit version (kornia.filters.canny with thresholds 50 / 255 and 150 / 255 and
    no pre-smoothing, as cv2.Canny(.., 50, 150); kornia's L2 gradient norm for OpenCV's L1: 95 % of the
    edge pixels agree on CIFAR's liquid layers), the distance to them (exact L2 for OpenCV's 5 x 5
    chamfer, within 0.2 px), truncated at ``cap`` px (20 px through pixel_width), 3 x 3 box blur floored to 8 bits, histogram
    equalised (cv2.equalizeHist exactly), embossed (filter2D, saturated to 0..255), box-blurred, times
    the 8-bit liquid, divided by its maximum."""
    canny = optional_import("kornia.filters", "the spatter corruption").canny  # kornia loads slowly: only here

    u8 = torch.floor(liquid * 255)
    edges = canny(u8 / 255, 50 / 255, 150 / 255, kernel_size=(1, 1), sigma=(0.1, 0.1))[1] > 0
    dist = distance_to_mask(edges[:, 0]).clamp(max=cap).unsqueeze(1)
    dist = torch.floor(box_blur(dist))
    dist = equalize_hist(dist[:, 0]).unsqueeze(1)
    k = torch.tensor(EMBOSS)
    emb = F.conv2d(F.pad(dist, (1, 1, 1, 1), mode="reflect"), k.to(dist).view(1, 1, 3, 3))
    dist = box_blur(torch.round(emb).clamp(0, 255))
    m = u8 * dist
    top = m.flatten(1).amax(1).view(-1, 1, 1, 1)
    return torch.where(top > 0, m / top.clamp_min(1e-12), torch.zeros_like(m))


@register("spatter")
def spatter(x: torch.Tensor, severity: int, rng: SampleRNG) -> torch.Tensor:
    """make_cifar_c.py's spatter: a liquid layer N(c0, c1^2) per pixel, Gaussian-smoothed (sigma c2 px
    through pixel_width, skimage's "nearest" border), set to 0 below c3. Water (c5 = 0, severities 1-3):
    x + c4 water_layer * pale turquoise (175, 238, 238) / 255. Mud (c5 = 1, severities 4-5): the mask
    liquid > c3 smoothed with sigma c4 px through pixel_width, set to 0 below 0.8, x (1 - m) + m mud brown
    (63, 42, 20) / 255. Clipped; grey images take the colour's luma."""
    c = SPATTER[severity - 1]
    H, W = x.shape[-2:]
    liquid = gaussian_smooth(rng.normal(1, H, W, mean=c[0], std=c[1]), pixel_width(c[2], x))
    liquid = torch.where(liquid < c[3], torch.zeros_like(liquid), liquid)
    if c[5] == 0:
        colour = torch.tensor(WATER_RGB, device=x.device).view(1, 3, 1, 1) * (c[4] * water_layer(liquid, pixel_width(20.0, x)))
        colour = colour.clamp(0.0, 1.0)
        return (x + (luma(colour) if x.shape[1] == 1 else colour)).clamp_(0.0, 1.0)
    m = gaussian_smooth((liquid > c[3]).float(), pixel_width(c[4], x))
    m = torch.where(m < 0.8, torch.zeros_like(m), m)
    colour = torch.tensor(MUD_RGB, device=x.device).view(1, 3, 1, 1) * m
    return (x * (1 - m) + (luma(colour) if x.shape[1] == 1 else colour)).clamp_(0.0, 1.0)
