"""Consistency regularization for randomized smoothing (Jeong and Shin, NeurIPS 2020).

Each input x of a minibatch gets m noisy copies x + delta_i, delta_i ~ N(0, sigma^2 I), drawn by one
fused ``gaussian_noise`` call (rows b*m .. b*m+m-1 belong to input b). With p_i = softmax(f(x + delta_i))
and their mean p_bar = (1/m) sum_i p_i, the per-input loss is

    L = (1/m) sum_i CE(f(x + delta_i), y)                      (Gaussian-noise training on m copies)
      + lambda * (1/m) sum_i KL(p_bar || p_i)                  (consistency of the noisy predictions)
      + eta * H(p_bar),   H(p) = -sum_c p_c log p_c            (entropy of the mean prediction)

averaged over the minibatch. Choices, stated:

- p_bar is not detached: the gradient flows through both sides of the KL and through the entropy, as
  in the paper's objective (it has no stop-gradient).
- log p_bar is computed as logsumexp_i(log p_i) - log m, exact and finite for finite logits (no
  clamp on p_bar is needed).
- The losses are computed in float32 (logits cast up) also under autocast.
- With m = 1 the KL term is identically 0, and with lambda = eta = 0 the loss is exactly the
  cross-entropy of Gaussian-noise training on the same noise (a test checks this); a zero lambda or
  eta skips its term.
- The training accuracy of the epoch log counts argmax p_bar == y.

Defaults: m = 2 and eta = 0.5 (the paper's defaults for all its Gaussian + consistency runs) and
lambda = 10. The paper tunes lambda per noise level; its CIFAR-10 results use lambda = 20 at
sigma = 0.25 and lambda = 10 at sigma = 0.5 and 1.0 (published ACR 0.552 / 0.726 / 0.756), so at
sigma = 0.25 pass ``consistency_lambda=20`` to match. The hyperparameter names: ``noise_copies`` (m;
shared with ``macer``, whose k it is), ``consistency_lambda``, ``consistency_eta``; ``sigma`` is
shared with ``gaussian`` and is also the noise level validation and ``certify`` use."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ... import ops
from ..registry import Hyper, register
from .gaussian import SIGMA, SmoothingMethod, noise_copies


def consistency_terms(logits: torch.Tensor, m: int):
    """(KL, entropy) of the consistency loss from logits [B*m, C] (rows of input b contiguous): the
    batch means of (1/m) sum_i KL(p_bar || p_i) and of H(p_bar), and p_bar itself [B, C]."""
    logp = F.log_softmax(logits.float(), dim=1).unflatten(0, (-1, m))          # [B, m, C]
    log_pbar = torch.logsumexp(logp, dim=1) - math.log(m)                       # [B, C]
    pbar = log_pbar.exp()
    kl = (pbar.unsqueeze(1) * (log_pbar.unsqueeze(1) - logp)).sum(2).mean()      # mean over b and i
    ent = -(pbar * log_pbar).sum(1).mean()
    return kl, ent, pbar


@register
class Consistency(SmoothingMethod):
    name = "consistency"
    help = ("Gaussian noise on m copies + lambda * KL(mean prediction, each copy) + eta * entropy of the mean "
            "(Jeong & Shin 2020)")
    hyper = (SIGMA, noise_copies(2),
             Hyper("consistency_lambda", 10.0, "consistency: weight lambda of the KL term", minimum=0.0),
             Hyper("consistency_eta", 0.5, "consistency: weight eta of the entropy of the mean prediction",
                   minimum=0.0))
    @classmethod
    def label(cls, cfg) -> str:
        return (f"consistency (sigma={cfg.sigma:g}, m={cfg.noise_copies}, lambda={cfg.consistency_lambda:g}, "
                f"eta={cfg.consistency_eta:g})")

    def loss(self, logits: torch.Tensor, y: torch.Tensor):
        """The loss of logits [B*m, C] of the noisy copies (input-major) and labels y [B]: (loss, p_bar)."""
        c = self.cfg
        m = c.noise_copies
        loss = F.cross_entropy(logits.float(), y.repeat_interleave(m) if m > 1 else y)
        if c.consistency_lambda == 0 and c.consistency_eta == 0:
            return loss, logits.detach().float().unflatten(0, (-1, m)).softmax(2).mean(1)
        kl, ent, pbar = consistency_terms(logits, m)
        if c.consistency_lambda != 0:
            loss = loss + c.consistency_lambda * kl
        if c.consistency_eta != 0:
            loss = loss + c.consistency_eta * ent
        return loss, pbar

    def step(self, x, y):
        c, ctx = self.cfg, self.ctx
        xn = ctx.fmt(ops.gaussian_noise(x, c.noise_copies, c.sigma, seed=ctx.seed()))

        def closure(net):
            return self.loss(net(xn), y)

        loss, pbar = ctx.update(closure)
        return ctx.stats(loss, pbar, y)
