"""Training against a learned perturbation set (Wong and Kolter 2021, "Learning perturbation sets for
robust machine learning", ICLR; their section on robust training with learned sets).

A frozen perturbation model (``robustops.perturbation``: ``prior``, ``decode``; e.g. a trained CVAE)
defines S_eps(x) = { m(x, u) : ||u||_2 <= eps }, m(x, u) = clamp(g(mu(x) + sigma(x) * u, x), lo, hi).
Three methods use it (the three training modes of the paper's reference code,
locuslab/perturbation_learning: its ``cvae_attack``, ``cvae_aug`` and ``cvae_gaussian`` trainings):

- ``learned``: adversarial training in the set. Each minibatch, latent PGD
  (``robustops.attacks.LatentPGD``: steps of size alpha on u, projected on the L2 ball of radius eps, on
  the shared projected-gradient engine) finds the member x' = m(x, u*) that maximises the cross-entropy,
  and the model takes a step on the loss that ``set_loss`` names:

  * ``max`` (the default): the reference code's loss, per sample the larger of the clean and the
    adversarial cross-entropy, averaged over the batch: mean_i max(CE(f(x_i), y_i), CE(f(x'_i), y_i))
    (:func:`max_set_loss`). The paper writes the robust objective min_theta E max_{||u|| <= eps}
    CE(f(m(x, u)), y); u = 0 is a member only when m(x, 0) = x, which a learned decoder does not
    guarantee, so the reference adds the clean input as a candidate of the inner maximum. The clean and
    the adversarial batches go through the model in two forwards (train mode, as the reference does);
  * ``adv``: the adversarial loss alone, mean_i CE(f(x'_i), y_i) (Madry et al.'s form, the paper's
    equation with the latent ball in place of an L_p ball).
- ``learned_aug``: data augmentation with the set, the paper's comparison: each sample is replaced by a
  random member, u drawn as ``draw`` says: ``ball`` (the default), u uniform in the volume of the
  eps-ball (``ops.random_init``, seeded); ``prior``, u ~ N(0, I) unbounded (a sample of the CVAE's
  prior, z ~ N(mu(x), sigma(x)^2): what the reference's ``cvae_aug`` trains on).
- ``learned_noise``: latent Gaussian-noise training for the smoothed classifiers that
  ``smoothing.LatentSmooth`` certifies (Cohen et al.'s noise augmentation moved to the latent space,
  the reference's ``cvae_gaussian``): each sample is replaced by m(x, u), u ~ N(0, s^2 I) with s =
  ``sigma``, the latent noise level the classifier is certified at (``ops.gaussian_noise`` on zero
  codes, seeded); the loss is the cross-entropy on the noisy members alone, as in the reference.
  Validation adds ``latent_noise_acc`` (accuracy on one such member per input, eval mode) and selects by
  it; checkpoints record s as ``latent_sigma`` (:meth:`Method.checkpoint_entries`), which ``robustops
  certify --threat learned`` uses when --sigma is not given. The checkpoint's pixel ``sigma`` stays None.
  At sigma = 1 its draws are those of ``learned_aug`` with ``draw="prior"`` (the same seeds, the same
  weights); the two differ in validation and in the metric that selects the best epoch.

Settings: ``eps`` is the *latent* radius (the perturbation checkpoint's chosen eps is the natural
value; ``robustops train`` uses it by default); ``steps`` / ``alpha`` (default 2 * eps / steps, the
latent attack's own default) / ``random_start`` drive the inner attack; ``norm`` does not apply (the
latent ball is L2). The perturbation model comes through the config, ``perturbation_model=``: an
nn.Module with the protocol or the path of a checkpoint of ``robustops.perturbation``
(``load_perturbation_model``). It is moved to the run's device, put in eval mode and its parameters
stop requiring gradients; it is not saved in the run's checkpoints (a module given as an object is
recorded by a description; give it again, or give a path, to resume).

In the run: the attack runs on the local batch of each process with the model in train mode (as
PGD training does) under the run's autocast; the training step goes through ``ctx.update`` (DDP);
members come back in the configured layout (channels_last). Validation measures clean accuracy and,
when asked with ``val_eps`` > 0, the pixel-space PGD accuracy (the default ``val_eps`` of these methods
is 0: the pixel attack is not their threat model), and ``set_acc``: accuracy under the latent attack at
eps (val_steps steps), by which the best epoch is chosen. :func:`set_accuracy` measures the same for a
trained model over a loader.
"""
from __future__ import annotations

