"""Relaxed LPIPS adversarial training (RLAT; Kireev, Andriushchenko & Flammarion, "On the effectiveness
of adversarial training against common corruptions", UAI 2022, arXiv 2103.02325, section 5).

LPIPS adversarial training would solve min_theta E max_{d(x, x + delta) <= eps} CE(f(x + delta), y) with
d the LPIPS distance (:mod:`robustops.train.perceptual`), which needs an expensive inner solver (Laidlaw
et al.'s PAT). RLAT relaxes it: the network whose features define the distance is the classifier being
trained ("self-bounded" LPIPS), and instead of one input perturbation whose feature changes are
bounded, every feature map gets its own additive perturbation, bounded layer by layer:

    f(x; delta) = ... g_2(g_1(clip(x + delta_0)) + delta_1) + delta_2 ...,    ||delta_l||_2 <= eps_l,

maximised by one normalised gradient step from zero (an FGSM-like step in each layer's L2 ball),

    delta_l = eps_l * grad_l / ||grad_l||_2,   grad_l = d CE(f(x; 0), y) / d delta_l   (per sample),

and the model takes its training step on CE(f(x; delta), y). The loss is the cross-entropy on the
perturbed forward alone (no clean term), as the paper's objective.

Choices the method section leaves open or that come from the authors' code (tml-epfl/adv-training-
corruptions, ``train.py --attack rlat``; the paper's own text on them could not be read here, so these
follow the code, the closest faithful reading available):

- the perturbed layers: the input (clipped to the box, before any normalisation) and the outputs of
  :func:`~robustops.train.perceptual.feature_modules` of the classifier: its stem convolution and stages
  for a ResNet (the code's default layers), every convolution otherwise (the digits' CNNs);
- the radii: the code's default policy ("scaling", "descending"): eps_l = eps * (d_l / d_0) / (l + 1),
  d_l the per-sample size of layer l's output, l = 0 the input, so that ``rlat_eps`` is the input's L2
  radius (the code's CIFAR-10 runs use 0.08, ImageNet-100 0.02);
- the step from zero on the model in its training mode (batch-norm statistics of the batch, as the
  code runs it), gradients to the perturbations only; ||grad_l|| floored at 1e-12 (the code adds 0);
- ``rlat_steps`` > 1 (not in the paper, which takes one step): projected normalised steps of size
  2.5 eps_l / steps in each layer's ball, Madry et al.'s step rule; with one step this is exactly the
  paper's (a step of 2.5 eps_l from zero projected to radius eps_l is the step of eps_l). Each step goes
  through ``ops.pgd_step_`` in L2 mode with no box.

``rlat_net`` (``--rlat-net FILE``): instead of the classifier's own features, the LPIPS distance of a
frozen network (a robustops model file, e.g. a natural ``robustops train`` run's checkpoint; no
pretrained AlexNet can be downloaded here) defines the ball. Its features are not the classifier's, so
the layer-wise relaxation does not apply; the ball is relaxed instead to its second-order (Gauss-Newton)
approximation at x, d(x, x + delta) ~= delta^T M delta with M = (1/2) Hessian of d at delta = 0 (d and
its gradient vanish there), plus ``rlat_ridge`` * ||delta||^2 so that directions the features do not see
stay bounded, and one first-order step solves max_{delta^T (M + r I) delta <= eps^2} grad^T delta:

    delta = eps * u / sqrt(grad^T u),   u = (M + r I)^{-1} grad   (``rlat_cg`` conjugate-gradient steps),

on the input (then clipped to the box). This is an extension of the paper for a fixed feature network,
not its method; with a linear feature network and enough CG steps it is the exact maximiser.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ... import ops
from ..perceptual import (PerceptualDistance, check_feature_file, feature_modules, load_feature_net,
                          perturb_outputs)
from ..registry import Hyper, Method, register

__all__ = ["RLAT", "layer_radii", "relaxed_perturbations", "linearised_lpips_step"]

#: the floor of a gradient's norm (a zero gradient gives a zero step)
TINY = 1e-12


def layer_radii(eps: float, sizes: List[int]) -> List[float]:
    """eps_l = eps * (sizes[l] / sizes[0]) / (l + 1): the per-layer L2 radii of the authors' default
    policy; sizes[0] is the input's per-sample size."""
    return [eps * (d / sizes[0]) / (i + 1) for i, d in enumerate(sizes)]


def relaxed_perturbations(forward: nn.Module, modules, x, y, eps: float, steps: int, lo: float, hi: float,
                          loss_fn=None, autocast=None) -> List[torch.Tensor]:
    """The relaxed attack: [delta_0 (input), delta_1, ...] (detached), each in its layer's L2 ball
    (radii :func:`layer_radii`), from ``steps`` normalised gradient steps from zero of loss_fn (default
    mean cross-entropy) on forward(clip(x + delta_0)) with delta_l added to the output of modules[l-1]."""
    loss_fn = F.cross_entropy if loss_fn is None else loss_fn
    autocast = autocast or contextlib.nullcontext
    deltas: List[Optional[torch.Tensor]] = [torch.zeros_like(x)] + [None] * len(modules)
    radii: List[float] = []
    for _ in range(steps):
        leaves = [None] * len(deltas)

        def add(i, o, leaves=leaves):
            d = deltas[i + 1]
            leaves[i + 1] = (torch.zeros_like(o) if d is None else d).requires_grad_(True)
            return o + leaves[i + 1]

        leaves[0] = deltas[0].requires_grad_(True)
        with perturb_outputs(modules, add), autocast():
            loss = loss_fn(forward((x + leaves[0]).clamp(lo, hi)), y)
        grads = torch.autograd.grad(loss, leaves)
        if not radii:
            radii = layer_radii(eps, [g[0].numel() for g in grads])
        deltas = [leaf.detach() for leaf in leaves]
        for d, g, r in zip(deltas, grads, radii):  # in each layer's ball: a 2.5 r / steps step, projected
            ops.pgd_step_(d, torch.zeros_like(d), g.float().to(d.dtype), r, 2.5 * r / steps, "l2",
                          float("-inf"), float("inf"))
    return deltas


