"""Reference models and checkpoints.

- :class:`SmallCNN`: a small conv net for digits / MNIST-sized inputs.
- :class:`PreActResNet18`: the pre-activation ResNet-18 used in the adversarial-training literature.
- :func:`cifar_resnet`: He et al.'s CIFAR ResNets with 6n+2 layers (resnet20, resnet110, ...).
- :class:`CNN7`: the 7-layer CNN of the IBP certified-training benchmarks (Shi et al. 2021).
- :func:`cohen_cifar_resnet`: the CIFAR ResNet of Cohen, Rosenfeld and Kolter's randomized-smoothing
  code (locuslab/smoothing), with its layer names, so that their released checkpoints load.
- :class:`Denoised`: a :class:`Denoiser` in front of a classifier (``get_model("denoised_small_cnn")``),
  with the :class:`Discriminator` of generative adversarial training (:mod:`.denoise`).
- :class:`VideoCNN` (:mod:`.video`): a tiny 3-D-conv classifier for [B, T, C, H, W] videos, and the video
  layout helpers.
- :class:`Normalize`: ``(x - mean) / std`` per channel, to put in front of a model.
- :func:`get_model` builds one by name (:mod:`.nets`); :func:`save_checkpoint` / :func:`load_model`
  (:mod:`.checkpoints`) store and restore ``{"model": name, "model_kwargs": {...}, "state_dict": ...}``
  checkpoints, and also load raw state dicts, TorchScript files and ``torch.export`` archives, and the
  checkpoints of Cohen et al.'s code (``{"arch": "cifar_resnet110", "state_dict": ...}``, see :func:`load_model`).
"""
from .checkpoints import load_model, model_device, save_checkpoint, state_dict_digest, unwrap, verify_checkpoint
from .denoise import Denoised, Denoiser, Discriminator
from .nets import (CNN7, COHEN_CIFAR10_MEAN, COHEN_CIFAR10_STD, COHEN_IMAGENET_MEAN, COHEN_IMAGENET_STD, DENOISED_PREFIX,
                   MODEL_NAMES,
                   BasicBlock, CifarResNet, CohenBasicBlock, CohenCifarResNet, Normalize, PreActBlock, PreActResNet18,
                   SmallCNN, channel_stats, cifar_resnet, cohen_cifar_resnet, get_model, split_normalize)
from .video import VideoCNN

__all__ = ["SmallCNN", "CNN7", "PreActResNet18", "PreActBlock", "CifarResNet", "BasicBlock", "CohenBasicBlock",
           "cifar_resnet", "CohenCifarResNet", "cohen_cifar_resnet", "Normalize", "channel_stats", "split_normalize",
           "get_model", "MODEL_NAMES", "save_checkpoint", "load_model", "COHEN_CIFAR10_MEAN", "COHEN_CIFAR10_STD",
           "COHEN_IMAGENET_MEAN", "COHEN_IMAGENET_STD", "unwrap", "model_device", "state_dict_digest",
           "verify_checkpoint", "Denoiser", "Denoised", "Discriminator", "DENOISED_PREFIX", "VideoCNN"]
