"""SmoothAdv (Salman et al. 2019, "Provably robust deep learning via adversarially trained smoothed
classifiers", NeurIPS): adversarial training of the smoothed classifier itself.

The smoothed *soft* classifier of a base model f at noise level sigma is
G(x) = E_delta[softmax(f(x + delta))], delta ~ N(0, sigma^2 I). SmoothAdv attacks G, not f: with
m = ``noise_copies`` (the paper's m_train) noise vectors delta_1..delta_m drawn once per minibatch
(one ``ops.gaussian_noise`` call) and held fixed over the attack's steps, it maximises over x' in the L2 ball of radius
eps = ``adv_eps`` around x (and in the box [lo, hi])

    J(x') = -log( (1/m) * sum_i softmax_y(f(x' + delta_i)) )

(computed stably as log m - logsumexp_i log_softmax_y(f(x' + delta_i))), by ``adv_steps`` steps of
L2 PGD (normalised-gradient step of size alpha = 2 * eps / adv_steps, then projection; the step of
``ops.pgd_step_``) from x' = x. The base model is then trained on the same noisy adversarial copies:

    L = (1/m) * sum_i CE(f(x_adv + delta_i), y)      (averaged over the batch too).

The attack runs on the shared projected-gradient engine; the fixed noise travels as the engine's
per-sample context (a Tensor[B, m, ...]), and the engine's forward is
forward(x', noise) = model(x' repeated m times + noise), input-major (rows b*m .. b*m+m-1 belong to
x[b]), the layout ``ops.gaussian_noise`` writes.

Open choices, as made here:
- The attack runs with the model in eval mode (as TRADES does here, and as the authors' code does),
  the training forward in train mode.
- The noisy copies x' + delta_i are not clamped to [lo, hi] (randomized smoothing certifies the
  un-clamped noise); the iterate x' itself is kept in the box.
- The same noise serves the attack and the training step (the paper's algorithm reuses it).
- Defaults: ``noise_copies`` 2, ``adv_steps`` 2, ``adv_eps`` 0.5, ``sigma`` 0.25. The paper sweeps
  m_train in {1, 2, 4, 8}, steps in {1, 2, 4, 8, 10} and eps in {0.25, 0.5, 1.0, 2.0}, with eps
  growing with sigma; 0.5 at sigma 0.25 is one of its CIFAR-10 settings, and two steps with two
  noise samples keep the cost at about 3x Gaussian training with two copies. Scale ``adv_eps`` with
  ``sigma`` (e.g. 2 * sigma) when changing the noise level.
- ``adv_steps`` = 0 or ``adv_eps`` = 0 skips the attack: training is then Gaussian-noise training
  with m copies per input (m = 1: the ``gaussian`` method, draw for draw).
- Warm-up: eps grows linearly over the first W = ``adv_warmup`` epochs, eps_e = adv_eps * min(1, (e + 1) / W)
  in epoch e (0-based; the step size follows it), as the authors' training code does with its --warmup
  (Jeong et al.'s SmoothAdv re-runs use W = 10, the default here; W = 0 or 1: no ramp).

The training loss and accuracy reported are those of the m * B noisy adversarial copies against y.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...attacks.engine import Engine
from ...smoothing.soft import add_noise, smoothed_nll
from ..registry import Hyper, register
from .gaussian import SIGMA, SmoothingMethod, draw_noise, noise_copies

__all__ = ["SmoothAdv", "smoothed_nll", "draw_noise", "add_noise"]


class _NoisyForward:
    """The engine's forward: model(fmt(x' + noise)) over the m fixed noisy copies of each sample."""

    def __init__(self, ctx):
        self.ctx = ctx

    def __call__(self, xa, noise):
        ctx = self.ctx
        return ctx.forward(ctx.fmt(add_noise(xa, noise)))


def smoothed_engine(ctx) -> Engine:
    """The shared projected-gradient engine on the smoothed soft classifier's loss (L2, the run's box,
    autocast and fp16 loss scaling); its forward takes the fixed noise as context."""
    return ctx.engine("l2", smoothed_nll, forward=_NoisyForward(ctx))


@register
class SmoothAdv(SmoothingMethod):
    name = "smoothadv"
    help = "SmoothAdv: L2 PGD on the smoothed soft classifier, then training on its noisy copies (Salman et al. 2019)"
    hyper = (SIGMA, noise_copies(2),
             Hyper("adv_eps", 0.5, "L2 radius of the SmoothAdv attack", minimum=0.0),
             Hyper("adv_steps", 2, "PGD steps of the SmoothAdv attack (0: Gaussian training)", kind="int", minimum=0),
             Hyper("adv_warmup", 10, "SmoothAdv: epochs over which eps ramps up linearly (0: none)", kind="int",
                   minimum=0))
    @classmethod
    def label(cls, cfg) -> str:
        return f"SmoothAdv (sigma={cfg.sigma:g}, eps={cfg.adv_eps:g}, PGD-{cfg.adv_steps}, m={cfg.noise_copies})"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.engine = smoothed_engine(ctx)

    def eps(self) -> float:
        """The attack radius of the current epoch: adv_eps * min(1, (epoch + 1) / adv_warmup)."""
        c = self.cfg
        return c.adv_eps if c.adv_warmup == 0 else c.adv_eps * min(1.0, (self.ctx.epoch + 1) / c.adv_warmup)

    def attack(self, x: torch.Tensor, y: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_adv: the SmoothAdv PGD on x with the fixed noise [B, m, ...] (x itself when there is no attack).
        The model is put in eval mode for the attack and back in train mode after it."""
        c, ctx = self.cfg, self.ctx
        if c.adv_steps == 0 or c.adv_eps == 0:
            return x
        ctx.forward.eval()
        try:
            eps = self.eps()
            return self.engine.run(x, y, eps, 2.0 * eps / c.adv_steps, c.adv_steps, start="clean",
                                   evaluate=False, context=noise).x_adv
        finally:
            ctx.forward.train()

    def step(self, x, y):
        c, ctx = self.cfg, self.ctx
        m = c.noise_copies
        noise = draw_noise(x, m, c.sigma, ctx.seed())
        x_adv = self.attack(x, y, noise)
        xn = ctx.fmt(add_noise(x_adv, noise))
        yn = y.repeat_interleave(m)

        def closure(net):
            logits = net(xn)
            return F.cross_entropy(logits.float(), yn), logits

        loss, logits = ctx.update(closure)
        return ctx.stats(loss, logits, yn)
