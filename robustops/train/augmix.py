"""AugMix (Hendrycks, Mu, Cubuk, Zoph, Gilmer and Lakshminarayanan, "AugMix: A simple data processing
method to improve robustness and uncertainty", ICLR 2020, arXiv 1912.02781), batched in torch on
[B, C, H, W] images in [0, 1] (1 or 3 channels, any size, the 8x8 digits included), on CPU or GPU.

The paper's augmentation of one image x (its Algorithm 1; the reference code, google-research/augmix,
``augment_and_mix``, read, not copied):

    w = (w_1 .. w_k) ~ Dirichlet(alpha, ..., alpha),   m ~ Beta(alpha, alpha)
    chain_i(x) = op_{i,d_i} o ... o op_{i,1} (x),      d_i = depth, or uniform in {1, 2, 3} when depth = -1
    x_augmix = (1 - m) x + m sum_i w_i chain_i(x)                       (the "skip connection")

each op drawn uniformly from :data:`OPS`, at a level drawn uniformly in [0.1, severity] (out of 10), with
a random sign for the geometric ones. The operations are the paper's, which leave out those that overlap
the test corruptions of CIFAR-10-C / ImageNet-C (contrast, colour, brightness, sharpness, noise, blur,
JPEG): autocontrast, equalize, posterize, solarize (kornia.enhance where it has them) and rotate, shear
x / y, translate x / y (one batched ``kornia.geometry.transform.warp_affine`` with per-image matrices,
bilinear, zero fill as PIL's black). Magnitudes, as the reference's ``augmentations.py`` at level L:

    posterize    keep 4 - int(0.4 L) bits (kornia.enhance.posterize)
    solarize     invert pixels >= (256 - int(25.6 L)) / 255 (kornia.enhance.solarize)
    rotate       +-int(3 L) degrees about the image centre
    shear x / y  +-0.03 L, about the top-left corner (PIL's affine data (1, s, 0, 0, 1, 0))
    translate    +-L / 30 of the width / height
    autocontrast each channel stretched from [min, max] to [0, 1] (unchanged when constant)
    equalize     per-channel histogram equalisation (kornia.enhance.equalize, PIL's rule)

Choices and departures, stated:

- Floats, not 8-bit PIL images: autocontrast is the continuous min-max stretch (PIL rounds through a
  lookup table); posterize and equalize go through 8-bit levels inside kornia as PIL does; geometric ops
  interpolate the float image (PIL rounds the result to 8 bits).
- translate: the reference shifts by whole pixels, int(L * 32/3 / 10) at 32x32 (0..3 px at severity 3);
  here the shift is the same fraction of the image, L/30 of its side, continuous (bilinear), so a small
  image (8x8) is translated too instead of always by 0 px. Pixel-centre conventions follow PIL's (the
  shear's origin is the image's corner, the rotation's its centre).
- equalize follows PIL: a channel of no more than 255 pixels has step 0 and is returned unchanged, so on
  the 8x8 digits (64 pixels) equalize is the identity.
- Randomness: every choice (ops, levels, signs, depths, the weights w and m, the mixing mode and box) comes
  from a numpy Generator seeded with one draw from the caller's CPU ``torch.Generator``, so the output
  is a function of (generator state, batch size, settings): deterministic, and a run that checkpoints
  the generator's state resumes exactly. Dirichlet and Beta draws use numpy (torch's distributions take
  no generator).
- The mixing ``mode``: "linear" is AugMix's convex combination above. "mask" and "random" serve AugRmixAT
  (:mod:`robustops.train.methods.augrmix`): "mask" pastes the chains' mixture sum_i w_i chain_i(x) into
  a rectangle of x covering a fraction m of the image (CutMix's box shape, sides sqrt(m) H and sqrt(m) W
  rounded to pixels, but placed uniformly among the positions where it fits, not clipped at the border, so
  its area is m as in the linear mode), x_mix = (1 - M) x + M sum_i w_i chain_i(x); "random" picks linear
  or mask per image with probability 1/2.

:func:`js_consistency` is the paper's Jensen-Shannon consistency loss over the softmax outputs of the
views, with the reference's clamp of the mixture to [1e-7, 1] before its log.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .._checks import LazyModule
from .registry import Hyper

kornia = LazyModule("kornia", "AugMix's equalize, posterize, solarize and geometric ops")  # imported at first use

__all__ = ["OPS", "AFFINE_OPS", "MODES", "AUGMIX_HYPERS", "AugMixDraw", "draw", "apply_ops", "chains", "mix",
           "augmix", "js_consistency", "check_settings", "check_hypers"]

#: The paper's operations (none overlaps a test corruption), in the reference's order.
OPS = ("autocontrast", "equalize", "posterize", "rotate", "solarize", "shear_x", "shear_y", "translate_x",
       "translate_y")
AFFINE_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
#: How the chains' mixture is combined with the image: AugMix's convex combination, a box, or either.
MODES = ("linear", "mask", "random")
MAX_DEPTH = 3  # depth -1: uniform in {1, 2, 3}, as in the paper

#: AugMix's settings as hyperparameters (--augmix-width/-depth/-severity/-alpha), shared by the methods that
#: augment with it (augrmix, and ada with --ada-augmix); the defaults are AugMix's CIFAR settings.
AUGMIX_HYPERS = (
    Hyper("augmix_width", 3, "AugMix (augrmix; ada with --ada-augmix): number of augmentation chains k", kind="int",
          minimum=1),
    Hyper("augmix_depth", -1, "AugMix (augrmix; ada with --ada-augmix): operations per chain (-1: random 1..3)",
          kind="int", minimum=-1),
    Hyper("augmix_severity", 3.0, "AugMix (augrmix; ada with --ada-augmix): operation level, out of 10", minimum=0.1,
          strict=True, maximum=10.0),
    Hyper("augmix_alpha", 1.0, "AugMix (augrmix; ada with --ada-augmix): Dirichlet / Beta parameter of the mixing "
          "weights", minimum=0.0, strict=True),
)


@dataclass
class AugMixDraw:
    """The random choices of one AugMix call for B images, k chains and up to D steps per chain (CPU numpy
    arrays, so a test can write them by hand): ops [B, k, D] (indices into ``op_names``), levels [B, k, D]
    (in [0.1, severity]), signs [B, k, D] (+-1), active [B, k, D] (step d of chain i runs: d < depth_i),
    weights [B, k] (convex: Dirichlet), m [B] (the skip weight / box area), masked [B] (mask mode) and
    position [B, 2] (the box's position in [0, 1) along H and W)."""
    ops: np.ndarray
    levels: np.ndarray
    signs: np.ndarray
    active: np.ndarray
    weights: np.ndarray
    m: np.ndarray
    masked: np.ndarray
    position: np.ndarray
    op_names: Sequence[str] = OPS


def check_settings(severity, width, depth, alpha, mode="linear", ops: Sequence[str] = OPS,
                   prefix: str = "") -> None:
    """ValueError naming the argument (after ``prefix``) for a setting AugMix cannot take."""
    if not isinstance(severity, (int, float)) or isinstance(severity, bool) or not 0.1 < severity <= 10:
        raise ValueError(f"{prefix}severity (AugMix's operation level, out of 10) must be in (0.1, 10], "
                         f"got {severity!r}")
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise ValueError(f"{prefix}width (AugMix's number of chains) must be an int >= 1, got {width!r}")
    if not isinstance(depth, int) or isinstance(depth, bool) or not (depth == -1 or depth >= 1):
        raise ValueError(f"{prefix}depth (operations per AugMix chain) must be -1 (random 1..3) or an int >= 1, "
                         f"got {depth!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0 or not math.isfinite(alpha):
        raise ValueError(f"{prefix}alpha (AugMix's Dirichlet / Beta parameter) must be a finite number > 0, "
                         f"got {alpha!r}")
    if mode not in MODES:
        raise ValueError(f"mode (how AugMix mixes the chains into the image) must be one of {', '.join(MODES)}; "
                         f"got {mode!r}")
    bad = [o for o in ops if o not in OPS]
    if not ops or bad:
        raise ValueError(f"ops must be a non-empty subset of {', '.join(OPS)}; got {list(ops)!r}")


def check_hypers(cfg) -> None:
    """ValueError naming the --augmix-* setting of a run config (:data:`AUGMIX_HYPERS`) AugMix cannot take."""
    check_settings(cfg.augmix_severity, cfg.augmix_width, cfg.augmix_depth, cfg.augmix_alpha, prefix="augmix_")


def draw(batch: int, generator: torch.Generator, severity: float = 3, width: int = 3, depth: int = -1,
         alpha: float = 1.0, mode: str = "linear", ops: Sequence[str] = OPS) -> AugMixDraw:
    """The random choices of :func:`augmix` for a batch of ``batch`` images, from ``generator`` (a CPU
    torch.Generator; one draw of it seeds the numpy stream)."""
    check_settings(severity, width, depth, alpha, mode, ops)
    seed = int(torch.randint(0, 1 << 62, (1,), generator=generator))
    rng = np.random.default_rng(seed)
    steps = depth if depth > 0 else MAX_DEPTH
    shape = (batch, width, steps)
    op_idx = rng.integers(0, len(ops), size=shape)
    levels = rng.uniform(0.1, severity, size=shape)
    signs = np.where(rng.uniform(size=shape) > 0.5, -1.0, 1.0)
    depths = np.full((batch, width), depth) if depth > 0 else rng.integers(1, MAX_DEPTH + 1, size=(batch, width))
    active = np.arange(steps)[None, None, :] < depths[:, :, None]
    weights = rng.dirichlet([alpha] * width, size=batch)
    m = rng.beta(alpha, alpha, size=batch)
    masked = np.full(batch, mode == "mask") if mode != "random" else rng.uniform(size=batch) < 0.5
    position = rng.uniform(size=(batch, 2))
    return AugMixDraw(op_idx, levels, signs, active, weights, m, masked, position, tuple(ops))


def _affine_matrices(names, levels, signs, h: int, w: int) -> torch.Tensor:
    """Source -> destination pixel matrices [N, 2, 3] (kornia's convention, pixel centres at integers) of
    the geometric ops. Each is built as PIL's inverse map in PIL's coordinates (pixel centres at +0.5)."""
    inv = np.tile(np.eye(3), (len(names), 1, 1))  # destination (PIL coords) -> source (PIL coords)
    rot = names == "rotate"
    t = -np.radians(signs[rot] * np.trunc(levels[rot] * 30 / 10))
    c, s, cx, cy = np.cos(t), np.sin(t), w / 2, h / 2
    inv[rot, 0, 0], inv[rot, 0, 1], inv[rot, 1, 0], inv[rot, 1, 1] = c, s, -s, c
    inv[rot, 0, 2], inv[rot, 1, 2] = cx - c * cx - s * cy, cy + s * cx - c * cy
    shear = signs * levels * 0.3 / 10
    inv[names == "shear_x", 0, 1] = shear[names == "shear_x"]
    inv[names == "shear_y", 1, 0] = shear[names == "shear_y"]
    inv[names == "translate_x", 0, 2] = (signs * levels * w / 30)[names == "translate_x"]
    inv[names == "translate_y", 1, 2] = (signs * levels * h / 30)[names == "translate_y"]
    to_pil = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1.0]])
    from_pil = np.array([[1, 0, -0.5], [0, 1, -0.5], [0, 0, 1.0]])
    return torch.from_numpy(np.linalg.inv(from_pil @ inv @ to_pil)[:, :2, :]).float()


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (x - lo) / span.clamp_min(1e-12), x)


