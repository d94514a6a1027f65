"""Natural training: cross-entropy on the clean inputs.

Options (see ``FitConfig``): ``ema`` (weight averaging) and ``mixup`` (Zhang et al. 2018: one
lam ~ Beta(alpha, alpha) and one permutation pi per batch, ``MethodContext.mixup``; the loss is
lam CE(f(x_mix), y) + (1 - lam) CE(f(x_mix), y[pi]) on x_mix = lam x + (1 - lam) x[pi]; the reported
accuracy counts the dominant labels y), or ``cutmix`` (:mod:`robustops.train.cutmix`), or ``robust_mixup``
(:mod:`robustops.train.robust_mixup`)."""
from __future__ import annotations

from ..registry import Method, register


@register
class Natural(Method):
    name = "natural"
    help = "cross-entropy on clean inputs"
    select = "clean_acc"
    adversarial = False
    options = ("ema", "mixup", "cutmix", "robust_mixup")
    sample_weights = True

    def step(self, x, y):
        ctx = self.ctx
        if self.cfg.cutmix is not None:  # CutMix (Yun et al. 2019): the mixed cross-entropy
            return ctx.natural_step(*ctx.cutmix(x, y))
        if self.cfg.robust_mixup is not None:  # robust mixup (Lau et al. 2023): the more adverse interpolations
            return ctx.natural_step(*ctx.robust_mixup(x, y))
        if self.cfg.mixup is None:
            return ctx.natural_step(x, y)
        xm, _, y2, lam = ctx.mixup(x, y)

        def closure(net):
            logits = net(xm)
            return ctx.mixed_ce(logits, y, y2, lam), logits

        loss, logits = ctx.update(closure)
        return ctx.stats(loss, logits, y)
