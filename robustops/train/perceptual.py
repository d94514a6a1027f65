"""The LPIPS distance (Zhang, Isola, Efros, Shechtman & Wang, CVPR 2018, "The unreasonable
effectiveness of deep features as a perceptual metric", eq. 1) on the features of a network robustops
trains, and the feature hooks the relaxed perceptual adversarial training of Kireev et al. (method
``rlat``) perturbs.

For feature maps phi_l(x) in R^{C_l x H_l x W_l} of layers l = 1..L,

    d(x, x') = sum_l 1 / (H_l W_l) sum_{h,w} || w_l * (phi^_l(x)_hw - phi^_l(x')_hw) ||_2^2,

where phi^_l is phi_l unit-normalised over the channels at every position (``phi / (||phi||_2 + 1e-10)``)
and w_l in R^{C_l} a per-channel weight, applied as the ``lpips`` package applies it: its learned 1x1
convolution sums w_lc (phi^ - phi'^)^2_c, so w_lc here weighs the squared difference (the paper's
||w_l * .||^2 with w_lc its square). This is ``lpips.LPIPS.forward``'s computation (``normalize_tensor``,
squared difference, the linear layer, ``spatial_average``, the sum over layers), written for any
feature list; with no weights every channel weighs 1, which is the package's ``lpips=False``
("baseline") mode: the learned weights of the paper are fitted to human judgements (BAPPS) on AlexNet /
VGG / SqueezeNet features and do not exist for robustops' networks.

The features: NO pretrained AlexNet can be downloaded here (and none is bundled), so the network is one
robustops trains (e.g. a ``robustops train`` checkpoint of a natural model, :func:`load_feature_net`),
and its layers are :func:`feature_modules`: the stem convolution and the stages of a ResNet-style model
(attributes ``conv1``, ``layer1``, ``layer2``, ...: the layers Kireev et al.'s code perturbs), else every
``nn.Conv2d`` of the model in registration order, shortcut convolutions left out (LPIPS compares
[B, C, H, W] maps only). A layer whose output is [B, C] counts as [B, C, 1, 1]. :func:`feature_taps` picks
layers by depth among the same layers, where a convolution may also be a Conv1d / Conv3d (a video model's
taps, for method ``sat``), or any layers of a user model by name (:func:`modules_by_name`).
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, List, Optional, Sequence

import torch
import torch.nn as nn

from ..models import load_model, split_normalize

__all__ = ["feature_modules", "modules_by_name", "feature_taps", "CONV_TYPES", "four_d", "normalize_tensor", "spatial_average",
           "lpips_distance", "capture_features",
           "perturb_outputs", "PerceptualDistance", "check_feature_file", "load_feature_net"]

#: what the lpips package adds to the channel norm (``lpips.normalize_tensor``'s eps)
NORM_EPS = 1e-10
#: the layers :func:`feature_taps` taps in a model without ResNet stages (LPIPS: nn.Conv2d only)
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def feature_modules(net: nn.Module, conv_types: tuple = (nn.Conv2d,)) -> List[nn.Module]:
    """The modules whose outputs are the perceptual features of ``net`` (see the module docstring):
    [conv1, layer1, layer2, ...] for a ResNet-style model anywhere inside net, else every convolution of
    ``conv_types`` (not a shortcut) in registration order. The default, nn.Conv2d, is what LPIPS compares;
    :func:`feature_taps` passes :data:`CONV_TYPES`. ValueError when net has none."""
    for m in net.modules():
        if hasattr(m, "layer1") and isinstance(getattr(m, "conv1", None), nn.Module):
            stages, k = [m.conv1], 1
            while isinstance(getattr(m, f"layer{k}", None), nn.Module):
                stages.append(getattr(m, f"layer{k}"))
                k += 1
            return stages
    convs = [m for name, m in net.named_modules() if isinstance(m, conv_types) and "shortcut" not in name]
    if not convs:
        kinds = "/".join(t.__name__ for t in conv_types)
        raise ValueError(f"the feature network ({type(net).__name__}) has no {kinds} whose features "
                         f"{'LPIPS could compare' if conv_types == (nn.Conv2d,) else 'could be tapped'}")
    return convs


def modules_by_name(net: nn.Module, names: Sequence[str]) -> List[nn.Module]:
    """The submodules of ``net`` called ``names`` (``net.named_modules()`` spellings, e.g. "features.2" or
    "layer3"), in the order given: the feature taps of a user model. When net is ``nn.Sequential(Normalize,
    model)`` (a model with its input normalisation in front, as training runs it) the names of ``model``'s
    own layers are accepted too. ValueError naming the first unknown layer (and a few that exist) when one
    is missing, or when names is empty."""
    if isinstance(names, str) or not names:
        raise ValueError(f"names must be a non-empty list of layer names, got {names!r}")
    table = dict(net.named_modules())
    body = split_normalize(net)[0]
    if body is not net:  # the user's names are those of the model behind the normalisation
        table = {**dict(body.named_modules()), **table}
    for n in names:
        if n not in table or not n:
            known = [k for k in table if k][:12]
            raise ValueError(f"layer {n!r} is not a submodule of {type(net).__name__}; its layers include "
                             f"{', '.join(known)}")
    return [table[n] for n in names]


def feature_taps(net: nn.Module, layers: Optional[Sequence] = None) -> List[nn.Module]:
    """The modules to tap at chosen depths: None -> every :func:`feature_modules` layer (a convolution may
    be any of :data:`CONV_TYPES`); a list of ints -> those depths of it (0 = the shallowest; negative counts
    from the deepest); a list of str -> :func:`modules_by_name`. ValueError naming a depth out of range or an
    unknown layer."""
    if layers is None:
        return feature_modules(net, CONV_TYPES)
    layers = list(layers)
    if layers and all(isinstance(v, str) for v in layers):
        return modules_by_name(net, layers)
    if not layers or not all(isinstance(v, int) and not isinstance(v, bool) for v in layers):
        raise ValueError(f"layers must be a non-empty list of depths (int) or of layer names (str), got {layers!r}")
    mods = feature_modules(net, CONV_TYPES)
    for d in layers:
        if not -len(mods) <= d < len(mods):
            raise ValueError(f"layer depth {d} is out of range: {type(net).__name__} has {len(mods)} feature "
                             f"layers (depths 0..{len(mods) - 1})")
    return [mods[d] for d in layers]


def normalize_tensor(f: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """f [B, C, H, W] divided by its L2 norm over the channels at every position (+ eps), as lpips does."""
    return f / (f.pow(2).sum(1, keepdim=True).sqrt() + eps)


def spatial_average(f: torch.Tensor) -> torch.Tensor:
    """The mean over the spatial dimensions (2, 3) of [B, C, H, W] -> [B, C]."""
    return f.mean((2, 3))


def four_d(f: torch.Tensor) -> torch.Tensor:
    """A [B, C] layer output as [B, C, 1, 1]; any other shape unchanged."""
    return f.reshape(*f.shape[:2], 1, 1) if f.dim() == 2 else f


def lpips_distance(feats0: Sequence[torch.Tensor], feats1: Sequence[torch.Tensor],
                   weights: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
    """d(x0, x1) of the module docstring from two lists of feature maps [B, C_l, H_l, W_l] (or [B, C_l]);
    weights: one Tensor[C_l] (>= 0) per layer, or None (every channel 1). Returns Tensor[B]."""
    if len(feats0) != len(feats1) or not feats0:
        raise ValueError(f"feats0 and feats1 must be two non-empty lists of the same length, got {len(feats0)} "
                         f"and {len(feats1)}")
    if weights is not None and len(weights) != len(feats0):
        raise ValueError(f"weights must have one Tensor[C] per layer ({len(feats0)}), got {len(weights)}")
    total = 0
    for i, (a, b) in enumerate(zip(feats0, feats1)):
        a, b = four_d(a), four_d(b)
        if a.dim() != 4:
            raise ValueError(f"feats0/feats1 layer {i}: LPIPS compares [B, C, H, W] (or [B, C]) feature maps, got "
                             f"shape {list(a.shape)}")
        if a.shape != b.shape:
            raise ValueError(f"layer {i}: the two feature maps differ in shape, {list(a.shape)} and {list(b.shape)}")
        diff = (normalize_tensor(a) - normalize_tensor(b)).pow(2)
        if weights is not None:
            diff = diff * weights[i].to(diff).view(1, -1, 1, 1)
        total = total + spatial_average(diff.sum(1, keepdim=True))[:, 0]
    return total


@contextlib.contextmanager
def capture_features(modules: Sequence[nn.Module], inputs: bool = False) -> Iterator[List[torch.Tensor]]:
    """Within the block every forward appends the outputs of ``modules`` (in their forward order) to
    the yielded list (inputs=True: their first inputs, e.g. the representation a classifier head
    reads); the hooks are removed on exit. The tensors are the network's own (no copy), so an output that
    a later in-place op overwrites (``ReLU(inplace=True)`` after a convolution) is seen as the network
    leaves it, post-activation, exactly as a manual forward of the same network shows it."""
    out: List[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda _m, i, o: out.append(i[0] if inputs else o)) for m in modules]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def perturb_outputs(modules: Sequence[nn.Module], add: Callable[[int, torch.Tensor], torch.Tensor]):
    """Within the block the output o of modules[i] is replaced by add(i, o) (e.g. o + delta_i): the
    feature perturbations of the relaxed attack. Each module must run once per forward."""
    handles = [m.register_forward_hook(lambda _m, _i, o, i=i: add(i, o)) for i, m in enumerate(modules)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class PerceptualDistance(nn.Module):
    """d(x0, x1) (Tensor[B]) on the features of ``net`` at ``modules`` (default :func:`feature_modules`),
    with per-layer channel weights or none. The network is frozen (no parameter requires grad) and kept
    in eval mode: gradients flow to the inputs only."""

    def __init__(self, net: nn.Module, modules: Optional[Sequence[nn.Module]] = None,
                 weights: Optional[Sequence[torch.Tensor]] = None):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.layers = list(feature_modules(net) if modules is None else modules)
        self.weights = None if weights is None else [torch.as_tensor(w, dtype=torch.float32) for w in weights]

    def train(self, mode: bool = True):  # noqa: D401  (the feature network stays in eval mode)
        """Keeps the feature network in eval mode whatever the caller asks."""
        super().train(False)
        return self

    def features(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The feature maps of x at the layers (one forward)."""
        with capture_features(self.layers) as feats:
            self.net(x)
        return list(feats)

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        return lpips_distance(self.features(x0), self.features(x1), self.weights)


def check_feature_file(path, what: str = "rlat_net") -> None:
    """ValueError naming ``what`` when path is not an existing file (the check :func:`load_feature_net`
    makes, for a config check before any loading)."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        raise ValueError(f"{what}: no feature-network file at {path!r} (expected a model file, e.g. the "
                         f"best.pt of a natural `robustops train` run)")


def load_feature_net(path, device=None, what: str = "rlat_net") -> nn.Module:
    """The network of a model file (:func:`robustops.models.load_model`: a robustops checkpoint, a
    state dict with its name, TorchScript, ...) on ``device``, frozen and in eval mode. A missing or
    unreadable file is a ValueError naming ``what``."""
    check_feature_file(path, what)
    try:
        net = load_model(os.fspath(path))
    except (ValueError, RuntimeError, KeyError, OSError) as e:
        raise ValueError(f"{what}: cannot load a feature network from {path!r}: {e}") from e
    if not isinstance(net, nn.Module):
        raise ValueError(f"{what}: {path!r} holds no network ({type(net).__name__})")
    if device is not None:
        net.to(device)
    return net.eval().requires_grad_(False)
