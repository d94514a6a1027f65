"""AugRmixAT (Liu, Shen, Zhao and Nie, "AugRmixAT: A data processing and training method for improving
multiple robustness and generalization performance", ICME 2022, arXiv 2207.10290): AugMix-style
augmentation chains, random mixing of the augmented views, adversarial training on the mixed inputs and
a Jensen-Shannon consistency across the views.

Only the paper's abstract and introduction could be read when this was written (its method section and
equations could not be retrieved, and no official code was found), so this is the closest faithful reading
of what is available, built from the paper's stated ingredients, AugMix (Hendrycks et al. 2020, whose
chains and consistency loss it extends) and the authors' RandoMix (Liu et al. 2022, arXiv 2205.08728: a
random choice between linear and mask mixing, which "Rmix" is read to name). Per minibatch (x, y):

    v_j = AugRmix(x),  j = 1 .. n               n = ``augrmix_views`` independent views (default 2)
    AugRmix(x) = (1 - M) x + M sum_i w_i chain_i(x),   w ~ Dirichlet(a), m ~ Beta(a, a),
                 M = m everywhere (linear, AugMix's skip mixing) or a box of area m (mask),
                 the mode drawn per image with probability 1/2 (``augrmix_mode`` random)
    v~_j = PGD(v_j)                             the threat model's attack, in the eps-ball around v_j
    L = CE term + lambda JS(p(x), p(v~_1), ..., p(v~_n))      p = softmax(f(.)), lambda = ``js_weight``

CE term: ``augrmix_ce`` "all" (default) averages CE(f(x), y) and every CE(f(v~_j), y), the adversarial
training loss on the mixed inputs beside the clean loss that the paper's generalisation claim needs;
"clean" keeps AugMix's CE(f(x), y) alone (the views then enter only through JS).

Choices the sources leave open, stated (each a reading, not the paper's text):

- the chains: :func:`robustops.train.augmix.augmix` (the paper's operations, none overlapping a test
  corruption; width 3, depth -1 = random 1..3, severity 3, alpha 1: AugMix's CIFAR defaults).
- "random mixing": linear or mask per image (mode "random"); "linear" is plain AugMix and "mask" the box
  alone. The box pastes the chains' mixture into the image (CutMix's box, area fraction m), so every view
  keeps its image's label: no label mixing.
- the attack: PGD with the run's eps / alpha / steps / norm / random_start (``ctx.budget``: the budget
  schedules apply; a per-sample budget is repeated for each view), started in and projected on the ball
  around each view (not around x), the model in train mode as in PGD-AT; the views of a batch are
  attacked together in one call.
- JS: AugMix's form, the mean KL of each view's prediction to the clamped mixture
  (:func:`~robustops.train.augmix.js_consistency`), over the clean input and the adversarial views;
  lambda = 12, AugMix's value.
- one forward of the concatenated batch [x, v~_1 .. v~_n] (as the AugMix reference does; batch-norm
  statistics are those of the whole), losses in float32. The logged training accuracy is that of the first
  adversarial view.
- randomness: the views come from the method's own CPU torch.Generator, seeded once from the run's
  stream and saved in checkpoints (``state_dict``), so a resumed run draws the same views.

``cutmix`` (:mod:`robustops.train.cutmix`): the batch is composed first (as for pgd), its views are
AugRmix views of the composed images, PGD attacks and the CE term trains on the mixed target
lam CE(y) + (1 - lam) CE(y[pi]) of every row; the JS term, label-free, is unchanged.

The test corruptions (``robustops.corruptions``) are never used as augmentation here.
"""
from __future__ import annotations

import torch

from .. import augmix as am
from ..context import mean_ce
from ..cutmix import MixedTarget
from ..registry import Hyper, Method, register

__all__ = ["AugRmixAT", "CE_TERMS", "repeat_target"]

CE_TERMS = ("all", "clean")

def repeat_target(y, n: int):
    """Labels y [B] (or a CutMix MixedTarget) for n view-major copies of the batch: [n * B]."""
    if isinstance(y, MixedTarget):
        return MixedTarget(y.y.repeat(n), y.y2.repeat(n), y.lam)
    return y.repeat(n)


@register
class AugRmixAT(Method):
    name = "augrmix"
    help = ("AugRmixAT: AugMix chains, random linear / box mixing, PGD on the mixed views, JS consistency "
            "(Liu et al. 2022)")
    hyper = am.AUGMIX_HYPERS + (
        Hyper("augrmix_mode", "random", "AugRmixAT: mixing of the chains into the image: linear (AugMix), mask "
              "(a box) or random (either, per image)", kind="choice", choices=am.MODES),
        Hyper("augrmix_views", 2, "AugRmixAT: augmented (then attacked) views per image", kind="int", minimum=1),
        Hyper("augrmix_ce", "all", "AugRmixAT: cross-entropy on all views (clean and adversarial) or the clean only",
              kind="choice", choices=CE_TERMS),
        Hyper("js_weight", 12.0, "weight lambda of the Jensen-Shannon consistency term", minimum=0.0),
    )
    options = ("ema", "cutmix")
    budget_schedules = True

    @classmethod
    def check_config(cls, cfg) -> None:
        am.check_hypers(cfg)

    @classmethod
    def label(cls, cfg) -> str:
        return f"AugRmixAT ({cfg.augrmix_mode}, PGD-{cfg.steps}, lambda={cfg.js_weight:g})"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.generator = torch.Generator().manual_seed(ctx.seed())

    def views(self, x: torch.Tensor) -> torch.Tensor:
        """The n AugRmix views of x, view-major: [n * B, C, H, W] (rows j*B .. j*B+B-1: view j)."""
        c = self.cfg
        return torch.cat([am.augmix(x, self.generator, c.augmix_severity, c.augmix_width, c.augmix_depth,
                                    c.augmix_alpha, mode=c.augrmix_mode) for _ in range(c.augrmix_views)])

    def adversarial_views(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """PGD on the views (the model in its current mode), at this minibatch's budget."""
        c, ctx = self.cfg, self.ctx
        n = c.augrmix_views
        eps, alpha = ctx.budget(x, y)
        if torch.is_tensor(eps) and eps.dim() > 0:
            eps, alpha = eps.repeat(n), alpha.repeat(n)
        return ctx.attack(ctx.fmt(self.views(x)), repeat_target(y, n), eps, alpha, c.steps, c.norm, c.random_start)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss of logits [(n + 1) * B, C] of [x, v~_1 .. v~_n] (view-major) and labels y [B] (or a
        CutMix batch's MixedTarget)."""
        c = self.cfg
        parts = logits.float().split(logits.shape[0] // (c.augrmix_views + 1))
        if c.augrmix_ce == "all":
            ce = mean_ce(torch.cat(parts), repeat_target(y, len(parts)))
        else:
            ce = mean_ce(parts[0], y)
        if c.js_weight == 0:
            return ce
        return ce + c.js_weight * am.js_consistency(parts)

    def step(self, x, y):
        ctx = self.ctx
        if self.cfg.cutmix is not None:  # the composed batch and its mixed target (robustops.train.cutmix)
            x, y = ctx.cutmix(x, y)
        adv = self.adversarial_views(x, y)
        inputs = ctx.fmt(torch.cat([x, adv]))
        b = x.shape[0]

        def closure(net):
            logits = net(inputs)
            return self.loss(logits, y), logits[b:2 * b]

        loss, logits = ctx.update(closure)
        return ctx.stats(loss, logits, y)

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, st) -> None:
        if "generator" in st:
            self.generator.set_state(st["generator"])
