"""Typed wrappers of the robustops ops: argument validation with messages that name the argument,
Python floats turned into the kernels' per-sample convention, and the fake kernels that let
torch.compile(fullgraph=True) trace every op.

Per-sample parameters (eps, alpha, step) are a float (one value for the batch) or a Tensor[B].
A float travels as a 0-dim CPU tensor that the kernel reads on the host, so no host-device
transfer or sync happens per call.
"""
from __future__ import annotations

import math

from typing import Optional, Union

import torch

from . import _library, _rng

_library.load()

Param = Union[float, int, torch.Tensor]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NORMS = ("linf", "l2")


def batch_major_dense(x: torch.Tensor) -> bool:
    """True if x is dense and non-overlapping with the batch as its outermost memory dimension
    (contiguous and channels_last tensors are): the layouts the kernels work on in place."""
    dims = sorted((d for d in range(x.dim()) if x.shape[d] != 1), key=lambda d: -x.stride(d))
    expected = 1
    for d in reversed(dims):
        if x.stride(d) != expected:
            return False
        expected *= x.shape[d]
    return x.dim() >= 1 and (x.shape[0] <= 1 or not dims or dims[0] == 0)


def _tracing() -> bool:
    return torch.compiler.is_compiling()


def _check_floating(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.dim() < 1:
        raise ValueError(f"{name} must have a leading batch dimension [B, ...], got a 0-dim tensor")


def _check_like(t, ref: torch.Tensor, name: str, refname: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != ref.shape:
        raise ValueError(f"{name} must have the same shape as {refname}, got {list(t.shape)} and {list(ref.shape)}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have the same dtype as {refname}, got {t.dtype} and {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the same device as {refname}, got {t.device} and {ref.device}")


def _check_norm(norm) -> None:
    if norm not in _NORMS:
        raise ValueError(f'norm must be "linf" or "l2", got {norm!r}')


def _check_bounds(lo, hi) -> None:
    if not lo <= hi:
        raise ValueError(f"lo must be <= hi, got lo={lo} and hi={hi}")


def _param(p: Param, name: str, x: torch.Tensor, nonneg: bool = True) -> torch.Tensor:
    """The kernels' form of a per-sample parameter: a 0-dim CPU float tensor or a float Tensor[B]
    on x's device. Values are checked where that costs no device sync (floats, CPU tensors)."""
    if isinstance(p, bool) or not isinstance(p, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a float or a Tensor[B], got {type(p).__name__}")
    if not isinstance(p, torch.Tensor):
        p = float(p)
        if nonneg and not p >= 0:
            raise ValueError(f"{name} must be >= 0, got {p}")
        return torch.tensor(p, dtype=torch.float32)
    B = x.shape[0]
    if p.dim() > 1 or (p.dim() == 1 and p.shape[0] != B):
        raise ValueError(f"{name} must be a float or a Tensor[B] with B = {B}, got shape {list(p.shape)}")
    if not (p.dtype.is_floating_point or p.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{name} must hold floating-point values, got {p.dtype}")
    if p.dim() == 0 and p.device.type == "cpu" and p.dtype == torch.float32 and not _tracing():
        if nonneg and not p.item() >= 0:  # the common case, checked without tensor ops
            raise ValueError(f"{name} must be >= 0 for every sample, got {p.item()} (at index 0)")
        return p
    if nonneg and p.device.type == "cpu" and not _tracing():
        bad = ~(p >= 0)
        if bool(bad.any()):
            raise ValueError(f"{name} must be >= 0 for every sample, got {p[bad][0].item()} "
                             f"(at index {int(bad.nonzero()[0, 0]) if p.dim() else 0})")
    if p.dim() == 0 and p.device.type == "cpu":
        return p.float()
    return p.to(device=x.device, dtype=torch.float32)


def pgd_step_(x_adv: torch.Tensor, x: torch.Tensor, grad: torch.Tensor, eps: Param, alpha: Param,
              norm: str = "linf", lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """One projected-gradient step, in place on x_adv, fused into one kernel (L-inf; on CUDA also L2
    for samples of up to 8192 elements) or two (larger L2 samples: a sums pass, then the update).

    x_adv, x, grad: Tensor[B, ...] of one dtype (float32/float16/bfloat16) and device.
    eps, alpha: float or Tensor[B]. norm: "linf" or "l2". lo <= hi: the valid input range.

    L-inf: x_adv = clamp(x + clamp(x_adv + alpha*sign(grad) - x, -eps, eps), lo, hi).
    L2:    s = x_adv + alpha*grad/||grad||; d = s - x; d *= min(1, eps/||d||); x_adv = clamp(x + d, lo, hi),
    norms taken per sample. Returns x_adv.
    """
    _check_floating(x_adv, "x_adv")
    _check_like(x, x_adv, "x", "x_adv")
    _check_like(grad, x_adv, "grad", "x_adv")
    _check_norm(norm)
    _check_bounds(lo, hi)
    torch.ops.robustops.pgd_step_(x_adv, x, grad, _param(eps, "eps", x_adv), _param(alpha, "alpha", x_adv),
                                  norm, float(lo), float(hi))
    return x_adv


_RADII = ("ball", "uniform")


def _offset(offset, x: torch.Tensor):
    """An int offset (checked), or a one-element int64 tensor on x's device (the device-offset form)."""
    if isinstance(offset, torch.Tensor):
        if offset.dtype != torch.int64 or offset.numel() != 1:
            raise TypeError(f"offset as a tensor must be a one-element int64 tensor, got {offset.dtype} of shape "
                            f"{list(offset.shape)}")
        if offset.device != x.device:
            raise ValueError(f"offset must be on the same device as x, got {offset.device} and {x.device}")
        return offset
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < 2 ** 63:
        raise ValueError(f"offset must be an int in [0, 2^63) or a one-element int64 tensor, got {offset!r}")
    return offset


def random_init(x: torch.Tensor, eps: Param, norm: str = "linf", lo: float = 0.0, hi: float = 1.0,
                seed: Optional[int] = None, offset: Union[int, torch.Tensor] = 0, radius: str = "ball") -> torch.Tensor:
    """A random start point: x plus a draw in the eps-ball, clamped to [lo, hi]. L-inf: each coordinate
    uniform in [-eps, eps]. L2: a uniform direction and, by ``radius``, a point uniform in the ball's
    volume ("ball": radius eps * U^(1/D)) or a radius uniform in [0, eps] ("uniform": eps * U).
    Returns a new Tensor[B, ...] in x's dtype and layout.

    The draw is Philox4x32-10 keyed by (seed, offset + sample index) and the element's index in its
    sample: the same on CPU and CUDA, for contiguous and channels_last inputs, and for any split of a
    batch (draw the part starting at sample k with offset + k). The offset counts samples: calls
    whose sample ranges [offset, offset + B) are disjoint draw disjoint streams. seed=None takes a
    seed from torch's default generator (torch.manual_seed governs it).

    offset may also be a one-element int64 tensor on x's device: the op then reads it there and
    advances it by B, so a CUDA graph that captures the call draws fresh numbers at every replay
    (the integer form refuses capture).
    """
    _check_floating(x, "x")
    _check_norm(norm)
    _check_bounds(lo, hi)
    if radius not in _RADII:
        raise ValueError(f'radius must be "ball" or "uniform", got {radius!r}')
    offset = _offset(offset, x)
    args = (x, _param(eps, "eps", x), norm, float(lo), float(hi), _rng.resolve_seed(seed))
    if isinstance(offset, torch.Tensor):
        return torch.ops.robustops.random_init_dev_offset(*args, offset, radius)
    return torch.ops.robustops.random_init(*args, offset, radius)


def recycle_step_(delta: torch.Tensor, x: torch.Tensor, grad: torch.Tensor, *, eps: Param, step: Param,
                  lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """Gradient-recycling ("free" AT) and FGSM-RS update of a persistent perturbation, in place:
    delta = clamp(delta + step*sign(grad), -eps, eps), then clamped so that x + delta lies in [lo, hi].

    delta, x, grad: Tensor[B, ...] of one dtype and device, in pgd_step_'s order (the updated tensor,
    the clean input, the gradient); eps, step (keyword-only): float or Tensor[B]. Returns delta.
    """
    _check_floating(delta, "delta")
    _check_like(x, delta, "x", "delta")
    _check_like(grad, delta, "grad", "delta")
    _check_bounds(lo, hi)
    torch.ops.robustops.recycle_step_(delta, x, grad, _param(eps, "eps", delta), _param(step, "step", delta),
                                      float(lo), float(hi))
    return delta


_LANGEVIN_FORMS = ("gaussian", "laplace")


def langevin_step_(x_adv: torch.Tensor, x: torch.Tensor, grad: torch.Tensor, eps: Param, alpha: Param,
                   noise: Param, form: str = "laplace", lo: float = 0.0, hi: float = 1.0,
                   seed: Optional[int] = None, offset: Union[int, torch.Tensor] = 0) -> torch.Tensor:
    """One hybrid Langevin step of DALE (Robey et al. 2021), in place on x_adv = x + delta, fused into
    one pass over memory:

    - form="gaussian": delta <- P(delta + alpha*sign(grad) + noise*xi), xi ~ N(0, I)
    - form="laplace":  delta <- P(delta + alpha*sign(grad + noise*l)),  l ~ Laplace(0, 1) per element

    where P projects onto the L-inf ball of radius eps and keeps x + delta in [lo, hi] (exactly
    pgd_step_'s L-inf projection: x_adv = clamp(x + clamp(v - x, -eps, eps), lo, hi)). With noise = 0
    both forms equal ``pgd_step_(..., norm="linf")`` bit for bit and draw nothing.

    x_adv, x, grad: Tensor[B, ...] of one dtype (float32/float16/bfloat16) and device, contiguous or
    channels_last. eps, alpha, noise: float or Tensor[B], >= 0 (noise finite). In the Langevin
    reading, the Gaussian form with noise = sqrt(2*alpha*T) is the projected, sign-gradient
    discretisation at temperature T.

    The noise is Philox4x32-10 keyed by (seed, offset + sample index) and the element's index in its
    sample (random_init's layout, on a stream of its own): the same on CPU and CUDA, for contiguous and
    channels_last tensors and for any split of the batch (the part starting at sample k draws with
    offset + k). Calls whose sample ranges [offset, offset + B) are disjoint draw independent noise;
    successive steps of one chain should change the seed (``_rng.derive_seed(seed, step)``) or move
    the offset past the batch. seed=None takes a seed from torch's default generator. Returns x_adv.

    offset may also be a one-element int64 tensor on x_adv's device (the device-offset form, like
    random_init's): the op reads it there and advances it by B, so successive calls walk the noise
    stream as the integer offsets 0, B, 2B, ... would, and a CUDA graph that captures the call draws
    fresh noise at every replay (the integer form refuses capture).
    """
    _check_floating(x_adv, "x_adv")
    _check_like(x, x_adv, "x", "x_adv")
    _check_like(grad, x_adv, "grad", "x_adv")
    _check_bounds(lo, hi)
    if form not in _LANGEVIN_FORMS:
        raise ValueError(f'form must be "gaussian" or "laplace", got {form!r}')
    if isinstance(noise, (int, float)) and not isinstance(noise, bool) and not math.isfinite(noise):
        raise ValueError(f"noise must be finite, got {noise}")
    offset = _offset(offset, x_adv)
    op = torch.ops.robustops.langevin_step_
    if isinstance(offset, torch.Tensor):
        op = torch.ops.robustops.langevin_step_dev_offset_
    op(x_adv, x, grad, _param(eps, "eps", x_adv), _param(alpha, "alpha", x_adv), _param(noise, "noise", x_adv), form,
       float(lo), float(hi), _rng.resolve_seed(seed), offset)
    return x_adv


# ------------------------------------------------------------------------------- fake kernels

@torch.library.register_fake("robustops::pgd_step_")
def _pgd_step_fake(x_adv, x, grad, eps, alpha, norm, lo, hi):
    return None


@torch.library.register_fake("robustops::recycle_step_")
def _recycle_step_fake(delta, x, grad, eps, step, lo, hi):
    return None


@torch.library.register_fake("robustops::langevin_step_")
def _langevin_step_fake(x_adv, x, grad, eps, alpha, noise, form, lo, hi, seed, offset):
    return None


@torch.library.register_fake("robustops::langevin_step_dev_offset_")
def _langevin_step_dev_fake(x_adv, x, grad, eps, alpha, noise, form, lo, hi, seed, offset):
    return None


@torch.library.register_fake("robustops::random_init")
def _random_init_fake(x, eps, norm, lo, hi, seed, offset, radius="ball"):
    # Same layout rule as the kernels: dense batch-major inputs keep theirs, others become contiguous.
    if batch_major_dense(x):
        return torch.empty_like(x)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.register_fake("robustops::random_init_dev_offset")
def _random_init_dev_fake(x, eps, norm, lo, hi, seed, offset, radius="ball"):
    return _random_init_fake(x, eps, norm, lo, hi, seed, 0, radius)


# --------------------------------------------------------------------------- smoothing family

def _channel_param(p, name: str, x: torch.Tensor) -> Optional[torch.Tensor]:
    if p is None:
        return None
    t = torch.as_tensor(p, dtype=torch.float32)
    C = x.shape[1] if x.dim() >= 2 else 1
    if t.dim() > 1 or (t.dim() == 1 and t.shape[0] != C):
        raise ValueError(f"{name} must be a float or a sequence / Tensor[C] with C = {C} channels, "
                         f"got shape {list(t.shape)}")
    if t.device.type == "cpu" and not _tracing():
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} must be finite for every channel, got {t.tolist()}")
        if name == "std" and not bool((t > 0).all()):
            raise ValueError(f"std must be > 0 for every channel, got {t.tolist()}")
    return t.expand(C).to(device=x.device).contiguous()


def gaussian_noise(x: torch.Tensor, num: int, sigma: float, seed: Optional[int] = None,
                   offset: Union[int, torch.Tensor] = 0,
                   mean=None, std=None, out_dtype: Optional[torch.dtype] = None,
                   channels_last: bool = False) -> torch.Tensor:
    """Noisy copies for randomized smoothing, written once: Tensor[B*num, ...] whose rows
    b*num .. b*num+num-1 are x[b] + sigma*N(0, I) (input-major), then (. - mean)/std per channel
    (dim 1) when mean / std are given, stored in out_dtype (default x's dtype), in channels_last
    when asked (4-D / 5-D outputs).

    x: Tensor[B, ...]; num >= 1; sigma >= 0; mean, std: float or Tensor[C]. Noisy sample
    offset + b*num + j draws from Philox (seed, that index) alone, so splitting the work into
    batches (advancing offset by the rows already drawn) gives the same noise.

    offset may also be a one-element int64 tensor on x's device: the op reads it there and advances
    it by B*num, the rows drawn, which is exactly that bookkeeping done on the device; a CUDA graph
    that captures the call then draws the next rows at every replay (the integer form refuses
    capture).
    """
    _check_floating(x, "x")
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be an int >= 1, got {num!r}")
    if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or not 0 <= sigma < math.inf:
        raise ValueError(f"sigma must be a finite float >= 0, got {sigma!r}")
    offset = _offset(offset, x)
    if out_dtype is not None and out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    if channels_last and x.dim() not in (4, 5):
        raise ValueError(f"channels_last needs a 4-D or 5-D x, got {x.dim()}-D")
    op = torch.ops.robustops.gaussian_noise
    if isinstance(offset, torch.Tensor):
        op = torch.ops.robustops.gaussian_noise_dev_offset
    return op(x, num, float(sigma), _rng.resolve_seed(seed), offset, _channel_param(mean, "mean", x),
              _channel_param(std, "std", x), out_dtype, bool(channels_last))


def count_votes_(logits: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Fused argmax + histogram, in place: counts[b, argmax_c logits[b*num + j, c]] += 1 for every
    j < num = logits.shape[0] // B. Ties go to the lowest index and NaN counts as the maximum,
    exactly like torch.argmax. No argmax tensor, no host sync.

    logits: Tensor[B*num, C] (float32/float16/bfloat16); counts: int64 Tensor[B, C] on the same device.
    """
    _check_floating(logits, "logits")
    if not isinstance(counts, torch.Tensor) or counts.dtype != torch.int64:
        raise TypeError(f"counts must be an int64 tensor, got "
                        f"{counts.dtype if isinstance(counts, torch.Tensor) else type(counts).__name__}")
    if logits.dim() != 2 or counts.dim() != 2:
        raise ValueError(f"logits must be [B*num, C] and counts [B, C], got {list(logits.shape)} "
                         f"and {list(counts.shape)}")
    if logits.shape[1] != counts.shape[1]:
        raise ValueError(f"logits has {logits.shape[1]} classes but counts has {counts.shape[1]}")
    if (logits.shape[0] % counts.shape[0] != 0) if counts.shape[0] else logits.shape[0] != 0:
        raise ValueError(f"logits rows ({logits.shape[0]}) must be a multiple of counts rows (B = {counts.shape[0]})")
    if not _tracing() and torch._debug_has_internal_overlap(counts) == 1:  # MemOverlap::Yes (the kernel checks too)
        raise ValueError("counts must not overlap itself (an expanded tensor): every (input, class) needs its own "
                         "element")
    if logits.device != counts.device:
        raise ValueError(f"counts must be on the same device as logits, got {counts.device} and {logits.device}")
    torch.ops.robustops.count_votes_(logits, counts)
    return counts


def _check_rows_table(t, name: str, x: torch.Tensor, R: int, what: str = "source") -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.dim() != 1:
        got = f"{t.dtype} of shape {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"{name} must be a 1-D int64 tensor [R] (one entry per output row), got {got}")
    if t.shape[0] != R:
        raise ValueError(f"{name} must have as many rows as {what} ({R}), got {t.shape[0]}")
    if t.device != x.device:
        raise ValueError(f"{name} must be on the same device as {'logits' if what == 'logits' else 'x'}, got "
                         f"{t.device} and {x.device}")


def gaussian_noise_rows(x: torch.Tensor, source: torch.Tensor, key: torch.Tensor, row: torch.Tensor,
                        sigma: float, mean=None, std=None, out_dtype: Optional[torch.dtype] = None,
                        channels_last: bool = False) -> torch.Tensor:
    """gaussian_noise for a batch cut from many inputs and Philox streams, in one launch:
    Tensor[R, ...] whose row r is x[source[r]] + sigma*N(0, I) drawn as noisy row row[r] of the key
    key[r] (bit for bit the row gaussian_noise(x[source[r]:source[r]+1], 1, sigma, seed=key[r],
    offset=row[r]) draws), then (. - mean)/std, in out_dtype (default x's dtype) and channels_last when
    asked.

    x: Tensor[B, ...]; source, key, row: int64 Tensor[R] on x's device, 0 <= source < B and row >= 0
    (checked on the CPU; a device assertion on CUDA, where checking on the host would synchronize).
    """
    _check_floating(x, "x")
    R = source.shape[0] if isinstance(source, torch.Tensor) and source.dim() == 1 else -1
    for t, name in ((source, "source"), (key, "key"), (row, "row")):
        _check_rows_table(t, name, x, R)
    if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or not 0 <= sigma < math.inf:
        raise ValueError(f"sigma must be a finite float >= 0, got {sigma!r}")
    if out_dtype is not None and out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    if channels_last and x.dim() not in (4, 5):
        raise ValueError(f"channels_last needs a 4-D or 5-D x, got {x.dim()}-D")
    return torch.ops.robustops.gaussian_noise_rows(x, source, key, row, float(sigma), _channel_param(mean, "mean", x),
                                                   _channel_param(std, "std", x), out_dtype, bool(channels_last))


def count_votes_segments_(logits: torch.Tensor, segment: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """count_votes_ with a count row per logits row, in place: counts[segment[r], argmax_c logits[r, c]] += 1
    for every row r (torch.argmax's rule: ties to the lowest index, a NaN counts as the maximum). The
    votes of a forward batch cut from many inputs in one launch.

    logits: Tensor[R, C] (float32/float16/bfloat16); segment: int64 Tensor[R] with 0 <= segment < S
    (checked on the CPU, a device assertion on CUDA); counts: int64 Tensor[S, C]; all on one device.
    """
    _check_floating(logits, "logits")
    if not isinstance(counts, torch.Tensor) or counts.dtype != torch.int64:
        raise TypeError(f"counts must be an int64 tensor, got "
                        f"{counts.dtype if isinstance(counts, torch.Tensor) else type(counts).__name__}")
    if logits.dim() != 2 or counts.dim() != 2:
        raise ValueError(f"logits must be [R, C] and counts [S, C], got {list(logits.shape)} and {list(counts.shape)}")
    if logits.shape[1] != counts.shape[1]:
        raise ValueError(f"logits has {logits.shape[1]} classes but counts has {counts.shape[1]}")
    _check_rows_table(segment, "segment", logits, logits.shape[0], "logits")
    if not _tracing() and torch._debug_has_internal_overlap(counts) == 1:
        raise ValueError("counts must not overlap itself (an expanded tensor): every (segment, class) needs its own "
                         "element")
    if logits.device != counts.device:
        raise ValueError(f"counts must be on the same device as logits, got {counts.device} and {logits.device}")
    torch.ops.robustops.count_votes_segments_(logits, segment, counts)
    return counts


@torch.library.register_fake("robustops::gaussian_noise")
def _gaussian_noise_fake(x, num, sigma, seed, offset, mean, std, out_dtype, channels_last):
    shape = (x.shape[0] * num,) + tuple(x.shape[1:])
    out = torch.empty(shape, dtype=out_dtype or x.dtype, device=x.device)
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
    return out


@torch.library.register_fake("robustops::gaussian_noise_dev_offset")
def _gaussian_noise_dev_fake(x, num, sigma, seed, offset, mean, std, out_dtype, channels_last):
    return _gaussian_noise_fake(x, num, sigma, seed, 0, mean, std, out_dtype, channels_last)


@torch.library.register_fake("robustops::count_votes_")
def _count_votes_fake(logits, counts):
    return None


@torch.library.register_fake("robustops::gaussian_noise_rows")
def _gaussian_noise_rows_fake(x, source, key, row, sigma, mean, std, out_dtype, channels_last):
    torch._check(source.shape[0] == key.shape[0] and source.shape[0] == row.shape[0],
                 lambda: "source, key and row must have one entry per output row")
    shape = (source.shape[0],) + tuple(x.shape[1:])
    out = torch.empty(shape, dtype=out_dtype or x.dtype, device=x.device)
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
    return out


@torch.library.register_fake("robustops::count_votes_segments_")
def _count_votes_segments_fake(logits, segment, counts):
    return None
