"""CROWN and CROWN-IBP: linear-relaxation lower bounds of the margins z_y - z_j over an L-inf box.

    m = crown.margin_bounds(model, x, y, eps, method="crown")     # [B, K], 0 at j = y
    ok = crown.verified(model, x, y, eps, method="crown-ibp")     # BoolTensor[B]
    res = bounds.certified_radius(model, x, y, eps_max=0.4, bound="crown")   # after importing crown

The box is {x' : |x' - x|_inf <= eps} intersected with [lo, hi] (eps a float or a Tensor[B]), i.e. the
product of intervals [x_l, x_u] = [max(x - eps, lo), min(x + eps, hi)] (robustops.bounds.input_box).

Backward linear relaxation (Zhang et al. 2018, "Efficient neural network robustness certification with
general activation functions", CROWN, theorem 3.2 and its corollary 3.3): the network is flattened into
a list of layers f_1 ... f_n (nn.Sequential recursion; SmallCNN = features + classifier; CNN7 = .net).
A lower bound of the specification C z_n is built backwards: Lambda_n = C, and for layer i

- affine layers (Linear, Conv2d, BatchNorm in eval mode, Normalize, Flatten, Identity, Dropout in eval):
  f_i(h) = W_i h + b_i gives Lambda_{i-1} = Lambda_i W_i and the constant term gains Lambda_i b_i (the
  transpose of a convolution is conv_transpose2d, its output_padding computed from the input shape);
- ReLU with pre-activation bounds l <= h <= u (per neuron): the relaxation
  alpha h <= ReLU(h) <= s (h - l), s = u / (u - l), for unstable neurons (l < 0 < u); exact (slope 1 or 0)
  for stable ones. The lower slope is CROWN's adaptive rule alpha = 1 if u >= -l else 0 (the one
  that minimises the relaxation's area; the slope is fixed, not optimised as alpha-CROWN does).
  For a lower bound a positive coefficient takes the lower line, a negative one the upper line:
  Lambda_{i-1} = [Lambda_i]_+ alpha + [Lambda_i]_- s and the constant gains [Lambda_i]_- (-s l);
- MaxPool2d with input bounds [l, u]: per window, with i* the input of largest lower bound (the first
  on a tie), max >= h_{i*} (lower line), and max <= h_{i*} when l_{i*} >= u_j for every other j of the
  window (then the max is h_{i*} itself), else max <= max_j u_j (a constant). This is sound but coarser
  than auto_LiRPA's max-pool relaxation (which uses a sloped upper line); it is what lets one proof
  at a time pass through a window.

At the input the linear bound Lambda_0 x + c is minimised over the box exactly:
Lambda_0 x_c - |Lambda_0| x_r + c (x_c, x_r the box's centre and radius) (Zhang et al. 2018, eq. 11 for the
L-inf ball, here for the box clipped to [lo, hi]).

Intermediate bounds (the [l, u] each ReLU / MaxPool needs):
- ``method="crown"``: full CROWN; the bounds of every nonlinear layer's input come from their own backward
  pass from that layer (specification [I; -I] on its input), in order, each using the relaxations of the
  layers before it. A nonlinear layer directly after another (ReLU then MaxPool) takes the interval image
  of the earlier one's bounds (both are monotone). The cost is quadratic in depth and linear in the
  neurons of each layer: more than ``NEURON_BUDGET`` neurons at one layer is refused (use crown-ibp).
  Each neuron's CROWN bounds are intersected with its IBP bounds (IBP propagated from the box, both sound;
  what auto_LiRPA does with its reference bounds): CROWN's intermediate bounds are not tighter than IBP's
  on every neuron of a certifiably trained network, and without the intersection full CROWN can prove
  less than CROWN-IBP.
- ``method="crown-ibp"``: CROWN-IBP (Zhang et al. 2020, "Towards stable and efficient training of
  verifiably robust neural networks", ICLR, section 3): the intermediate bounds are IBP's
  (robustops.bounds.propagate layer by layer), and only the specification is bounded by the backward pass.
- ``method="best"``: the elementwise maximum of IBP's margin bounds (robustops.bounds.margin_bounds) and
  CROWN's: both are sound, so their maximum is.

Specification: the elided margins (Gowal et al. 2018): C = e_y - e_j, so the last Linear layer is folded
into C in the first backward step (Lambda_{n-1} = C W_n). As in robustops.bounds.margin_bounds the row
j = y is zero, and its bound is 0.

Everything runs in x's dtype (float64 in the tests) without autocast; the bounds are differentiable with
respect to the parameters (CROWN-IBP training back-propagates through them). BatchNorm in training mode
is refused for now. Bounds are computed in chunks of specification rows so that no coefficient tensor
holds more than ``CHUNK_ELEMENTS`` numbers. Soundness up to rounding, as for robustops.bounds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _checks
from . import bounds
from . import models as M

__all__ = ["METHODS", "NEURON_BUDGET", "CHUNK_ELEMENTS", "flatten_layers", "margin_bounds", "verified",
           "linear_lower_bound"]

Param = Union[float, torch.Tensor]

#: The bound methods of this module.
METHODS = ("crown", "crown-ibp", "best")
#: Full CROWN refuses a nonlinear layer with more input neurons than this (one backward pass per neuron).
NEURON_BUDGET = 20000
#: The largest coefficient tensor (numbers) one chunk of specification rows may hold.
CHUNK_ELEMENTS = 1 << 24

_AFFINE = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, M.Normalize, nn.Flatten, nn.Identity, nn.Dropout)
_NONLINEAR = (nn.ReLU, nn.MaxPool2d)


def flatten_layers(model: nn.Module, where: str = "model") -> List[Tuple[str, nn.Module]]:
    """The model as a list of (name, layer): nn.Sequential recursed, SmallCNN as features + classifier,
    CNN7 as its .net. A layer CROWN has no rule for raises bounds.UnsupportedLayerError naming it."""
    if type(model) is nn.Sequential:
        out: List[Tuple[str, nn.Module]] = []
        for name, child in model.named_children():
            out += flatten_layers(child, f"{where}.{name}")
        return out
    if type(model) is M.SmallCNN:
        return flatten_layers(model.features, f"{where}.features") + flatten_layers(model.classifier,
                                                                                    f"{where}.classifier")
    if type(model) is M.CNN7:
        return flatten_layers(model.net, f"{where}.net")
    if type(model) in _AFFINE or type(model) in _NONLINEAR:
        _check_layer(model, where)
        return [(where, model)]
    raise bounds.UnsupportedLayerError(
        f"CROWN has no rule for {type(model).__name__} (at {where}); supported: Linear, Conv2d, ReLU, "
        f"BatchNorm1d/2d (eval), Flatten, MaxPool2d, Normalize, Identity, Dropout (eval), Sequential, SmallCNN, "
        f"CNN7")


def _check_layer(m: nn.Module, where: str) -> None:
    def refuse(what: str):
        raise bounds.UnsupportedLayerError(f"CROWN: {what} (at {where})")

    if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None):
        refuse(f"{type(m).__name__} in training mode (put the model in eval mode; CROWN bounds BatchNorm as the "
               f"affine map of its running statistics)")
    if isinstance(m, nn.Dropout) and m.training and m.p > 0:
        refuse("Dropout in training mode (put the model in eval mode)")
    if isinstance(m, nn.Conv2d) and (m.padding_mode != "zeros" or isinstance(m.padding, str)):
        refuse(f"Conv2d with padding_mode={m.padding_mode!r}, padding={m.padding!r} (only numeric zero padding)")
    if isinstance(m, nn.MaxPool2d) and (m.return_indices or m.ceil_mode):
        refuse("MaxPool2d with return_indices=True or ceil_mode=True")


# ------------------------------------------------------------------------------ relaxations

@dataclass
class _Relax:
    """A nonlinear layer's linear bounds, as used by a lower bound: lo_* for a positive coefficient, up_*
    for a negative one (slopes elementwise over the layer's input; a constant per output element)."""
    lo_slope: torch.Tensor
    up_slope: torch.Tensor
    up_const: torch.Tensor
    index: Optional[torch.Tensor] = None  # MaxPool: one-hot of i* per window, [B, C, k*k, L]


def _relu_relax(l: torch.Tensor, u: torch.Tensor) -> _Relax:
    unstable = (l < 0) & (u > 0)
    active = l >= 0
    denom = torch.where(unstable, u - l, torch.ones_like(u))
    s = torch.where(unstable, u / denom, active.to(u.dtype))
    alpha = torch.where(unstable, (u >= -l).to(u.dtype), active.to(u.dtype))
    return _Relax(alpha, s, torch.where(unstable, -s * l, torch.zeros_like(l)))


def _windows(m: nn.MaxPool2d, t: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, k*k, L]: the pooling windows (padding filled with -inf, never the max)."""
    k, s, p, d = (_pair(v) for v in (m.kernel_size, m.stride or m.kernel_size, m.padding, m.dilation))
    b, c = t.shape[:2]
    t = F.pad(t, (p[1], p[1], p[0], p[0]), value=float("-inf"))
    cols = F.unfold(t.reshape(b * c, 1, *t.shape[2:]), k, dilation=d, stride=s)
    return cols.reshape(b, c, cols.shape[1], cols.shape[2])


def _pair(v) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _maxpool_relax(m: nn.MaxPool2d, l: torch.Tensor, u: torch.Tensor) -> _Relax:
    wl, wu = _windows(m, l), _windows(m, u)
    star = wl.argmax(dim=2, keepdim=True)
    onehot = torch.zeros_like(wl).scatter_(2, star, 1.0)
    l_star = wl.gather(2, star).squeeze(2)
    others = wu.masked_fill(onehot.bool(), float("-inf")).amax(2)  # -inf for a one-element window
    tight = (l_star >= others).to(l.dtype)  # then max = h_{i*} exactly
    const = torch.where(tight.bool(), torch.zeros_like(l_star), wu.amax(2))
    out = (l.shape[0], l.shape[1]) + tuple(m(l[:1]).shape[2:])  # per window, in the output's shape
    return _Relax(torch.ones_like(l_star).reshape(out), tight.reshape(out), const.reshape(out), onehot)


# ------------------------------------------------------------------------------ backward steps

def _affine_step(m: nn.Module, a: torch.Tensor, shape: torch.Size) -> Tuple[torch.Tensor, torch.Tensor]:
    """(Lambda W, Lambda b) for an affine layer with input shape ``shape`` (no batch); a: [b, S, *out]."""
    b, s = a.shape[:2]
    if isinstance(m, nn.Linear):
        w = m.weight.to(a.dtype)
        const = a @ m.bias.to(a.dtype) if m.bias is not None else a.new_zeros(b, s)
        return a @ w, const
    if isinstance(m, nn.Conv2d):
        return _conv_step(m, a, shape)
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, M.Normalize)):
        scale, shift = _channel_affine(m, a.dtype)
        view = (1, 1, -1) + (1,) * (a.dim() - 3)
        return a * scale.reshape(view), (a * shift.reshape(view)).flatten(2).sum(2)
    if isinstance(m, nn.Flatten):
        return a.reshape(b, s, *shape), a.new_zeros(b, s)
    return a, a.new_zeros(b, s)  # Identity, Dropout (eval)


def _conv_step(m: nn.Conv2d, a: torch.Tensor, shape: torch.Size) -> Tuple[torch.Tensor, torch.Tensor]:
    b, s = a.shape[:2]
    flat = a.reshape(b * s, *a.shape[2:])
    stride, pad, dil, k = (_pair(v) for v in (m.stride, m.padding, m.dilation, m.kernel_size))
    # the forward map floors (in + 2p - d(k-1) - 1) / stride: output_padding restores the input size
    opad = tuple(shape[1 + i] - ((a.shape[3 + i] - 1) * stride[i] - 2 * pad[i] + dil[i] * (k[i] - 1) + 1)
                 for i in range(2))
    out = F.conv_transpose2d(flat, m.weight.to(a.dtype), None, stride, pad, opad, m.groups, dil)
    const = a.new_zeros(b, s)
    if m.bias is not None:
        const = a.sum(dim=(3, 4)) @ m.bias.to(a.dtype)
    return out.reshape(b, s, *shape), const


def _channel_affine(m: nn.Module, dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) per channel of an eval-mode BatchNorm or a Normalize."""
    if isinstance(m, M.Normalize):
        inv = 1.0 / m.std.flatten().to(dtype)
        return inv, -m.mean.flatten().to(dtype) * inv
    scale = torch.rsqrt(m.running_var.to(dtype) + m.eps)
    if m.weight is not None:
        scale = scale * m.weight.to(dtype)
    shift = -m.running_mean.to(dtype) * scale
    if m.bias is not None:
        shift = shift + m.bias.to(dtype)
    return scale, shift


def _relax_step(m: nn.Module, r: _Relax, a: torch.Tensor, shape: torch.Size) -> Tuple[torch.Tensor, torch.Tensor]:
    """Through a nonlinear layer: positive coefficients take the lower line, negative ones the upper."""
    pos, neg = a.clamp(min=0), a.clamp(max=0)
    const = (neg * r.up_const.unsqueeze(1)).flatten(2).sum(2)
    if isinstance(m, nn.ReLU):
        return pos * r.lo_slope.unsqueeze(1) + neg * r.up_slope.unsqueeze(1), const
    # MaxPool: the coefficient of window L goes to its input i* (scaled by the tight flag for negatives)
    b, s = max(a.shape[0], r.index.shape[0]), a.shape[1]
    coef = (pos + neg * r.up_slope.unsqueeze(1)).flatten(3)  # [b, S, C, L]
    cols = coef.unsqueeze(3) * r.index.unsqueeze(1)  # [b, S, C, k*k, L]
    kk, pad = cols.shape[3], _pair(m.padding)
    size = (shape[1] + 2 * pad[0], shape[2] + 2 * pad[1])
    k, st, d = (_pair(v) for v in (m.kernel_size, m.stride or m.kernel_size, m.dilation))
    folded = F.fold(cols.reshape(b * s * shape[0], kk, cols.shape[-1]), size, k, dilation=d, stride=st)
    folded = folded.reshape(b, s, shape[0], *size)[..., pad[0]:pad[0] + shape[1], pad[1]:pad[1] + shape[2]]
    return folded, const


# ------------------------------------------------------------------------------ the bound passes

def linear_lower_bound(layers, upto: int, spec: torch.Tensor, shapes, relax: Dict[int, _Relax],
                       box: bounds.Interval) -> torch.Tensor:
    """Lower bounds [B, S] of spec . (output of layers[:upto]) over box, spec [1 or B, S, *out shape], by
    the backward pass through layers[upto-1], ..., layers[0] with the relaxations ``relax`` (by layer
    index), in chunks of rows of at most CHUNK_ELEMENTS coefficients."""
    bsz = box.c.shape[0]
    biggest = max(int(torch.Size(s).numel()) for s in shapes[:upto + 1])
    rows = max(1, CHUNK_ELEMENTS // max(1, bsz * biggest))
    out = []
    for start in range(0, spec.shape[1], rows):
        a = spec[:, start:start + rows]
        const = a.new_zeros(1, a.shape[1])
        for i in reversed(range(upto)):
            m = layers[i][1]
            a, c = _relax_step(m, relax[i], a, shapes[i]) if i in relax else _affine_step(m, a, shapes[i])
            const = const + c
        a = a.flatten(2)
        lower = (a @ box.c.flatten(1).unsqueeze(2)).squeeze(2) - (a.abs() @ box.r.flatten(1).unsqueeze(2)).squeeze(2)
        out.append(lower + const)
    return torch.cat(out, dim=1)


def _identity_spec(shape: torch.Size, dtype, device) -> torch.Tensor:
    """[1, 2N, *shape]: rows e_n then -e_n (lower bounds of h_n and of -h_n, i.e. minus its upper bound)."""
    n = int(torch.Size(shape).numel())
    eye = torch.eye(n, dtype=dtype, device=device)
    return torch.cat([eye, -eye]).reshape(1, 2 * n, *shape)


def _relaxations(layers, shapes, box: bounds.Interval, method: str) -> Dict[int, _Relax]:
    """The relaxation of every nonlinear layer, from CROWN's (or, for crown-ibp, IBP's) input bounds."""
    relax: Dict[int, _Relax] = {}
    iv = box
    prev: Optional[bounds.Interval] = None  # the bounds of the previous nonlinear layer's input
    for i, (name, m) in enumerate(layers):
        if isinstance(m, _NONLINEAR):
            if method == "crown-ibp":
                cur = iv
            elif i > 0 and isinstance(layers[i - 1][1], _NONLINEAR):
                cur = bounds.propagate(layers[i - 1][1], prev, None, layers[i - 1][0])
            else:
                n = int(torch.Size(shapes[i]).numel())
                if n > NEURON_BUDGET:
                    raise ValueError(f"method='crown' bounds every neuron by its own backward pass: {name} has {n} "
                                     f"input neurons (more than {NEURON_BUDGET}); use method='crown-ibp'")
                low = linear_lower_bound(layers, i, _identity_spec(shapes[i], box.c.dtype, box.c.device), shapes,
                                         relax, box)
                # intersected with IBP's (both sound): CROWN is not tighter than IBP on every neuron
                lower = torch.maximum(low[:, :n].reshape(iv.c.shape), iv.lower)
                upper = torch.minimum(-low[:, n:].reshape(iv.c.shape), iv.upper)
                cur = bounds.Interval.from_bounds(lower, torch.maximum(lower, upper))
            relax[i] = (_relu_relax(cur.lower, cur.upper) if isinstance(m, nn.ReLU)
                        else _maxpool_relax(m, cur.lower, cur.upper))
            prev = cur
        iv = bounds.propagate(m, iv, None, name)
    return relax


def _shapes(layers, x: torch.Tensor) -> List[torch.Size]:
    """The input shape (no batch) of every layer, and the output's last: one clean pass of one input."""
    shapes = []
    with torch.no_grad():
        h = x[:1]
        for _, m in layers:
            shapes.append(h.shape[1:])
            h = m(h.clone())  # clone: ReLU(inplace=True) must not overwrite x
        shapes.append(h.shape[1:])
    return shapes


def margin_bounds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: Param, lo: float = 0.0, hi: float = 1.0,
                  method: str = "crown", num_classes: Optional[int] = None) -> torch.Tensor:
    """Lower bounds [B, K] of z_y - z_j over the box (0 at j = y) by CROWN, CROWN-IBP or the best of
    IBP and CROWN (``method``: one of METHODS). num_classes is checked against the model's output."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    y = _checks.check_labels(y, x.shape[0], x.device, "y")
    layers = flatten_layers(model)
    box = bounds.input_box(x, eps, lo, hi)
    shapes = _shapes(layers, x)
    if len(shapes[-1]) != 1:
        raise bounds.UnsupportedLayerError(f"CROWN needs [B, K] outputs, got [B, {', '.join(map(str, shapes[-1]))}]")
    k = int(shapes[-1][0])
    if num_classes is not None and int(num_classes) != k:
        raise ValueError(f"num_classes must be the model's number of outputs ({k}), got {num_classes}")
    if x.shape[0] and int(y.max()) >= k:
        raise ValueError(f"y must lie in [0, {k - 1}] for a model with {k} outputs, got {int(y.max())}")
    relax = _relaxations(layers, shapes, box, "crown-ibp" if method == "crown-ibp" else "crown")
    spec = bounds.margin_spec(y, k, dtype=x.dtype)
    out = linear_lower_bound(layers, len(layers), spec, shapes, relax, box)
    if method == "best":
        out = torch.maximum(out, bounds.margin_bounds(model, x, y, eps, lo, hi, num_classes=k).to(out.dtype))
    return out


def verified(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: Param, lo: float = 0.0, hi: float = 1.0,
             method: str = "crown", num_classes: Optional[int] = None) -> torch.Tensor:
    """BoolTensor[B]: the bound ``method`` proves class y at every point of the box (every margin > 0)."""
    m = margin_bounds(model, x, y, eps, lo, hi, method, num_classes)
    m = m.scatter(1, y.view(-1, 1).long(), float("inf"))
    return (m > 0).all(dim=1)


def _verifier(method: str) -> Callable:
    def verify(model, x, y, eps, lo=0.0, hi=1.0, num_classes=None):
        return verified(model, x, y, eps, lo, hi, method, num_classes)
    return verify


for _name in METHODS:
    bounds.register_verifier(_name, _verifier(_name))
