"""FastIBP: IBP training with short warm-up (Shi, Wang, Zhang, Yi and Hsieh, "Fast certified robust
training with short warmup", NeurIPS 2021), the baseline of the ACERT paper.

Three changes to interval bound propagation training (``ibp``, Gowal et al. 2018):

1. IBP initialisation (the paper's section 3.2): the interval radius Delta_i of layer i grows by
   E[Delta_i / Delta_{i-1}] = n_i sigma_i / sqrt(2 pi) at initialisation (half of the ReLUs active,
   E|w| = sigma sqrt(2 / pi)), so every weight matrix except the last layer's is drawn
   w ~ N(0, sigma_i^2) with sigma_i = sqrt(2 pi) / n_i, n_i its fan-in (in_features; for a convolution
   in_channels / groups * k_h * k_w): the radii keep their size through the layers.
   :func:`ibp_init`.
2. BatchNorm after every layer, normalising with the clean batch's statistics (auto_LiRPA's training
   mode): an architecture (``CNN7`` has it) and the BatchNorm rule of ``robustops.bounds``, which the
   bound pass here goes through (``bounds.propagate``): ``bn`` (``--bn``), "clean" by default as in the
   paper, "centre" for the interval centres' statistics, as for ``ibp``.
3. Warm-up regularisers on the pre-activation intervals [l_i, u_i] (centre c_i, radius r_i) of the m
   ReLU layers (the paper's section 3.4), with tau = ``reg_tol``:

       L_tightness = (1/m) sum_i ReLU(tau - mean(Delta_0) / mean(r_i)) / tau
       L_relu      = (1/m) sum_i [ReLU(tau - min(rho_i, 1/rho_i)) + ReLU(tau - min(nu_i, 1/nu_i))] / tau
       rho_i = mean(c_i [l_i > 0]) / -mean(c_i [u_i < 0])               (active vs inactive centres)
       nu_i  = sum((c_i - mean c_i)^2 [l_i > 0]) / sum((c_i - mean c_i)^2 [u_i < 0])   (their spread)

   Delta_0: the radius of the input box (after the model's input normalisation, if any); means over
   the batch and every unit of the layer. :func:`tightness_loss`, :func:`relu_balance_loss`.

The loss at training progress p (optimizer steps done / all):

    eps_t    = eps_scale * eps * u(p)         (u: ``ibp.ramp_fraction``, by default the smooth ramp)
    lambda_t = reg_lambda * (1 - u(p))       (the paper's lambda_0 (1 - eps_t / eps_target): 0 after the ramp)
    L = kappa * CE(z(x), y) + (1 - kappa) * CE(z_hat(x, eps_t), y) + lambda_t (L_tightness + L_relu)

z_hat: the worst-case logits with the last layer elided (``bounds.worst_case_logits``), computed in the
same pass that records the pre-activation intervals (:func:`bound_pass`).

Settings (the paper's CIFAR-10 runs and the authors' code): lambda_0 = 0.5, tau = 0.5, eps held at 0
for the first epoch then the smooth ramp over 80 of 160 epochs (warmup ~0.006, ramp 0.5), training
eps = the test eps (eps_scale 1), Adam lr 5e-4, gradient norm clipped at 10, lr x0.2 at epochs 120 and
140. Here the defaults are warmup 0.05 (one epoch in 20), ramp 0.5, eps_scale 1, smooth; the optimiser
settings are FitConfig's (``optimizer="adam"``, ``grad_clip=10``, ...), available to every method.

kappa: Shi et al. train on the IBP loss alone (kappa = 0, the clean loss only during the eps-0
warm-up, where CE(z_hat(x, 0), y) = CE(z(x), y)); unlike ``ibp`` (Gowal et al.'s kappa ramp from 1)
kappa is constant here, default 0, the issue's "constant kappa" knob for the accuracy trade-off.

Choices the paper leaves open, and what this implementation does:
- biases are left as the default initialisation drew them, and the last layer (the classifier) keeps
  its default initialisation (the authors' code does both); BatchNorm parameters are untouched; the
  paper's halving of weights after residual additions is not done (SmallCNN / CNN-7 have none);
- ``weight_init="default"`` skips the initialisation (fine-tuning a trained model);
- the pre-activation intervals: the model is walked layer by layer (the children of nn.Sequential,
  SmallCNN's features and classifier, CNN-7's net: :func:`layers`); a ReLU inside another module
  (a residual block) is not seen by the regularisers;
- min(r, 1/r) is computed as min(a, b) / max(a, b) (the same value; 0 where one side is 0); a layer
  where either ratio of L_relu is 0 / 0 contributes 0 to the sum but still counts in m (the authors'
  code drops its NaN term), without sending a NaN gradient back; the tightness ratio divides by
  max(mean r_i, 1e-12);
- at eps_t = 0 (the warm-up) the bound pass and the regularisers are skipped: there are no intervals
  (the tightness ratio is 0 / 0) and the loss is the clean cross-entropy;
- the model is in training mode for the bounds (BatchNorm: ``robustops.bounds``' training-mode rule);
  progress, AMP, DDP and resume as in ``ibp`` (the schedule follows from the optimizer-step counter).

IBP certifies L-inf boxes only: ``norm`` must be "linf".
"""
from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ... import bounds
from ...models import CNN7, Normalize, SmallCNN
from ..registry import Hyper, register
from .ibp import IBP, bn_hyper, kappa_hyper, ramp_fraction, schedule_hypers