import os
from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

from ... import ops, perturbation
from ...attacks.latent import LatentPGD
from ..registry import Hyper, Method, register

__all__ = ["LearnedSet", "LearnedAugmentation", "LearnedNoise", "set_accuracy",
           "max_set_loss", "SET_LOSSES", "DRAWS"]

#: the losses of ``learned`` (--set-loss): the reference code's per-sample max(clean, adversarial), or the
#: adversarial loss alone
SET_LOSSES = ("max", "adv")
#: the draws of ``learned_aug`` (--draw): u uniform in the eps-ball, or u ~ N(0, I) from the prior
DRAWS = ("ball", "prior")

_INF = float("inf")


def _check_source(cfg, method: str) -> None:
    """perturbation_model is given: a module with the protocol or an existing file (ValueError otherwise)."""
    pm = cfg.perturbation_model
    if pm is None:
        raise ValueError(f"perturbation_model is required for method {method!r}: give a perturbation model (an "
                         f"nn.Module with latent_dim, prior(x) -> (mu, logvar) and decode(z, x), e.g. a trained "
                         f"robustops.perturbation.CVAE) or the path of its checkpoint")
    if isinstance(pm, str) and not hasattr(pm, "module"):
        if not os.path.isfile(pm):
            raise ValueError(f"perturbation_model: no perturbation-model checkpoint at {pm!r}")
        return
    module = getattr(pm, "module", pm)
    if not isinstance(module, nn.Module):
        raise ValueError(f"perturbation_model must be an nn.Module with the perturbation-model protocol or a "
                         f"checkpoint path, got {type(module).__name__}")
    try:
        perturbation.check_perturbation_model(module, "perturbation_model")
    except TypeError as e:
        raise ValueError(str(e)) from None


