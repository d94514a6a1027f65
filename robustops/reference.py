"""Plain-PyTorch reference of every robustops op: the tests' oracle and the eager baseline.

Each function computes in float32 (like the kernels) and returns a new tensor in the input's
dtype and memory layout; nothing here is fused or fast. The random ops re-implement the same
Philox4x32-10 stream as csrc/philox.h (in numpy uint64 arithmetic), so their draws can be compared
with the kernels' element for element.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ._rng import noise_counter_groups
from .ops import batch_major_dense

TINY = torch.finfo(torch.float32).tiny

STREAM_INIT_UNIFORM = 0
STREAM_INIT_RADIUS = 1
STREAM_GAUSSIAN = 2
STREAM_LANGEVIN = 3


def _per_sample(p, x: torch.Tensor) -> torch.Tensor:
    """A float or Tensor[B] as a float32 tensor broadcastable against x ([B, 1, 1, ...])."""
    t = torch.as_tensor(p, dtype=torch.float32, device=x.device)
    if t.dim() == 0:
        return t
    return t.reshape((-1,) + (1,) * (x.dim() - 1))


def _sample_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).reshape((-1,) + (1,) * (t.dim() - 1))


def _restore(out32: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(like)
    out.copy_(out32)
    return out


def pgd_step(x_adv, x, grad, eps, alpha, norm="linf", lo=0.0, hi=1.0):
    """One PGD step, the torchattacks way: several small eager ops."""
    xa, x32, g = x_adv.float(), x.float(), grad.float()
    e, a = _per_sample(eps, xa), _per_sample(alpha, xa)
    if norm == "linf":
        adv = xa + a * g.sign()
        d = torch.maximum(torch.minimum(adv - x32, e), -e)
    elif norm == "l2":
        d = _l2_direction_step(xa - x32, g, a, e)
    else:
        raise ValueError(f'norm must be "linf" or "l2", got {norm!r}')
    return _restore((x32 + d).clamp(lo, hi), x_adv)


def _l2_direction_step(a, g, alpha, eps):
    """d = f (a + c g) with c = alpha / max(||g||, tiny) and f = min(1, eps / ||a + c g||): the norms
    and factors in float64 (so tiny and huge gradients neither under- nor overflow), the update in
    float32, c applied as (g * c1) * c2 with c1 = 2^100 when c exceeds that (as the kernels do).
    A NaN anywhere in a sample makes the whole sample NaN."""
    shape = (-1,) + (1,) * (a.dim() - 1)
    gn = torch.linalg.vector_norm(g.flatten(1), dim=1, dtype=torch.float64)
    c = alpha.double().reshape(-1) / torch.maximum(gn, torch.tensor(TINY, dtype=torch.float64, device=g.device))
    c1 = torch.where(c > 2.0 ** 100, torch.tensor(2.0 ** 100, dtype=torch.float64, device=g.device),
                     torch.ones_like(c))
    v = a + (g * c1.float().reshape(shape)) * (c / c1).float().reshape(shape)
    dn = torch.linalg.vector_norm((a.double() + c.reshape(shape) * g.double()).flatten(1), dim=1)
    e = eps.double().reshape(-1)
    f = torch.where(dn > e, e / dn, torch.where(torch.isnan(dn), dn, torch.ones_like(dn)))
    return f.float().reshape(shape) * v


def recycle_step(delta, x, grad, eps, step, lo=0.0, hi=1.0):
    """Free-AT / FGSM-RS update of a persistent perturbation."""
    d32, x32 = delta.float(), x.float()
    e, s = _per_sample(eps, d32), _per_sample(step, d32)
    d = torch.maximum(torch.minimum(d32 + s * grad.float().sign(), e), -e)
    return _restore((x32 + d).clamp(lo, hi) - x32, delta)


# ------------------------------------------------------------------------------------- Philox

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK = np.uint64(0xFFFFFFFF)


def philox4x32_10(seed: int, counter: np.ndarray, stream: int) -> tuple:
    """Philox4x32-10 of counters (uint64 array) under key seed: four uint64 arrays of 32-bit words."""
    seed &= (1 << 64) - 1
    k0, k1 = seed & 0xFFFFFFFF, seed >> 32
    counter = counter.astype(np.uint64)
    x0 = counter & _MASK
    x1 = counter >> np.uint64(32)
    x2 = np.full_like(x0, stream)
    x3 = np.zeros_like(x0)
    for _ in range(10):
        p0 = _M0 * x0  # exact: both factors are below 2**32
        p1 = _M1 * x2
        hi0, lo0 = p0 >> np.uint64(32), p0 & _MASK
        hi1, lo1 = p1 >> np.uint64(32), p1 & _MASK
        x0, x1, x2, x3 = hi1 ^ x1 ^ np.uint64(k0), lo1, hi0 ^ x3 ^ np.uint64(k1), lo0
        k0 = (k0 + _W0) & 0xFFFFFFFF
        k1 = (k1 + _W1) & 0xFFFFFFFF
    return x0, x1, x2, x3


def _uniform01(w):
    return (w >> np.uint64(8)).astype(np.float64) * 2.0 ** -24


def _uniform01_open0(w):
    return ((w >> np.uint64(8)) + np.uint64(1)).astype(np.float64) * 2.0 ** -24


def philox_rows(seed: int, offset: int, rows: int, D: int, stream: int):
    """The Philox words of every logical element of `rows` rows of D elements (row r, element e: word
    e % 4 of counter (offset + r) * ceil(D/4) + e // 4): the four word arrays and each element's word
    index ("lane"), flattened in row-major order. random_init (offset in samples) and gaussian_noise
    (offset in noisy rows) both use this layout."""
    G = noise_counter_groups(D)
    r = np.uint64(offset) + np.arange(rows, dtype=np.uint64)
    e = np.arange(D, dtype=np.uint64)
    ctr = (r[:, None] * np.uint64(G) + (e // np.uint64(4))[None, :]).reshape(-1)
    lane = np.tile((e % np.uint64(4)).astype(np.int64), rows)
    return philox4x32_10(seed, ctr, stream), lane


def uniforms(words, lane) -> np.ndarray:
    """Uniform [0, 1) draws (float64 holding float32 values) of philox_rows' elements."""
    return _uniform01(np.choose(lane, words)).astype(np.float32).astype(np.float64)


def normals(words, lane) -> np.ndarray:
    """Standard normals by Box-Muller on word pairs (0, 1) and (2, 3) of philox_rows' elements."""
    c0, c1, c2, c3 = words
    first = lane < 2
    u1 = _uniform01_open0(np.where(first, c0, c2))
    u2 = _uniform01(np.where(first, c1, c3))
    return np.sqrt(-2.0 * np.log(u1)) * np.where(lane % 2 == 0, np.cos(2 * math.pi * u2), np.sin(2 * math.pi * u2))


def laplaces(words, lane) -> np.ndarray:
    """Standard Laplace draws of philox_rows' elements: magnitude -ln u with u in (0, 1] from the top
    24 bits of the element's word, sign negative when the word's bit 0 is set."""
    w = np.choose(lane, words)
    e = -np.log(_uniform01_open0(w))
    return np.where((w & np.uint64(1)) != 0, -e, e)


def langevin_noise(shape, seed=0, offset=0, form="laplace") -> torch.Tensor:
    """The float32 noise langevin_step_ draws for a batch of the given shape (logical order), on the CPU."""
    B = shape[0]
    D = int(np.prod(shape[1:])) if B else 0
    words, lane = philox_rows(seed, offset, B, D, STREAM_LANGEVIN)  # offset counts samples
    if form == "gaussian":
        n = normals(words, lane)
    elif form == "laplace":
        n = laplaces(words, lane)
    else:
        raise ValueError(f'form must be "gaussian" or "laplace", got {form!r}')
    return torch.from_numpy(n.astype(np.float32)).reshape(shape)


def langevin_step(x_adv, x, grad, eps, alpha, noise, form="laplace", lo=0.0, hi=1.0, seed=0, offset=0):
    """DALE's hybrid Langevin step on x_adv = x + delta. Gaussian: v = x_adv + alpha*sign(g) + c*xi;
    Laplace: v = x_adv + alpha*sign(g + c*l); then pgd_step's L-inf projection. The products c*n are
    exact in float64 and the sums rounded once to float32, like the kernels' fmaf."""
    xa, x32, g = x_adv.float(), x.float(), grad.float()
    e, a, c = _per_sample(eps, xa), _per_sample(alpha, xa), _per_sample(noise, xa)
    n = langevin_noise(tuple(x.shape), seed, offset, form).to(x.device)
    if form == "gaussian":
        v = (c.double() * n.double() + (xa + a * g.sign()).double()).float()
    else:
        v = xa + a * (c.double() * n.double() + g.double()).float().sign()
    d = torch.maximum(torch.minimum(v - x32, e), -e)
    return _restore((x32 + d).clamp(lo, hi), x_adv)


def langevin_step_dev_offset(x_adv, x, grad, eps, alpha, noise, form="laplace", lo=0.0, hi=1.0, seed=0, offset=0):
    """langevin_step_dev_offset_: the step drawn at the offset tensor's value, and that offset advanced
    by the B samples drawn (returned as a new int64 tensor; the op advances its argument in place)."""
    start = int(offset)
    out = langevin_step(x_adv, x, grad, eps, alpha, noise, form, lo, hi, seed, start)
    return out, torch.tensor(start + x.shape[0], dtype=torch.int64)


def random_init(x, eps, norm="linf", lo=0.0, hi=1.0, seed=0, offset=0, radius="ball"):
    """A start point drawn from the eps-ball around x, clamped to [lo, hi]: L-inf uniform in the box;
    L2 a uniform direction with radius eps * U^(1/D) (radius="ball": uniform in the ball's volume)
    or eps * U (radius="uniform"). offset counts samples (philox_rows)."""
    B = x.shape[0]
    n = x.numel()
    D = n // B if B else 0
    x32 = x.float()
    e = _per_sample(eps, x32)
    words, lane = philox_rows(seed, offset, B, D, STREAM_INIT_UNIFORM)  # offset counts samples
    if norm == "linf":
        u = torch.from_numpy(uniforms(words, lane)).float()
        delta = e * (2.0 * u.reshape(x.shape).to(x.device) - 1.0)
    elif norm == "l2":
        z = torch.from_numpy(normals(words, lane)).reshape(B, D)
        ctr = np.uint64(offset) + np.arange(B, dtype=np.uint64)
        u = torch.from_numpy(_uniform01(philox4x32_10(seed, ctr, STREAM_INIT_RADIUS)[0]))
        if radius == "ball":
            r = u.pow(1.0 / D) if D else u
        elif radius == "uniform":
            r = u
        else:
            raise ValueError(f'radius must be "ball" or "uniform", got {radius!r}')
        scale = r / z.norm(dim=1).clamp_min(TINY)
        delta = (z * scale[:, None]).float().reshape(x.shape).to(x.device) * e
    else:
        raise ValueError(f'norm must be "linf" or "l2", got {norm!r}')
    out32 = (x32 + delta).clamp(lo, hi)
    if batch_major_dense(x):
        return _restore(out32, x)
    return out32.to(x.dtype).contiguous()


# ------------------------------------------------------------------------- smoothing family

def gaussian_noise(x, num, sigma, seed=0, offset=0, mean=None, std=None, out_dtype=None,
                   channels_last=False):
    """[B*num, ...]: input b repeated num times (input-major) plus sigma*N(0, 1), then optionally
    (. - mean)/std per channel (dim 1), in out_dtype (default: x's dtype).

    Noisy sample s = offset + b*num + j, element e (logical order) takes the normal of Philox
    counter s*ceil(D/4) + e//4, word e%4, stream 2: a draw fixed by (seed, global sample index),
    whatever the batch split.
    """
    B = x.shape[0]
    D = x[0].numel() if B else 0
    z = torch.from_numpy(normals(*philox_rows(seed, offset, B * num, D, STREAM_GAUSSIAN))).float()
    z = z.reshape((B * num,) + tuple(x.shape[1:])).to(x.device)
    out = x.float().repeat_interleave(num, dim=0) + float(sigma) * z
    if mean is not None or std is not None:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if mean is not None:
            out = out - torch.as_tensor(mean, dtype=torch.float32, device=x.device).reshape(shape)
        if std is not None:
            out = out / torch.as_tensor(std, dtype=torch.float32, device=x.device).reshape(shape)
    out = out.to(out_dtype or x.dtype)
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last if out.dim() == 4 else torch.channels_last_3d)
    return out