__all__ = ["FastIBP", "ibp_init", "ibp_init_std", "layers", "bound_pass", "tightness_loss", "relu_balance_loss",
           "reg_weight"]

# The sequential parts of robustops' networks, in forward order (their forward is the composition).
_CONTAINERS = {SmallCNN: ("features", "classifier"), CNN7: ("net",)}

# The authors' floor of a ratio's denominator.
_TINY = 1e-12


def ibp_init_std(weight: torch.Tensor) -> float:
    """sqrt(2 pi) / fan_in of a Linear ([out, in]) or Conv ([out, in / groups, *kernel]) weight."""
    fan_in = math.prod(weight.shape[1:])
    return math.sqrt(2.0 * math.pi) / fan_in


def ibp_init(model: nn.Module, generator: Optional[torch.Generator] = None) -> int:
    """Shi et al.'s IBP initialisation in place: every Linear / Conv weight but the last one's drawn from
    N(0, ibp_init_std(w)^2) (from ``generator``, a CPU generator, or the global RNG). Returns how many
    weights were re-drawn."""
    mods = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    with torch.no_grad():
        for m in mods[:-1]:
            w = m.weight
            draw = torch.randn(w.shape, generator=generator, dtype=torch.float32)
            w.copy_(draw * ibp_init_std(w))
    return max(0, len(mods) - 1)


def layers(module: nn.Module) -> List[nn.Module]:
    """module as the flat list of the layers its forward composes: nn.Sequential's children and the
    sequential parts of SmallCNN / CNN7 expanded recursively; any other module is one layer."""
    if type(module) is nn.Sequential:
        return [m for child in module.children() for m in layers(child)]
    parts = _CONTAINERS.get(type(module))
    if parts is not None:
        return [m for name in parts for m in layers(getattr(module, name))]
    return [module]