class _Upload:
    """Host arrays queued for a device: every int64 array in one copy and every float32 array in another,
    non-blocking (from pinned memory on CUDA), instead of one blocking copy per array."""

    def __init__(self):
        self.arrays = {np.int64: [], np.float32: []}

    def add(self, a, dtype=np.float32) -> tuple:
        """Queue a (cast to dtype); the returned key finds its device tensor in :meth:`send`'s result."""
        queue = self.arrays[dtype]
        queue.append(np.ascontiguousarray(a, dtype=dtype))
        return dtype, len(queue) - 1

    def send(self, device) -> dict:
        """{key: device tensor} of every queued array (at most two host-to-device copies)."""
        out = {}
        for dtype, queue in self.arrays.items():
            if not queue:
                continue
            flat = torch.from_numpy(np.concatenate([a.ravel() for a in queue]))
            if torch.device(device).type == "cuda":
                flat = flat.pin_memory()
            flat = flat.to(device, non_blocking=True)
            start = 0
            for i, a in enumerate(queue):
                out[dtype, i] = flat[start:start + a.size].view(a.shape)
                start += a.size
        return out


def _point_param(name: str, levels: np.ndarray, up: _Upload):
    """The queued parameter of a point op at these levels (None for the parameter-free ones)."""
    if name == "posterize":
        return up.add(4 - (levels * 4 / 10).astype(np.int64), np.int64)
    if name == "solarize":  # PIL inverts 8-bit values i >= t, i.e. floats i/255 >= t/255 (t = 256: none)
        return up.add((256 - (levels * 256 / 10).astype(np.int64)) / 255.0)
    return None


