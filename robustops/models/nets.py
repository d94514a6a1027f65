"""Reference models: the architectures and :func:`get_model`, which builds one by name (the list is in
the package's docstring, :mod:`robustops.models`); the checkpoints are in :mod:`.checkpoints`."""
from __future__ import annotations

import re
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .denoise import Denoised, Denoiser
from .video import VIDEO_CHANNEL_DIM, VideoCNN

__all__ = ["SmallCNN", "CNN7", "PreActResNet18", "PreActBlock", "CifarResNet", "BasicBlock", "CohenBasicBlock",
           "cifar_resnet", "CohenCifarResNet", "cohen_cifar_resnet", "Normalize", "channel_stats", "split_normalize",
           "get_model", "MODEL_NAMES", "DENOISED_PREFIX", "COHEN_CIFAR10_MEAN", "COHEN_CIFAR10_STD", "COHEN_IMAGENET_MEAN",
           "COHEN_IMAGENET_STD"]


def channel_stats(mean, std) -> Tuple[torch.Tensor, torch.Tensor]:
    """mean and std of a per-channel normalisation as float32 CPU tensors [C] (or [1] for one value),
    validated: both given, one value or one per channel each (the same number when both have
    several), finite, std > 0. The one check every user of :class:`Normalize` relies on."""
    if mean is None or std is None:
        raise ValueError("give both mean and std (per-channel normalisation), or neither")
    out = []
    for v, name in ((mean, "mean"), (std, "std")):
        try:
            t = torch.as_tensor(v, dtype=torch.float32).detach().cpu()
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{name} must be a float or a sequence / Tensor of per-channel floats, got {v!r}") from None
        if t.dim() > 1:
            raise ValueError(f"{name} must be a float or one value per channel, got shape {list(t.shape)}")
        t = t.reshape(-1)
        if t.numel() == 0 or not bool(torch.isfinite(t).all()) or (name == "std" and not bool((t > 0).all())):
            raise ValueError(f"{name} must be {'> 0 and finite' if name == 'std' else 'finite'} for every "
                             f"channel, got {t.tolist()}")
        out.append(t)
    if out[0].numel() != out[1].numel() and 1 not in (out[0].numel(), out[1].numel()):
        raise ValueError(f"mean and std must have the same number of channels, got {out[0].numel()} "
                         f"and {out[1].numel()}")
    return out[0], out[1]


class Normalize(nn.Module):
    """``(x - mean) / std`` with per-channel mean / std (at ``channel_dim``: 1 for [B, C, ...] images, 2 for
    [B, T, C, H, W] videos; a mean / std of several channels that does not match that dim is an error,
    never a silent broadcast over frames), kept as buffers so they follow the
    module's device and are saved in its state dict. The one normalisation of robustops: attacks
    (``mean``/``std``), training (``FitConfig.mean``/``std``), smoothing (fused into the noise kernel)
    and checkpoints all go through it; :func:`channel_stats` validates its arguments."""

    def __init__(self, mean: Union[float, Sequence[float]], std: Union[float, Sequence[float]],
                 channel_dim: int = 1):
        super().__init__()
        mean_t, std_t = channel_stats(mean, std)
        if not isinstance(channel_dim, int) or isinstance(channel_dim, bool) or channel_dim < 1:
            raise ValueError(f"channel_dim must be an int >= 1 (1: [B, C, ...] images; 2: [B, T, C, H, W] "
                             f"videos), got {channel_dim!r}")
        self.channel_dim = channel_dim
        self.register_buffer("mean", mean_t.reshape(1, -1, 1, 1))
        self.register_buffer("std", std_t.reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, d = self.mean.numel(), self.channel_dim
        if c > 1 and (x.dim() <= d or x.shape[d] != c):
            # broadcasting would silently turn a 1-channel batch into c identical channels
            hint = " (a video [B, T, C, H, W]? use Normalize(..., channel_dim=2))" \
                if d == 1 and x.dim() == 5 and x.shape[2] == c else ""
            want = f"[B, {c}, ...]" if d == 1 else f"[B, T, {c}, H, W]" if d == 2 else f"{c} channels at dim {d}"
            raise ValueError(f"Normalize: expected inputs {want} ({c} channels, one mean/std each), got "
                             f"{list(x.shape)}{hint}")
        shape = (1,) * d + (-1,) + (1,) * max(x.dim() - d - 1, 0)
        return (x - self.mean.reshape(shape).to(x.dtype)) / self.std.reshape(shape).to(x.dtype)

    def values(self) -> Tuple[List[float], List[float]]:
        """(mean, std) as lists of floats (one per channel, or one for all)."""
        return self.mean.flatten().tolist(), self.std.flatten().tolist()

    def extra_repr(self) -> str:
        dim = f", channel_dim={self.channel_dim}" if self.channel_dim != 1 else ""
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}{dim}"