def gaussian_noise_rows(x, source, key, row, sigma, mean=None, std=None, out_dtype=None, channels_last=False):
    """[R, ...]: row r is gaussian_noise(x[source[r]:source[r] + 1], 1, sigma, seed=key[r], offset=row[r], ...)."""
    if len(source) == 0:
        out = gaussian_noise(x[:0], 1, sigma, mean=mean, std=std, out_dtype=out_dtype, channels_last=channels_last)
        return out
    rows = [gaussian_noise(x[int(s):int(s) + 1], 1, sigma, seed=int(k), offset=int(o), mean=mean, std=std,
                           out_dtype=out_dtype) for s, k, o in zip(source.tolist(), key.tolist(), row.tolist())]
    out = torch.cat(rows)
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last if out.dim() == 4 else torch.channels_last_3d)
    return out


def count_votes_segments(logits, segment, counts):
    """counts[segment[r], argmax_c logits[r, c]] += 1 for every row r (torch.argmax's rules)."""
    add = torch.zeros_like(counts)
    flat = segment.to(counts.device) * counts.shape[1] + logits.argmax(dim=1)
    add.view(-1).index_add_(0, flat, torch.ones_like(flat))
    return counts + add


def count_votes(logits, counts):
    """counts[b, argmax_c logits[b*num + j, c]] += 1 for j < num, with num = rows / B.
    torch.argmax's rules: ties go to the lowest index, a NaN counts as the maximum."""
    B, C = counts.shape
    pred = logits.argmax(dim=1).reshape(B, -1)
    add = torch.zeros_like(counts)
    add.scatter_add_(1, pred, torch.ones_like(pred, dtype=counts.dtype))
    return counts + add
