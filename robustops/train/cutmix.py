"""CutMix, the spatial composition of two images, and the mixed target it trains against: the
``cutmix=alpha`` training option (``MethodContext.cutmix``).

Rebuffi, Gowal, Calian, Stimberg, Wiles and Mann, "Data augmentation can improve robustness"
(NeurIPS 2021, arXiv 2111.05328) find that spatial composition (CutMix, Yun et al. 2019) reduces
robust overfitting once it is combined with model weight averaging (here the ``ema`` option), where
other augmentations do not. A batch is composed with a permutation pi of itself:

    lam ~ Beta(alpha, alpha)                                   (alpha = 1 in the paper: lam uniform)
    cut_h = int(H * sqrt(1 - lam)),  cut_w = int(W * sqrt(1 - lam))
    cy ~ U{0, ..., H - 1},  cx ~ U{0, ..., W - 1}               (the box's centre)
    y1 = clip(cy - cut_h // 2, 0, H),  y2 = clip(cy + cut_h // 2, 0, H)   (x1, x2 likewise in W)
    x_mix = x, with x_mix[..., y1:y2, x1:x2] = x[pi][..., y1:y2, x1:x2]
    lam  <- 1 - (y2 - y1) (x2 - x1) / (H W)                    (lam recomputed from the box)
    target = lam onehot(y) + (1 - lam) onehot(y[pi])

so exactly (1 - lam) H W pixels of each image come from its partner, with lam the recomputed value.
The box is the reference code's (Yun et al.'s ``rand_bbox``, and ``utils.cutmix`` of the official
code of Rebuffi et al., read for reference only): the half-sizes are floored, so an odd cut loses a
row or a column, and a box at the border is clipped (lam then rises). One lam, one box and one pi per
batch, as in both.

The mixed target (:class:`MixedTarget`) is what the adversarial methods attack and train on: the
cross-entropy of a mixed target is lam CE(logits, y) + (1 - lam) CE(logits, y[pi]) (the soft-label
cross-entropy, linear in the target), and the attack of PGD-AT / FGSM / free AT / FGSM-SDI maximises
that loss on the composed batch. TRADES' inner maximisation needs no label (the KL to the clean
prediction on the composed batch); its natural term is the mixed cross-entropy.

Choices the paper leaves open, and where the official code differs:

- Where the composition goes: on the clean batch, before the attack (as in the official code), so
  the adversary perturbs the composed image within the ball around it.
- TRADES: the official code, under CutMix, replaces the clean prediction by the mixed label as the
  target of the attack's KL ("regress the attack away from mixed labels"); here the attack keeps
  TRADES' own target (the clean prediction on the composed batch), the reading of the paper's text,
  which says only that the TRADES loss is used.
- The official code refuses an attack that needs hard labels under CutMix; here the label-based
  attacks maximise the mixed cross-entropy above.
- The attack-budget schedules (``ctx.budget``) see the composed batch with its dominant labels.
- Accuracy on training batches (logs only): counted against the dominant label (y where lam >= 1/2,
  else y[pi]); the official code reports none under CutMix.
- lam (Beta(alpha, alpha), the draw mixup uses) and the box centre come from a numpy generator seeded
  from the run's mixing generator, pi from that torch generator, which checkpoints save (exact resume).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch

from .. import _checks

__all__ = ["MixedTarget", "cutmix_box", "compose", "target_cross_entropy"]


class MixedTarget(NamedTuple):
    """The target lam * onehot(y) + (1 - lam) * onehot(y2) of a composed batch: y, y2 LongTensor[B]
    (y2 = y[pi], the partners' labels), lam a Python float (one per batch)."""
    y: torch.Tensor
    y2: torch.Tensor
    lam: float

    @property
    def dominant(self) -> torch.Tensor:
        """The labels with the larger share: y where lam >= 1/2, else y2 (what training accuracy counts)."""
        return self.y if self.lam >= 0.5 else self.y2


def cutmix_box(lam: float, cy: int, cx: int, height: int, width: int) -> Tuple[int, int, int, int, float]:
    """The CutMix box of a drawn lam in [0, 1] and centre (cy, cx) on an H x W image, as the reference
    code computes it: (y1, y2, x1, x2, lam_box), the rows y1:y2 and columns x1:x2 taken from the
    partner and lam_box = 1 - (y2 - y1)(x2 - x1) / (H W), the share of the image's own pixels."""
    if not (_checks.is_finite_number(lam) and 0.0 <= lam <= 1.0):
        raise ValueError(f"lam must be a number in [0, 1], got {lam!r}")
    if not (0 <= cy < height and 0 <= cx < width):
        raise ValueError(f"the box centre (cy, cx) must lie in the {height} x {width} image, got ({cy}, {cx})")
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    y1, y2 = min(max(cy - cut_h // 2, 0), height), min(max(cy + cut_h // 2, 0), height)
    x1, x2 = min(max(cx - cut_w // 2, 0), width), min(max(cx + cut_w // 2, 0), width)
    return y1, y2, x1, x2, 1.0 - (y2 - y1) * (x2 - x1) / (height * width)


def compose(x: torch.Tensor, partner: torch.Tensor, box: Tuple[int, int, int, int]) -> torch.Tensor:
    """x with the box (y1, y2, x1, x2) of its last two (H, W) dimensions taken from partner (same shape);
    a new tensor in x's memory layout (x itself when the box is empty). Videos [B, T, C, H, W]: the same
    box in every frame."""
    y1, y2, x1, x2 = box
    if y2 <= y1 or x2 <= x1:
        return x
    out = x.clone(memory_format=torch.preserve_format)
    out[..., y1:y2, x1:x2] = partner[..., y1:y2, x1:x2]
    return out


def target_cross_entropy(ce, logits: torch.Tensor, target: MixedTarget, weights: Optional[torch.Tensor],
                         label_smoothing: float = 0.0) -> torch.Tensor:
    """lam * ce(logits, y) + (1 - lam) * ce(logits, y2), ce(logits, labels, weights, label_smoothing) the
    (weighted) cross-entropy: the soft-label cross-entropy of the mixed target, label smoothing applied
    to it (smoothing is linear in the target, so it commutes with the mixing)."""
    lam = target.lam
    first = ce(logits, target.y, weights, label_smoothing)
    if lam == 1.0:
        return first
    return lam * first + (1.0 - lam) * ce(logits, target.y2, weights, label_smoothing)