def split_normalize(model):
    """(body, mean, std): a model ``nn.Sequential(Normalize, ...)`` split into the rest of the model
    and the normalisation's values (so that a fused kernel can apply them); (model, None, None)
    when the model does not start with a :class:`Normalize`."""
    if isinstance(model, nn.Sequential) and len(model) >= 2 and isinstance(model[0], Normalize):
        rest = list(model)[1:]
        body = rest[0] if len(rest) == 1 else nn.Sequential(*rest)
        mean, std = model[0].values()
        return body, mean, std
    return model, None, None


class SmallCNN(nn.Module):
    """conv3x3(16) - ReLU - conv3x3(32) - ReLU - maxpool2 [- conv3x3(64) - ReLU - maxpool2 when
    input_size >= 16] - fc(128) - ReLU - fc(num_classes). For 8x8 digits (default) and 28x28 MNIST."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 8):
        super().__init__()
        if input_size < 2:
            raise ValueError(f"input_size must be >= 2, got {input_size}")
        layers = [nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(inplace=True),
                  nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        size, channels = input_size // 2, 32
        if input_size >= 16:
            layers += [nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            size, channels = size // 2, 64
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(channels * size * size, 128), nn.ReLU(inplace=True),
                                        nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# ------------------------------------------------------------------------ pre-activation ResNet

class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class PreActResNet18(nn.Module):
    """Pre-activation ResNet-18 (He et al. 2016, "Identity mappings"), the CIFAR variant: a 3x3 stem,
    four stages of two blocks (64, 128, 256, 512 channels), global average pooling."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        stages, in_planes = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(PreActBlock(in_planes, planes, stride), PreActBlock(planes, planes, 1)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


# ------------------------------------------------------------------------------ CIFAR ResNet

