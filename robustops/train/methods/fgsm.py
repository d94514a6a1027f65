"""Fast adversarial training with FGSM and a random start (Wong, Rice and Kolter 2020): one L-inf
step of size alpha (1.25 eps by default) from a start that is uniform in the ball ("random"), the
clean input ("zero"), or the perturbation left by the previous minibatch ("previous", updated in
place with ``recycle_step_`` as free-AT does). ``cutmix``: the step and the loss on the composed batch's
mixed cross-entropy (:mod:`robustops.train.cutmix`)."""
from __future__ import annotations

from ..registry import Hyper, Method, register
from ... import ops
from .free import PersistentPerturbation


@register
class FGSMTraining(Method):
    name = "fgsm"
    help = "FGSM adversarial training with a random start (Wong et al. 2020)"
    hyper = (Hyper("fgsm_init", "random", "fgsm start: random, zero or previous", kind="choice",
                   choices=("random", "zero", "previous")),)
    options = ("ema", "cutmix")
    sample_weights = True
    budget_schedules = True

    @classmethod
    def default_alpha(cls, cfg) -> float:
        return 1.25 * cfg.eps

    @classmethod
    def label(cls, cfg) -> str:
        return "FGSM-RS AT"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.perturbation = PersistentPerturbation(ctx)

    def coreset_inputs(self, x, y):
        # the "previous" start lives in the training step's persistent perturbation, which a selection
        # pass must not advance: the proxies use a fresh start (random, or the clean input for "zero")
        eps, alpha = self.ctx.budget(x, y, log=False)  # trains nothing: out of train_eps, no adaptive estimate
        return {"adv": self.ctx.attack(x, y, eps, alpha, 1, "linf", self.cfg.fgsm_init != "zero")}

    def step(self, x, y):
        c, ctx = self.cfg, self.ctx
        if c.cutmix is not None:  # the composed batch and its mixed target (robustops.train.cutmix)
            x, y = ctx.cutmix(x, y)
        eps, alpha = ctx.budget(x, y)
        if c.fgsm_init == "previous":
            delta = self.perturbation(x)
            xa = (x + delta).detach()
            g, _, _ = ctx.engine("linf").gradient(xa, y)
            ops.recycle_step_(delta, x, g, eps=eps, step=alpha, lo=c.lo, hi=c.hi)
            x_adv = x + delta
        else:  # one L-inf step from the start point: x + clamp(start - x + alpha*sign(g), -eps, eps)
            x_adv = ctx.attack(x, y, eps, alpha, 1, "linf", c.fgsm_init == "random")
        return ctx.natural_step(x_adv, y)

    def state_dict(self):
        return self.perturbation.state_dict()

    def load_state_dict(self, st) -> None:
        self.perturbation.load_state_dict(st)
