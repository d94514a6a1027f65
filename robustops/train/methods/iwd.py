"""IWD adversarial training: the defense of Wang, Zhang, Cao, Li, Tan & Xiang, "Internal Wasserstein
distance for adversarial attack and defense" (arXiv 2103.07598), read as adversarial training against
the IWD attack (:class:`~robustops.attacks.IWDAttack`):

    min_theta  E[ (1 - w) CE(f_theta(x_iwd), y) + w CE(f_theta(x), y) ],
    x_iwd = argmax_{IWD(x, x') <= iwd_eps, x' in [lo, hi]} CE(f_theta(x'), y)   (approximately: ``steps`` sign
                                                                               steps, each projected onto the budget)

The paper's defense section could not be retrieved when this was written (its abstract: "a new defense
method relying on IWD to learn robust models against unseen adversarial examples"); this min-max reading
with the IWD ball as the threat model is the closest faithful one, and ``iwd_clean_weight`` w (default 0:
plain adversarial training, as PGD-AT) is this implementation's, not the paper's.

Settings: the budget ``iwd_eps`` (the IWD_2 ball's radius on the per-value scale of
:mod:`robustops.attacks.wasserstein`; default 0.2, the demo's L-inf eps: the IWD ball of radius 0.2 holds
the L-inf ball of radius 0.2 and more, and on the 8x8 digits already 0.1 drops a natural SmallCNN clearly), the patches ``iwd_patch`` /
``iwd_stride``, the solver ``iwd_method`` and the attack's Lagrangian weight ``iwd_lam``; the attack takes
the threat model's ``steps`` and ``random_start``, its step size 2.5 iwd_eps / steps. The attack runs with
the model in train mode (as pgd's) and trains on its final iterate (``evaluate=False``), from ``ctx.seed()`` (the run's checkpointed generator): the method has
no state of its own, so resume is exact with nothing more in its checkpoint. Under ``amp`` the attack's
forward runs under autocast without fp16 loss scaling (its sign steps need only the gradient's sign; bf16 is
the safe choice).
"""
from __future__ import annotations

from ...attacks.iwd import DEFAULT_EPS, IWDAttack
from ...attacks.wasserstein import METHODS
from ..registry import Hyper, Method, register


@register
class IWDTraining(Method):
    name = "iwd"
    help = "adversarial training against the internal-Wasserstein (IWD) attack (Wang et al. 2021)"
    options = ("awp", "ema")
    hyper = (
        Hyper("iwd_eps", DEFAULT_EPS, "IWD training budget (IWD_2 of the patch distributions, per-value scale)", minimum=0.0,
              strict=True),
        Hyper("iwd_patch", 3, "IWD patch size in pixels", kind="int", minimum=1),
        Hyper("iwd_stride", 1, "IWD patch stride in pixels", kind="int", minimum=1),
        Hyper("iwd_method", "auto", "IWD optimal-transport solver", kind="choice", choices=METHODS),
        Hyper("iwd_lam", 0.0, "IWD attack's Lagrangian weight of the distance in its ascent", minimum=0.0),
        Hyper("iwd_clean_weight", 0.0, "weight of the clean cross-entropy in IWD training's loss", minimum=0.0,
              maximum=1.0),
    )

    @classmethod
    def label(cls, cfg) -> str:
        solver = "" if cfg.iwd_method == "auto" else f", {cfg.iwd_method}"
        return f"IWD-AT (eps {cfg.iwd_eps:g}, {cfg.iwd_patch}x{cfg.iwd_patch}{solver})"

    def __init__(self, ctx):
        super().__init__(ctx)
        c = self.cfg
        self.attack = IWDAttack(ctx.forward, c.iwd_eps, steps=c.steps, patch=c.iwd_patch, stride=c.iwd_stride,
                                method=c.iwd_method, lam=c.iwd_lam, random_start=c.random_start,
                                clip=(c.lo, c.hi), train_mode=True, dtype=ctx.amp_dtype)

    def adversarial_examples(self, x, y):
        """The IWD attack's examples for the batch (model in train mode, seed from the run's generator;
        ``IWDAttack.examples``: no host sync on a device where the distance runs there)."""
        return self.ctx.fmt(self.attack.examples(x, y, self.ctx.seed()))

    def step(self, x, y):
        ctx, w = self.ctx, self.cfg.iwd_clean_weight
        x_adv = self.adversarial_examples(x, y)
        if w == 0.0:
            return ctx.natural_step(x_adv, y)

        def closure(net):
            logits_c, logits_a = net(x, x_adv)  # one forward call: one DDP all-reduce
            return (1.0 - w) * ctx.cross_entropy(logits_a, y) + w * ctx.cross_entropy(logits_c, y), logits_a

        loss, logits = ctx.update(closure)
        return ctx.stats(loss, logits, y)
