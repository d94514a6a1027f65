"""PGD adversarial training (Madry et al. 2018): the model is trained on the output of a PGD-k attack
(eps, alpha, steps, norm, random_start of the threat model) run with the model in train mode on the
shared projected-gradient engine.

Options (see ``FitConfig``): ``awp`` (adversarial weight perturbation on CE(f(x_adv), y), Wu et al.
2020), ``ema`` (weight averaging) and ``mixup``, which makes it interpolated adversarial training
(IAT, Lamb et al. 2019): the attack runs on the unmixed batch, then the clean batch and the adversarial
batch are each mixed (lam_c, pi_c and lam_a, pi_a drawn independently, ``MethodContext.mixup``) and the loss
is the mean of the two mixup losses,

    L = 1/2 [ lam_c CE(f(x_c), y) + (1 - lam_c) CE(f(x_c), y[pi_c])
            + lam_a CE(f(x_a), y) + (1 - lam_a) CE(f(x_a), y[pi_a]) ],
    x_c = lam_c x + (1 - lam_c) x[pi_c],   x_a = lam_a x_adv + (1 - lam_a) x_adv[pi_a].

The training loss and accuracy it reports are those of L and of the mixed adversarial batch against
its dominant labels y. As alpha -> 0 (lam = 1) it is the 50 % clean / 50 % adversarial loss
(CE(f(x), y) + CE(f(x_adv), y)) / 2, not plain PGD-AT.

OOD data (``ood_ratio`` > 0, :mod:`robustops.train.ood`, Lee et al. 2021): the OOD rows of the batch
(``ctx.ood``) are attacked to raise, and trained to lower, their cross-entropy to the uniform label,
their mean weighted by ``ood_weight`` and added to the in-distribution rows' mean cross-entropy.

``cutmix`` (Rebuffi et al. 2021, :mod:`robustops.train.cutmix`): the batch is composed first and PGD
maximises, and training minimises, the mixed cross-entropy lam CE(f(x'), y) + (1 - lam) CE(f(x'), y[pi])
of the composed batch's adversarial example x'. ``robust_mixup`` (Lau et al. 2023,
:mod:`robustops.train.robust_mixup`): the same on the batch of the more adverse interpolations.
"""
from __future__ import annotations

from .. import ood as oat
from ..registry import Method, register


@register
class PGDTraining(Method):
    name = "pgd"
    help = "PGD-k adversarial training (Madry et al. 2018)"
    options = ("awp", "ema", "mixup", "cutmix", "robust_mixup")
    sample_weights = True
    budget_schedules = True
    ood_data = True

    @classmethod
    def label(cls, cfg) -> str:
        return f"PGD-{cfg.steps} AT"

    def __init__(self, ctx):
        super().__init__(ctx)
        self._ood_engine = None

    def ood_engine(self):
        """The engine of OAT's attack (objective :func:`~robustops.train.ood.marked_loss`), built on first use."""
        if self._ood_engine is None:
            self._ood_engine = self.ctx.engine(self.cfg.norm, objective=oat.marked_loss)
        return self._ood_engine

    def ood_step(self, x, y):
        """OAT's step (:mod:`robustops.train.ood`): PGD on the per-row loss with the OOD rows' uniform label,
        then the weighted batch loss."""
        c, ctx = self.cfg, self.ctx
        ood, marked = ctx.ood, oat.marked_labels(y, ctx.ood)
        x_adv = self.adversarial(x, y, engine=self.ood_engine(), attack_labels=marked)

        def closure(net):
            logits = net(x_adv)
            return oat.batch_loss(oat.marked_loss(logits, marked), ood, c.ood_weight, ctx.ood_count), logits

        loss, logits = ctx.update(closure)
        return oat.ood_stats(loss, logits, y, ood, ctx.ood_count)

    def adversarial(self, x, y, log: bool = True, engine=None, attack_labels=None):
        """PGD-k from x at this minibatch's budget (``ctx.budget`` of y; log=False: a selection pass's) on
        ``engine`` (default: the run's cross-entropy engine), ascending its objective at attack_labels
        (default y)."""
        c, ctx = self.cfg, self.ctx
        eps, alpha = ctx.budget(x, y, log=log)
        return ctx.attack(x, y if attack_labels is None else attack_labels, eps, alpha, c.steps, c.norm,
                          c.random_start, engine=engine)

    def coreset_inputs(self, x, y):
        # a selection pass trains nothing: its budgets stay out of train_eps and the adaptive estimate
        return {"adv": self.adversarial(x, y, log=False)}

    def step(self, x, y):
        c, ctx = self.cfg, self.ctx
        if ctx.ood is not None:
            return self.ood_step(x, y)
        if c.cutmix is not None:  # the composed batch and its mixed target (robustops.train.cutmix)
            x, y = ctx.cutmix(x, y)
        elif c.robust_mixup is not None:  # the more adverse interpolations (robustops.train.robust_mixup)
            x, y = ctx.robust_mixup(x, y)
        x_adv = self.adversarial(x, y)
        if c.mixup is None:
            return ctx.natural_step(x_adv, y)
        xc, _, yc, lc = ctx.mixup(x, y)
        xa, _, ya, la = ctx.mixup(x_adv, y)

        def closure(net):
            logits_c, logits_a = net(xc, xa)
            return 0.5 * (ctx.mixed_ce(logits_c, y, yc, lc) + ctx.mixed_ce(logits_a, y, ya, la)), logits_a

        loss, logits = ctx.update(closure)
        return ctx.stats(loss, logits, y)
