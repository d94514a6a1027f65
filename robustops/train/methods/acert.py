"""Adaptive certified training, ACERT (Nurlanov, Schmidt and Bernard, "Adaptive Certified Training:
Towards Better Accuracy-Robustness Tradeoffs", arXiv 2307.13078, ECML PKDD 2024).

Instead of one eps for every sample, each training sample is certified at its own radius: first the
largest radius at which interval bound propagation (IBP) proves the sample's label is found, then the
IBP loss is taken at that radius. Per minibatch, at training progress p (optimizer steps done / all):

    eps_max(p) = eps_scale * eps * u(p)                                    (the ramped cap)
    eps_i      = max { e in [0, eps_max(p)] : min_{j != y_i} m_j(x_i, y_i, e) > 0 },
                 eps_i = 0 when x_i is misclassified                       (adaptive radius)
    L          = kappa * CE(z(x), y) + (1 - kappa) * (1/B) sum_i CE(z_hat(x_i, eps_i), y_i)

m_j(x, y, e): the IBP lower bound of z_y - z_j over {x' : |x' - x|_inf <= e} intersected with [lo, hi],
with the last linear layer elided (Gowal et al. 2018), ``robustops.bounds.margin_bounds``;
z_hat = -m, the worst-case logits (``bounds.worst_case_logits``), so CE(z_hat(x_i, eps_i), y_i) is the
certified (upper-bound) cross-entropy at the sample's own radius; z(x): the clean logits through
``ctx.update``'s net. A sample certified at eps_max(p) is trained at eps_max(p); a misclassified one at
radius 0, where CE(z_hat(x, 0), y) = CE(z(x), y): it gets the clean loss. The radii are constants in
the loss (computed without gradient); the gradient of the robust term at eps_i pushes the margins at
the sample's current radius up, which is what enlarges the radius. The ramp u(p) is
:func:`~robustops.train.methods.ibp.ramp_fraction` (as ``ibp``'s), by default the smooth one of Shi et
al. 2021 that the authors' training setup uses; kappa is constant (the paper's knob for the
accuracy-robustness tradeoff; the authors report kappa = 0 on MNIST and sweep it on CIFAR-10).

How the radii are computed: ``robustops.bounds.certified_radius(ctx.forward, x, y, eps_max=eps_max(p),
tol=radius_tol * eps_max(p), mode=radius_mode, bn=bn)``: a bisection of all samples at once on a grid of
spacing h = 2^floor(log2(tol)) <= tol whose last point is eps_max(p) itself, about log2(1 / radius_tol) + 1
bound passes (8 at the default 0.01), without gradient or autocast. It returns the
largest grid radius at which IBP proves the label (exactly eps_max(p) where it proves it there),
i.e. at most h below the exact IBP radius (the root of min_j m_j(x, y, e) = 0) or eps_max(p), and
never above it: the robust loss is taken at a radius that is still proven.

Choices the paper (and its code) leave open, and what this implementation does:
- root finding: batched grid bisection to a tolerance relative to eps_max(p) (the authors run
  Brent's method per batch with about 10 iterations); the radius is the proven side of the root, so at
  eps_i the worst margin is >= 0 rather than exactly 0;
- the network of the radius search (hyperparameter ``radius_mode``): "train" (default, the authors'
  choice) the training-mode network, the same bounds as the loss: BatchNorm with the batch statistics
  of the rule ``bn`` (default "clean": the clean batch's, as Shi et al. 2021, the authors' code and
  auto_LiRPA; "centre": the box centres'), every bound pass over the whole minibatch so that the
  statistics are the loss's, and no running-statistics update; "eval": the model in eval mode (running
  statistics), the network ``certify`` and validation's ``cert_acc`` certify. For networks without
  BatchNorm and dropout (SmallCNN, the IBP CNNs) all coincide;
- "misclassified" is the prediction of the search's network (the label is not the strict argmax of its
  clean logits);
- eps_max(p) = 0 (warm-up) skips the radius search and the bound pass: every radius is 0 and the loss is
  the clean cross-entropy, the same value;
- the IBP-friendly initialisation and the warm-up regularisers of Shi et al. 2021 that the authors'
  code adds are a different paper's and are not part of this method;
- progress, AMP, channels_last, BatchNorm in the loss, DDP and resume as in ``ibp`` (see its module
  docstring): the schedule follows from the optimizer-step counter, so there is no state of its own.

IBP certifies L-inf boxes only: ``norm`` must be "linf".
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import bounds
from ..registry import Hyper, register
from .ibp import CertifiedMethod, bn_hyper, kappa_hyper, ramp_fraction, schedule_hypers

__all__ = ["ACERT"]


@register
class ACERT(CertifiedMethod):
    name = "acert"
    help = ("adaptive certified training: kappa * CE(clean) + (1 - kappa) * IBP loss at each sample's own "
            "certified radius (Nurlanov et al. 2023)")
    hyper = (kappa_hyper(0.0),) + schedule_hypers(0.05, 0.4, "smooth") + (
        Hyper("radius_tol", 0.01, "tolerance of ACERT's per-sample radius search, as a fraction of the current "
                                  "eps cap", minimum=0.0, strict=True, maximum=1.0),
        bn_hyper(),
        Hyper("radius_mode", "train", "network of ACERT's radius search: train (the training-mode network of the "
                                      "loss, the authors' choice) or eval (running statistics, as certify)",
              kind="choice", choices=bounds.RADIUS_MODES))

    @classmethod
    def label(cls, cfg) -> str:
        return f"ACERT (kappa={cfg.kappa:g})"

    def eps_max(self, p: float) -> float:
        """The cap of the radii at training progress p."""
        c = self.cfg
        return c.eps_scale * c.eps * ramp_fraction(p, c.warmup, c.ramp, c.eps_schedule)

    def radii(self, x: torch.Tensor, y: torch.Tensor, eps_max: float) -> torch.Tensor:
        """eps_i: Tensor[B] (float32, no gradient), the largest proven grid radius <= eps_max, 0 where
        the label is not predicted."""
        if eps_max <= 0:
            return torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
        c = self.cfg
        res = bounds.certified_radius(self.ctx.forward, x, y, eps_max=eps_max, tol=c.radius_tol * eps_max,
                                      lo=c.lo, hi=c.hi, mode=c.radius_mode, bn=c.bn)
        return res.radius.float()

    def loss(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
        """The ACERT loss given the clean logits and the radii (call it under the run's autocast)."""
        ce = F.cross_entropy(logits.float(), y)
        if self.cfg.kappa >= 1 or not bool((radii > 0).any()):
            return ce  # kappa 1; or every radius 0, where CE(z_hat(x_i, 0), y_i) is the clean cross-entropy
        c = self.cfg
        worst = bounds.worst_case_logits(self.ctx.forward, x, y, radii.to(x.dtype), c.lo, c.hi,
                                         num_classes=logits.shape[1], bn=c.bn)
        return c.kappa * ce + (1.0 - c.kappa) * F.cross_entropy(worst.float(), y)

    def step(self, x, y):
        ctx = self.ctx
        self.check_model(x, y)
        radii = self.radii(x, y, self.eps_max(ctx.progress) if self.cfg.kappa < 1 else 0.0)

        def closure(net):
            logits = net(x)
            return self.loss(logits, x, y, radii), logits

        loss, logits = ctx.update(closure)
        return ctx.stats(loss, logits, y)