def _point_op(name: str, x: torch.Tensor, param) -> torch.Tensor:
    if name == "autocontrast":
        return _autocontrast(x)
    if name == "equalize":
        return kornia.enhance.equalize(x)
    if name == "posterize":
        return kornia.enhance.posterize(x, param)
    return kornia.enhance.solarize(x, param.to(x.dtype))


def _plan_ops(op_names, levels, signs, h: int, w: int, up: _Upload) -> list:
    """The host side of :func:`apply_ops`: [(op, index key, parameter key)], the arrays queued in up."""
    levels, signs = np.asarray(levels, dtype=np.float64), np.asarray(signs, dtype=np.float64)
    names = np.asarray(op_names)
    plan = []
    geo = np.flatnonzero(np.isin(names, AFFINE_OPS))
    if geo.size:
        mats = _affine_matrices(names[geo], levels[geo], signs[geo], h, w).numpy()
        plan.append(("affine", up.add(geo, np.int64), up.add(mats)))
    for name in OPS:
        sel = np.flatnonzero(names == name)
        if sel.size and name not in AFFINE_OPS:
            plan.append((name, up.add(sel, np.int64), _point_param(name, levels[sel], up)))
    return plan


def _run_ops(x: torch.Tensor, plan: list, dev: dict) -> torch.Tensor:
    """The device side of :func:`apply_ops`: plan's ops on x with its tensors already on x's device."""
    out = x.clone()
    h, w = x.shape[-2:]
    for name, idx_key, param_key in plan:
        idx = dev[idx_key]
        part = x.index_select(0, idx)
        if name == "affine":
            res = kornia.geometry.transform.warp_affine(part, dev[param_key], (h, w), mode="bilinear",
                                                        padding_mode="zeros", align_corners=True)
        else:
            res = _point_op(name, part, None if param_key is None else dev[param_key])
        out.index_copy_(0, idx, res.to(out.dtype))
    return out.clamp_(0.0, 1.0)


