"""Out-of-distribution data in adversarial training: OAT (Lee, Park, Lee, Yi, Lee & Yoon, "Removing
undesirable feature contributions using out-of-distribution data", ICLR 2021).

Every batch of B samples holds g = round(ood_ratio * B) OOD images (``robustops.ood``) and B - g
training samples, mixed by the proxy data's :class:`robustops.proxy.MixedLoader` (``return_source``:
its mask says which rows are OOD; an epoch is one pass over the training data, so a ratio r makes
1 / (1 - r) times as many steps per epoch). The OOD rows are trained toward the uniform label u =
(1/K, ..., 1/K) with the paper's adversarial term: they are attacked too, at the run's eps, to raise
their loss against u. For PGD-AT the objective is

    L = mean_{i in-dist} CE(f(x_i'), y_i) + lambda * mean_{j OOD} CE_u(f(x~_j')),

the paper's E_D[max CE] + lambda E_OOD[max CE_u], x' maximising the same per-sample loss over the
eps-ball, with

    CE_u(z) = -(1/K) sum_k log softmax(z)_k = logsumexp(z) - mean_k z_k = log K + KL(u || softmax(z)),

whose minimum over the logits is log K, reached exactly at equal logits (gradient softmax(z) - u = 0).
For TRADES each row's loss is CE (to y, or CE_u on the OOD rows) + beta KL(f(x) || f(x')), combined in the
same way (mean over the in-distribution rows + lambda * mean over the OOD rows); its inner maximisation is
TRADES' own over the whole batch (label-free).

Where the official code differs: it averages the per-row losses over the whole batch, (1 / B) [sum_in +
lambda sum_OOD] (AT: the OOD rows' cross-entropy scaled by alpha = lambda; TRADES: the OOD rows concatenated
with uniform soft targets, lambda = 1). At ratio r that is (1 - r) [mean_in + lambda r / (1 - r) mean_OOD]:
the same objective at a learning rate scaled by 1 - r; here the in-distribution term keeps the base
method's scale, so ratio -> 0 leaves the base method's step unchanged.

Choices the paper leaves open: lambda is
``ood_weight`` (default 1: the official TRADES code; its AT code uses 5 on CIFAR-10); the ratio is
``ood_ratio`` (the official code uses 1/2, the in-distribution half of the batch being what PGD-AT alone
would use: compare at the same number of optimizer steps, which 1 / (1 - r) times fewer epochs give);
the training accuracy is measured on the in-distribution rows only and the reported training loss is
L itself; the OOD images take placeholder label 0 in the loader (never used)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import _checks

__all__ = ["uniform_label_loss", "ood_loader", "marked_labels", "marked_loss", "batch_loss", "ood_stats"]


def uniform_label_loss(logits: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """CE_u(z) = -(1/K) sum_k log softmax(z)_k (the cross-entropy to the uniform label) of logits [B, K]:
    per row ("none"), summed ("sum") or averaged ("mean"). Its minimum, log K, is at equal logits."""
    z = logits.float()
    per = torch.logsumexp(z, dim=1) - z.mean(dim=1)
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    if reduction == "mean":
        return per.mean()
    raise ValueError(f'reduction must be "none", "sum" or "mean", got {reduction!r}')


def marked_labels(y: torch.Tensor, ood: torch.Tensor) -> torch.Tensor:
    """The labels with -1 on the OOD rows: what the attack's objective :func:`marked_loss` takes."""
    return torch.where(ood, torch.full_like(y, -1), y)


def marked_loss(logits: torch.Tensor, marked: torch.Tensor) -> torch.Tensor:
    """Per-row loss [B]: CE(z_i, y_i) where marked_i >= 0, CE_u(z_i) where marked_i = -1 (the OOD rows):
    the soft-target cross-entropy with one-hot / uniform targets, without building the [B, K] targets; also
    the attack's objective for a batch with OOD rows (its sum is ascended)."""
    ce = F.cross_entropy(logits.float(), marked.clamp_min(0), reduction="none")
    return torch.where(marked < 0, uniform_label_loss(logits, "none"), ce)


def batch_loss(per_row: torch.Tensor, ood: torch.Tensor, weight: float, ood_count: int) -> torch.Tensor:
    """The mean of the in-distribution rows' losses + weight * the mean of the OOD rows' (per-row losses [B],
    ood_count OOD rows, at least one of each kind)."""
    n_in = per_row.shape[0] - int(ood_count)
    scale = torch.where(ood, float(weight) / int(ood_count), 1.0 / n_in)
    return (per_row * scale).sum()


def ood_stats(loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, ood: torch.Tensor, ood_count: int):
    """A step's StepStats over the in-distribution rows: (loss * their number, their number correct, their
    number); the loss is the whole batch's objective (its OOD part included)."""
    n = y.shape[0] - int(ood_count)
    correct = ((logits.detach().argmax(1) == y) & ~ood).sum()
    return loss.detach().float() * n, correct, n


def ood_loader(train_loader, ood_x: torch.Tensor, ratio: float, *, seed: int, rank: Optional[int] = None,
               world_size: Optional[int] = None, lo: float = 0.0, hi: float = 1.0):
    """A :class:`robustops.proxy.MixedLoader` over the training data of ``train_loader`` (a DataLoader over a
    map-style dataset, or a MixedLoader without generated data: its batch size is kept) and the OOD images
    ood_x [N, C, H, W] at ``ratio``, yielding (x, y, is_ood)."""
    from ..proxy import MixedLoader, as_tensors

    ratio = _checks.check_number(ratio, "ood_ratio")
    batch_size = getattr(train_loader, "batch_size", None)
    dataset = getattr(train_loader, "dataset", None)
    if isinstance(train_loader, MixedLoader):
        if train_loader.gen_x.shape[0]:
            raise ValueError("ood_data cannot be combined with generated (proxy) training data in one loader")
        dataset = (train_loader.real_x, train_loader.real_y)
    if batch_size is None or dataset is None:
        raise ValueError(f"ood_data needs train_loader to be a DataLoader over a map-style dataset with a batch_size, "
                         f"got {type(train_loader).__name__}")
    rx, ry = as_tensors(dataset, "train_loader's data")
    placeholder = torch.zeros(ood_x.shape[0], dtype=torch.int64)
    return MixedLoader((rx, ry), (ood_x, placeholder), int(batch_size), ratio, seed=seed, rank=rank,
                       world_size=world_size, return_source=True, lo=lo, hi=hi,
                       num_classes=max(int(ry.max()) + 1, 1))
