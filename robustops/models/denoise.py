"""A denoiser in front of a classifier: the model of generative adversarial training (Kinfu & Vidal,
"Analysis and extensions of adversarial training for video classification", CVPR-W 2022, their
"Generative AT"; trained by the ``denoise`` method, ``robustops/train/methods/denoise.py``).

- :class:`Denoiser`: a small residual conv net, ``x_hat = clamp(x + r(x), lo, hi)``.
- :class:`Denoised`: ``classifier(denoiser(x))`` as one ``nn.Module``, so every attack, evaluation
  and certification command attacks the whole pipeline (white-box through the denoiser) with no
  special casing, and its checkpoints reload with ``load_model`` (``get_model("denoised_<name>")``).
- :class:`Discriminator`: the small conv critic the method trains to tell denoised from clean inputs.

Video inputs [B, T, C, H, W] are denoised (and judged) frame by frame, T folded into the batch; the
classifier receives the 5-D batch as it came.

Choices of this module (the paper gives no architecture for its denoiser that could be retrieved):
three 3x3 convolutions of ``width`` channels with ReLUs, the last one zero-initialised, so that a new
pipeline starts as the bare classifier (r = 0) and the denoiser learns a correction; the output is
clamped to the data box, where the pixels of the inputs live.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional

import torch
import torch.nn as nn

__all__ = ["Denoiser", "Denoised", "Discriminator", "fold_frames"]


def fold_frames(x: torch.Tensor) -> torch.Tensor:
    """A video batch [B, T, C, H, W] as frames [B*T, C, H, W]; any other tensor as it is."""
    return x.flatten(0, 1) if x.dim() == 5 else x


class Denoiser(nn.Module):
    """``x_hat = clamp(x + r(x), lo, hi)``, r: conv3x3(channels -> width) - ReLU - (depth - 2) x
    [conv3x3(width -> width) - ReLU] - conv3x3(width -> channels), the last conv zero-initialised (the
    denoiser starts as the identity on the box). Takes [B, C, H, W] or video [B, T, C, H, W]."""

    def __init__(self, channels: int = 1, width: int = 32, depth: int = 3, lo: float = 0.0, hi: float = 1.0):
        super().__init__()
        if depth < 2:
            raise ValueError(f"depth must be >= 2 (convolutions of the denoiser), got {depth}")
        if not lo < hi:
            raise ValueError(f"lo must be < hi (the data box), got lo={lo}, hi={hi}")
        layers: List[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True)]
        last = nn.Conv2d(width, channels, 3, padding=1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*layers, last)
        self.lo, self.hi = float(lo), float(hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames = fold_frames(x)
        out = (frames + self.net(frames)).clamp(self.lo, self.hi)
        return out.view(x.shape) if x.dim() == 5 else out


class Denoised(nn.Module):
    """``classifier(denoiser(x))``: the pipeline of generative adversarial training, one module whose
    input gradient passes through the denoiser (white-box attacks see the whole defence).

    ``capture()`` records the denoiser's outputs of the forwards run inside it (the training method
    reads D(x_adv) off the one forward whose loss it back-propagates, under DistributedDataParallel too)."""

    def __init__(self, denoiser: nn.Module, classifier: nn.Module):
        super().__init__()
        self.denoiser = denoiser
        self.classifier = classifier
        self._captured: Optional[List[torch.Tensor]] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_hat = self.denoiser(x)
        if self._captured is not None:
            self._captured.append(x_hat)
        return self.classifier(x_hat)

    @contextlib.contextmanager
    def capture(self) -> Iterator[List[torch.Tensor]]:
        """Yields a list that receives the denoised batch of every forward inside the block."""
        self._captured = []
        try:
            yield self._captured
        finally:
            self._captured = None


class Discriminator(nn.Module):
    """A small conv critic: conv4x4(channels -> width, stride 2) - LeakyReLU(0.2) - conv4x4(width ->
    2 width, stride 2) - LeakyReLU(0.2) - global average pool - linear(1): one logit per image (per frame
    of a video, T folded into the batch), "clean" > 0. The DCGAN / pix2pix building blocks, sized for
    small inputs (8x8 digits up to CIFAR's 32x32)."""

    def __init__(self, channels: int = 1, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
                                 nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(fold_frames(x)).flatten()
