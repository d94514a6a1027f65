"""Known perturbation families of the digits pairs, one at a time, and what the generalisation study needs
around them (Wong and Kolter 2021, "Learning perturbation sets for robust machine learning", ICLR: their
MNIST sets are learned from known families -- an L-inf ball, rotation, and rotation / translation / scaling
-- and their CIFAR-10 classifiers are evaluated on real perturbed test images, on corruptions held out of
the set's training data, and against a baseline trained on the real perturbations themselves).

- Families: ``rotation`` (the angle), ``translation`` (tx, ty), ``scaling`` (the scale), ``thickness``
  (the stroke thickness), each alone with the other parameters of :func:`~.pairs.transform_images` at
  the identity (angle 0, shift 0, scale 1, thickness 0) and its own parameter drawn from the dataset's
  range; ``all`` (every parameter at once: the digits pairs' original family); ``linf`` (x + d, d uniform
  in [-eps, eps]^n, clamped to [0, 1]: the reference code's L-inf family, which draws d uniformly in the
  box rather than on its surface or by PGD). ``DigitsPairs(family=...)`` takes one name or several (item
  i then comes from family i mod k).
- :func:`held_out_split`: the families a set is learned on and the one held out of its training data.
- :class:`PerturbedImages`: (x~, y) of pair data, the training set of the real-perturbation baseline
  (data augmentation with the true x~; the reference's ``nooriginal`` CIFAR-10-C variant trains on the
  perturbed images alone, ``include_clean`` adds the clean ones).
- :func:`pair_accuracy`: a classifier's accuracy on the clean and on the real perturbed images of pairs.
"""
from __future__ import annotations

import math
from typing import Dict, Sequence, Tuple, Union

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["FAMILIES", "parse_families", "restrict_params", "linf_noise", "held_out_split", "PerturbedImages",
           "pair_accuracy"]

#: every family name DigitsPairs accepts; "all" is the combined one (the default)
FAMILIES = ("all", "rotation", "translation", "scaling", "thickness", "linf")
#: the transform_images parameters each family draws (the others stay at the identity)
FAMILY_PARAMS = {"all": ("angle", "tx", "ty", "scale", "thickness"), "rotation": ("angle",),
                 "translation": ("tx", "ty"), "scaling": ("scale",), "thickness": ("thickness",), "linf": ()}
IDENTITY = {"angle": 0.0, "tx": 0.0, "ty": 0.0, "scale": 1.0, "thickness": 0.0}


def parse_families(family: Union[str, Sequence[str]], what: str = "family") -> Tuple[str, ...]:
    """A family name, a comma list ("rotation,translation") or a sequence of names, as a tuple of
    distinct known names; a ValueError naming ``what`` otherwise."""
    names = family.split(",") if isinstance(family, str) else family
    try:
        names = tuple(str(n).strip() for n in names)
    except TypeError:
        raise ValueError(f"{what} must be a family name or a list of them ({', '.join(FAMILIES)}), "
                         f"got {family!r}") from None
    bad = [n for n in names if n not in FAMILIES]
    if not names or bad or len(set(names)) != len(names):
        raise ValueError(f"{what} must be one or more distinct names of {', '.join(FAMILIES)}, got {family!r}")
    return names


def check_linf_eps(eps) -> float:
    """The L-inf family's radius: a finite number in [0, 1] (pixels lie in [0, 1])."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or not 0 <= eps <= 1:
        raise ValueError(f"linf_eps must be a number in [0, 1] (the L-inf family's radius in pixel units), got "
                         f"{eps!r}")
    return float(eps)


def restrict_params(p: torch.Tensor, family: str, names: Sequence[str]) -> torch.Tensor:
    """Parameters p [..., len(names)] (in the order ``names``) with those outside ``family`` set to the
    identity; p itself (the same values) for "all"."""
    keep = FAMILY_PARAMS[family]
    if len(keep) == len(names):
        return p
    out = p.clone()
    for k, name in enumerate(names):
        if name not in keep:
            out[..., k] = IDENTITY[name]
    return out


def linf_noise(x: torch.Tensor, eps: float, seeds: Sequence[int]) -> torch.Tensor:
    """x [B, ...] + d clamped to [0, 1], d uniform in [-eps, eps] per element, row b drawn from a
    generator keyed by seeds[b] (so a row does not depend on the rest of the batch)."""
    if len(seeds) != x.shape[0]:
        raise ValueError(f"seeds must hold one seed per row of x ({x.shape[0]}), got {len(seeds)}")
    d = torch.stack([torch.rand(x.shape[1:], generator=torch.Generator().manual_seed(int(s)), dtype=torch.float32)
                     for s in seeds]) if len(seeds) else torch.zeros(x.shape)
    return (x.float() + eps * (2.0 * d.to(x.device) - 1.0)).clamp(0.0, 1.0).to(x.dtype)


def held_out_split(held_out: str, families: Union[str, Sequence[str]] = ("rotation", "translation", "scaling",
                                                                          "thickness")) -> Tuple[Tuple[str, ...], str]:
    """(the families a set is learned on, the held-out one): ``families`` without ``held_out``. "all"
    cannot be held out (it contains every affine family) nor be a training family beside a held-out one."""
    fams = parse_families(families, "families")
    (held,) = parse_families(held_out, "held_out")
    if held == "all" or "all" in fams:
        raise ValueError("held_out and families must name single families (rotation, translation, scaling, "
                         "thickness, linf), not 'all': 'all' contains every affine family")
    train = tuple(f for f in fams if f != held)
    if not train:
        raise ValueError(f"families must hold a family besides the held-out {held!r}, got {families!r}")
    return train, held


class PerturbedImages(Dataset):
    """(x~, y) of pair data (a dataset of (x, x~, y) such as DigitsPairs or CifarCPairs): the training set
    of the real-perturbation baseline. include_clean: also (x, y), items [0, N) clean and [N, 2N)
    perturbed."""

    def __init__(self, pairs: Dataset, include_clean: bool = False):
        self.pairs, self.include_clean = pairs, bool(include_clean)

    def __len__(self) -> int:
        return len(self.pairs) * (2 if self.include_clean else 1)

    def __getitem__(self, i: int):
        n = len(self.pairs)
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i!r} out of range for PerturbedImages of length {len(self)}")
        i %= len(self)
        x, xt, y = self.pairs[i % n][:3]
        return (x if i < n and self.include_clean else xt), y


def pair_accuracy(model: torch.nn.Module, pairs: Dataset, batch_size: int = 256, device=None) -> Dict[str, float]:
    """{"clean_acc", "perturbed_acc", "n"}: the model's accuracy (eval mode, no gradients) on the clean x
    and on the real perturbed x~ of every pair, labels y."""
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    right = torch.zeros(2, dtype=torch.long)
    n = 0
    with torch.no_grad():
        for x, xt, y in DataLoader(pairs, batch_size=batch_size):
            y = y.to(device)
            right[0] += int((model(x.to(device)).argmax(1) == y).sum())
            right[1] += int((model(xt.to(device)).argmax(1) == y).sum())
            n += y.shape[0]
    model.train(was_training)
    if n == 0:
        raise ValueError("pairs holds no pairs")
    return {"clean_acc": float(right[0]) / n, "perturbed_acc": float(right[1]) / n, "n": n}
