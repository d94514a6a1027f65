"""CROWN and CROWN-IBP: linear-relaxation lower bounds of the margins z_y - z_j over an L-inf box.

    m = crown.margin_bounds(model, x, y, eps, method="crown")     # [B, K], 0 at j = y
    ok = crown.verified(model, x, y, eps, method="crown-ibp")     # BoolTensor[B]
    res = bounds.certified_radius(model, x, y, eps_max=0.4, bound="crown")   # after importing crown

The box is {x' : |x' - x|_inf <= eps} intersected with [lo, hi] (eps a float or a Tensor[B]), i.e. the
product of intervals [x_l, x_u] = [max(x - eps, lo), min(x + eps, hi)] (robustops.bounds.input_box).

Backward linear relaxation (Zhang et al. 2018, "Efficient neural network robustness certification with
general activation functions", CROWN, theorem 3.2 and its corollary 3.3): the network becomes a layer
tree (:func:`layer_tree`): a list whose items are layers f_i or residual nodes, a residual node holding a
main branch and a shortcut branch, each again such a list (nn.Sequential recursed; SmallCNN = features +
classifier; CNN7 = .net; robustops.models' PreActBlock, BasicBlock, CohenBasicBlock and their networks
PreActResNet18, CifarResNet, CohenCifarResNet exactly as their forward() computes them: the F.relu calls
become ReLU nodes, PreActBlock's relu(bn1(x)) feeds both branches when its shortcut is a convolution,
BasicBlock's parameter-free shortcut is the linear layer :class:`Subsample`, the global / 8x8 average
pooling an AdaptiveAvgPool2d(1) / AvgPool2d layer). A lower bound of the specification C z_n is built
backwards: Lambda_n = C, and for layer i

- affine layers (Linear, Conv2d, BatchNorm, Normalize, Flatten, Identity, Dropout in eval, AvgPool2d,
  AdaptiveAvgPool2d, Subsample): f_i(h) = W_i h + b_i gives Lambda_{i-1} = Lambda_i W_i and the constant
  term gains Lambda_i b_i (the transpose of a convolution is conv_transpose2d, its output_padding computed
  from the input shape; that of a pooling / Subsample layer its vector-Jacobian product, by autograd);
- a residual node h -> main(h) + shortcut(h): Lambda is carried back through each branch separately from
  the same Lambda at the node's output (an empty branch is the identity), and the two results add, both
  the coefficients at the node's input and the constant terms (the sum rule of linear bounds; exact: the
  node adds no relaxation of its own);
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
- ``method="crown"``: full CROWN, also inside residual branches; the bounds of every nonlinear layer's
  input come from their own backward pass from that layer (specification [I; -I] on its input), in forward
  order, each using the relaxations of the layers before it: from a layer inside a branch the pass runs
  back through the branch's earlier layers to the residual node's input, then through the enclosing list
  (both branches of every earlier residual node) to the network's input. A nonlinear layer directly after
  another in the same list (ReLU then MaxPool) takes the interval image of the earlier one's bounds (both
  are monotone). The cost is quadratic in depth and linear in the
  neurons of each layer: more than ``NEURON_BUDGET`` neurons at one layer is refused (use crown-ibp).
  Each neuron's CROWN bounds are intersected with its IBP bounds (IBP propagated from the box, both sound;
  what auto_LiRPA does with its reference bounds): CROWN's intermediate bounds are not tighter than IBP's
  on every neuron of a certifiably trained network, and without the intersection full CROWN can prove
  less than CROWN-IBP.
- ``method="crown-ibp"``: CROWN-IBP (Zhang et al. 2020, "Towards stable and efficient training of
  verifiably robust neural networks", ICLR, section 3): the intermediate bounds are IBP's
  (robustops.bounds.propagate layer by layer on the same tree, a residual node the interval sum of its
  branches as in robustops.bounds), and only the specification is bounded by the backward pass.
- ``method="best"``: the elementwise maximum of IBP's margin bounds (robustops.bounds.margin_bounds) and
  CROWN's: both are sound, so their maximum is.

Specification: the elided margins (Gowal et al. 2018): C = e_y - e_j, so the last Linear layer is folded
into C in the first backward step (Lambda_{n-1} = C W_n). As in robustops.bounds.margin_bounds the row
j = y is zero, and its bound is 0.

BatchNorm: in eval mode the affine map of its running statistics. In training mode (or without running
statistics), option ``bn="clean"`` (the only rule here; robustops.bounds' default, Shi et al. 2021,
auto_LiRPA's default): the layer normalises with the clean batch's statistics, held as constants, which
makes it the per-channel affine map scale = weight / sqrt(var + eps), shift = bias - mean * scale with
mean / biased var those of the layer's input in the clean forward of x (:func:`batch_affine`). The
forward walk carries the clean activation beside the interval (robustops.bounds' ``Interval.clean``), so
the statistics are the clean forward's, in the order of the layers, and keep their gradient (CROWN-IBP
training back-propagates through them); CROWN and IBP are then bounds of the same affine network, CROWN's
exact on the BatchNorm layers. No forward of the model runs (the running statistics never change), and
the statistics are those of the whole batch x, so a bound depends on the other samples of the batch
exactly as the training-mode forward does. ``bn="centre"`` (statistics of the interval centres, which
move with eps) is refused for a model with batch statistics: no fixed affine map describes it.

Everything runs in x's dtype (float64 in the tests) without autocast; the bounds are differentiable with
respect to the parameters (CROWN-IBP training back-propagates through them). Bounds are computed in chunks of specification rows so that no coefficient tensor
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

__all__ = ["METHODS", "NEURON_BUDGET", "CHUNK_ELEMENTS", "Layer", "Residual", "Subsample", "layer_tree",
           "flatten_layers", "batch_affine", "margin_bounds", "verified", "linear_lower_bound"]

Param = Union[float, torch.Tensor]

#: The bound methods of this module.
METHODS = ("crown", "crown-ibp", "best")
#: Full CROWN refuses a nonlinear layer with more input neurons than this (one backward pass per neuron).
NEURON_BUDGET = 20000
#: The largest coefficient tensor (numbers) one chunk of specification rows may hold.
CHUNK_ELEMENTS = 1 << 24

_AFFINE = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, M.Normalize, nn.Flatten, nn.Identity, nn.Dropout,
           nn.AvgPool2d, nn.AdaptiveAvgPool2d)
_NONLINEAR = (nn.ReLU, nn.MaxPool2d)


class Subsample(nn.Module):
    """BasicBlock's parameter-free shortcut as a layer: t[:, :, ::stride, ::stride], then ``pad`` zero
    channels (pad // 2 before, the rest after); a linear map."""

    def __init__(self, stride: int, pad: int):
        super().__init__()
        self.stride, self.pad = int(stride), int(pad)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            t = t[:, :, ::self.stride, ::self.stride]
        if self.pad:
            t = F.pad(t, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return t


@dataclass(eq=False)
class Layer:
    """One layer of a layer tree: its dotted name and module."""
    name: str
    module: nn.Module


@dataclass(eq=False)
class Residual:
    """A residual node of a layer tree: output = main(h) + shortcut(h), each branch a list of nodes (an
    empty branch is the identity)."""
    name: str
    main: list
    shortcut: list


def _leaf(m: nn.Module, where: str) -> List[Layer]:
    return layer_tree(m, where) if m is not None else []


def _block_tree(model: nn.Module, where: str) -> Optional[list]:
    """The residual blocks of robustops.models as their forward() computes them (F.relu as a ReLU node)."""
    t, relu = type(model), (lambda n: Layer(f"{where}.{n}", nn.ReLU()))
    if t is M.PreActBlock:  # relu(bn1(x)) feeds both branches when the shortcut is a convolution
        head = _leaf(model.bn1, f"{where}.bn1") + [relu("relu1")]
        main = _leaf(model.conv1, f"{where}.conv1") + _leaf(model.bn2, f"{where}.bn2") + [relu("relu2")]
        main += _leaf(model.conv2, f"{where}.conv2")
        if model.shortcut is None:
            return [Residual(where, head + main, [])]
        return head + [Residual(where, main, _leaf(model.shortcut, f"{where}.shortcut"))]
    if t in (M.BasicBlock, M.CohenBasicBlock):
        main = _leaf(model.conv1, f"{where}.conv1") + _leaf(model.bn1, f"{where}.bn1") + [relu("relu1")]
        main += _leaf(model.conv2, f"{where}.conv2") + _leaf(model.bn2, f"{where}.bn2")
        if t is M.BasicBlock:
            skip = [Layer(f"{where}.shortcut", Subsample(model.stride, model.pad))] if model.stride != 1 or model.pad \
                else []
        else:
            skip = _leaf(model.downsample, f"{where}.downsample")
        return [Residual(where, main, skip), relu("relu")]
    head = None
    if t is M.PreActResNet18:
        head = _leaf(model.conv1, f"{where}.conv1")
        stages, tail = ("layer1", "layer2", "layer3", "layer4"), _leaf(model.bn, f"{where}.bn") + [relu("relu")]
        pool, last = nn.AdaptiveAvgPool2d(1), "linear"
    elif t in (M.CifarResNet, M.CohenCifarResNet):
        head = _leaf(model.conv1, f"{where}.conv1") + _leaf(model.bn1, f"{where}.bn1") + [relu("relu")]
        stages, tail = ("layer1", "layer2", "layer3"), []
        pool, last = (nn.AdaptiveAvgPool2d(1), "linear") if t is M.CifarResNet else (model.avgpool, "fc")
    if head is None:
        return None
    for name in stages:
        head += layer_tree(getattr(model, name), f"{where}.{name}")
    return head + tail + [Layer(f"{where}.pool", pool), Layer(f"{where}.flatten", nn.Flatten())] + \
        _leaf(getattr(model, last), f"{where}.{last}")


def layer_tree(model: nn.Module, where: str = "model") -> list:
    """The model as a layer tree: a list of :class:`Layer` and :class:`Residual` nodes (nn.Sequential
    recursed, SmallCNN as features + classifier, CNN7 as its .net, robustops.models' residual networks
    and blocks as their forward() computes them). A layer CROWN has no rule for raises
    bounds.UnsupportedLayerError naming it."""
    if type(model) is nn.Sequential:
        out: list = []
        for name, child in model.named_children():
            out += layer_tree(child, f"{where}.{name}")
        return out
    if type(model) is M.SmallCNN:
        return layer_tree(model.features, f"{where}.features") + layer_tree(model.classifier, f"{where}.classifier")
    if type(model) is M.CNN7:
        return layer_tree(model.net, f"{where}.net")
    blocks = _block_tree(model, where)
    if blocks is not None:
        return blocks
    if type(model) in _AFFINE or type(model) in _NONLINEAR or type(model) is Subsample:
        _check_layer(model, where)
        return [Layer(where, model)]
    raise bounds.UnsupportedLayerError(
        f"CROWN has no rule for {type(model).__name__} (at {where}); supported: Linear, Conv2d, ReLU, "
        f"BatchNorm1d/2d, Flatten, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, Normalize, Identity, Dropout (eval), "
        f"Sequential, SmallCNN, CNN7, PreActResNet18, CifarResNet, CohenCifarResNet and their blocks")


def flatten_layers(model: nn.Module, where: str = "model") -> List[Tuple[str, nn.Module]]:
    """Every layer of the model's layer tree as (name, module), in forward order (a residual node's main
    branch, then its shortcut): a plain list for counting or running a network without residual blocks."""
    def leaves(seq):
        for node in seq:
            if isinstance(node, Residual):
                yield from leaves(node.main)
                yield from leaves(node.shortcut)
            else:
                yield node.name, node.module
    return list(leaves(layer_tree(model, where)))


def _check_layer(m: nn.Module, where: str) -> None:
    def refuse(what: str):
        raise bounds.UnsupportedLayerError(f"CROWN: {what} (at {where})")

    if isinstance(m, nn.Dropout) and m.training and m.p > 0:
        refuse("Dropout in training mode (put the model in eval mode)")
    if isinstance(m, nn.Conv2d) and (m.padding_mode != "zeros" or isinstance(m.padding, str)):
        refuse(f"Conv2d with padding_mode={m.padding_mode!r}, padding={m.padding!r} (only numeric zero padding)")
    if isinstance(m, nn.MaxPool2d) and (m.return_indices or m.ceil_mode):
        refuse("MaxPool2d with return_indices=True or ceil_mode=True")
    if isinstance(m, nn.AvgPool2d) and m.divisor_override is not None:
        refuse("AvgPool2d(divisor_override=...)")


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

def _affine_step(m: nn.Module, a: torch.Tensor, shape: torch.Size,
                 affine: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(Lambda W, Lambda b) for an affine layer with input shape ``shape`` (no batch); a: [b, S, *out].
    affine: a training-mode BatchNorm's (scale, shift) from the clean batch's statistics."""
    b, s = a.shape[:2]
    if isinstance(m, nn.Linear):
        w = m.weight.to(a.dtype)
        const = a @ m.bias.to(a.dtype) if m.bias is not None else a.new_zeros(b, s)
        return a @ w, const
    if isinstance(m, nn.Conv2d):
        return _conv_step(m, a, shape)
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, M.Normalize)):
        scale, shift = _channel_affine(m, a.dtype) if affine is None else (t.to(a.dtype) for t in affine)
        view = (1, 1, -1) + (1,) * (a.dim() - 3)
        return a * scale.reshape(view), (a * shift.reshape(view)).flatten(2).sum(2)
    if isinstance(m, nn.Flatten):
        return a.reshape(b, s, *shape), a.new_zeros(b, s)
    if isinstance(m, (nn.AvgPool2d, nn.AdaptiveAvgPool2d, Subsample)):
        # parameter-free linear maps: the transpose is the map's vector-Jacobian product (at 0, any point),
        # itself differentiable in a where a needs gradients (CROWN-IBP training)
        flat = a.reshape(b * s, *a.shape[2:])
        with torch.enable_grad():
            z = flat.new_zeros(b * s, *shape, requires_grad=True)
            (g,) = torch.autograd.grad(m(z), z, flat, create_graph=flat.requires_grad)
        return g.reshape(b, s, *shape), a.new_zeros(b, s)
    return a, a.new_zeros(b, s)  # Identity, Dropout (eval)


def batch_affine(m: nn.modules.batchnorm._BatchNorm, clean: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) per channel of a BatchNorm normalising with the batch statistics of ``clean`` (its
    input in the clean forward: mean and biased variance over all dimensions but the channel's), as
    robustops.bounds' ``bn="clean"`` rule; differentiable in the parameters and in clean."""
    var, mean = torch.var_mean(clean, dim=[0] + list(range(2, clean.dim())), unbiased=False)
    return _channel_affine(m, clean.dtype, (mean, var))


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


def _channel_affine(m: nn.Module, dtype, stats: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
    """(scale, shift) per channel of a Normalize or a BatchNorm with the statistics (mean, var): stats, or
    the running ones."""
    if isinstance(m, M.Normalize):
        inv = 1.0 / m.std.flatten().to(dtype)
        return inv, -m.mean.flatten().to(dtype) * inv
    mean, var = (m.running_mean, m.running_var) if stats is None else stats
    scale = torch.rsqrt(var.to(dtype) + m.eps)
    if m.weight is not None:
        scale = scale * m.weight.to(dtype)
    shift = -mean.to(dtype) * scale
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

@dataclass
class _State:
    """What the forward walk records, by node (id): input shapes, the relaxations of nonlinear layers, the
    bounds of their inputs, training-mode BatchNorm's (scale, shift); and the box, the method."""
    box: bounds.Interval
    method: str
    shapes: Dict[int, torch.Size]
    relax: Dict[int, _Relax]
    inputs: Dict[int, bounds.Interval]
    affine: Dict[int, Tuple[torch.Tensor, torch.Tensor]]


def _back(seq: list, upto: int, a: torch.Tensor, const: torch.Tensor, st: _State):
    """The backward pass through seq[upto-1], ..., seq[0]: a residual node is the sum of its branches'
    passes (both start from a; their coefficients and constant terms add)."""
    for node in reversed(seq[:upto]):
        if isinstance(node, Residual):
            am, cm = _back(node.main, len(node.main), a, a.new_zeros(1, a.shape[1]), st)
            ak, ck = _back(node.shortcut, len(node.shortcut), a, a.new_zeros(1, a.shape[1]), st)
            a, const = am + ak, const + (cm + ck)
            continue
        key = id(node)
        if key in st.relax:
            a, c = _relax_step(node.module, st.relax[key], a, st.shapes[key])
        else:
            a, c = _affine_step(node.module, a, st.shapes[key], st.affine.get(key))
        const = const + c
    return a, const


def linear_lower_bound(path: List[Tuple[list, int]], spec: torch.Tensor, st: _State) -> torch.Tensor:
    """Lower bounds [B, S] of spec . h over the box, h the activation at a position of the layer tree and
    spec [1 or B, S, *h's shape]. The position is a path [(seq_0, i_0), ..., (seq_k, i_k)]: h is the input
    of seq_k[i_k] (or seq_k's output for i_k = len(seq_k)), seq_{j+1} a branch of the residual node
    seq_j[i_j]; the backward pass runs through seq_k[:i_k], then seq_{k-1}[:i_{k-1}], ... (the enclosing
    residual nodes' inputs), with the relaxations recorded so far, in chunks of rows of at most
    CHUNK_ELEMENTS coefficients."""
    box = st.box
    bsz = box.c.shape[0]
    biggest = max([int(torch.Size(v).numel()) for v in st.shapes.values()] + [int(spec[0, 0].numel())])
    rows = max(1, CHUNK_ELEMENTS // max(1, bsz * biggest))
    out = []
    for start in range(0, spec.shape[1], rows):
        a = spec[:, start:start + rows]
        const = a.new_zeros(1, a.shape[1])
        for seq, upto in reversed(path):
            a, const = _back(seq, upto, a, const, st)
        a = a.flatten(2)
        lower = (a @ box.c.flatten(1).unsqueeze(2)).squeeze(2) - (a.abs() @ box.r.flatten(1).unsqueeze(2)).squeeze(2)
        out.append(lower + const)
    return torch.cat(out, dim=1)


def _identity_spec(shape: torch.Size, dtype, device) -> torch.Tensor:
    """[1, 2N, *shape]: rows e_n then -e_n (lower bounds of h_n and of -h_n, i.e. minus its upper bound)."""
    n = int(torch.Size(shape).numel())
    eye = torch.eye(n, dtype=dtype, device=device)
    return torch.cat([eye, -eye]).reshape(1, 2 * n, *shape)


def _input_bounds(seq: list, i: int, path: list, iv: bounds.Interval, st: _State) -> bounds.Interval:
    """The bounds of the nonlinear layer seq[i]'s input: IBP's (iv) for crown-ibp; for crown the interval
    image of the previous layer's bounds when that is nonlinear too, else its own backward pass
    intersected with IBP's."""
    node = seq[i]
    if st.method == "crown-ibp":
        return iv
    prev = seq[i - 1] if i > 0 else None
    if isinstance(prev, Layer) and isinstance(prev.module, _NONLINEAR):
        return bounds.propagate(prev.module, st.inputs[id(prev)], None, prev.name)
    shape = iv.c.shape[1:]
    n = int(shape.numel())
    if n > NEURON_BUDGET:
        raise ValueError(f"method='crown' bounds every neuron by its own backward pass: {node.name} has {n} "
                         f"input neurons (more than {NEURON_BUDGET}); use method='crown-ibp'")
    low = linear_lower_bound(path, _identity_spec(shape, iv.c.dtype, iv.c.device), st)
    # intersected with IBP's (both sound): CROWN is not tighter than IBP on every neuron
    lower = torch.maximum(low[:, :n].reshape(iv.c.shape), iv.lower)
    upper = torch.minimum(-low[:, n:].reshape(iv.c.shape), iv.upper)
    return bounds.Interval.from_bounds(lower, torch.maximum(lower, upper))


def _walk(seq: list, iv: bounds.Interval, outer: list, st: _State) -> bounds.Interval:
    """The forward walk over seq from the input interval iv (IBP, the clean tensor where BatchNorm uses
    batch statistics): records every node's input shape, training-mode BatchNorm's affine map, and the
    relaxation of every nonlinear layer, in forward order. Returns IBP's output interval."""
    for i, node in enumerate(seq):
        if isinstance(node, Residual):
            here = outer + [(seq, i)]
            iv = _walk(node.main, iv, here, st) + _walk(node.shortcut, iv, here, st)
            continue
        m, key = node.module, id(node)
        st.shapes[key] = iv.c.shape[1:]
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None):
            st.affine[key] = batch_affine(m, iv.c if iv.clean is None else iv.clean)
        if isinstance(m, _NONLINEAR):
            cur = _input_bounds(seq, i, outer + [(seq, i)], iv, st)
            st.inputs[key] = cur
            st.relax[key] = (_relu_relax(cur.lower, cur.upper) if isinstance(m, nn.ReLU)
                             else _maxpool_relax(m, cur.lower, cur.upper))
        iv = iv.map(m) if isinstance(m, Subsample) else bounds.propagate(m, iv, None, node.name)
    return iv


def margin_bounds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: Param, lo: float = 0.0, hi: float = 1.0,
                  method: str = "crown", num_classes: Optional[int] = None, *, bn: str = "clean") -> torch.Tensor:
    """Lower bounds [B, K] of z_y - z_j over the box (0 at j = y) by CROWN, CROWN-IBP or the best of
    IBP and CROWN (``method``: one of METHODS). num_classes is checked against the model's output.
    bn: the rule of BatchNorm layers that use batch statistics; only "clean" (the clean batch's
    statistics as constants of an affine map, module docstring); no forward pass of the model runs."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if bn not in bounds.BN_RULES:
        raise ValueError(f"bn must be one of {', '.join(bounds.BN_RULES)}; got {bn!r}")
    y = _checks.check_labels(y, x.shape[0], x.device, "y")
    tree = layer_tree(model)
    batch = bounds.batch_statistics(model)
    if batch and bn != "clean":
        raise ValueError(f'bn must be "clean" for CROWN bounds of a model with training-mode BatchNorm, got {bn!r} '
                         f'(the "centre" rule takes statistics of interval centres, which no affine map fixes; '
                         f'use robustops.bounds for it)')
    box = bounds.input_box(x, eps, lo, hi)
    box = box if batch else bounds.Interval(box.c, box.r)  # the clean tensor only where BatchNorm needs it
    st = _State(box, "crown-ibp" if method == "crown-ibp" else "crown", {}, {}, {}, {})
    out_iv = _walk(tree, box, [], st)
    if out_iv.c.dim() != 2:
        raise bounds.UnsupportedLayerError(f"CROWN needs [B, K] outputs, got {list(out_iv.c.shape)}")
    k = int(out_iv.c.shape[1])
    if num_classes is not None and int(num_classes) != k:
        raise ValueError(f"num_classes must be the model's number of outputs ({k}), got {num_classes}")
    if x.shape[0] and int(y.max()) >= k:
        raise ValueError(f"y must lie in [0, {k - 1}] for a model with {k} outputs, got {int(y.max())}")
    spec = bounds.margin_spec(y, k, dtype=x.dtype)
    out = linear_lower_bound([(tree, len(tree))], spec, st)
    if method == "best":
        out = torch.maximum(out, bounds.margin_bounds(model, x, y, eps, lo, hi, num_classes=k, bn=bn).to(out.dtype))
    return out


def verified(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: Param, lo: float = 0.0, hi: float = 1.0,
             method: str = "crown", num_classes: Optional[int] = None, *, bn: str = "clean") -> torch.Tensor:
    """BoolTensor[B]: the bound ``method`` proves class y at every point of the box (every margin > 0)."""
    m = margin_bounds(model, x, y, eps, lo, hi, method, num_classes, bn=bn)
    m = m.scatter(1, y.view(-1, 1).long(), float("inf"))
    return (m > 0).all(dim=1)


def _verifier(method: str) -> Callable:
    def verify(model, x, y, eps, lo=0.0, hi=1.0, num_classes=None, *, bn="clean"):
        return verified(model, x, y, eps, lo, hi, method, num_classes, bn=bn)
    return verify


for _name in METHODS:
    bounds.register_verifier(_name, _verifier(_name))
