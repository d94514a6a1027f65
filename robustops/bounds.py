"""Interval bound propagation (IBP): bounds of a network's outputs over an L-inf box, the margin bounds
of certified training with the last layer elided, and per-sample certified radii by batched bisection.

    lower, upper = bounds.interval_bounds(model, x, eps=0.1)          # logits over the box, [B, K]
    m = bounds.margin_bounds(model, x, y, eps)                        # lower bounds of z_y - z_j
    loss = F.cross_entropy(bounds.worst_case_logits(model, x, y, eps), y)   # Gowal et al.'s IBP loss
    res = bounds.certified_radius(model, x, y, eps_max=0.4, tol=1e-3) # res.radius: Tensor[B]

The box is {x' : |x' - x|_inf <= eps} intersected with [lo, hi], eps a float or a Tensor[B] (one radius
per sample). Bounds travel through the network as (centre c, radius r >= 0), the interval [c - r, c + r]
(Gowal et al. 2018, "On the effectiveness of interval bound propagation ...", eq. 6):

- affine layers (Linear, Conv2d, average pooling, BatchNorm, Normalize): c' = W c + b, r' = |W| r. For a
  convolution both products are one grouped convolution over the stacked pair [c, r] with the stacked
  weights [W, |W|] (``_conv``; measured in benchmarks/bench_bounds.py against two convolutions);
- monotone layers (ReLU, max pooling): applied to the lower and upper ends;
- residual blocks: the interval sum of the two branches' intervals (sound, not tight);
- the last Linear layer is elided into the specification (Gowal et al., section 3): for the margins
  z_y - z_j the rows W_y - W_j and biases b_y - b_j are formed first and bounded in one step, which is
  never looser than subtracting bounds of the logits (it is exact for the last layer).

BatchNorm (option ``bn`` of every entry point): in eval mode an affine map with the running statistics.
In training mode (or without running statistics) the layer normalises with batch statistics, and the
bounds are those of the network whose BatchNorm layers hold some batch's mean and biased variance as
constants. Which batch:

- ``bn="clean"`` (the default; Shi et al. 2021, "Fast certified robust training with short warmup",
  the ACERT authors' code and auto_LiRPA's default): the clean batch's, i.e. the mean / biased variance
  of the activations that the layer sees in the clean forward of x. The clean activation travels with
  the interval (``Interval.clean``: x at the input, then each layer's own function applied to it), so
  the statistics are exactly the clean forward's and carry its gradient. Choices left open by the
  papers: the clean tensor is carried only where some BatchNorm layer uses batch statistics (otherwise
  nothing changes, bit for bit); a rule that builds its output without ``clean`` (a user rule) hands
  the centre rule to the BatchNorm layers after it.
- ``bn="centre"``: the batch of interval centres' (robustops' earlier rule): for a box clipped to
  [lo, hi] and after the first ReLU these differ from the clean activations, and on a random CNN-7 at
  eps 2/255 the logit intervals are orders of magnitude wider than the clean rule's.

Neither rule updates the running statistics (the rules never call a BatchNorm forward).

Soundness: the interval arithmetic is the exact enclosure of each layer in real arithmetic; the floating
point evaluation rounds to nearest (no directed rounding), so a bound may be off by rounding error, a
few ulps of the values involved. ``certified_radius`` therefore computes in float32 or wider without
autocast and certifies only a strictly positive margin. Under autocast (training) the products run in
the autocast dtype.

Supported: nn.Linear, nn.Conv2d, nn.ReLU, nn.BatchNorm1d/2d, nn.Flatten, nn.AvgPool2d,
nn.AdaptiveAvgPool2d, nn.MaxPool2d, nn.Identity, nn.Dropout (eval), robustops.models.Normalize,
nn.Sequential, and robustops.models' SmallCNN, PreActResNet18, CifarResNet and CohenCifarResNet with
their blocks. Other modules: :func:`register` a rule, or an :class:`UnsupportedLayerError` names the
module and lists these.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _checks

__all__ = ["Interval", "UnsupportedLayerError", "RadiusResult", "register", "supported", "input_box",
           "propagate", "interval_bounds", "margin_bounds", "worst_case_logits", "verified", "certified_radius",
           "margin_spec", "batch_statistics", "BN_RULES", "RADIUS_MODES", "register_verifier", "verifiers"]

Param = Union[float, torch.Tensor]


class UnsupportedLayerError(TypeError):
    """A module IBP has no rule for."""


@dataclass
class Interval:
    """The box [c - r, c + r], elementwise (r >= 0). clean: None, or the layer's activation of the clean
    input (what the clean forward computes there), carried for the ``bn="clean"`` rule of BatchNorm in
    training mode; every rule applies the layer's own function to it."""
    c: torch.Tensor
    r: torch.Tensor
    clean: Optional[torch.Tensor] = None

    @classmethod
    def from_bounds(cls, lower: torch.Tensor, upper: torch.Tensor,
                    clean: Optional[torch.Tensor] = None) -> "Interval":
        return cls((upper + lower) / 2, (upper - lower) / 2, clean)

    def with_clean(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Optional[torch.Tensor]:
        """fn(clean), or None where no clean tensor is carried."""
        return None if self.clean is None else fn(self.clean)

    @property
    def lower(self) -> torch.Tensor:
        return self.c - self.r

    @property
    def upper(self) -> torch.Tensor:
        return self.c + self.r

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Interval":
        """A shape-only function (view, slice, pad with zeros) applied to both parts."""
        return Interval(fn(self.c), fn(self.r), self.with_clean(fn))

    def monotone(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Interval":
        """An elementwise non-decreasing function (or max pooling) applied to both ends."""
        return Interval.from_bounds(fn(self.lower), fn(self.upper), self.with_clean(fn))

    def __add__(self, other: "Interval") -> "Interval":
        clean = None if self.clean is None or other.clean is None else self.clean + other.clean
        return Interval(self.c + other.c, self.r + other.r, clean)


# A rule: (module, interval, spec) -> interval. spec is None, or a Tensor[B, S, K] that the rule must
# apply to its output (out' = spec @ out per sample); a rule that ends in a Linear layer folds it in.
Rule = Callable[[nn.Module, Interval, Optional[torch.Tensor]], Interval]
_RULES: Dict[Type[nn.Module], Rule] = {}


def register(*types: Type[nn.Module]):
    """Decorator: ``rule(module, interval, spec) -> interval`` for these module types (exact types;
    subclasses need their own). A rule that does not end in a Linear layer returns
    ``apply_spec(out, spec)``. A rule carries ``iv.clean`` through with the layer's own function
    (``Interval.map`` / ``monotone`` / ``+`` do; see :class:`Interval`): without it the BatchNorm layers
    after it fall back to the ``bn="centre"`` rule in training mode."""
    def deco(rule: Rule) -> Rule:
        for t in types:
            _RULES[t] = rule
        return rule
    return deco


def supported() -> Tuple[str, ...]:
    """The module types with an interval rule, by name."""
    return tuple(sorted({t.__name__ for t in _RULES} | {"Sequential"}))


def apply_spec(iv: Interval, spec: Optional[torch.Tensor]) -> Interval:
    """The interval of spec @ out (per sample) from the interval of out ([B, K])."""
    if spec is None:
        return iv
    if iv.c.dim() != 2:
        raise UnsupportedLayerError(f"a margin specification needs [B, K] outputs, got {list(iv.c.shape)}")
    return Interval(torch.einsum("bsk,bk->bs", spec, iv.c), torch.einsum("bsk,bk->bs", spec.abs(), iv.r),
                    iv.with_clean(lambda t: torch.einsum("bsk,bk->bs", spec, t)))


BN_RULES = ("clean", "centre")


def batch_statistics(model: nn.Module) -> bool:
    """Whether some BatchNorm layer of model normalises with batch statistics (training mode, or no
    running statistics): where the ``bn`` rule matters."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None)
               for m in model.modules())


def with_bn_rule(model: nn.Module, iv: Interval, bn: str) -> Interval:
    """iv with the clean tensor the rule bn needs: kept for "clean" where model has batch statistics,
    dropped otherwise (nothing else to compute)."""
    if bn not in BN_RULES:
        raise ValueError(f"bn must be one of {', '.join(BN_RULES)}; got {bn!r}")
    if bn == "centre" or not batch_statistics(model):
        return Interval(iv.c, iv.r) if iv.clean is not None else iv
    if iv.clean is None:
        raise ValueError('bn="clean" needs the clean input: give Interval(c, r, clean=x) (input_box does), '
                         'or bn="centre"')
    return iv


def propagate(module: nn.Module, iv: Interval, spec: Optional[torch.Tensor] = None, where: str = "model",
              bn: Optional[str] = None) -> Interval:
    """The interval of module's output over the input interval iv (then of spec @ output, if given).
    bn: the BatchNorm rule in training mode, "clean" or "centre" (see the module docstring), or None
    (rules calling propagate on their children: whatever iv carries, the clean rule where iv.clean is
    given)."""
    if bn is not None:
        iv = with_bn_rule(module, iv, bn)
    rule = _RULES.get(type(module))
    if rule is not None:
        try:
            return rule(module, iv, spec)
        except UnsupportedLayerError as e:
            if " (at " in str(e):
                raise
            raise UnsupportedLayerError(f"{e} (at {where})") from None
    if type(module) is nn.Sequential:
        return _sequential(module, iv, spec, where)
    raise UnsupportedLayerError(
        f"interval bound propagation has no rule for {type(module).__name__} (at {where}); supported: "
        f"{', '.join(supported())}; add one with robustops.bounds.register")


# ------------------------------------------------------------------------------------ layer rules

def _affine_channels(iv: Interval, scale: torch.Tensor, shift: torch.Tensor) -> Interval:
    """x -> scale * x + shift with per-channel (dim 1) scale / shift."""
    shape = (1, -1) + (1,) * (iv.c.dim() - 2)
    s, t = scale.reshape(shape).to(iv.c.dtype), shift.reshape(shape).to(iv.c.dtype)
    return Interval(iv.c * s + t, iv.r * s.abs(), iv.with_clean(lambda v: v * s + t))


@register(nn.Linear)
def _linear(m: nn.Linear, iv: Interval, spec: Optional[torch.Tensor]) -> Interval:
    w, b = m.weight, m.bias
    clean = iv.with_clean(lambda t: F.linear(t, w, b))
    if spec is None:
        return Interval(F.linear(iv.c, w, b), F.linear(iv.r, w.abs()), clean)
    # Elision (Gowal et al., section 3): bound spec @ (W h + b) = (spec W) h + spec b directly.
    w_s = torch.einsum("bsk,kd->bsd", spec, w.to(spec.dtype))
    c = torch.einsum("bsd,bd->bs", w_s, iv.c)
    if b is not None:
        c = c + torch.einsum("bsk,k->bs", spec, b.to(spec.dtype))
    clean = None if clean is None else torch.einsum("bsk,bk->bs", spec, clean)
    return Interval(c, torch.einsum("bsd,bd->bs", w_s.abs(), iv.r), clean)


#: Per device type: compute W c and |W| r as one grouped convolution over the stacked pair (True) or
#: as two convolutions (False). Set from benchmarks/bench_bounds.py's measurements (see README).
STACKED_CONV = {"cpu": False, "cuda": True}


def _conv_pair(m: nn.Conv2d, c, r, wc, wr, b):
    """(wc * c + b, wr * r) for m's geometry: two convolutions, or one grouped convolution over the stacked
    pair where STACKED_CONV says so."""
    args = (m.stride, m.padding, m.dilation)
    if STACKED_CONV.get(c.device.type, False):
        bias = None if b is None else torch.cat([b, torch.zeros_like(b)])
        return F.conv2d(torch.cat([c, r], 1), torch.cat([wc, wr]), bias, *args, groups=2 * m.groups).chunk(2, 1)
    return F.conv2d(c, wc, b, *args, groups=m.groups), F.conv2d(r, wr, None, *args, groups=m.groups)


def _conv(m: nn.Conv2d, iv: Interval, spec: Optional[torch.Tensor]) -> Interval:
    if m.padding_mode != "zeros":
        raise UnsupportedLayerError(f"Conv2d with padding_mode={m.padding_mode!r} (only zero padding)")
    w, b = m.weight, m.bias
    out = Interval(*_conv_pair(m, iv.c, iv.r, w, w.abs(), b))
    out.clean = iv.with_clean(lambda t: F.conv2d(t, w, b, m.stride, m.padding, m.dilation, m.groups))
    return apply_spec(out, spec)


register(nn.Conv2d)(_conv)


@register(nn.ReLU)
def _relu(m, iv: Interval, spec) -> Interval:
    return apply_spec(iv.monotone(F.relu), spec)


@register(nn.MaxPool2d)
def _maxpool(m: nn.MaxPool2d, iv: Interval, spec) -> Interval:
    if m.return_indices:
        raise UnsupportedLayerError("MaxPool2d(return_indices=True)")
    return apply_spec(iv.monotone(m), spec)


@register(nn.AvgPool2d, nn.AdaptiveAvgPool2d)
def _avgpool(m, iv: Interval, spec) -> Interval:
    if isinstance(m, nn.AvgPool2d) and m.divisor_override is not None:
        raise UnsupportedLayerError("AvgPool2d(divisor_override=...)")
    return apply_spec(iv.map(m), spec)  # positive weights summing to one: c' = A c, r' = A r


@register(nn.Flatten, nn.Identity, nn.Dropout)
def _shape_only(m, iv: Interval, spec) -> Interval:
    if isinstance(m, nn.Dropout) and m.training and m.p > 0:
        raise UnsupportedLayerError("Dropout in training mode (put the model in eval mode)")
    return apply_spec(iv if isinstance(m, (nn.Identity, nn.Dropout)) else iv.map(m), spec)


def _bn_scale_shift(m: nn.modules.batchnorm._BatchNorm, ref: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm m as x -> scale * x + shift per channel: with the running statistics in eval mode, else
    with the mean / biased variance of ref (the batch whose statistics the bounds hold fixed)."""
    if m.training or m.running_mean is None:
        dims = [0] + list(range(2, ref.dim()))
        mean = ref.mean(dim=dims)
        var = ref.var(dim=dims, unbiased=False)
    else:
        mean, var = m.running_mean, m.running_var
    scale = torch.rsqrt(var + m.eps)
    if m.weight is not None:
        scale = scale * m.weight
    shift = -mean * scale
    if m.bias is not None:
        shift = shift + m.bias
    return scale, shift


@register(nn.BatchNorm1d, nn.BatchNorm2d)
def _batchnorm(m: nn.modules.batchnorm._BatchNorm, iv: Interval, spec) -> Interval:
    # batch statistics: the clean activations' ("clean") where the interval carries them, else the centres'
    scale, shift = _bn_scale_shift(m, iv.c if iv.clean is None else iv.clean)
    return apply_spec(_affine_channels(iv, scale, shift), spec)


# ------------------------------------------------------------- fused blocks of a Sequential
# A Sequential's runs of Conv2d / Linear [+ BatchNorm] [+ ReLU] take fewer passes over memory than the
# layer rules above (same interval arithmetic; equal to them up to float rounding):
# - BatchNorm whose statistics are known before the products (running statistics, or the clean
#   activations' under bn="clean") is folded into a convolution's weights and bias (exact algebraically:
#   s (W c + b) + t = (s W) c + (s b + t), |s W| = |s| |W|); after a Linear (weights larger than its
#   outputs) and under the centre rule it is applied to the outputs;
# - the products give c' = W c + b and D = 2 r' = 2 |W| r, and ReLU gives its upper end u = relu(c' + D / 2)
#   and width d = min(u, D) (= relu(u') - relu(l') for l' = u' - D), leaving the interval as
#   c = -(d - 2 u) / 2, r = d / 2: the factors -1/2 and 1/2 (powers of two, so exactly) go into the next
#   layer's weights instead of two scaling passes (``_Lazy``).

class _Lazy:
    """The interval with centre a * p and radius b * q (a, b powers of two, signed), and the clean tensor."""
    __slots__ = ("p", "a", "q", "b", "clean")

    def __init__(self, p, a, q, b, clean):
        self.p, self.a, self.q, self.b, self.clean = p, a, q, b, clean

    def interval(self) -> Interval:
        return Interval(self.p if self.a == 1 else self.p * self.a, self.q if self.b == 1 else self.q * self.b,
                        self.clean)


_ABS: "torch.utils.weak.WeakIdKeyDictionary" = torch.utils.weak.WeakIdKeyDictionary()


def _abs_weight(w: torch.Tensor) -> torch.Tensor:
    """|w|, kept per weight tensor while its storage and version counter are unchanged, where no graph is
    recorded (certification's repeated passes over a large Linear); computed afresh where gradients are
    recorded (training: the weights change every step) and under torch.compile."""
    if (torch.is_grad_enabled() and w.requires_grad) or torch.compiler.is_compiling():
        return w.abs()
    key = (w.data_ptr(), w._version, w.dtype, w.shape)
    hit = _ABS.get(w)
    if hit is None or hit[0] != key:
        hit = _ABS[w] = (key, w.detach().abs())
    return hit[1]


def _builtin(m: nn.Module, rule: Rule) -> bool:
    return _RULES.get(type(m)) is rule


def _block(children, i: int) -> int:
    """How many children from i form a fused block (0: none): Conv2d (zero padding) or Linear with their
    built-in rules, then optionally BatchNorm1d/2d, then optionally ReLU."""
    m = children[i][1]
    if not ((_builtin(m, _conv) and m.padding_mode == "zeros") or _builtin(m, _linear)):
        return 0
    n = 1
    if i + n < len(children) and _builtin(children[i + n][1], _batchnorm):
        n += 1
    if i + n < len(children) and _builtin(children[i + n][1], _relu):
        n += 1
    return n


def _fused(m: nn.Module, bn, relu: bool, z: _Lazy) -> _Lazy:
    """The block m (Conv2d / Linear), bn (BatchNorm or None), ReLU if relu, on z (see the comment above)."""
    conv = isinstance(m, nn.Conv2d)

    def prod(t, w, b=None):
        return F.conv2d(t, w, b, m.stride, m.padding, m.dilation, m.groups) if conv else F.linear(t, w, b)

    w, b = m.weight, m.bias
    clean = None if z.clean is None else prod(z.clean, w, b)
    fold = bn is not None and conv and (clean is not None or not (bn.training or bn.running_mean is None))
    if fold:
        s, t = _bn_scale_shift(bn, clean)
        view = (-1,) + (1,) * (w.dim() - 1)
        if clean is not None:  # as _batchnorm's
            clean = clean * s.reshape((1,) + view[:-1]).to(clean.dtype) + t.reshape((1,) + view[:-1]).to(clean.dtype)
        w = w * s.reshape(view).to(w.dtype)
        b = t.to(w.dtype) if b is None else b * s.to(w.dtype) + t.to(w.dtype)
        bn = None
    if conv:  # the factors a, 2 b into the (small) weights
        wc = w if z.a == 1 else w * z.a
        wr = wc.abs() * (2 * z.b / abs(z.a))
        c, d = _conv_pair(m, z.p, z.q, wc, wr, b)
    else:  # into the (small) outputs: exact scaling, the same sums
        c = F.linear(z.p, w, b) if z.a == 1 else F.linear(z.p, w) * z.a if b is None else \
            torch.addmm(b, z.p.flatten(0, -2), w.t(), alpha=z.a).unflatten(0, z.p.shape[:-1])  # any leading dims
        d = F.linear(z.q, _abs_weight(w))
        d = d if 2 * z.b == 1 else d * (2 * z.b)
    if bn is not None:  # after a Linear, or the centre rule (statistics of c)
        s, t = _bn_scale_shift(bn, c if clean is None else clean)
        iv = _affine_channels(Interval(c, d, clean), s, t)
        c, d, clean = iv.c, iv.r, iv.clean
    if not relu:
        return _Lazy(c, 1, d, 0.5, clean)
    if c.requires_grad or d.requires_grad or torch.compiler.is_compiling():  # minimum's backward saves u, d
        u = torch.add(c, d, alpha=0.5).relu_()
        d = torch.minimum(u, d)
        p = torch.add(d, u, alpha=-2.0)
    else:  # no graph: in place in this block's own buffers
        u = c.add_(d, alpha=0.5).relu_()
        p = torch.add(torch.minimum(u, d, out=d), u, alpha=-2.0, out=u)
    return _Lazy(p, -0.5, d, 0.5, None if clean is None else F.relu(clean))


def _sequential(module: nn.Sequential, iv: Interval, spec: Optional[torch.Tensor], where: str) -> Interval:
    """propagate for an nn.Sequential: its fused blocks (``_fused``), Flatten between them, and every other
    child by its rule; the last child takes spec (a last Linear on its own keeps the elision)."""
    children = list(module.named_children())
    z: Optional[_Lazy] = None
    i = 0
    while i < len(children):
        name, child = children[i]
        n = _block(children, i)
        if n and not (n == 1 and i + 1 == len(children) and spec is not None):
            if z is None:
                z = _Lazy(iv.c, 1, iv.r, 1, iv.clean)
            mods = [c for _, c in children[i:i + n]]
            bn = next((c for c in mods if isinstance(c, nn.modules.batchnorm._BatchNorm)), None)
            z = _fused(child, bn, isinstance(mods[-1], nn.ReLU), z)
            i += n
            continue
        i += 1
        if z is not None and _builtin(child, _shape_only) and isinstance(child, nn.Flatten) and i < len(children):
            z = _Lazy(child(z.p), z.a, child(z.q), z.b, None if z.clean is None else child(z.clean))
            continue
        if z is not None:
            iv, z = z.interval(), None
        iv = propagate(child, iv, spec if i == len(children) else None, f"{where}.{name}")
    return apply_spec(z.interval(), spec) if z is not None else iv if children else apply_spec(iv, spec)


def _normalize_rule(m, iv: Interval, spec) -> Interval:
    inv = 1.0 / m.std.flatten()
    return apply_spec(_affine_channels(iv, inv, -m.mean.flatten() * inv), spec)


def _register_models() -> None:
    """Rules of robustops.models' networks (their forward written in intervals)."""
    from . import models as M

    register(M.Normalize)(_normalize_rule)

    @register(M.SmallCNN)
    def _small_cnn(m, iv, spec):
        return propagate(m.classifier, propagate(m.features, iv, None, "features"), spec, "classifier")

    @register(M.PreActBlock)
    def _preact_block(m, iv, spec):
        out = propagate(m.bn1, iv).monotone(F.relu)
        skip = propagate(m.shortcut, out) if m.shortcut is not None else iv
        out = propagate(m.conv1, out)
        out = propagate(m.conv2, propagate(m.bn2, out).monotone(F.relu))
        return apply_spec(out + skip, spec)

    @register(M.PreActResNet18)
    def _preact_resnet(m, iv, spec):
        out = propagate(m.conv1, iv)
        for name in ("layer1", "layer2", "layer3", "layer4"):
            out = propagate(getattr(m, name), out, None, name)
        out = propagate(m.bn, out).monotone(F.relu)
        out = out.map(lambda t: F.adaptive_avg_pool2d(t, 1).flatten(1))
        return propagate(m.linear, out, spec)

    @register(M.BasicBlock)
    def _basic_block(m, iv, spec):
        out = propagate(m.bn1, propagate(m.conv1, iv)).monotone(F.relu)
        out = propagate(m.bn2, propagate(m.conv2, out))
        skip = iv
        if m.stride != 1:
            skip = skip.map(lambda t: t[:, :, ::m.stride, ::m.stride])
        if m.pad:
            skip = skip.map(lambda t: F.pad(t, (0, 0, 0, 0, m.pad // 2, m.pad - m.pad // 2)))
        return apply_spec((out + skip).monotone(F.relu), spec)

    @register(M.CifarResNet)
    def _cifar_resnet(m, iv, spec):
        out = propagate(m.bn1, propagate(m.conv1, iv)).monotone(F.relu)
        for name in ("layer1", "layer2", "layer3"):
            out = propagate(getattr(m, name), out, None, name)
        out = out.map(lambda t: F.adaptive_avg_pool2d(t, 1).flatten(1))
        return propagate(m.linear, out, spec)

    @register(M.CohenBasicBlock)
    def _cohen_block(m, iv, spec):
        out = propagate(m.bn1, propagate(m.conv1, iv)).monotone(F.relu)
        out = propagate(m.bn2, propagate(m.conv2, out))
        skip = iv if m.downsample is None else propagate(m.downsample, iv, None, "downsample")
        return apply_spec((out + skip).monotone(F.relu), spec)

    @register(M.CohenCifarResNet)
    def _cohen_resnet(m, iv, spec):
        out = propagate(m.bn1, propagate(m.conv1, iv)).monotone(F.relu)
        for name in ("layer1", "layer2", "layer3"):
            out = propagate(getattr(m, name), out, None, name)
        out = propagate(m.avgpool, out).map(lambda t: t.flatten(1))
        return propagate(m.fc, out, spec)

    @register(M.CNN7)
    def _cnn7(m, iv, spec):
        return propagate(m.net, iv, spec, "net")


_register_models()


# ---------------------------------------------------------------------------------- entry points

def input_box(x: torch.Tensor, eps: Param, lo: float = 0.0, hi: float = 1.0) -> Interval:
    """The interval of {x' : |x' - x|_inf <= eps} intersected with [lo, hi] (eps: float or Tensor[B]), with
    x as its clean tensor."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise ValueError(f"x must be a floating-point batch [B, ...], got "
                         f"{list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not float(lo) <= float(hi):
        raise ValueError(f"lo must be <= hi, got lo={lo}, hi={hi}")
    e = _checks.sample_param_on(eps, "eps", x.shape[0], x.device)  # checked (float32 copy)
    if isinstance(e, torch.Tensor):  # in x's precision, from the caller's values
        e = eps.to(device=x.device, dtype=x.dtype).reshape((-1,) + (1,) * (x.dim() - 1))
    lower = (x - e).clamp(float(lo), float(hi))
    upper = (x + e).clamp(float(lo), float(hi))
    return Interval.from_bounds(lower, upper, x)


def margin_spec(y: torch.Tensor, num_classes: int, dtype=torch.float32) -> torch.Tensor:
    """spec [B, K, K] with row j = e_y - e_j: spec @ z = z_y - z_j (row y is zero)."""
    eye = torch.eye(num_classes, dtype=dtype, device=y.device)
    return eye[y].unsqueeze(1) - eye.unsqueeze(0)


def _num_classes(model: nn.Module, x: torch.Tensor) -> int:
    """The model's number of outputs: one forward pass of one input in eval mode (no running-statistics
    update), without gradients."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return int(model(x[:1]).shape[1])
    finally:
        model.train(was)


def interval_bounds(model: nn.Module, x: torch.Tensor, eps: Param, lo: float = 0.0,
                    hi: float = 1.0, *, bn: str = "clean") -> Tuple[torch.Tensor, torch.Tensor]:
    """(lower, upper) bounds of model's outputs over the box around each input (in the model's current
    mode; differentiable with respect to the parameters). bn: the BatchNorm rule in training mode,
    "clean" or "centre" (module docstring)."""
    out = propagate(model, input_box(x, eps, lo, hi), bn=bn)
    return out.lower, out.upper


def margin_bounds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: Param, lo: float = 0.0,
                  hi: float = 1.0, num_classes: Optional[int] = None, *, bn: str = "clean") -> torch.Tensor:
    """Lower bounds of z_y - z_j over the box, [B, K] (0 at j = y), with the last Linear layer elided
    into the specification. num_classes: K (None: one forward pass of one input finds it). bn: the
    BatchNorm rule in training mode, "clean" or "centre" (module docstring)."""
    y = _checks.check_labels(y, x.shape[0], x.device, "y")
    k = _num_classes(model, x) if num_classes is None else int(num_classes)
    # data-dependent: checked in eager mode only (a compiled graph would have to break for it)
    if x.shape[0] and not torch.compiler.is_compiling() and int(y.max()) >= k:
        raise ValueError(f"y must lie in [0, {k - 1}] for a model with {k} outputs, got {int(y.max())}")
    iv = input_box(x, eps, lo, hi)
    out = propagate(model, iv, margin_spec(y, k, dtype=torch.float32 if x.dtype != torch.float64 else x.dtype), bn=bn)
    return out.lower


def worst_case_logits(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: Param, lo: float = 0.0,
                      hi: float = 1.0, num_classes: Optional[int] = None, *, bn: str = "clean") -> torch.Tensor:
    """-margin_bounds: logits whose class-y entry is 0 and class-j entry an upper bound of z_j - z_y, so
    that CE(worst_case_logits, y) bounds the cross entropy over the box from above (Gowal et al.)."""
    return -margin_bounds(model, x, y, eps, lo, hi, num_classes, bn=bn)


def verified(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: Param, lo: float = 0.0, hi: float = 1.0,
             num_classes: Optional[int] = None, *, bn: str = "clean") -> torch.Tensor:
    """BoolTensor[B]: IBP proves class y at every point of the box (every margin bound > 0), with the
    BatchNorm rule bn in training mode."""
    m = margin_bounds(model, x, y, eps, lo, hi, num_classes, bn=bn)
    m = m.scatter(1, y.view(-1, 1).long(), float("inf"))
    return (m > 0).all(dim=1)


#: certified_radius's bounds by name: verify(model, x, y, eps, lo, hi, num_classes) -> BoolTensor[B]. "ibp" is
#: this module's; robustops.crown registers "crown", "crown-ibp" and "best" when imported (a registry, so that
#: this module, below crown, never imports it).
_VERIFIERS: Dict[str, Callable[..., torch.Tensor]] = {}


def register_verifier(name: str, fn: Callable[..., torch.Tensor]) -> None:
    """Make ``fn(model, x, y, eps, lo, hi, num_classes, *, bn) -> BoolTensor[B]`` the bound ``name`` of
    certified_radius (``bound=name``; bn: its BatchNorm rule). Sound: True only where the class is proven."""
    _VERIFIERS[str(name)] = fn


def verifiers() -> Tuple[str, ...]:
    """The names certified_radius's ``bound`` accepts now."""
    return tuple(_VERIFIERS)


register_verifier("ibp", verified)


@dataclass
class RadiusResult:
    """prediction: the clean prediction [B]; radius [B] (float64): the largest grid radius at which IBP proves the
    certified class (the label if given, else the prediction; 0 when the label is not predicted or
    nothing is proven); passes: bound passes done; step: the grid spacing."""
    prediction: torch.Tensor
    radius: torch.Tensor
    passes: int
    step: float


RADIUS_MODES = ("eval", "train")


@contextlib.contextmanager
def _radius_mode(model: nn.Module, mode: str):
    """No gradients or autocast; mode "eval": the model in eval mode; "train": left in its mode, every
    BatchNorm buffer (running mean / variance, num_batches_tracked) restored on exit, so that the clean
    forward of the search changes none."""
    if mode not in RADIUS_MODES:
        raise ValueError(f"mode must be one of {', '.join(RADIUS_MODES)}; got {mode!r}")
    was = model.training
    saved = [(b, b.clone()) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             for b in m.buffers(recurse=False)] if mode == "train" else []
    if mode == "eval":
        model.eval()
    try:
        with torch.no_grad(), torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            yield
    finally:
        model.train(was)
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


def certified_radius(model: nn.Module, x: torch.Tensor, y: Optional[torch.Tensor] = None, *, eps_max: float,
                     tol: float = 1e-3, lo: float = 0.0, hi: float = 1.0, mode: str = "eval",
                     bn: str = "clean", bound: str = "ibp") -> RadiusResult:
    """Per-sample L-inf certified radius by IBP: the largest radius on the grid
    G = {k h : k h < eps_max} + {eps_max}, h = 2^floor(log2(tol)) (so h <= tol), at which IBP proves the
    class, found by bisection over the grid indices of all samples at once
    (ceil(log2(ceil(eps_max / h) + 1)) bound passes, no per-sample loop). eps_max itself is on the grid,
    so a sample IBP proves at eps_max gets exactly eps_max (certified accuracy at the training radius,
    8/255 say, is not lost to the grid). IBP's enclosures grow with the box, so the proven radii form an
    interval [0, r*] and the result is the largest grid point <= r*: at most h below min(r*, eps_max).
    The grids of smaller tolerances refine those of larger ones (the radius never shrinks as tol
    shrinks); a larger eps_max never gives a smaller radius except that one proven at the smaller cap
    may fall back to the grid point below it (less than h).

    y: the labels (certify the true class: radius 0 where the prediction is wrong) or None (certify the
    predicted class). Runs without gradients or autocast, in x's precision (float32 for half inputs); the
    radii are float64 (grid points and eps_max exactly). mode "eval" (certification): the model in eval
    mode. mode "train" (ACERT's search, as its authors run it): the model as it is, in training mode
    the bounds of the BatchNorm rule bn (clean: the statistics of the clean batch x) and the prediction
    of the training-mode forward; where a BatchNorm uses batch statistics every bound pass covers the
    whole batch (the statistics are x's, not those of the samples still searched); no running statistic
    changes.

    bound: the verifier, "ibp" (this module, with the rule bn) or one registered with register_verifier
    ("crown", "crown-ibp", "best" once robustops.crown is imported). A bound that is not monotone in the
    radius (CROWN's adaptive slopes can switch) still gives a certified radius: the result is always a
    radius at which the verifier proved the class; a verifier never weaker than IBP at any radius (best)
    gives a radius >= IBP's (IBP's proven set is an interval [0, r*] and bisection keeps hi > r*)."""
    eps_max = _checks.check_number(eps_max, "eps_max", 0.0, strict=True)
    tol = _checks.check_number(tol, "tol", 0.0, strict=True)
    if not math.isfinite(eps_max):
        raise ValueError(f"eps_max must be finite, got {eps_max}")
    if bound not in _VERIFIERS:
        raise ValueError(f"bound must be one of {', '.join(_VERIFIERS)} (import robustops.crown for crown, "
                         f"crown-ibp, best), got {bound!r}")
    verify = functools.partial(_VERIFIERS[bound], bn=bn)
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    h = 2.0 ** math.floor(math.log2(tol))
    top = int(math.ceil(eps_max / h))  # grid index top is eps_max itself (k h for k < top lie below it)

    def grid(k: torch.Tensor) -> torch.Tensor:
        return torch.where(k >= top, torch.full_like(k, eps_max, dtype=torch.float64), k.to(torch.float64) * h)

    with _radius_mode(model, mode):
        logits = model(x)
        pred = logits.argmax(1)
        k = logits.shape[1]
        target = pred if y is None else _checks.check_labels(y, x.shape[0], x.device, "y")
        # radius 0 is "proven" when the target is the strict maximum of the clean logits
        others = logits.scatter(1, target.view(-1, 1), float("-inf"))
        ok0 = logits.gather(1, target.view(-1, 1)).squeeze(1) > others.amax(1)
        lo_k = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
        hi_k = torch.full_like(lo_k, top + 1)
        hi_k = torch.where(ok0, hi_k, torch.ones_like(hi_k))  # nothing proven: the search is empty
        passes = 0
        whole = mode == "train" and batch_statistics(model)  # batch statistics: x's, not the active samples'
        while bool((hi_k - lo_k > 1).any()):
            mid = (lo_k + hi_k) // 2
            active = hi_k - lo_k > 1
            idx = torch.arange(x.shape[0], device=x.device) if whole else active.nonzero().squeeze(1)
            ok = verify(model, x[idx], target[idx], grid(mid[idx]).to(x.dtype), lo, hi, num_classes=k)
            passes += 1
            ok, done = ok & active[idx], ~active[idx]
            lo_k[idx] = torch.where(ok, mid[idx], lo_k[idx])
            hi_k[idx] = torch.where(ok | done, hi_k[idx], mid[idx])
    radius = torch.where(ok0, grid(lo_k), torch.zeros(lo_k.shape, dtype=torch.float64, device=lo_k.device))
    return RadiusResult(pred, radius, passes, h)
