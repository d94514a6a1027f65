"""Interpolated joint space adversarial training, IJSAT (Lau, Liu, Souri, Lin, Feizi and Chellappa, TPAMI
2023, arXiv 2112.06323): adversarial training against the joint-space threat model (JSTM) of a
normalising flow G, on robust-mixup interpolations of the batch.

Each minibatch (x, y):

1. robust mixup (:mod:`robustops.train.robust_mixup`, the ``robust_mixup`` option, on by default here
   with alpha = 0.2: on the digits alpha = 1 cost PGD-AT 40 points of PGD accuracy, 0.2 about 15): x~ the per-sample more adverse interpolation of x with a partner, y~ its mixed target;
2. the joint space attack (:class:`robustops.attacks.JointEngine`, the engine of ``JSTMAttack``) on x~:
   x~' = clamp(G(G^-1(x~) + dz) + dx, lo, hi) maximising the mixed cross-entropy over
   ||dz||_inf <= eps_z, ||dx||_inf <= eps, ``steps`` signed steps of alpha_z = 2.5 eps_z / steps and
   alpha (the run's), from a uniform start when ``random_start``, the model in train mode (as PGD-AT);
3. a training step on the mixed cross-entropy CE(f(x~'), y~) (``ctx.natural_step``: weighted, AWP-free).

The objective is thus min_theta E max_{dz, dx} CE_mix(f(x~'), y~) on robust-mixup inputs: the paper's
IJSAT as read here (its method section could not be read for this implementation; what the abstract
and the threat model's definition fix is kept, the rest is the closest reading: one adversarial term, no
separate clean term; the interpolation precedes the attack). With a budget schedule (``ctx.budget``), eps_z
follows the same fraction of its value as the pixel budget of eps.

Settings: ``flow`` (--flow) the path of a normalising-flow checkpoint (``robustops perturbation train
--kind flow``), or from Python ``perturbation_model=`` a module with the flow protocol (image_shape,
encode, decode, log_prob; :func:`robustops.perturbation.check_flow`); it is frozen (eval mode, no
parameter gradients) and not saved in the run's checkpoints. ``eps_z`` (--eps-z): the latent L-inf budget
(default 0.03, for a flow whose latents are standard normal: on the digits' linear Gaussian flow 0.1 added
so much to the pixel ball that clean accuracy fell to about 0.5);
eps / alpha / steps / random_start: the pixel part and the attack; norm must be L-inf. Validation: clean
and pixel-PGD accuracy (val_eps) as PGD-AT's.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from ... import perturbation
from ...perturbation import protocol
from ...attacks.base import madry_step
from ...attacks.jstm import JointEngine, joint_budget
from ..registry import Hyper, Method, register, require_linf

__all__ = ["IJSAT", "resolve_flow"]


def resolve_flow(source, device) -> nn.Module:
    """The flow of a config value (a module, a config's model object, or a checkpoint path) on device, in
    eval mode, with no parameter requiring gradients; a TypeError when it lacks the flow protocol."""
    module = getattr(source, "module", source)
    if isinstance(module, (str, os.PathLike)):
        module = perturbation.load_perturbation_model(os.fspath(module), device)
    protocol.check_flow(module, "flow")
    module = module.to(device).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


@register
class IJSAT(Method):
    name = "ijsat"
    help = "interpolated joint space AT: latent (flow) + pixel adversaries of robust-mixup inputs (Lau et al. 2023)"
    hyper = (Hyper("flow", None, "ijsat's normalising-flow checkpoint (perturbation train --kind flow)", kind="path"),
             Hyper("eps_z", 0.03, "ijsat's latent L-inf budget through the flow", minimum=0.0))
    options = ("ema", "robust_mixup")
    sample_weights = True
    budget_schedules = True

    @classmethod
    def check_config(cls, cfg) -> None:
        require_linf(cfg, "ijsat", "the joint-space attack takes L-inf steps in both spaces")
        flow = cfg.flow if cfg.flow is not None else cfg.perturbation_model
        if flow is None:
            raise ValueError("flow is required for method 'ijsat': give the path of a normalising-flow checkpoint "
                             "(robustops perturbation train --kind flow) or, from Python, perturbation_model= a "
                             "module with the flow protocol (image_shape, encode, decode, log_prob)")
        if isinstance(flow, str) and not hasattr(flow, "module") and not os.path.isfile(flow):
            raise ValueError(f"flow: no normalising-flow checkpoint at {flow!r}")
        if hasattr(flow, "module"):
            try:
                protocol.check_flow(flow.module, "perturbation_model")
            except TypeError as e:
                raise ValueError(str(e)) from None
        if cfg.robust_mixup is None:
            cfg.robust_mixup = 0.2  # IJSAT's interpolation: robust mixup with lam ~ Beta(0.2, 0.2)

    @classmethod
    def label(cls, cfg) -> str:
        return f"IJSAT (JSTM-{cfg.steps}, eps_z={cfg.eps_z:g})"

    def __init__(self, ctx):
        super().__init__(ctx)
        source = self.cfg.flow if self.cfg.flow is not None else self.cfg.perturbation_model
        self.flow = resolve_flow(source, ctx.device)
        self.engine = JointEngine.like(ctx.engine(self.cfg.norm), self.flow)

    def adversarial(self, x, y):
        """The joint space attack on x (labels or a MixedTarget y) at this minibatch's budget: x_adv."""
        c, ctx = self.cfg, self.ctx
        eps, alpha = ctx.budget(x, y)
        scale = eps / c.eps if c.eps > 0 else 1.0  # a budget schedule's fraction, applied to eps_z too
        eps_z = c.eps_z * scale
        B, device = x.shape[0], x.device
        budget = joint_budget(eps_z, eps, B, device)
        steps = joint_budget(madry_step(eps_z, c.steps), alpha, B, device)
        centre = self.engine.centre(x)
        t = ctx.attack(centre, y, budget, steps, c.steps, random_start=c.random_start, engine=self.engine)
        with torch.no_grad():
            return ctx.fmt(self.engine.member(t))

    def step(self, x, y):
        ctx = self.ctx
        x, y = ctx.robust_mixup(x, y)
        return ctx.natural_step(self.adversarial(x, y), y)
