"""Free adversarial training by gradient recycling (Shafahi et al. 2019).

Each minibatch is replayed ``m`` times; every replay is one forward/backward pass that yields both
the weight gradient (an optimizer step) and the input gradient (a ``recycle_step_`` of the
perturbation, step ``alpha`` = eps by default). The perturbation persists across minibatches (and
is saved for an exact resume; under a budget schedule it is first clamped to each minibatch's eps).
``cutmix``: each minibatch is composed once (:mod:`robustops.train.cutmix`) and its m replays train on
and ascend the mixed cross-entropy. ``epochs`` counts forward/backward passes like natural training:
the data are traversed ceil(epochs / m) times.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ... import ops
from ...attacks.engine import batch_view_shape
from ..registry import Hyper, Method, register

__all__ = ["Free", "PersistentPerturbation"]


class PersistentPerturbation:
    """A perturbation that persists across minibatches (free-AT, FGSM with the "previous" start):
    a buffer as large as the largest batch seen, whose first B rows serve a batch of B."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.delta: Optional[torch.Tensor] = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The perturbation for this minibatch (a view of the first B rows), zero where new."""
        B = x.shape[0]
        d = self.delta
        if d is None or d.shape[1:] != x.shape[1:] or d.shape[0] < B or d.device != x.device:
            self.delta = self.ctx.fmt(torch.zeros_like(x, memory_format=torch.contiguous_format))
            if d is not None and d.shape[1:] == x.shape[1:]:
                k = min(d.shape[0], B)
                self.delta[:k].copy_(d[:k])
        return self.delta[:B]

    def state_dict(self):
        return {"delta": None if self.delta is None else self.delta.detach().cpu()}

    def load_state_dict(self, st) -> None:
        d = st.get("delta")
        self.delta = None if d is None else self.ctx.fmt(d.to(self.ctx.device))


@register
class Free(Method):
    name = "free"
    help = "free adversarial training: m replays per minibatch with gradient recycling (Shafahi et al. 2019)"
    hyper = (Hyper("m", 8, "free-AT replays per minibatch", kind="int", minimum=1, flags=("-m", "--m", "--replays")),)
    options = ("ema", "cutmix")
    sample_weights = True
    budget_schedules = True

    @classmethod
    def default_alpha(cls, cfg) -> float:
        return cfg.eps

    @classmethod
    def updates_per_batch(cls, cfg) -> int:
        return cfg.m

    @classmethod
    def passes(cls, cfg) -> int:
        return math.ceil(cfg.epochs / cfg.m)

    @classmethod
    def label(cls, cfg) -> str:
        return f"free AT (m={cfg.m})"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.perturbation = PersistentPerturbation(ctx)

    def step(self, x, y):
        c, ctx = self.cfg, self.ctx
        if c.cutmix is not None:  # the composed batch and its mixed target (robustops.train.cutmix)
            x, y = ctx.cutmix(x, y)
        delta = self.perturbation(x)
        eps, alpha = ctx.budget(x, y)  # one budget for the m replays of the minibatch
        if c.budget_schedule != "constant":
            # delta carries the previous minibatch's budget: a lower one now would have the first replay
            # train outside the new ball
            bound = eps.view(batch_view_shape(delta)) if torch.is_tensor(eps) else eps
            delta.clamp_(-bound, bound)
        tot_loss, tot_correct, n = 0.0, 0, 0
        for _ in range(c.m):
            xa = (x + delta).requires_grad_(True)

            def closure(net):
                logits = net(xa)
                return ctx.cross_entropy(logits, y), logits

            # one backward: the weight gradients (the update's step) and the input gradient, which
            # only moves the perturbation, so it may follow the optimizer step
            loss, logits = ctx.update(closure)
            g = xa.grad
            if c.amp == "fp16":
                g = torch.nan_to_num(g, nan=0.0, posinf=1.0, neginf=-1.0)
            ops.recycle_step_(delta, x, ctx.fmt(g), eps=eps, step=alpha, lo=c.lo, hi=c.hi)
            step_loss, step_correct, b = ctx.stats(loss, logits, y)
            tot_loss, tot_correct, n = tot_loss + step_loss, tot_correct + step_correct, n + b
        return tot_loss, tot_correct, n

    def state_dict(self):
        return self.perturbation.state_dict()

    def load_state_dict(self, st) -> None:
        self.perturbation.load_state_dict(st)
