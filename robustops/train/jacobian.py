"""The Frobenius norm of a network's input-output Jacobian by random projections (Hoffman, Roberts & Yaida
2019, "Robust learning with Jacobian regularization", arXiv 1908.02729, sec. 2.2 / algorithm 1).

For outputs z = f(x) in R^C of an input x in R^D with Jacobian J = dz/dx (C x D),

    ||J||_F^2 = C * E_v [ ||v^T J||_2^2 ],   v uniform on the unit sphere S^{C-1},

since E[v v^T] = I / C. Each draw v^T J is one vector-Jacobian product: a backward pass through the
network's graph with v as the output gradient, so ``projections`` draws cost one forward and
``projections`` backward passes (the exact norm needs C backward passes, one per output). With
``create_graph=True`` the estimate is differentiable in the weights (double back-propagation: the training
step then costs about two more backward passes per draw). The Monte-Carlo standard error is the sample
standard deviation of the per-draw values C ||v_k^T J||^2 over sqrt(projections) (undefined for one draw).

The draws come from a caller's ``torch.Generator`` on the CPU (moved to x's device), so CPU and CUDA runs
use the same directions. Per-sample Jacobians assume the rows of f(x) depend on their own input only (eval
mode; with batch normalisation in train mode the vector-Jacobian product includes the cross-sample terms
through the batch statistics, as in Hoffman et al.'s training loop).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch

from .. import _checks

__all__ = ["JacobianNorm", "jacobian_frobenius", "unit_sphere", "input_saliency"]


class JacobianNorm(NamedTuple):
    """The estimate of ||J(x_b)||_F^2 per sample [B], its Monte-Carlo standard error [B] (NaN for one draw)
    and the draws C ||v_k^T J(x_b)||^2 [projections, B]."""
    sq_norm: torch.Tensor
    stderr: torch.Tensor
    draws: torch.Tensor


def unit_sphere(shape, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """Vectors uniform on the unit sphere along the last dimension of shape (normalised Gaussians,
    drawn on the CPU from generator, then moved to device)."""
    v = torch.randn(shape, generator=generator, dtype=torch.float32)
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return v if device is None else v.to(device)


def jacobian_frobenius(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, projections: int = 1, *,
                       generator: Optional[torch.Generator] = None, create_graph: bool = False,
                       outputs: Optional[torch.Tensor] = None) -> JacobianNorm:
    """The random-projection estimate of ||df(x_b)/dx_b||_F^2 for each sample of x [B, ...] (see the module
    docstring): fn maps x to outputs [B, C] (e.g. logits); projections >= 1 draws of v per sample.
    create_graph: keep the graph so that the estimate can be back-propagated (training). outputs: fn(x)
    already computed from x (x must then require gradients), to share the forward with a loss."""
    projections = _checks.check_int(projections, "projections", 1)
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise TypeError(f"x must be a Tensor [B, ...], got {type(x).__name__}")
    if outputs is None:
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        outputs = fn(x)
    elif not x.requires_grad:
        raise ValueError("outputs given: x must be the tensor (requiring gradients) they were computed from")
    z = outputs.flatten(1).float()
    if z.shape[0] != x.shape[0]:
        raise ValueError(f"fn(x) must have x's batch size {x.shape[0]} first, got shape {list(outputs.shape)}")
    C = z.shape[1]
    draws = []
    for k in range(projections):
        v = unit_sphere(z.shape, generator, z.device)
        (g,) = torch.autograd.grad(z, x, grad_outputs=v, retain_graph=create_graph or k < projections - 1,
                                   create_graph=create_graph)
        draws.append(C * g.float().flatten(1).pow(2).sum(1))
    d = torch.stack(draws)
    if projections > 1:
        se = d.detach().std(dim=0, unbiased=True) / math.sqrt(projections)
    else:
        se = torch.full_like(d[0].detach(), float("nan"))
    return JacobianNorm(d.mean(0), se, d)


def input_saliency(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The input-gradient saliency map |grad_x CE(model(x_b), y_b)| of each sample, summed over the channels
    and scaled to a maximum of 1 per sample: [B, H, W] for images [B, C, H, W] (model in its current mode)."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = torch.nn.functional.cross_entropy(model(x).float(), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, x)
    s = g.abs().sum(1) if g.dim() == 4 else g.abs()
    return s / s.flatten(1).amax(1).clamp_min(1e-12).view(-1, *([1] * (s.dim() - 1)))