def apply_ops(x: torch.Tensor, op_names: Sequence[str], levels, signs) -> torch.Tensor:
    """x [N, C, H, W] with op_names[n] applied to image n at levels[n] (sign signs[n] for the geometric
    ones): each point op on its images in one call, all geometric ops in one warp_affine."""
    up = _Upload()
    plan = _plan_ops(op_names, levels, signs, x.shape[-2], x.shape[-1], up)
    return _run_ops(x, plan, up.send(x.device))


def chains(x: torch.Tensor, d: AugMixDraw) -> torch.Tensor:
    """The k augmentation chains of each image: [B, k, C, H, W], chain i of image b = its active ops applied
    in order to x[b]. Every step's indices and parameters are built on the host first and reach the device
    in at most two non-blocking copies."""
    b, k, steps = d.ops.shape
    imgs = x.float().unsqueeze(1).expand(b, k, *x.shape[1:]).reshape(b * k, *x.shape[1:])
    ops, levels = d.ops.reshape(b * k, steps), d.levels.reshape(b * k, steps)
    signs, active = d.signs.reshape(b * k, steps), d.active.reshape(b * k, steps)
    names = np.asarray(d.op_names)
    up, plans = _Upload(), []
    for s in range(steps):
        run = np.flatnonzero(active[:, s])
        if run.size:
            plans.append((up.add(run, np.int64), _plan_ops(names[ops[run, s]], levels[run, s], signs[run, s],
                                                           x.shape[-2], x.shape[-1], up)))
    dev = up.send(x.device)
    for run_key, plan in plans:
        idx = dev[run_key]
        imgs = imgs.index_copy(0, idx, _run_ops(imgs.index_select(0, idx), plan, dev))
    return imgs.reshape(b, k, *x.shape[1:])


