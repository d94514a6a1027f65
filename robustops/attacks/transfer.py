"""Transfer (black-box) attacks: adversarial examples crafted with white-box access to a source model,
evaluated on another model, the target (Papernot et al. 2016; the transfer evaluation of Liu et al. 2022,
J-SIGR). :class:`Transfer` is an :class:`~robustops.attacks.base.Attack` on the target whose perturbation
comes from an attack built on the source, so ``robust_accuracy``, the suites and ``robustops evaluate``
count a point as robust when the target classifies it correctly both clean and at the source's
adversarial example. A suite becomes a transfer suite with :meth:`~robustops.attacks.suites.Suite.transfer_to`:
each of its attacks (built on the source) wrapped, run in order on the points the earlier ones left
robust on the target, so a point survives only when the target resists every source attack's example.

The source attack runs with the same seed, offset and skip as it would in a white-box evaluation, so with
source = target a transfer evaluation equals the white-box one (for the attacks whose examples fool the
model they were crafted on; FAB's examples beyond eps are replaced by the clean input)."""
from __future__ import annotations

from typing import Optional

import torch

from .base import Attack
from .engine import AttackResult, predictions

__all__ = ["Transfer"]


class Transfer(Attack):
    """The attack ``source`` (an Attack on the source model) transferred to ``model`` (the target):
    x_adv is the source's adversarial example; success, pred and loss are the target's at x_adv.

    mean / std / dtype: the target's input normalisation and autocast (the source attack has its own)."""

    def __init__(self, model, source: Attack, *, mean=None, std=None, dtype=None):
        if not isinstance(source, Attack):
            raise TypeError(f"source must be an Attack built on the source model, got {type(source).__name__}")
        if source.targeted:
            raise ValueError("source: a targeted attack (targets given at call time) cannot be transferred here; "
                             "use an untargeted one (APGD-T chooses its own targets and is fine)")
        super().__init__(model, clip=source.clip, mean=mean, std=std, seed=source.seed, dtype=dtype)
        self.source = source
        self.early_stop = bool(getattr(source, "early_stop", False))
        self.steps = getattr(source, "steps", None)
        self.result_fields = tuple(f for f in getattr(source, "result_fields", ()) if f != "distance")

    def __repr__(self) -> str:
        return f"Transfer({type(self.source).__name__} on the source model)"

    def attack(self, x: torch.Tensor, y: torch.Tensor, targets: Optional[torch.Tensor], *, seed: int, offset: int,
               skip: Optional[torch.Tensor], evaluate: bool, **params) -> AttackResult:
        src = self.source.perturb(x, y, None, offset=offset, skip=skip, evaluate=False)
        x_adv = src.x_adv.detach()
        distance = getattr(src, "distance", None)
        if distance is not None and getattr(self.source, "eps", None) is not None:
            # a minimum-distance attack (FAB) returns its smallest example even beyond eps: outside the
            # threat model it transfers nothing, so the clean input stands in for it
            inside = (distance <= self.source.eps).view(-1, *([1] * (x.dim() - 1)))
            x_adv = torch.where(inside, x_adv, x)
        with torch.no_grad(), torch.autocast(x.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            logits = self.forward(x_adv).float()
        pred = predictions(logits)
        fooled = (pred != y) & (pred >= 0)
        step = torch.where(fooled, torch.zeros_like(y), torch.full_like(y, -1))
        res = AttackResult(x_adv, fooled, step, src.restart, None, pred)
        for field in self.result_fields:  # e.g. Square's queries on the source
            setattr(res, field, getattr(src, field, None))
        return res