def _cifar_resnet_blocks(depth) -> int:
    """n, the blocks per stage of a CIFAR ResNet of depth 6n + 2 (He et al. 2016, section 4.2)."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(f"depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth!r}")
    return (depth - 2) // 6


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.pad = planes - in_planes  # option A: identity shortcut, subsampled and zero-padded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = x
        if self.stride != 1:
            skip = skip[:, :, ::self.stride, ::self.stride]
        if self.pad:
            skip = F.pad(skip, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + skip)


class CifarResNet(nn.Module):
    """He et al. (2016) CIFAR ResNet with 6n+2 layers: a 3x3 conv (16), three stages of n basic blocks
    (16, 32, 64 channels; stride 2 at stages 2 and 3; parameter-free shortcuts), global average
    pooling and a linear layer."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        n = _cifar_resnet_blocks(depth)
        self.depth = depth
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def cifar_resnet(depth: int = 20, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """He et al.'s CIFAR ResNet with depth = 6n+2 layers (20 -> 0.27M parameters, 110 -> 1.7M)."""
    return CifarResNet(depth=depth, num_classes=num_classes, in_channels=in_channels)


# -------------------------------------------------------- Cohen et al.'s CIFAR ResNet (locuslab/smoothing)

# The normalisations of Cohen et al.'s code (its datasets.py): their NormalizeLayer keeps them as plain
# tensors, not buffers, so their checkpoints do not hold them; load_model recreates the layer from these.
COHEN_CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
COHEN_CIFAR10_STD = (0.2023, 0.1994, 0.2010)
COHEN_IMAGENET_MEAN = (0.485, 0.456, 0.406)
COHEN_IMAGENET_STD = (0.229, 0.224, 0.225)


class CohenBasicBlock(nn.Module):
    """conv3x3(stride) - bn - relu - conv3x3 - bn, plus the shortcut (a 1x1 conv + bn named
    ``downsample`` when the stride or the width changes, else the identity), then relu."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes))
        else:
            self.downsample = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = x if self.downsample is None else self.downsample(x)
        return self.relu(out + skip)


class CohenCifarResNet(nn.Module):
    """The CIFAR ResNet (6n+2 layers, basic blocks) of Cohen, Rosenfeld and Kolter's randomized-smoothing
    code, itself the "pytorch-classification" CIFAR ResNet: a 3x3 conv (16, no bias) ``conv1``, ``bn1``,
    ``relu``; ``layer1`` / ``layer2`` / ``layer3`` of n blocks (16 / 32 / 64 planes, strides 1 / 2 / 2)
    whose first block of a new width has a projection shortcut ``downsample`` (1x1 conv + BN); an 8x8
    average pool ``avgpool`` and a linear ``fc``. The parameter names are theirs, so the weights of their
    checkpoints load strictly (after their "1.module." prefix, see :func:`load_model`).

    Differs from :class:`CifarResNet` (parameter-free shortcuts, global pooling, ``linear``). Like theirs,
    it is sized for 32x32 inputs (the fixed 8x8 pool), and takes normalised inputs: their model is
    ``nn.Sequential(NormalizeLayer(CIFAR-10 means, sds), this)``."""

    def __init__(self, depth: int = 110, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        n = _cifar_resnet_blocks(depth)
        self.depth = depth
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        stages, width = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = [CohenBasicBlock(width, planes, stride)]
            blocks += [CohenBasicBlock(planes, planes, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            width = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():  # He initialisation (fan-out) of the convolutions, as theirs
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = self.avgpool(out).flatten(1)
        return self.fc(out)


def cohen_cifar_resnet(depth: int = 110, num_classes: int = 10, in_channels: int = 3) -> CohenCifarResNet:
    """Cohen et al.'s CIFAR ResNet ("cifar_resnet20", "cifar_resnet110" in their code) with depth 6n+2,
    with their layer names (110 -> 1.7M parameters). See :class:`CohenCifarResNet`."""
    return CohenCifarResNet(depth=depth, num_classes=num_classes, in_channels=in_channels)


# ---------------------------------------------------------------------------------------- CNN-7

class CNN7(nn.Module):
    """CNN-7, the 7-layer network of the IBP / certified-training benchmarks (Shi, Wang, Zhang, Yi and
    Hsieh 2021, "Fast certified robust training with short warmup", NeurIPS; the "CNN-7" of their
    MNIST and CIFAR-10 experiments): five 3x3 convolutions (padding 1) with
    64, 64, 128, 128, 128 channels, the third of stride 2, each followed by BatchNorm and ReLU; then
    flatten, a linear layer of 512 units with BatchNorm and ReLU, and the linear classifier.

    in_channels (3), num_classes (10), input_size: the height / width of the (square) input, 32 for
    CIFAR-10 (17.2M parameters), 28 for MNIST; the stride-2 convolution halves it (rounding up). The
    layers are one ``self.net`` Sequential, so robustops.bounds propagates intervals through it."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, input_size: int = 32):
        super().__init__()
        if input_size < 1:
            raise ValueError(f"input_size must be >= 1, got {input_size}")
        layers: List[nn.Module] = []
        width = in_channels
        for out, stride in ((64, 1), (64, 1), (128, 2), (128, 1), (128, 1)):
            layers += [nn.Conv2d(width, out, 3, stride=stride, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            width = out
        side = (input_size + 1) // 2  # the one stride-2 convolution (3x3, padding 1)
        layers += [nn.Flatten(), nn.Linear(width * side * side, 512), nn.BatchNorm1d(512), nn.ReLU(inplace=True),
                   nn.Linear(512, num_classes)]
        self.input_size = input_size
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ------------------------------------------------------------------------------------ registry

MODEL_NAMES = ("small_cnn", "preact_resnet18", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
               "cohen_cifar_resnet20", "cohen_cifar_resnet110", "cnn7", "video_cnn")
_RESNET = re.compile(r"^resnet(\d+)$")
_COHEN_RESNET = re.compile(r"^cohen_(?:cifar_)?resnet(\d+)$")  # cohen_cifar_resnet110, cohen_resnet110


#: get_model("denoised_<name>"): the model <name> with a :class:`Denoiser` in front (a :class:`Denoised`)
DENOISED_PREFIX = "denoised_"


def _denoised(inner: str, **kwargs) -> Denoised:
    """Denoised(Denoiser, get_model(inner, **kwargs)): every keyword of get_model (frames for video_cnn too)
    reaches the classifier; the normalisation (mean / std) stays inside it, so the denoiser works on the
    pixels of the data box [0, 1]."""
    if inner.lower().replace("-", "_").startswith(DENOISED_PREFIX):
        raise ValueError(f"unknown model {DENOISED_PREFIX + inner!r}: one denoiser per model")
    classifier = get_model(inner, **kwargs)
    # the denoiser's channels are the classifier's input channels, read off the built model (its first
    # convolution) rather than guessed from the name: video_cnn defaults to 1 channel, the ResNets to 3
    first = next((m for m in classifier.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))), None)
    if first is None:
        raise ValueError(f"unknown model {DENOISED_PREFIX + inner!r}: the classifier has no convolution to read "
                         f"its input channels from")
    return Denoised(Denoiser(first.in_channels), classifier)


def get_model(name: str, num_classes: int = 10, in_channels: Optional[int] = None, input_size: Optional[int] = None,
              mean=None, std=None, frames: int = 8) -> nn.Module:
    """A model by name: "small_cnn", "preact_resnet18", "resnet20", "resnet110" (any "resnet<6n+2>"),
    "cohen_cifar_resnet110" (or "cohen_resnet110"; any depth 6n+2): Cohen et al.'s CIFAR ResNet;
    "cnn7" (or "cnn_7"): :class:`CNN7`, the IBP benchmark network; "video_cnn":
    :class:`~robustops.models.video.VideoCNN` for [B, T, C, H, W] videos (input_size default 16, frames 8;
    its Normalize is at dim 2); "denoised_<name>" (e.g. "denoised_small_cnn"): that model behind a
    :class:`~robustops.models.denoise.Denoiser`, one :class:`~robustops.models.denoise.Denoised` module
    (generative adversarial training's pipeline).

    num_classes; in_channels (default 1 for small_cnn, 3 otherwise); input_size (the height / width
    of the input: small_cnn default 8, cnn7 default 32; the ResNets pool globally and take any size). With mean
    and std, the model is ``nn.Sequential(Normalize(mean, std), model)``: it takes [0, 1] pixels."""
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string, got {type(name).__name__}")
    key = name.lower().replace("-", "_")
    if key.startswith(DENOISED_PREFIX):
        return _denoised(name[len(DENOISED_PREFIX):], num_classes=num_classes, in_channels=in_channels,
                         input_size=input_size, mean=mean, std=std, frames=frames)
    if key in ("small_cnn", "smallcnn"):
        model = SmallCNN(in_channels=1 if in_channels is None else in_channels, num_classes=num_classes,
                         input_size=8 if input_size is None else input_size)
    elif key in ("preact_resnet18", "preactresnet18"):
        model = PreActResNet18(num_classes=num_classes, in_channels=3 if in_channels is None else in_channels)
    elif key in ("cnn7", "cnn_7"):
        model = CNN7(in_channels=3 if in_channels is None else in_channels, num_classes=num_classes,
                     input_size=32 if input_size is None else input_size)
    elif _COHEN_RESNET.match(key):
        depth = int(_COHEN_RESNET.match(key).group(1))
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"unknown model {name!r}: Cohen et al.'s CIFAR ResNets have depth 6n+2 "
                             f"(cohen_cifar_resnet20, cohen_cifar_resnet110, ...); "
                             f"known models: {', '.join(MODEL_NAMES)}")
        model = cohen_cifar_resnet(depth, num_classes=num_classes,
                                   in_channels=3 if in_channels is None else in_channels)
    elif _RESNET.match(key) and key != "resnet18":
        depth = int(_RESNET.match(key).group(1))
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"unknown model {name!r}: CIFAR ResNets have depth 6n+2 (resnet20, resnet32, ..., "
                             f"resnet110); known models: {', '.join(MODEL_NAMES)}")
        model = cifar_resnet(depth, num_classes=num_classes, in_channels=3 if in_channels is None else in_channels)
    elif key in ("video_cnn", "videocnn"):
        model = VideoCNN(in_channels=1 if in_channels is None else in_channels, num_classes=num_classes,
                         frames=frames, input_size=16 if input_size is None else input_size)
    else:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")
    if mean is not None or std is not None:
        model = nn.Sequential(Normalize(mean, std, channel_dim=VIDEO_CHANNEL_DIM if isinstance(model, VideoCNN) else 1), model)
    return model