def linearised_lpips_step(metric: PerceptualDistance, x: torch.Tensor, grad: torch.Tensor, eps: float,
                          ridge: float, cg_steps: int) -> torch.Tensor:
    """delta = eps * u / sqrt(grad^T u), u = (M + ridge I)^{-1} grad per sample (M: half the Hessian of
    metric(x, x + delta) at delta = 0, applied by double back-propagation; ``cg_steps`` batched
    conjugate-gradient iterations from u = 0). Returns delta (detached), shaped like x."""
    probe = torch.zeros_like(x, requires_grad=True)
    first = torch.autograd.grad(metric(x, x + probe).sum(), probe, create_graph=True)[0]

    def apply(v):  # (M + ridge I) v, per sample
        hv = torch.autograd.grad(first, probe, grad_outputs=v, retain_graph=True)[0]
        return 0.5 * hv.detach() + ridge * v

    def dot(a, b):
        return (a * b).flatten(1).sum(1).view(-1, *([1] * (x.dim() - 1)))

    g = grad.detach().float()
    u, r = torch.zeros_like(g), g.clone()
    p, rr = r.clone(), dot(r, r)
    for _ in range(cg_steps):
        mp = apply(p)
        a = rr / dot(p, mp).clamp_min(TINY)
        u, r = u + a * p, r - a * mp
        rr_new = dot(r, r)
        p, rr = r + (rr_new / rr.clamp_min(TINY)) * p, rr_new
    return (eps * u / dot(g, u).clamp_min(TINY).sqrt()).detach()


@register
class RLAT(Method):
    name = "rlat"
    help = "relaxed LPIPS adversarial training: one normalised step on every layer's features (Kireev et al. 2022)"
    hyper = (Hyper("rlat_eps", 0.08, "RLAT radius: the input's L2 radius, eps_l = eps d_l / d_0 / (l + 1) per layer; "
                   "with --rlat-net a sqrt-LPIPS radius (the linearised ball d(x, x + delta) <= eps^2)",
                   minimum=0.0, strict=True),
             Hyper("rlat_steps", 1, "RLAT normalised ascent steps (the paper: 1)", kind="int", minimum=1),
             Hyper("rlat_net", None, "frozen feature network file for RLAT's LPIPS ball (default: the classifier's "
                   "own features, the paper)", kind="path"),
             Hyper("rlat_ridge", 1e-3, "RLAT with --rlat-net: the L2 term r of the linearised ball", minimum=0.0,
                   strict=True),
             Hyper("rlat_cg", 8, "RLAT with --rlat-net: conjugate-gradient steps", kind="int", minimum=1))
    select = "clean_acc"
    adversarial = False
    sample_weights = True

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.rlat_net is not None:
            check_feature_file(cfg.rlat_net)

    @classmethod
    def label(cls, cfg) -> str:
        return f"RLAT (eps={cfg.rlat_eps:g}{', external features' if cfg.rlat_net else ''})"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.metric = None
        if self.cfg.rlat_net is not None:  # loaded once, frozen, in eval mode
            self.metric = PerceptualDistance(load_feature_net(self.cfg.rlat_net, ctx.device))
        self.modules = feature_modules(ctx.forward)

    def step(self, x, y):
        c, ctx = self.cfg, self.ctx
        if self.metric is not None:
            return ctx.natural_step(ctx.fmt(self.external_adversary(x, y)), y)
        deltas = relaxed_perturbations(ctx.forward, self.modules, x, y, c.rlat_eps, c.rlat_steps, c.lo, c.hi,
                                       loss_fn=ctx.cross_entropy, autocast=ctx.autocast)
        x_adv = ctx.fmt((x + deltas[0]).clamp(c.lo, c.hi))

        def closure(net):
            with perturb_outputs(self.modules, lambda i, o: o + deltas[i + 1].to(o.dtype)):
                logits = net(x_adv)
            return ctx.cross_entropy(logits, y), logits

        loss, logits = ctx.update(closure)
        return ctx.stats(loss, logits, y)

    def external_adversary(self, x, y):
        """clip(x + delta) with delta the linearised-LPIPS step of the frozen network's ball."""
        c, ctx = self.cfg, self.ctx
        xg = x.detach().clone().requires_grad_(True)
        with ctx.autocast():
            loss = ctx.cross_entropy(ctx.forward(xg), y)
        grad = torch.autograd.grad(loss, xg)[0]
        delta = linearised_lpips_step(self.metric, x, grad, c.rlat_eps, c.rlat_ridge, c.rlat_cg)
        return (x + delta.to(x.dtype)).clamp(c.lo, c.hi)
