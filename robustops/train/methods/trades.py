"""TRADES (Zhang et al. 2019): minimise CE(f(x), y) + beta * KL(f(x) || f(x')), where x' maximises
KL(f(x) || f(x')) over the threat model's ball. The inner maximisation runs on the shared
projected-gradient engine with the model in eval mode (as in the paper's code), from
x + 0.001 * N(0, I), with the KL summed over the batch as its objective.

Options (see ``FitConfig``): ``ema`` (weight averaging) and ``awp`` (adversarial weight perturbation,
Wu et al. 2020): the weights are perturbed to raise the TRADES loss itself, CE(f(x), y) + beta *
KL(f(x) || f(x')), at the x' found on the unperturbed weights (as the AWP authors do for TRADES), and
the training gradient of that loss is taken at the perturbed weights.

``cutmix`` (Rebuffi et al. 2021, :mod:`robustops.train.cutmix`): the batch is composed first; the inner
maximisation is TRADES' own (the KL to the clean prediction on the composed batch, no label; the official
code targets the mixed label instead) and the natural term is the mixed cross-entropy. ``robust_mixup``
(:mod:`robustops.train.robust_mixup`): the same on the batch of the more adverse interpolations.

OOD data (``ood_ratio`` > 0, :mod:`robustops.train.ood`, Lee et al. 2021): the inner maximisation covers
every row (label-free, as always); the natural term is the cross-entropy to the uniform label on the OOD
rows (``ctx.ood``); the loss is the in-distribution rows' mean plus ``ood_weight`` times the OOD rows' mean.

Per-sample weights (``sample_weights``, e.g. a coreset's): both terms become weighted means,
sum_i w_i (CE_i + beta KL_i) / sum_i w_i; without weights the loss is computed exactly as before."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ood as oat
from ..registry import Hyper, Method, register


def _kl_objective(logits, p_nat):
    return F.kl_div(F.log_softmax(logits.float(), dim=1), p_nat, reduction="sum")


@register
class Trades(Method):
    name = "trades"
    help = "TRADES: cross-entropy + beta * KL(clean prediction, adversarial prediction) (Zhang et al. 2019)"
    hyper = (Hyper("beta", 6.0, "TRADES beta", minimum=0.0),)
    options = ("awp", "ema", "cutmix", "robust_mixup")
    budget_schedules = True
    sample_weights = True
    ood_data = True

    @classmethod
    def label(cls, cfg) -> str:
        return f"TRADES (PGD-{cfg.steps})"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.engine = ctx.engine(self.cfg.norm, objective=_kl_objective)

    def adversarial(self, x, y, log: bool = True):
        """TRADES' inner maximisation from x (model in eval mode; left in eval mode); log=False: the
        budget of a selection pass (``ctx.budget``)."""
        c, ctx = self.cfg, self.ctx
        eps, alpha = ctx.budget(x, y, log=log)
        ctx.forward.eval()
        with torch.no_grad(), ctx.autocast():
            p_nat = F.softmax(ctx.forward(x).float(), dim=1)
        # The engine's "labels" are the clean prediction's probabilities: the KL's target.
        return self.engine.run(x, p_nat, eps, alpha, c.steps, start="normal", start_sigma=0.001,
                               seed=ctx.seed(), evaluate=False).x_adv

    def coreset_inputs(self, x, y):
        # a selection pass trains nothing: its budgets stay out of train_eps and the adaptive estimate
        return {"clean": x, "adv": self.adversarial(x, y, log=False), "beta": self.cfg.beta}

    def ood_step(self, x, y):
        """OAT with TRADES (:mod:`robustops.train.ood`): TRADES' attack on the whole batch, the OOD rows'
        natural term toward the uniform label, both terms weighted per row."""
        c, ctx = self.cfg, self.ctx
        ood, marked = ctx.ood, oat.marked_labels(y, ctx.ood)
        x_adv = self.adversarial(x, y)
        ctx.forward.train()

        def closure(net):
            logits, logits_adv = net(x, x_adv)
            kl = F.kl_div(F.log_softmax(logits_adv.float(), dim=1), F.softmax(logits.float(), dim=1),
                          reduction="none").sum(1)
            per_row = oat.marked_loss(logits, marked) + c.beta * kl
            return oat.batch_loss(per_row, ood, c.ood_weight, ctx.ood_count), logits

        loss, logits = ctx.update(closure)
        return oat.ood_stats(loss, logits, y, ood, ctx.ood_count)

    def step(self, x, y):
        c, ctx = self.cfg, self.ctx
        if ctx.ood is not None:
            return self.ood_step(x, y)
        if c.cutmix is not None:  # the composed batch and its mixed target (robustops.train.cutmix)
            x, y = ctx.cutmix(x, y)
        elif c.robust_mixup is not None:  # the more adverse interpolations (robustops.train.robust_mixup)
            x, y = ctx.robust_mixup(x, y)
        x_adv = self.adversarial(x, y)
        ctx.forward.train()

        def closure(net):
            logits, logits_adv = net(x, x_adv)
            kl = F.kl_div(F.log_softmax(logits_adv.float(), dim=1), F.softmax(logits.float(), dim=1),
                          reduction="batchmean" if ctx.weights is None else "none")
            if ctx.weights is not None:  # the weighted mean of the per-sample KL, like the cross-entropy's
                kl = (kl.sum(1) * ctx.weights).sum() / ctx.weights.sum()
            return ctx.cross_entropy(logits, y) + c.beta * kl, logits

        loss, logits = ctx.update(closure)
        return ctx.stats(loss, logits, y)
