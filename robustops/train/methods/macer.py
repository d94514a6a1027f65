"""MACER: maximizing the certified radius of the smoothed classifier (Zhai et al., ICLR 2020).

Each input x gets k noisy copies x + delta_j, delta_j ~ N(0, sigma^2 I), from one fused
``gaussian_noise`` call (rows b*k .. b*k+k-1 belong to input b); z_j are their logits. Two soft
smoothed predictions are formed from them:

    g(x)      = (1/k) sum_j softmax(z_j)          (for the classification term)
    g_beta(x) = (1/k) sum_j softmax(beta * z_j)   (for the radius term; beta: inverse temperature)

and the per-input loss is

    L = -log g(x)_y  +  lambda * (sigma / 2) * 1[argmax g_beta(x) = y] * max(gamma - xi, 0),
    xi = Phi^-1(q_1) - Phi^-1(q_2),

where q_1 >= q_2 are the two largest entries of g_beta(x). For a correctly classified input q_1 is
the label's probability and q_2 the runner-up's, so (sigma / 2) * xi is the soft certified radius
sigma/2 (Phi^-1(p_y) - Phi^-1(p_second)) and the hinge asks for a radius of at least sigma*gamma/2;
misclassified inputs get only the classification term. The loss is averaged over the minibatch (the
hinge term too: it is summed over the masked inputs and divided by the batch size, as in the
authors' code).

Choices, stated:

- The paper's masking keeps the correctly classified inputs with |xi| <= gamma and finite xi; for
  them xi >= 0, and dropping xi > gamma is exactly where the hinge is zero, so the mask is
  "correct" and the hinge max(gamma - xi, 0) (gradient 0 beyond gamma).
- The classification term uses the plain softmax (beta = 1) and the radius term the beta softmax,
  as the authors' code does; -log g(x)_y is computed as -(logsumexp_j log softmax(z_j)_y - log k),
  finite without the authors' +1e-10.
- Phi^-1 is ``torch.special.ndtri``. The radius term is computed in float64 with q_1, q_2 clamped
  to [1e-12, 1 - 1e-12] (so |Phi^-1| <= 7.03 and xi <= 14.07 stays finite; where the clamp acts,
  the gradient through that probability is 0). The authors instead drop inputs whose xi is not
  finite; the two agree wherever xi <= gamma = 8 needs no clamp.
- Warm-up (``macer_warmup`` epochs, default 0): for the first epochs lambda is taken as 0, i.e. the
  model trains on the smoothed cross-entropy alone (Gaussian-noise training on k copies through
  g(x)). The authors' main script has no warm-up (440 CIFAR-10 epochs with lambda throughout);
  Jeong and Shin's re-runs of MACER defer the radius term for the first learning-rate phase (30 of
  90 MNIST epochs), which ``macer_warmup=30`` reproduces. The epoch is the context's ``epoch``, read off the
  optimizer-step count (optimizer steps // steps per epoch), which checkpoints restore, so a
  resumed run leaves warm-up at the same step; a run built without ``steps_per_epoch`` counts
  each optimizer step as an epoch.
- The training accuracy of the epoch log counts argmax g(x) == y.

Defaults from the paper (CIFAR-10): k = 16, beta = 16, gamma = 8, lambda = 12 (its setting for
sigma = 0.25 and 0.5; at sigma = 1.0 it uses lambda = 4, pass ``macer_lambda=4``). Published ACR
0.556 / 0.726 / 0.792 at sigma 0.25 / 0.5 / 1.0. Names: ``noise_copies`` (k, shared with
``consistency``), ``macer_beta``, ``macer_gamma``, ``macer_lambda``, ``macer_warmup``; ``sigma`` is
shared with ``gaussian`` and is also the noise level validation and ``certify`` use."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ... import ops
from ..registry import Hyper, register
from .gaussian import SIGMA, SmoothingMethod, noise_copies

#: The clamp of the soft-smoothed probabilities before Phi^-1 (float64): [PROB_EPS, 1 - PROB_EPS].
PROB_EPS = 1e-12


def smoothed_ce(logits: torch.Tensor, y: torch.Tensor, k: int):
    """Per-input -log((1/k) sum_j softmax(z_j)_y) from logits [B*k, C] (input-major), and g(x) [B, C]."""
    logp = F.log_softmax(logits.float(), dim=1).unflatten(0, (-1, k))       # [B, k, C]
    log_g = torch.logsumexp(logp, dim=1) - math.log(k)                       # [B, C]
    return -log_g.gather(1, y[:, None]).squeeze(1), log_g.exp()


def radius_hinge(logits: torch.Tensor, y: torch.Tensor, k: int, sigma: float, beta: float, gamma: float):
    """Per-input (sigma/2) * 1[correct] * max(gamma - xi, 0) of MACER from logits [B*k, C] (float64)."""
    g = F.softmax(beta * logits.double(), dim=1).unflatten(0, (-1, k)).mean(1)   # g_beta(x), [B, C]
    top, idx = g.topk(2, dim=1)
    q = top.clamp(PROB_EPS, 1.0 - PROB_EPS)
    xi = torch.special.ndtri(q[:, 0]) - torch.special.ndtri(q[:, 1])
    correct = idx[:, 0] == y
    return (sigma / 2) * torch.where(correct, (gamma - xi).clamp_min(0), torch.zeros_like(xi))


@register
class Macer(SmoothingMethod):
    name = "macer"
    help = "MACER: smoothed cross-entropy + lambda * hinge on the soft certified radius (Zhai et al. 2020)"
    hyper = (SIGMA, noise_copies(16),
             Hyper("macer_beta", 16.0, "macer: inverse temperature beta of the soft smoothed classifier",
                   minimum=0.0, strict=True),
             Hyper("macer_gamma", 8.0, "macer: hinge margin gamma on Phi^-1(p_y) - Phi^-1(p_second)", minimum=0.0),
             Hyper("macer_lambda", 12.0, "macer: weight lambda of the radius hinge", minimum=0.0),
             Hyper("macer_warmup", 0, "macer: epochs of warm-up with lambda = 0 (smoothed cross-entropy only)",
                   kind="int", minimum=0))
    @classmethod
    def label(cls, cfg) -> str:
        warm = f", warm-up {cfg.macer_warmup}" if cfg.macer_warmup else ""
        return (f"MACER (sigma={cfg.sigma:g}, k={cfg.noise_copies}, lambda={cfg.macer_lambda:g}, "
                f"gamma={cfg.macer_gamma:g}, beta={cfg.macer_beta:g}{warm})")

    def epoch(self) -> int:
        """The current (0-based) training epoch, from the optimizer-step count."""
        return self.ctx.epoch

    def loss(self, logits: torch.Tensor, y: torch.Tensor, lam: float):
        """MACER's loss of logits [B*k, C] (input-major), labels y [B] and the weight lam: (loss, g(x))."""
        c = self.cfg
        ce, g = smoothed_ce(logits, y, c.noise_copies)
        loss = ce.mean()
        if lam != 0 and c.sigma > 0:
            hinge = radius_hinge(logits, y, c.noise_copies, c.sigma, c.macer_beta, c.macer_gamma)
            loss = loss + lam * hinge.mean().to(loss.dtype)
        return loss, g

    def step(self, x, y):
        c, ctx = self.cfg, self.ctx
        lam = 0.0 if self.epoch() < c.macer_warmup else c.macer_lambda
        xn = ctx.fmt(ops.gaussian_noise(x, c.noise_copies, c.sigma, seed=ctx.seed()))

        def closure(net):
            return self.loss(net(xn), y, lam)

        loss, g = ctx.update(closure)
        return ctx.stats(loss, g, y)
