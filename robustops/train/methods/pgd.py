"""PGD adversarial training (Madry et al. 2018): the model is trained on the output of a PGD-k
attack (eps, alpha, steps, norm, random_start of the threat model) run with the model in train mode
on the shared projected-gradient engine."""
from __future__ import annotations

from ..registry import Method, register


@register
class PGDTraining(Method):
    name = "pgd"
    help = "PGD-k adversarial training (Madry et al. 2018)"

    @classmethod
    def label(cls, cfg) -> str:
        return f"PGD-{cfg.steps} AT"

    def step(self, x, y):
        c = self.cfg
        x_adv = self.trainer.attack(x, y, c.eps, c.alpha, c.steps, c.norm, c.random_start)
        return self.trainer.natural_step(x_adv, y)
