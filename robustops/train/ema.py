"""Weight averaging (an exponential moving average of the weights), the ``ema=decay`` training option.

Model weight averaging as Rebuffi et al. (2021, "Fixing data augmentation to improve adversarial
robustness") use it against robust overfitting: beside the trained weights w_t the run keeps

    w_avg <- d_t * w_avg + (1 - d_t) * w_t,    d_t = min(decay, (1 + t) / (10 + t)),

after every optimizer step t = 0, 1, 2, ... (t counts the updates made before this one), starting
from w_avg = the initial weights. The warm-up factor (1 + t) / (10 + t) keeps the early average
from being dominated by the random initialisation; it reaches decay = 0.999 after about 9000 steps.
decay = 0 makes w_avg a copy of w_t after every step.

Choices, stated:

- What is averaged: every floating-point entry of the model's state dict, the parameters and the
  buffers alike (normalisation layers' running means and variances are averaged with the same d_t);
  integer buffers (BatchNorm's ``num_batches_tracked``) are copied from the live model.
- The update is one fused ``lerp`` over all tensors (w_avg += (1 - d_t) (w_t - w_avg)); d_t is a
  Python number computed from the host-side count t, so no host synchronisation.
- Use: validation, the selection of the best epoch, early stopping, best.pt and the model ``fit``
  returns are the averaged weights (``fit`` swaps them in for validation and leaves them in the
  model at the end); the live weights keep training. See ``fit`` for the checkpoint layout.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, List

import torch
import torch.nn as nn

__all__ = ["WeightAverage", "ema_decay"]


def ema_decay(decay: float, t: int) -> float:
    """d_t of the (t+1)-th update: min(decay, (1 + t) / (10 + t))."""
    return min(float(decay), (1.0 + t) / (10.0 + t))


class WeightAverage:
    """The moving average of ``model``'s state dict (see the module's docstring).

    ``update()`` after each optimizer step; ``applied()`` a context in which the model holds the
    averaged weights (swapped in and back exactly); ``state_dict()`` / ``load_state_dict()`` for
    checkpoints (the averaged tensors and the update count)."""

    def __init__(self, model: nn.Module, decay: float):
        self.model = model
        self.decay = float(decay)
        self.updates = 0
        self._bind()
        with torch.no_grad():
            self.avg: Dict[str, torch.Tensor] = {k: v.detach().clone() for k, v in self._live.items()}

    def _bind(self) -> None:
        # detached views that share storage with the live parameters and buffers
        self._live: Dict[str, torch.Tensor] = dict(self.model.state_dict(keep_vars=False))
        self._float = [k for k, v in self._live.items() if v.is_floating_point()]
        self._other = [k for k, v in self._live.items() if not v.is_floating_point()]

    def _lists(self):
        live: List[torch.Tensor] = [self._live[k] for k in self._float]
        avg: List[torch.Tensor] = [self.avg[k] for k in self._float]
        return live, avg

    @torch.no_grad()
    def update(self) -> None:
        d = ema_decay(self.decay, self.updates)
        live, avg = self._lists()
        if d == 0.0:
            torch._foreach_copy_(avg, live)
        elif avg:
            torch._foreach_lerp_(avg, live, 1.0 - d)
        for k in self._other:
            self.avg[k].copy_(self._live[k])
        self.updates += 1

    @torch.no_grad()
    def _swap(self) -> None:
        for k, live in self._live.items():
            a = self.avg[k]
            tmp = live.clone()
            live.copy_(a)
            a.copy_(tmp)

    @contextlib.contextmanager
    def applied(self):
        """The model holds the averaged weights inside the block, its own again after it (exactly)."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def averaged_state_dict(self) -> Dict[str, torch.Tensor]:
        """The averaged weights as a CPU state dict of the model (copies)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.avg.items()}

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Loads the averaged weights into the model (the end of ``fit``)."""
        for k, live in self._live.items():
            live.copy_(self.avg[k])

    def state_dict(self) -> Dict[str, Any]:
        return {"updates": self.updates, "decay": self.decay, "state_dict": self.averaged_state_dict()}

    @torch.no_grad()
    def load_state_dict(self, st: Dict[str, Any]) -> None:
        sd = st["state_dict"]
        missing = sorted(set(self.avg) ^ set(sd))
        if missing:
            raise ValueError(f"ema: the averaged weights do not match the model (keys {', '.join(missing[:5])})")
        self._bind()
        for k, v in sd.items():
            self.avg[k].copy_(v)
        self.updates = int(st["updates"])
