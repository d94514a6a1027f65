"""Natural training: cross-entropy on the clean inputs."""
from __future__ import annotations

from ..registry import Method, register


@register
class Natural(Method):
    name = "natural"
    help = "cross-entropy on clean inputs"
    select = "clean_acc"
    adversarial = False

    def step(self, x, y):
        return self.trainer.natural_step(x, y)
