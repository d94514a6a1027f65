"""Interval bound propagation training (Gowal et al. 2018, "On the effectiveness of interval bound
propagation for training verifiably robust models").

The loss of one minibatch at training progress p (optimizer steps done / all optimizer steps) is the
paper's hybrid loss (its section 3, the training procedure):

    L = kappa_t * CE(z(x), y) + (1 - kappa_t) * CE(z_hat(x, eps_t), y)

z(x): the logits of the clean input, through the net ``ctx.update`` hands the step. z_hat(x, eps_t): the worst-case logits
over the box {x' : |x' - x|_inf <= eps_t} intersected with [lo, hi], obtained by interval bound
propagation with the last linear layer elided into the margin specification (section 3: z_hat_y is
an upper bound of z_y - z_true for y != true and 0 for the true class), i.e.
``robustops.bounds.worst_case_logits``; CE is the mean cross-entropy over the minibatch.

Schedule (the paper's training procedure and experimental setup: eps_t ramps linearly from 0 to
eps_train after a warm-up with kappa = 1, and kappa_t decreases linearly from 1 to kappa_final = 0.5
over the same ramp):

    u(p)    = 0 for p < warmup;  min(1, (p - warmup) / ramp) otherwise  (ramp = 0: 1 from warmup on)
    eps_t   = eps_scale * eps * u(p)
    kappa_t = 1 - (1 - kappa) * u(p)

Gowal et al. count warm-up and ramp in optimizer steps: MNIST 2K warm-up and 10K ramp steps of 60K
(fractions 0.033 and 0.167), CIFAR-10 10K and 150K of 350K (0.029 and 0.43); eps_train = 1.1 * eps on
CIFAR-10 (MNIST: 0.4 for test eps 0.3). Here both are fractions of the run so that one setting serves
any number of epochs. Defaults: kappa 0.5 (the paper's kappa_final), warmup 0.05, ramp 0.4 (a
CIFAR-like ramp, which also suits the short digits runs: with 30 epochs, 1.5 warm-up and 12 ramp
epochs), eps_scale 1.1 (the paper's CIFAR-10 rule; validation and certification stay at eps / val_eps).

Choices the paper leaves open, and what this implementation does:
- progress is ``ctx.progress`` (optimizer steps done / all) read before the step's update: the
  schedule follows from the optimizer-step counter, which a resumed run restores, so a resumed run
  continues the schedule exactly (no state of its own);
- when eps_t = 0 or kappa_t = 1 the bound pass is skipped: at eps 0 the worst-case logits are the clean
  margins and CE(z_hat(x, 0), y) = CE(z(x), y), so the loss is the same;
- ``eps_schedule="smooth"`` replaces the linear ramp by the smooth one of Shi et al. 2021 (see
  :func:`ramp_fraction`), kappa_t following the same curve; the default is the paper's linear ramp;
- the model is in training mode for both terms: BatchNorm normalises the clean batch with its batch
  statistics (and updates the running statistics once, in the clean forward); the bounds hold batch
  statistics fixed without touching the running statistics, by the rule of hyperparameter ``bn``
  (``robustops.bounds``): "clean" (default; Shi et al. 2021, the ACERT authors, auto_LiRPA), the
  statistics of the clean batch, i.e. the bounds of the network the clean forward computes; "centre",
  those of the batch of box centres (robustops' earlier rule). The paper's networks have no BatchNorm;
- the bound pass runs under the run's autocast (bf16 / fp16 products, fp32 cross-entropy); the
  certification in validation (``cert_acc``) runs in fp32 without autocast;
- distributed data parallel: the clean forward goes through ``ctx.update``'s net (the DDP wrapper), which
  prepares the gradient all-reduce; the bound pass calls the same modules directly (interval rules per
  layer, not their forward). Every parameter's gradient from both terms is summed by autograd before
  the parameter's accumulation hook fires, so DDP all-reduces the whole gradient once, as for a single
  forward (tests/test_certified_training.py compares a 2-process gloo run with one process).

IBP certifies L-inf boxes only: ``norm`` must be "linf". The model must be one ``robustops.bounds`` can
bound (no active dropout; an unsupported layer fails at the first step with
``bounds.UnsupportedLayerError`` naming it, not when the ramp starts).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from ... import bounds
from ..registry import Hyper, Method, register, require_linf

__all__ = ["IBP", "ramp_fraction", "progress", "SCHEDULE_SHAPES", "bn_hyper"]

SCHEDULE_SHAPES = ("linear", "smooth")

# Shi et al. 2021's smooth ramp: u^4 growth for the first quarter of the ramp, then linear, with the
# value and the slope continuous where they meet.
_SMOOTH_MID, _SMOOTH_POWER = 0.25, 4.0
_SMOOTH_COEF = 1.0 / (_SMOOTH_POWER * _SMOOTH_MID ** (_SMOOTH_POWER - 1) * (1 - _SMOOTH_MID)
                      + _SMOOTH_MID ** _SMOOTH_POWER)
_SMOOTH_AT_MID = _SMOOTH_COEF * _SMOOTH_MID ** _SMOOTH_POWER


def ramp_fraction(progress: float, warmup: float, ramp: float, shape: str = "linear") -> float:
    """Where the ramp stands at training progress ``progress`` (in [0, 1]): 0 before ``warmup``, 1 after
    ``warmup + ramp`` (from ``warmup`` on when ``ramp`` is 0), and between them, with
    u = (progress - warmup) / ramp, u itself ("linear", Gowal et al.) or ("smooth", Shi et al. 2021,
    "Fast certified robust training with short warmup") c * u^4 for u < 1/4 and
    c / 256 + (1 - c / 256) * (u - 1/4) / (3/4) after, with c = 1 / (4 (1/4)^3 (3/4) + (1/4)^4) so that the
    value and the slope are continuous at u = 1/4."""
    if shape not in SCHEDULE_SHAPES:
        raise ValueError(f"eps_schedule must be one of {', '.join(SCHEDULE_SHAPES)}; got {shape!r}")
    if progress < warmup:
        return 0.0
    if ramp <= 0:
        return 1.0
    u = min(1.0, (progress - warmup) / ramp)
    if shape == "linear":
        return u
    if u < _SMOOTH_MID:
        return _SMOOTH_COEF * u ** _SMOOTH_POWER
    return _SMOOTH_AT_MID + (1.0 - _SMOOTH_AT_MID) * (u - _SMOOTH_MID) / (1.0 - _SMOOTH_MID)


def progress(ctx) -> float:
    """The fraction of the run's optimizer steps done (restored with the scheduler on resume):
    ``ctx.progress`` of a method context (or of whatever holds one and has ``progress``)."""
    return ctx.progress


def check_linf(cfg, method: str) -> None:
    require_linf(cfg, method, "interval bounds are L-inf boxes")


def check_supported(ctx, x: torch.Tensor, y: torch.Tensor) -> None:
    """One bound pass on one sample at radius 0 (eval mode, no gradient): a model with a layer that
    interval bound propagation has no rule for fails at the first step (bounds.UnsupportedLayerError,
    naming the layer) rather than when the eps ramp starts."""
    fwd = ctx.forward
    was = fwd.training
    fwd.eval()
    try:
        with torch.no_grad():
            bounds.margin_bounds(fwd, x[:1], y[:1], 0.0, ctx.cfg.lo, ctx.cfg.hi)
    finally:
        fwd.train(was)


def kappa_hyper(default: float) -> Hyper:
    return Hyper("kappa", default, "weight of the clean cross-entropy against the certified (IBP) loss; ibp: its "
                                   "value after the ramp (from 1), acert / fastibp: constant", minimum=0.0, maximum=1.0)


def bn_hyper() -> Hyper:
    """The BatchNorm rule of training-mode bounds (shared by the certified methods)."""
    return Hyper("bn", "clean", "BatchNorm statistics of the training-mode bounds: clean (the clean batch's, Shi et "
                                "al. 2021 / auto_LiRPA) or centre (the box centres')", kind="choice",
                 choices=bounds.BN_RULES)


def schedule_hypers(warmup: float, ramp: float, shape: str) -> Tuple[Hyper, ...]:
    """The eps ramp's hyperparameters (shared by the certified methods: one kind, one set of flags)."""
    return (Hyper("warmup", warmup, "fraction of training before the eps ramp starts (eps 0: clean loss only)",
                  minimum=0.0, maximum=1.0),
            Hyper("ramp", ramp, "fraction of training over which the training eps grows from 0 to eps_scale * eps",
                  minimum=0.0, maximum=1.0),
            Hyper("eps_scale", 1.1, "training eps (the ramp's end) as a multiple of eps; validation and "
                                    "certification use eps (val_eps)", minimum=0.0, strict=True),
            Hyper("eps_schedule", shape, "shape of the eps ramp: linear (Gowal et al. 2018) or smooth "
                                         "(Shi et al. 2021: u^4, then linear)", kind="choice",
                  choices=SCHEDULE_SHAPES))


