"""CROWN-IBP certified training (Zhang et al. 2020, "Towards stable and efficient training of verifiably
robust neural networks", ICLR, section 3, eq. 9 and its schedule).

The loss of one minibatch at training progress p is

    L = kappa_t * CE(z(x), y) + (1 - kappa_t) * CE(-m_t, y),
    m_t = beta_t * m_CROWN-IBP(x, eps_t) + (1 - beta_t) * m_IBP(x, eps_t)

m_IBP, m_CROWN-IBP: the lower bounds of the margins z_y - z_j over the box at eps_t (0 at j = y; the
last Linear layer elided into the specification) by IBP (``robustops.bounds.margin_bounds``) and by
CROWN-IBP (``robustops.crown.margin_bounds(method="crown-ibp")``: IBP intermediate bounds, CROWN's
backward pass from the specification). -m_t are worst-case logits as in IBP training.

Schedule: eps_t and kappa_t as the ``ibp`` method's (robustops.train.methods.ibp: warm-up, then a ramp of
eps from 0 to eps_scale * eps and of kappa from 1 to kappa), and beta_t moving linearly (on the same ramp
curve u) from beta_start to beta_end: beta_t = beta_start + (beta_end - beta_start) * u. The paper's
MNIST / CIFAR setting is beta from 1 to 0 during the eps ramp (the defaults); beta_end = 1 keeps the
CROWN-IBP bound to the end (the paper's other setting).

Choices the paper leaves open, and what this implementation does:
- the CROWN-IBP pass is skipped when beta_t = 0 and both bound passes when eps_t = 0 or kappa_t = 1
  (the loss is the same);
- the bounds run in float32 without autocast (the backward relaxation divides by u - l, which half
  precision rounds badly), the clean forward under the run's autocast;
- the bounds are differentiated through the relaxations (the slopes depend on the IBP bounds, and the
  gradient flows through them, as in the paper's implementation); the adaptive lower slope (1 if u >= -l
  else 0) is piecewise constant and has no gradient;
- BatchNorm in training mode: both bounds take the clean batch's statistics (``bn="clean"``, the default;
  robustops.crown treats the layer as the affine map of those statistics, gradients flowing through
  them); ``bn="centre"`` is IBP-only and CROWN-IBP refuses it at the first bound pass; dropout must be
  inactive.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from ... import bounds, crown
from ..registry import Hyper, register
from .ibp import IBP, ramp_fraction

__all__ = ["CrownIBP", "BETA_HYPERS"]


#: beta's schedule (the paper's beta_start / beta_end), after the ibp method's hyperparameters.
BETA_HYPERS = (Hyper("beta_start", 1.0, "CROWN-IBP's weight of the CROWN-IBP margin bound at the start of the ramp",
                     minimum=0.0, maximum=1.0),
               Hyper("beta_end", 0.0, "CROWN-IBP's weight of the CROWN-IBP margin bound at the end of the ramp",
                     minimum=0.0, maximum=1.0))


@register
class CrownIBP(IBP):
    name = "crown_ibp"
    help = ("CROWN-IBP: kappa * CE(clean) + (1 - kappa) * CE(-(beta * CROWN-IBP margins + (1 - beta) * IBP "
            "margins)), eps and kappa ramped as ibp, beta from 1 to 0 (Zhang et al. 2020)")
    hyper = IBP.hyper + BETA_HYPERS

    @classmethod
    def label(cls, cfg) -> str:
        return f"CROWN-IBP (kappa={cfg.kappa:g}, beta {cfg.beta_start:g}->{cfg.beta_end:g})"

    def check_model(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """CROWN's layer tree (an unsupported layer or dropout in training mode refused with the layer's name:
        every step, it costs a walk over the modules), then IBP's check."""
        crown.layer_tree(self.ctx.forward)
        super().check_model(x, y)

    def beta(self, p: float) -> float:
        """beta_t at training progress p."""
        c = self.cfg
        u = ramp_fraction(p, c.warmup, c.ramp, c.eps_schedule)
        return c.beta_start + (c.beta_end - c.beta_start) * u

    def margins(self, x: torch.Tensor, y: torch.Tensor, eps_t: float, beta_t: float, k: int) -> torch.Tensor:
        """m_t = beta_t * m_CROWN-IBP + (1 - beta_t) * m_IBP, [B, K], in float32 without autocast."""
        c, net = self.cfg, self.ctx.forward
        with torch.autocast(x.device.type, enabled=False):
            xf = x.float()
            if beta_t <= 0:
                return bounds.margin_bounds(net, xf, y, eps_t, c.lo, c.hi, num_classes=k, bn=c.bn)
            m = crown.margin_bounds(net, xf, y, eps_t, c.lo, c.hi, method="crown-ibp", num_classes=k, bn=c.bn)
            if beta_t < 1:  # at beta 1 the IBP margins weigh nothing: not computed
                m = beta_t * m + (1.0 - beta_t) * bounds.margin_bounds(net, xf, y, eps_t, c.lo, c.hi,
                                                                       num_classes=k, bn=c.bn)
        return m

    def step(self, x, y):
        ctx = self.ctx
        self.check_model(x, y)
        p = ctx.progress
        eps_t, kappa_t = self.schedule(p)
        beta_t = self.beta(p)

        def closure(net):
            logits = net(x)
            ce = F.cross_entropy(logits.float(), y)
            if eps_t <= 0 or kappa_t >= 1:
                return ce, logits
            worst = -self.margins(x, y, eps_t, beta_t, logits.shape[1])
            return kappa_t * ce + (1.0 - kappa_t) * F.cross_entropy(worst, y), logits

        loss, logits = ctx.update(closure)
        return ctx.stats(loss, logits, y)

    def schedule_values(self, p: float) -> Tuple[float, float, float]:
        """(eps_t, kappa_t, beta_t) at training progress p."""
        return self.schedule(p) + (self.beta(p),)