def _box_masks(d: AugMixDraw, h: int, w: int) -> np.ndarray:
    """[B, 1, H, W] masks: 1 inside image b's box when it is mixed by mask, else all m_b (the linear weight)."""
    out = np.empty((len(d.m), 1, h, w), dtype=np.float32)
    for b, (m, masked, (cy, cx)) in enumerate(zip(d.m, d.masked, d.position)):
        if not masked:
            out[b] = m
            continue
        ch, cw = round(h * math.sqrt(m)), round(w * math.sqrt(m))
        y0, x0 = int(cy * (h - ch + 1)), int(cx * (w - cw + 1))  # uniform over the boxes that fit
        out[b] = 0.0
        out[b, :, y0:y0 + ch, x0:x0 + cw] = 1.0
    return out


def mix(x: torch.Tensor, chain_images: torch.Tensor, d: AugMixDraw) -> torch.Tensor:
    """x_mix = (1 - M) x + M sum_i w_i chain_i(x), M = m (linear) or image b's box (mask), in x's dtype
    (the weights and masks reach the device in one non-blocking copy)."""
    up = _Upload()
    w_key, m_key = up.add(d.weights), up.add(_box_masks(d, x.shape[-2], x.shape[-1]))
    dev = up.send(x.device)
    w = dev[w_key]
    mixture = (w.view(*w.shape, 1, 1, 1) * chain_images).sum(1)
    return torch.lerp(x.float(), mixture, dev[m_key]).clamp_(0.0, 1.0).to(x.dtype)


def augmix(x: torch.Tensor, generator: torch.Generator, severity: float = 3, width: int = 3, depth: int = -1,
           alpha: float = 1.0, mode: str = "linear", ops: Sequence[str] = OPS,
           choices: Optional[AugMixDraw] = None) -> torch.Tensor:
    """AugMix of a batch x [B, C, H, W] in [0, 1] (any device): one independent draw per image from
    ``generator`` (a CPU torch.Generator, advanced by one draw); the paper's defaults severity 3, width 3,
    depth -1 (random 1..3), alpha 1. mode: "linear" (AugMix), "mask" or "random" (AugRmixAT's mixing, see
    the module's docstring). choices: a given :class:`AugMixDraw` instead of a fresh one (tests)."""
    if x.dim() != 4:
        raise ValueError(f"x must be a batch of images [B, C, H, W], got shape {list(x.shape)}")
    d = draw(x.shape[0], generator, severity, width, depth, alpha, mode, ops) if choices is None else choices
    return mix(x, chains(x, d), d)


def js_consistency(logits_list: Sequence[torch.Tensor]) -> torch.Tensor:
    """The Jensen-Shannon divergence of the views' predictions, the AugMix consistency loss (without its
    weight lambda): with p_j = softmax(logits_j) and M = clamp(mean_j p_j, 1e-7, 1),

        JS = (1/n) sum_j KL(p_j || M),   KL averaged over the batch ("batchmean"),

    computed in float32. The clamp is the reference's (it keeps log M finite); 0 for equal logits up to it."""
    if len(logits_list) < 2:
        raise ValueError(f"js_consistency needs the logits of at least 2 views, got {len(logits_list)}")
    probs = [F.softmax(z.float(), dim=1) for z in logits_list]
    log_m = torch.clamp(torch.stack(probs).mean(0), 1e-7, 1.0).log()
    return sum(F.kl_div(log_m, p, reduction="batchmean") for p in probs) / len(probs)
