"""Corruption networks for AdversarialAugment (Calian et al., ICLR 2022, arXiv 2104.01086): image-to-image
networks c_phi(x) whose *weights* the ``ada`` training method perturbs, so that c_{phi + delta}(x) is a
corrupted version of x.

The paper uses pretrained image-to-image models (EDSR super-resolution, a compressive autoencoder,
VQ-VAE); none can be downloaded here, so robustops trains its own:

- :class:`CorruptionAE`: a small convolutional autoencoder (one stride-2 convolution down, nearest
  upsampling back, a sigmoid output in [0, 1]) trained on the training images by reconstruction
  (``robustops perturbation train --kind autoencoder``: ``fit_perturbation`` with the squared error
  summed over pixels, no KL term);
- :class:`PriorMeanDecoder`: the CVAE of ``robustops perturbation train`` used deterministically, the
  reading this package takes of "the CVAE decoder as a corruption network": x -> g(mu_p(x), x), the
  decoder on the prior's mean (no latent noise). Its forward uses the prior network and the decoder;
  the encoder q(z | x, x~) plays no part and is not perturbed.

:func:`robustops.perturbation.corruption_network` (in ``fit.py``, beside the checkpoint loader) turns a module or a checkpoint path into one of these (or any nn.Module whose
``forward(x)`` returns x's shape), in eval mode with its parameters frozen.
"""
from __future__ import annotations

from typing import Any, Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["CorruptionAE", "PriorMeanDecoder", "is_autoencoder"]


class CorruptionAE(nn.Module):
    """A small convolutional autoencoder x -> x_hat in [0, 1], for images of any size [B, C, H, W]:
    conv 3x3 (C -> width), conv 3x3 stride 2 (width -> 2 width), nearest upsampling to H x W,
    conv 3x3 (2 width -> width), conv 3x3 (width -> C), ReLU between, a sigmoid at the end.

    The one stride-2 layer gives a bottleneck of half the resolution, so the network has to learn the
    images rather than copy pixels; the nearest upsampling (instead of a transposed convolution) fits
    odd sizes too. ``kind`` and ``config`` let ``save_perturbation_model`` /
    ``load_perturbation_model`` rebuild it."""

    kind = "autoencoder"

    def __init__(self, in_channels: int = 1, width: int = 16):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        self.config: Dict[str, Any] = {"in_channels": in_channels, "width": width}
        self.enc1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.enc2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.dec1 = nn.Conv2d(2 * width, width, 3, padding=1)
        self.out = nn.Conv2d(width, in_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.enc2(F.relu(self.enc1(x))))
        h = F.interpolate(h, size=tuple(x.shape[-2:]), mode="nearest")
        return torch.sigmoid(self.out(F.relu(self.dec1(h))))


class PriorMeanDecoder(nn.Module):
    """A CVAE (the perturbation-model protocol: ``prior``, ``decode``) used as a deterministic corruption
    network: forward(x) = decode(mu_p(x), x). Its parameters are the CVAE's (``cvae.*``); the weights AdA
    perturbs are those the forward uses (the prior network's and the decoder's)."""

    #: parameter-name prefixes a weight perturbation leaves alone: the encoder q(z | x, x~) is not used
    ada_frozen = ("cvae.encoder_net.",)

    def __init__(self, cvae: nn.Module):
        super().__init__()
        if not (hasattr(cvae, "prior") and hasattr(cvae, "decode")):
            raise TypeError(f"PriorMeanDecoder needs a CVAE with prior(x) and decode(z, x); {type(cvae).__name__} "
                            f"lacks them")
        self.cvae = cvae

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu, _ = self.cvae.prior(x)
        return self.cvae.decode(mu, x)


def is_autoencoder(model: nn.Module) -> bool:
    """Whether model is trained by reconstruction (a :class:`CorruptionAE`, ``kind = "autoencoder"``)
    rather than as a CVAE on pairs."""
    return getattr(model, "kind", None) == "autoencoder"