class _LearnedBase(Method):
    select = "set_acc"
    val_metrics = ("set_acc",)
    #: the method trains against the set of ``cfg.perturbation_model`` (the CLI's --perturbation-model)
    uses_perturbation_model = True
    sample_weights = True

    @classmethod
    def default_alpha(cls, cfg) -> float:
        return 2.0 * cfg.eps / cfg.steps

    @classmethod
    def check_config(cls, cfg) -> None:
        _check_source(cfg, cls.name)
        if cfg.val_eps is None:
            cfg.val_eps = 0.0  # the pixel PGD of validation is not this threat model

    def __init__(self, ctx):
        super().__init__(ctx)
        self.pm = perturbation.frozen_model(self.cfg.perturbation_model, ctx.device)
        self._checked = False

    def validation_counts(self, x: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        """{"set_acc": the number of samples of a validation batch that the latent attack at eps
        (val_steps steps, model in eval mode, early stop) does not fool} (a device tensor): validation
        reports the learned set's robust accuracy and selects the best epoch by it."""
        c, ctx = self.cfg, self.ctx
        if c.eps <= 0:
            with torch.no_grad(), ctx.autocast():
                return {"set_acc": (ctx.forward(x).argmax(1) == y).sum()}
        atk = LatentPGD(ctx.forward, self.pm, eps=c.eps, steps=c.val_steps, seed=ctx.seed(), lo=c.lo, hi=c.hi,
                        dtype=ctx.amp_dtype)
        x_adv = ctx.fmt(atk.perturb(x, y, evaluate=False).x_adv.float())
        with torch.no_grad(), ctx.autocast():
            return {"set_acc": (ctx.forward(x_adv).argmax(1) == y).sum()}

    def _check_fit(self, x: torch.Tensor) -> None:
        """One prior / decode pass on a sample: a model that does not fit the data fails at the first step
        with an error that says so."""
        try:
            with torch.no_grad():
                mu, sigma = perturbation.prior_scale(self.pm, x[:1])
                if mu.shape[1] != int(self.pm.latent_dim):
                    raise ValueError(f"prior(x) returned codes of dimension {mu.shape[1]}, latent_dim is "
                                     f"{self.pm.latent_dim}")
                perturbation.member(self.pm, x[:1], torch.zeros_like(mu), mu, sigma, self.cfg.lo, self.cfg.hi)
        except (ValueError, RuntimeError) as e:
            raise ValueError(f"perturbation_model does not fit the training data (inputs of shape "
                             f"{list(x.shape[1:])}): {e}") from None
        self._checked = True


@register
class LearnedSet(_LearnedBase):
    name = "learned"
    help = ("adversarial training in a learned perturbation set: latent PGD in the eps-ball of a CVAE's latent "
            "space, per sample max(CE clean, CE worst member) (--set-loss max) or CE on the worst member "
            "(Wong and Kolter 2021)")
    hyper = (Hyper("set_loss", "max", "learned's loss: max = per-sample max(clean CE, adversarial CE) (the reference "
                   "code's), adv = adversarial CE alone", kind="choice", choices=SET_LOSSES),)

    @classmethod
    def label(cls, cfg) -> str:
        loss = ", max(clean, adv) loss" if cfg.set_loss == "max" else ""
        return f"learned-set AT (eps={cfg.eps:.3g}, {cfg.steps} steps{loss})"

    def __init__(self, ctx):
        super().__init__(ctx)
        c = self.cfg
        # the model as the run sees it (its normalisation in front), in train mode as PGD-AT attacks it
        self.attack = LatentPGD(ctx.forward, self.pm, eps=c.eps, alpha=c.alpha, steps=c.steps, restarts=1,
                                random_start=c.random_start, early_stop=False, seed=0, lo=c.lo, hi=c.hi,
                                dtype=ctx.amp_dtype, train_mode=True)

    def step(self, x, y):
        ctx = self.ctx
        if not self._checked:
            self._check_fit(x)
        if self.cfg.eps <= 0:
            return ctx.natural_step(x, y)  # no set to attack: plain training on x, as with either loss
        self.attack.seed = ctx.seed()
        x_adv = ctx.fmt(self.attack.perturb(x, y, offset=0, evaluate=False).x_adv.float())  # a fresh seed per step
        if self.cfg.set_loss == "adv":
            return ctx.natural_step(x_adv, y)

        def closure(net):
            logits, logits_c = net(x_adv, x)  # one (DDP) forward call, the inputs in the order they ran before
            return max_set_loss(logits_c, logits, y, ctx.weights), logits

        loss, logits = ctx.update(closure)
        return ctx.stats(loss, logits, y)


@register
class LearnedAugmentation(_LearnedBase):
    name = "learned_aug"
    help = ("data augmentation with a learned perturbation set: a random member, u uniform in the latent eps-ball "
            "(--draw ball) or u ~ N(0, I) from the prior (--draw prior)")
    hyper = (Hyper("draw", "ball", "learned_aug's latent draw: ball = u uniform in the eps-ball, prior = u ~ N(0, I) "
                   "unbounded (the reference code's)", kind="choice", choices=DRAWS),)

    @classmethod
    def label(cls, cfg) -> str:
        if cfg.draw == "prior":
            return "learned-set augmentation (prior draws)"
        return f"learned-set augmentation (eps={cfg.eps:.3g})"

    def step(self, x, y):
        ctx, c = self.ctx, self.cfg
        if not self._checked:
            self._check_fit(x)
        with torch.no_grad():
            mu, sigma = perturbation.prior_scale(self.pm, x)
            if c.draw == "prior":
                u = ops.gaussian_noise(torch.zeros_like(mu), 1, 1.0, seed=ctx.seed())
            else:
                u = ops.random_init(torch.zeros_like(mu), c.eps, "l2", -_INF, _INF, seed=ctx.seed(), radius="ball")
            x = ctx.fmt(perturbation.member(self.pm, x, u, mu, sigma, c.lo, c.hi).float())
        return ctx.natural_step(x, y)


@register
class LearnedNoise(_LearnedBase):
    name = "learned_noise"
    help = ("latent Gaussian-noise training for latent smoothing: each sample replaced by m(x, u), u ~ N(0, sigma^2 I) "
            "(Wong and Kolter 2021's smoothed classifiers)")
    hyper = (Hyper("sigma", 1.0, "Gaussian noise level (training and smoothing)", minimum=0.0, strict=True),)
    select = "latent_noise_acc"
    val_metrics = ("set_acc", "latent_noise_acc")

    @classmethod
    def label(cls, cfg) -> str:
        return f"latent Gaussian noise (sigma={cfg.sigma:g})"

    @classmethod
    def checkpoint_entries(cls, cfg) -> Dict[str, float]:
        return {"latent_sigma": float(cfg.sigma)}

    def noisy_members(self, x: torch.Tensor) -> torch.Tensor:
        """m(x, u) with u ~ N(0, sigma^2 I), one per input (a fresh seed of the run's stream), float32, in the
        configured layout; without gradient."""
        c = self.cfg
        with torch.no_grad():
            mu, scale = perturbation.prior_scale(self.pm, x)
            u = ops.gaussian_noise(torch.zeros_like(mu), 1, c.sigma, seed=self.ctx.seed())
            return self.ctx.fmt(perturbation.member(self.pm, x, u, mu, scale, c.lo, c.hi).float())

    def validation_counts(self, x: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        """set_acc as the other learned methods, and latent_noise_acc: the samples whose noisy member
        (u ~ N(0, sigma^2 I)) the model classifies correctly."""
        out = super().validation_counts(x, y)
        xn = self.noisy_members(x)
        with torch.no_grad(), self.ctx.autocast():
            out["latent_noise_acc"] = (self.ctx.forward(xn).argmax(1) == y).sum()
        return out

    def step(self, x, y):
        if not self._checked:
            self._check_fit(x)
        return self.ctx.natural_step(self.noisy_members(x), y)


def max_set_loss(clean_logits: torch.Tensor, adv_logits: torch.Tensor, y: torch.Tensor,
                 weights=None) -> torch.Tensor:
    """The reference code's training loss of ``learned``: per sample the larger of the clean and the
    adversarial cross-entropy, max(CE(clean_logits_i, y_i), CE(adv_logits_i, y_i)) (in float32), averaged
    over the batch, with per-sample weights [B] a weighted mean (sum_i w_i max_i / sum_i w_i).
    Logits [B, C], y [B]. Where the two are equal the gradient is split evenly between them."""
    per = torch.maximum(F.cross_entropy(clean_logits.float(), y, reduction="none"),
                        F.cross_entropy(adv_logits.float(), y, reduction="none"))
    if weights is None:
        return per.mean()
    w = weights.to(per.dtype)
    return (per * w).sum() / w.sum()


def set_accuracy(model: nn.Module, perturbation_model: nn.Module, loader, eps: float, steps: int = 10,
                 alpha=None, restarts: int = 1, seed: int = 0, lo: float = 0.0, hi: float = 1.0,
                 device=None) -> Dict[str, float]:
    """Clean accuracy and accuracy under the latent attack (LatentPGD at radius eps, ``steps`` steps,
    model in eval mode) of a model over a loader of (x, y, ...): {"clean_acc", "set_acc", "n"}, measured
    by ``attacks.robust_accuracy``."""
    from ...attacks import robust_accuracy

    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    pm = perturbation.frozen_model(perturbation_model, device)
    atk = LatentPGD(model, pm, eps=eps, alpha=alpha, steps=steps, restarts=restarts, seed=seed, lo=lo, hi=hi)
    res = robust_accuracy(model, loader, atk, device=device, progress=False)
    return {"clean_acc": res["clean_acc"], "set_acc": res["robust_acc"], "n": res["n"]}