def bound_pass(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps, lo: float, hi: float,
               num_classes: int, bn: str = "clean") -> Tuple[torch.Tensor, bounds.Interval, List[bounds.Interval]]:
    """One interval pass through :func:`layers` (model) with the BatchNorm rule bn (robustops.bounds; the
    clean input is carried only where a BatchNorm uses batch statistics): (worst-case logits [B, K], equal
    to ``bounds.worst_case_logits``; the input box after any leading input normalisation (Delta_0); the
    interval entering each nn.ReLU, in order)."""
    seq = layers(model)
    iv = bounds.with_bn_rule(model, bounds.input_box(x, eps, lo, hi), bn)
    i = 0
    while i < len(seq) - 1 and isinstance(seq[i], Normalize):
        iv = bounds.propagate(seq[i], iv, None, f"layer {i}")
        i += 1
    first, pre = iv, []
    spec = bounds.margin_spec(y, num_classes, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    for j in range(i, len(seq)):
        if isinstance(seq[j], nn.ReLU):
            pre.append(iv)
        iv = bounds.propagate(seq[j], iv, spec if j == len(seq) - 1 else None, f"layer {j}")
    return -iv.lower, first, pre


def tightness_loss(first: bounds.Interval, pre: Sequence[bounds.Interval], tau: float) -> torch.Tensor:
    """L_tightness = (1/m) sum_i ReLU(tau - mean(Delta_0) / mean(r_i)) / tau (0 without ReLU layers)."""
    d0 = first.r.float().mean()
    terms = [F.relu(tau - d0 / iv.r.float().mean().clamp(min=_TINY)) / tau for iv in pre]
    return torch.stack(terms).mean() if terms else d0.new_zeros(())


def _balance(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(min(a/b, b/a), whether it is defined) for a, b >= 0: min(a, b) / max(a, b), 0 where one is 0 (the
    authors' min(r, 1 / max(r, 1e-12)) there), undefined where both are (0 / 0). The division is guarded
    so that an undefined ratio, which the loss drops, sends no NaN gradient back."""
    hi = torch.maximum(a, b)
    ok = hi > 0
    return torch.minimum(a, b) / torch.where(ok, hi, torch.ones_like(hi)), ok


def relu_balance_loss(pre: Sequence[bounds.Interval], tau: float) -> torch.Tensor:
    """L_relu: (1/m) sum_i [ReLU(tau - min(rho, 1/rho)) + ReLU(tau - min(nu, 1/nu))] / tau over the ReLU
    inputs (rho: mean active centre over minus mean inactive centre; nu: their squared deviations from
    the layer's mean centre, summed); a layer where a ratio is 0 / 0 (no stable unit) adds 0."""
    total, m = None, 0
    for iv in pre:
        c, lower, upper = iv.c.float(), iv.lower.float(), iv.upper.float()
        act, inact = (lower > 0).float(), (upper < 0).float()
        dev = (c - c.mean()) ** 2
        rho, ok_rho = _balance((c * act).mean(), -(c * inact).mean())
        nu, ok_nu = _balance((dev * act).sum(), (dev * inact).sum())
        term = (F.relu(tau - rho) + F.relu(tau - nu)) / tau
        term = term * (ok_rho & ok_nu).float()
        total = term if total is None else total + term
        m += 1
    return total / m if m else torch.zeros(())


def reg_weight(u: float, reg_lambda: float) -> float:
    """lambda_t = reg_lambda * (1 - u) at ramp fraction u (= eps_t / eps_target): 0 once the ramp ends."""
    return reg_lambda * max(0.0, 1.0 - u)


def _hypers() -> Tuple[Hyper, ...]:
    sched = tuple(dataclasses.replace(h, default=1.0) if h.name == "eps_scale" else h
                  for h in schedule_hypers(0.05, 0.5, "smooth"))
    return (kappa_hyper(0.0),) + sched + (
        Hyper("reg_lambda", 0.5, "FastIBP: weight lambda_0 of the warm-up regularisers (decays to 0 over the ramp)",
              minimum=0.0),
        Hyper("reg_tol", 0.5, "FastIBP: tau of the warm-up regularisers (bound tightness, ReLU balance)",
              minimum=0.0, strict=True, maximum=1.0),
        Hyper("weight_init", "ibp", "FastIBP: ibp (Shi et al.'s initialisation at the start) or default "
                                    "(keep the model's weights)", kind="choice", choices=("ibp", "default")),
        bn_hyper())


@register
class FastIBP(IBP):
    """``ibp``'s step (the clean forward through ``ctx.update``, then :meth:`loss`) with this schedule
    (eps_t, lambda_t) and loss."""

    name = "fastibp"
    help = ("IBP with short warm-up (Shi et al. 2021): IBP initialisation, bound-tightness and ReLU-balance "
            "regularisers during the eps ramp, constant kappa")
    hyper = _hypers()

    @classmethod
    def label(cls, cfg) -> str:
        return f"FastIBP (kappa={cfg.kappa:g})"

    @classmethod
    def init_model(cls, model, cfg, generator) -> None:
        if cfg.weight_init == "ibp":
            ibp_init(model, generator)

    def schedule(self, p: float) -> Tuple[float, float]:
        """(eps_t, lambda_t) at training progress p."""
        c = self.cfg
        u = ramp_fraction(p, c.warmup, c.ramp, c.eps_schedule)
        return c.eps_scale * c.eps * u, reg_weight(u, c.reg_lambda)

    def loss(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor, eps_t: float,
             lam: float) -> torch.Tensor:
        """The FastIBP loss given the clean logits (call it under the run's autocast)."""
        c = self.cfg
        ce = F.cross_entropy(logits.float(), y)
        if eps_t <= 0 or (c.kappa >= 1 and lam <= 0):
            return ce
        worst, first, pre = bound_pass(self.ctx.forward, x, y, eps_t, c.lo, c.hi, logits.shape[1], c.bn)
        out = c.kappa * ce + (1.0 - c.kappa) * F.cross_entropy(worst.float(), y) if c.kappa < 1 else ce
        if lam > 0:
            out = out + lam * (tightness_loss(first, pre, c.reg_tol) + relu_balance_loss(pre, c.reg_tol))
        return out
