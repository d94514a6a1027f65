"""AdversarialAugment (AdA; Calian, Stimberg, Wiles, Rebuffi, Gyorgy, Mann & Gowal, "Defending against
image corruptions through adversarial augmentations", ICLR 2022, arXiv 2104.01086).

A corruption network c_phi (an image-to-image model: here a :class:`robustops.perturbation.CorruptionAE`
trained by reconstruction, or a CVAE's decoder on its prior mean) is corrupted in its *weights*; the
classifier f_theta trains on the images the corrupted network produces for its worst weight perturbation:

    min_theta  E_(x, y) [ max_{delta in Delta(nu)}  L( f_theta( c_{phi + delta}(x) ), y ) ],
    Delta(nu) = { delta : ||delta_l||_2 <= nu * ||phi_l||_2 for every layer l }

(the paper's objective with its per-layer relative L2 ball of radius nu). The inner maximum is solved per
example (each example has its own delta) by M steps of projected normalised gradient ascent from a random
start in the ball:

    delta_l <- Pi_l( delta_l + alpha_l * g_l / ||g_l||_2 ),   g_l = d L / d delta_l,   alpha_l = s * nu * ||phi_l||_2

each step one ``ops.pgd_step_`` (norm "l2", centre 0, radius nu ||phi_l||, the box (-inf, inf): no
clamping) on the flattened per-example delta of each layer; the per-example networks run batched through
``torch.func.functional_call`` under ``torch.func.vmap`` (PyTorch turns the batched convolution weights
into grouped convolutions). The loss is the classifier's cross-entropy summed over the examples (each
example's delta only moves its own loss), on c_{phi + delta}(x) clamped to [lo, hi].

Choices this implementation makes where the paper's method section and appendix could not be read here
(the closest faithful reading of the objective above; the lead's README names them):

- a "layer" is a parameter tensor: each weight and each bias has its own ball (a zero tensor, e.g. a
  bias initialised at zero, has radius 0 and is not perturbed);
- the random start is uniform in the volume of each layer's ball (``ops.random_init``, "ball"),
  independently per layer and example, keyed by the step's seed;
- the step size is relative to each layer's radius (``ada_step_size`` s; default 0.5 with M = 5 steps);
- nu's default (0.02) is chosen on the digits' small autoencoder (docs/ada_digits.png: at 0.1 the digits
  are mostly destroyed), not taken from the paper's pretrained EDSR / CAE / VQ-VAE;
- clean / AdA mixing: a fraction ``ada_clean`` of every minibatch (a seeded random choice) stays clean,
  the rest is replaced by its AdA examples, and the loss is the cross-entropy over the whole minibatch
  (0: AdA examples alone; the paper trains on clean and AdA-augmented data together);
- the classifier is attacked in its current mode (train mode during training, as PGD-AT here does).

AdA + AugMix (``ada_augmix`` n > 0; the paper reports AdA combined with AugMix and its Jensen-Shannon
consistency, but how the two are composed could not be read here: this is the closest faithful reading,
AugMix's own training scheme (Hendrycks et al. 2020, its Eq. for L_JSD) with AdA's minibatch as its
"clean" input). With x_a the minibatch above (clean for the ada_clean fraction, AdA examples elsewhere):

    v_j = AugMix(x_a),  j = 1 .. n                    (n = ``ada_augmix``, AugMix's 2 by default when on)
    L = CE(f(x_a), y) + lambda JS(p(x_a), p(v_1), ..., p(v_n)),     lambda = ``ada_js`` (AugMix's 12)

so a clean sample gets plain AugMix (its views AugMix(x)) and an AdA sample the AugMix views of its AdA
example (the JS term ties the AdA output to its AugMix views). Stated choices: the chains are
:func:`robustops.train.augmix.augmix` at the --augmix-width/-depth/-severity/-alpha settings (shared with
augrmix; by default AugMix's CIFAR ones, width 3, depth 1..3, severity 3, alpha 1), linear mixing; its
operations overlap no test corruption; the AdA examples are computed once, on x_a's AdA
part, not per view (AdA's cost unchanged); one forward of [x_a, v_1 .. v_n] (as AugMix's reference; batch
norm sees the whole); JS is :func:`~robustops.train.augmix.js_consistency` (AugMix's, in float32); the
logged training accuracy is that of x_a. The views come from the method's own CPU torch.Generator, seeded
from the run's stream when the method starts (only when ``ada_augmix`` > 0, so the default run is the
plain AdA run bit for bit) and saved in checkpoints (``state_dict``: exact resume).

Validation reports ``ada_acc``: the accuracy on AdA examples (all of the batch, model in eval mode).
Without AugMix the method keeps no state between steps (its randomness is the run's seed stream,
``ctx.seed()``), so a resumed run continues exactly with nothing of its own to save.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, vmap

from ... import _rng, ops, perturbation
from .. import augmix as am
from ..registry import Hyper, Method, register

__all__ = ["AdA", "WeightPerturbation", "ada_examples"]

_INF = float("inf")

Delta = Dict[str, torch.Tensor]


class WeightPerturbation:
    """Per-example perturbations of a network's weights in the per-layer relative L2 ball of radius nu:
    ||delta_l||_2 <= nu * ||phi_l||_2 for each parameter tensor phi_l (``radii``; the tensors of radius 0
    and those named by the network's ``ada_frozen`` prefixes are left alone: ``names``). A delta is a dict
    {name: Tensor[B, *phi_l.shape]} (float32)."""

    def __init__(self, net: nn.Module, nu: float):
        self.net, self.nu = net, float(nu)
        frozen = tuple(getattr(net, "ada_frozen", ()))
        self.params = {n: p.detach() for n, p in net.named_parameters()}
        self.buffers = {n: b.detach() for n, b in net.named_buffers()}
        self.radii = {n: self.nu * torch.linalg.vector_norm(p.float()).item() for n, p in self.params.items()}
        self.names: List[str] = [n for n in self.params if self.radii[n] > 0 and not n.startswith(frozen)]

    def random(self, batch: int, seed: int) -> Delta:
        """A random start: each layer's delta uniform in the volume of its ball, layer k keyed by
        derive_seed(seed, k)."""
        out = {}
        for k, n in enumerate(self.names):
            p = self.params[n]
            z = torch.zeros(batch, p.numel(), device=p.device, dtype=torch.float32)
            d = ops.random_init(z, self.radii[n], "l2", -_INF, _INF, seed=_rng.derive_seed(seed, k), radius="ball")
            out[n] = d.view(batch, *p.shape)
        return out

    def outputs(self, delta: Delta, x: torch.Tensor) -> torch.Tensor:
        """c_{phi + delta_i}(x_i) for every example i, [B, ...] (differentiable with respect to delta)."""
        def one(d: Delta, xi: torch.Tensor) -> torch.Tensor:
            p = dict(self.params)
            for n, v in d.items():
                p[n] = p[n] + v.to(p[n].dtype)
            return functional_call(self.net, (p, self.buffers), (xi.unsqueeze(0),)).squeeze(0)

        return vmap(one)(delta, x)

    def step_(self, delta: Delta, grads: Delta, step_size: float) -> None:
        """One projected normalised ascent step of every layer in place (``ops.pgd_step_``, L2, centre 0,
        radius nu ||phi_l||, step step_size * that radius, no box)."""
        for n in self.names:
            d = delta[n].view(delta[n].shape[0], -1)
            r = self.radii[n]
            ops.pgd_step_(d, torch.zeros_like(d), grads[n].reshape(d.shape).float(), r, step_size * r, "l2",
                          -_INF, _INF)

    def norms(self, delta: Delta) -> Dict[str, torch.Tensor]:
        """{name: ||delta_l,i||_2 per example, Tensor[B]} (to check the ball)."""
        return {n: torch.linalg.vector_norm(v.flatten(1).double(), dim=1) for n, v in delta.items()}


def ada_examples(pert: WeightPerturbation, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 x: torch.Tensor, y: torch.Tensor, steps: int, step_size: float, seed: int, lo: float = 0.0,
                 hi: float = 1.0, return_delta: bool = False):
    """AdA examples of x: clamp(c_{phi + delta}(x), lo, hi) after ``steps`` projected normalised ascent
    steps of ``loss(x_corrupted, y)`` (a sum over the examples) from a random start in the ball (seeded).
    With nu = 0 (no layer to perturb) the network's output itself. Returns x_ada (float32, no gradient),
    and the final delta with return_delta."""
    if not pert.names:
        with torch.no_grad():
            out = pert.net(x).float().clamp(lo, hi)
        return (out, {}) if return_delta else out
    delta = pert.random(x.shape[0], seed)
    for _ in range(steps):
        with torch.enable_grad():
            d = {n: v.detach().requires_grad_(True) for n, v in delta.items()}
            value = loss(pert.outputs(d, x).float().clamp(lo, hi), y)
            grads = torch.autograd.grad(value, list(d.values()))
        delta = {n: v.detach() for n, v in d.items()}
        pert.step_(delta, dict(zip(d, grads)), step_size)
    with torch.no_grad():
        out = pert.outputs(delta, x).float().clamp(lo, hi)
    return (out, delta) if return_delta else out


def _check_network(cfg) -> None:
    """perturbation_model is given and is a corruption network (a module, or a checkpoint that loads as
    one); ValueError naming it otherwise."""
    src = cfg.perturbation_model
    if src is None:
        raise ValueError("perturbation_model is required for method 'ada': give its corruption network (an "
                         "image-to-image nn.Module, e.g. robustops.perturbation.CorruptionAE, or the checkpoint "
                         "of `robustops perturbation train --kind autoencoder` or of a CVAE)")
    module = getattr(src, "module", src)  # a module given to fit is recorded as a str with .module
    if isinstance(module, nn.Module):
        return
    if not isinstance(module, (str, os.PathLike)):
        raise ValueError(f"perturbation_model must be an image-to-image nn.Module or a checkpoint path, got "
                         f"{type(module).__name__}")
    if not os.path.isfile(module):
        raise ValueError(f"perturbation_model: no corruption-network checkpoint at {os.fspath(module)!r}")
    try:
        perturbation.corruption_network(module, "cpu")
    except (ValueError, TypeError) as e:
        raise ValueError(f"perturbation_model: {e}") from None


@register
class AdA(Method):
    name = "ada"
    help = ("AdversarialAugment: train on the outputs of a corruption network (--perturbation-model) whose weights "
            "are perturbed per example in a per-layer relative L2 ball (nu) to maximise the loss (Calian et al. 2022)")
    hyper = (Hyper("ada_nu", 0.02, "ada's relative radius nu: ||delta_l|| <= nu ||W_l|| per layer", minimum=0.0),
             Hyper("ada_steps", 5, "ada's projected normalised ascent steps M", kind="int", minimum=0),
             Hyper("ada_step_size", 0.5, "ada's ascent step, relative to each layer's radius", minimum=0.0),
             Hyper("ada_clean", 0.5, "ada's fraction of each minibatch kept clean (the rest: AdA examples)",
                   minimum=0.0, maximum=1.0),
             Hyper("ada_augmix", 0, "ada's AugMix views of each training input, with a JS consistency term "
                   "(0: off; AugMix uses 2)", kind="int", minimum=0),
             Hyper("ada_js", 12.0, "ada's weight lambda of the JS consistency term (with --ada-augmix)",
                   minimum=0.0)) + am.AUGMIX_HYPERS
    select = "clean_acc"
    adversarial = False
    val_metrics = ("ada_acc",)
    uses_perturbation_model = True
    #: the perturbation model is an image-to-image corruption network, not a latent perturbation set
    corruption_network = True
    sample_weights = True

    @classmethod
    def label(cls, cfg) -> str:
        mix = f", AugMix x{cfg.ada_augmix}, lambda={cfg.ada_js:g}" if cfg.ada_augmix else ""
        return f"AdA (nu={cfg.ada_nu:g}, {cfg.ada_steps} steps{mix})"

    @classmethod
    def check_config(cls, cfg) -> None:
        _check_network(cfg)
        am.check_hypers(cfg)

    def __init__(self, ctx):
        super().__init__(ctx)
        self.net = perturbation.corruption_network(self.cfg.perturbation_model, ctx.device)
        self.pert = WeightPerturbation(self.net, self.cfg.ada_nu)
        self._checked = False
        # seeded only with AugMix on: drawing from the run's stream otherwise would change the default run
        self.generator = torch.Generator().manual_seed(ctx.seed()) if self.cfg.ada_augmix else None

    def _loss(self, xc: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self.ctx.autocast():
            logits = self.ctx.forward(self.ctx.fmt(xc))
        return F.cross_entropy(logits.float(), y, reduction="sum")

    def corrupt(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
        """The AdA examples of every sample of x (float32, the configured layout)."""
        c = self.cfg
        if not self._checked:
            with torch.no_grad():
                out = self.net(x[:1])
            if out.shape != x[:1].shape:
                raise ValueError(f"perturbation_model: the corruption network must return its input's shape "
                                 f"{list(x.shape[1:])}, got {list(out.shape[1:])}")
            self._checked = True
        return self.ctx.fmt(ada_examples(self.pert, self._loss, x, y, c.ada_steps, c.ada_step_size, seed,
                                         c.lo, c.hi))

    def ada_inputs(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training inputs of a minibatch, the one place they are made: x_a, a seeded random fraction
        ada_clean of x clean and the rest replaced by AdA examples; with ``ada_augmix`` n > 0 followed by
        its n AugMix views, view-major [(n + 1) * B, ...] (rows j*B .. j*B+B-1: view j, view 0 = x_a)."""
        seed, n = self.ctx.seed(), x.shape[0]
        keep = int(round(self.cfg.ada_clean * n))
        out = x
        if keep < n:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(_rng.derive_seed(seed, 0)))
            idx = perm[keep:].to(x.device, non_blocking=True)
            out = x.clone()
            out[idx] = self.corrupt(x[idx], y[idx], _rng.derive_seed(seed, 1)).to(x.dtype)
            out = self.ctx.fmt(out)
        if not self.cfg.ada_augmix:
            return out
        c = self.cfg
        views = [am.augmix(out, self.generator, c.augmix_severity, c.augmix_width, c.augmix_depth, c.augmix_alpha)
                 for _ in range(c.ada_augmix)]
        return self.ctx.fmt(torch.cat([out] + [v.to(out.dtype) for v in views]))

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The AdA + AugMix loss of logits [(n + 1) * B, C] of [x_a, v_1 .. v_n] (view-major), labels y
        [B]: CE(f(x_a), y) (the run's class weights apply) + ada_js * JS over the n + 1 views."""
        parts = logits.float().split(y.shape[0])
        ce = self.ctx.cross_entropy(parts[0], y)
        if self.cfg.ada_js == 0:
            return ce
        return ce + self.cfg.ada_js * am.js_consistency(parts)

    def step(self, x, y):
        inputs = self.ada_inputs(x, y)
        if not self.cfg.ada_augmix:
            return self.ctx.natural_step(inputs, y)
        b = y.shape[0]

        def closure(net):
            logits = net(inputs)
            return self.loss(logits, y), logits[:b]

        loss, logits = self.ctx.update(closure)
        return self.ctx.stats(loss, logits, y)

    def state_dict(self):
        return {} if self.generator is None else {"generator": self.generator.get_state()}

    def load_state_dict(self, st) -> None:
        if self.generator is not None and "generator" in st:
            self.generator.set_state(st["generator"])

    def validation_counts(self, x: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        """{"ada_acc": the samples of a validation batch classified correctly on their AdA example}."""
        xa = self.corrupt(x, y, self.ctx.seed())
        with torch.no_grad(), self.ctx.autocast():
            return {"ada_acc": (self.ctx.forward(xa).argmax(1) == y).sum()}
