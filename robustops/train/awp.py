"""Adversarial weight perturbation (AWP; Wu, Xia and Wang, NeurIPS 2020), the ``awp=gamma`` training option.

AWP trains against a worst case in weight space as well as in input space:

    min_w  max_{||v_l|| <= gamma ||w_l||}  L(w + v; x_adv),

where x_adv is the method's inner attack on w, L its training loss (PGD-AT: CE(f(x_adv), y); TRADES:
CE(f(x), y) + beta KL(f(x) || f(x_adv))) and l runs over the layers. The inner maximisation over v is
one normalised ascent step from v = 0, taken per layer:

    g_l = dL/dw_l (at w, on x_adv),   v_l = gamma * ||w_l|| * g_l / ||g_l||,

then the training gradient is taken at the perturbed weights and applied to the unperturbed ones:

    w <- w - lr * step(dL/dw evaluated at w + v).

:class:`WeightPerturbation` does the three parts of one step: ``perturb(closure)`` (the ascent
gradient, w += v), the method's training backward at w + v, and ``restore()`` (w copied back from a
saved copy, bit for bit: w + v - v would drift by rounding), before the optimizer steps.

Choices, stated:

- Layers: the parameters with two or more dimensions (convolution and linear weights); biases and
  normalisation scales / shifts (1-D) are not perturbed, as in the authors' code.
- One ascent step, v started at 0 (the paper's default, K2 = 1); no AWP warm-up epochs.
- A layer whose gradient is 0 (or, under fp16 loss scaling, non-finite) gets v_l = 0 for that step;
  decided on the device (no host synchronisation). The norms, scales and the update of all layers
  are a few fused ``_foreach`` launches.
- The ascent gradient is taken in train mode (batch statistics in normalisation layers), through
  the model without DistributedDataParallel, under the run's autocast; the fp16 loss scale is used
  for the backward and cancels in g_l / ||g_l||. The running statistics that this extra forward
  updates are put back afterwards, so the layers' buffers move once per step as without AWP.
- Distributed: the ascent gradient is averaged over the processes (one all-reduce of the perturbed
  weights' gradients) before it is normalised, so every process applies the same v, the one a
  single process would compute on the whole batch. Without it the processes' weights would still
  agree after the step (they are restored exactly, and the optimizer sees DDP's averaged gradient),
  but the run would differ from the single-process one.
- Persistent state: none (v is recomputed every step), so resume needs nothing beyond the config.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.nn as nn

from .collective import sync_tensors_

__all__ = ["WeightPerturbation"]

#: closure(net) -> (loss, aux): the method's training loss computed through ``net`` (``MethodContext.update``'s).
Closure = Callable[[nn.Module], Tuple[torch.Tensor, Any]]


class WeightPerturbation:
    """AWP for one trainer: ``perturb(closure)`` then, after the training backward, ``restore()``.

    trainer: the :class:`~robustops.train.Trainer` (its model, local forward, autocast, scaler,
    distribution); gamma: the relative size of each layer's perturbation (>= 0; 0 runs the
    machinery with v = 0, and the trajectory is that of the plain method)."""

    def __init__(self, trainer, gamma: float):
        self.trainer = trainer
        self.gamma = float(gamma)
        model = trainer.model
        self.params: List[nn.Parameter] = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
        self._saved: Optional[List[torch.Tensor]] = None
        self._saved_buffers: Optional[List[torch.Tensor]] = None
        self.active = False

    def _buffers(self) -> List[torch.Tensor]:
        return [b for b in self.trainer.model.buffers() if b is not None]

    def perturb(self, closure: Closure) -> None:
        """Computes v from the gradient of closure's loss at the current weights and adds it to them."""
        if self.active:
            raise RuntimeError("WeightPerturbation.perturb called twice without restore()")
        tr = self.trainer
        params = self.params
        if not params:
            self.active = True
            return
        buffers = self._buffers()
        if self._saved is None or len(self._saved) != len(params):
            self._saved = [torch.empty_like(p) for p in params]  # empty_like keeps channels_last
        if self._saved_buffers is None or len(self._saved_buffers) != len(buffers) or any(
                a.shape != b.shape for a, b in zip(self._saved_buffers, buffers)):
            self._saved_buffers = [torch.empty_like(b) for b in buffers]
        with torch.no_grad():
            for s, b in zip(self._saved_buffers, buffers):
                s.copy_(b)
        with tr.autocast():
            loss, _ = closure(tr.local)
        grads = torch.autograd.grad(tr.scaler.scale(loss), params, allow_unused=True)
        with torch.no_grad():
            for s, b in zip(self._saved_buffers, buffers):  # undo the extra forward's running statistics
                b.copy_(s)
            grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
            if tr.ddp and tr.world > 1:
                # averaged in place: own copies, since autograd may hand back expanded (overlapping) views
                grads = [g.clone() for g in grads]
                sync_tensors_(grads, "mean")
            w_norms = torch._foreach_norm(params)
            g_norms = torch._foreach_norm(grads)
            torch._foreach_copy_(self._saved, params)
            self.active = True  # from here on, restore() puts the saved weights back
            # scale_l = gamma ||w_l|| / ||g_l|| (the 1e-20 keeps a zero gradient's v_l = 0 * finite = 0)
            scales = torch._foreach_div(torch._foreach_mul(w_norms, self.gamma), torch._foreach_add(g_norms, 1e-20))
            if tr.scaler.is_enabled():  # fp16: a layer whose scaled gradient overflowed is not perturbed
                scales = [torch.where(torch.isfinite(gn), sc, torch.zeros_like(sc)) for sc, gn in zip(scales, g_norms)]
                grads = [torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0) for g in grads]
            torch._foreach_add_(params, torch._foreach_mul(grads, [sc.to(g.dtype) for sc, g in zip(scales, grads)]))

    def restore(self) -> None:
        """Copies the weights saved by ``perturb`` back (exactly); the gradients stay."""
        if not self.active:
            return
        with torch.no_grad():
            if self.params:
                torch._foreach_copy_(self.params, self._saved)
        self.active = False