class CertifiedMethod(Method):
    """Base of the IBP-based methods: validated and selected by cert_acc, L-inf only, and the model's
    layers checked for IBP rules at the first step (:meth:`check_model`)."""

    select = "cert_acc"
    certified = True

    @classmethod
    def check_config(cls, cfg) -> None:
        check_linf(cfg, cls.name)

    def __init__(self, ctx):
        super().__init__(ctx)
        self._checked = False

    def check_model(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """check_supported once, at the first step."""
        if not self._checked:
            check_supported(self.ctx, x, y)
            self._checked = True


@register
class IBP(CertifiedMethod):
    name = "ibp"
    help = ("interval bound propagation: kappa * CE(clean) + (1 - kappa) * CE(worst-case logits at eps), eps "
            "and kappa ramped (Gowal et al. 2018)")
    hyper = (kappa_hyper(0.5),) + schedule_hypers(0.05, 0.4, "linear") + (bn_hyper(),)

    @classmethod
    def label(cls, cfg) -> str:
        return f"IBP (kappa={cfg.kappa:g})"

    def schedule(self, p: float) -> Tuple[float, float]:
        """(eps_t, kappa_t) at training progress p."""
        c = self.cfg
        u = ramp_fraction(p, c.warmup, c.ramp, c.eps_schedule)
        return c.eps_scale * c.eps * u, 1.0 - (1.0 - c.kappa) * u

    def loss(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor, eps_t: float,
             kappa_t: float) -> torch.Tensor:
        """The hybrid loss given the clean logits (call it under the run's autocast)."""
        ce = F.cross_entropy(logits.float(), y)
        if eps_t <= 0 or kappa_t >= 1:
            return ce
        c = self.cfg
        worst = bounds.worst_case_logits(self.ctx.forward, x, y, eps_t, c.lo, c.hi, num_classes=logits.shape[1],
                                         bn=c.bn)
        return kappa_t * ce + (1.0 - kappa_t) * F.cross_entropy(worst.float(), y)

    def step(self, x, y):
        ctx = self.ctx
        self.check_model(x, y)
        eps_t, kappa_t = self.schedule(ctx.progress)

        def closure(net):
            logits = net(x)
            return self.loss(logits, x, y, eps_t, kappa_t), logits

        loss, logits = ctx.update(closure)
        return ctx.stats(loss, logits, y)
