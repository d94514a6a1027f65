"""SmoothMix (Jeong, Park, Kim, Lee, Kim and Shin 2021, "SmoothMix: training confidence-calibrated
smoothed classifiers for certified robustness", NeurIPS): mixup of each input with an adversarial
counterpart found on the smoothed classifier, with labels that decay from the smoothed prediction
towards the uniform distribution along that direction.

Notation: f the base model, K classes, m = ``noise_copies`` noise vectors delta_1..delta_m ~ sigma N(0, I)
per input, drawn once per minibatch (one ``ops.gaussian_noise`` call) and used by every part of the
step; F(x) = (1/m) sum_i softmax(f(x + delta_i)) the smoothed soft classifier on that noise.

1. Adversarial counterpart. From x^(0) = x, T = ``mix_steps`` steps of normalised-gradient ascent of
   the smoothed classifier's loss -log F_y(x^(t)) with step size ``mix_alpha``:
   x^(t+1) = x^(t) + alpha * g / ||g||_2. SmoothMix bounds no norm; on the shared engine that is the
   L2 ball of radius T * alpha (which no T-step iterate can leave, so the projection never acts), and
   the box [lo, hi] (kept: x^(t) stays a valid input). Run on the engine with the fixed noise as its
   per-sample context (as in ``smoothadv``), with the model in eval mode. x_adv = x^(T).
2. Mixup along that direction: lam ~ U[0, 1/2] per sample,
       x_mix = (1 - lam) x + lam x_adv,
       y_mix = (1 - lam) F(x) + lam u,   u = (1/K, ..., 1/K),
   with F(x) the smoothed soft prediction on the clean input (from the training forward, not detached:
   as in the authors' code, the mixup term's gradient also flows into the clean copies through the
   target): the further along the adversarial direction, the closer to uniform the target (the
   paper's confidence calibration).
3. Loss, with every noisy forward in train mode in one call of the net ``ctx.update`` hands the step (DDP):
       L = (1/m) sum_i CE(f(x + delta_i), y)
           + eta_e * 1[argmax F(x) = y] * (1/m) sum_i KL(y_mix || softmax(f(x_mix + delta_i))),
   averaged over the batch; eta_e = eta * min(1, (e + 1) / W) in epoch e (0-based), eta = ``mix_eta``,
   W = ``mix_warmup`` (the authors' code ramps eta linearly over the first W = 10 epochs; W = 0: no ramp). The mixup term applies only to inputs the smoothed
   classifier already gets right (the paper's indicator: mixing a wrong prediction towards uniform
   would teach the error).

Open choices, as made here:
- The paper has no separate consistency term: its regularisation is the mixup KL above, taken per
  noisy copy against one common target y_mix, which also pulls the m noisy predictions of x_mix
  together (a consistency effect). The KL is per copy and averaged, not the KL of the averaged
  prediction (by convexity the average of the per-copy KLs bounds it from above).
- The mixup endpoint is the final iterate x^(T); its start point, the "clean side", is x itself by default
  (``mix_step`` 0, the paper's method).
- The noisy mixed copies use the same noise as the clean ones and the attack.
- lam is drawn per sample from U[0, 1/2] (the paper's range), on the host from a generator seeded by the
  run's stream (resumable; no device synchronisation).
- Defaults: ``mix_steps`` 4, ``mix_alpha`` 0.5, ``mix_eta`` 5, ``noise_copies`` 2, ``sigma`` 0.25,
  ``mix_warmup`` 10: the authors' CIFAR-10 setting at sigma 0.25 (EXPERIMENTS.MD of jh-jeong/smoothmix:
  m 2, T 4, alpha 0.5, eta 5; alpha 1.0 at sigma 0.5 and 2.0 at sigma 1.0, scale ``mix_alpha`` with
  sigma). Their MNIST runs use m 4, alpha 1.0, T 2-3 at sigma 0.25 and eta 1 or 5.
- The authors' code splits each loaded batch into m sub-batches (one optimizer step each); here the
  loaded batch is one step.
- ``mix_steps`` = 0 or ``mix_eta`` = 0 makes x_adv = x or drops the term.

One-step adversary (``mix_step`` = 1; the paper's "SmoothMix + one-step adversary" rows, the authors'
``--mix_step 1``): the clean side becomes the adversary's first iterate, projected on the L2 ball of radius
w_e * s * alpha around x, w_e = min(1, (e + 1) / W) the same warm-up factor as eta's (s = mix_step):
    x_c = x + d * min(1, w_e s alpha / ||d||_2),   d = x^(s) - x,
and x_c replaces x in the whole loss, as in the authors' code (their attacker returns it in place of the
input): the cross-entropy term and the smoothed prediction F (the target y_mix and the indicator) are
taken on the noisy copies of x_c, and x_mix = (1 - lam) x_c + lam x^(T). The attack itself still starts
from x and runs its T steps unchanged (x^(s) is an iterate of the same run, not a separate attack), so the
option costs no extra forward. Since ||x^(1) - x||_2 <= alpha the projection acts only during the warm-up
(it shrinks the first step to w_e alpha, so that epoch 0 trains near x); no box clamp is needed after it
(x and x^(s) lie in [lo, hi], and so does every point between them). Choices: ``mix_step`` must be below
``mix_steps`` (the authors' code silently falls back to x when it is not); any s in [0, T) is accepted (the
paper and code use 0 and 1); the reported training accuracy is then that of the noisy copies of x_c.

The training loss reported is L; the accuracy is that of the clean noisy copies against y.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import Hyper, register
from .gaussian import SIGMA, SmoothingMethod, noise_copies
from .smoothadv import add_noise, draw_noise, smoothed_engine

__all__ = ["SmoothMix", "smoothmix_loss"]


def smoothmix_loss(logits_c: torch.Tensor, logits_mix: torch.Tensor, y: torch.Tensor, lam: torch.Tensor,
                   eta: float) -> torch.Tensor:
    """The SmoothMix loss of the module docstring from the logits of the clean noisy copies and of the
    mixed noisy copies (both [B*m, K], input-major), labels y [B] and the mixing weights lam [B]."""
    B, K = y.shape[0], logits_c.shape[1]
    m = logits_c.shape[0] // B
    logp_c = F.log_softmax(logits_c.float(), dim=1)
    ce = F.nll_loss(logp_c, y.repeat_interleave(m))
    p_smooth = logp_c.exp().view(B, m, K).mean(1)  # F(x); the target keeps its gradient (authors' code)
    correct = (p_smooth.detach().argmax(1) == y).float()
    target = (1.0 - lam).unsqueeze(1) * p_smooth + (lam / K).unsqueeze(1)
    logp_mix = F.log_softmax(logits_mix.float(), dim=1).view(B, m, K)
    t = target.unsqueeze(1)
    kl = (torch.xlogy(t, t) - t * logp_mix).sum(2).mean(1)  # [B]: mean over copies of KL(target || p_i)
    return ce + eta * (correct * kl).mean()


@register
class SmoothMix(SmoothingMethod):
    name = "smoothmix"
    help = "SmoothMix: mixup towards a smoothed adversarial point with labels calibrated to uniform (Jeong et al. 2021)"
    hyper = (SIGMA, noise_copies(2),
             Hyper("mix_steps", 4, "SmoothMix attack steps T (0: no attack)", kind="int", minimum=0),
             Hyper("mix_alpha", 0.5, "SmoothMix attack L2 step size", minimum=0.0),
             Hyper("mix_eta", 5.0, "weight eta of the SmoothMix mixup loss", minimum=0.0),
             Hyper("mix_warmup", 10, "SmoothMix: epochs over which eta ramps up linearly (0: none)", kind="int",
                   minimum=0),
             Hyper("mix_step", 0, "SmoothMix clean side: the attack iterate mixed from (0: x, 1: the one-step "
                   "adversary)", kind="int", minimum=0))
    @classmethod
    def label(cls, cfg) -> str:
        one_step = f", mixed from x^({cfg.mix_step})" if cfg.mix_step else ""
        return (f"SmoothMix (sigma={cfg.sigma:g}, T={cfg.mix_steps}, eta={cfg.mix_eta:g}, m={cfg.noise_copies}"
                f"{one_step})")

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        if cfg.mix_step and cfg.mix_step >= cfg.mix_steps:
            raise ValueError(f"mix_step must be below mix_steps (the clean side is the attack's iterate x^(mix_step)), "
                             f"got mix_step={cfg.mix_step} with mix_steps={cfg.mix_steps}")

    def __init__(self, ctx):
        super().__init__(ctx)
        self.engine = smoothed_engine(ctx)

    def attack(self, x: torch.Tensor, y: torch.Tensor, noise: torch.Tensor):
        """(x_c, x^(T)) with the fixed noise [B, m, ...]: the clean side (x, or with mix_step s the iterate x^(s)
        projected on the warm-up ball, see the module docstring) and the final iterate (x itself when T or alpha
        is 0); eval mode during the attack."""
        c, ctx = self.cfg, self.ctx
        if c.mix_steps == 0 or c.mix_alpha == 0:
            return x, x
        eps, s = c.mix_steps * c.mix_alpha, c.mix_step
        ctx.forward.eval()
        try:
            xa = self.engine.start(x, eps, "clean")
            # one run split at step s (the same iterates as engine.run's T steps), so x^(s) costs nothing extra
            self.engine.iterate(x, xa, y, eps, c.mix_alpha, s, context=noise)
            x_clean = self.clean_side(x, xa) if s else x
            self.engine.iterate(x, xa, y, eps, c.mix_alpha, c.mix_steps - s, context=noise)
            return x_clean, xa
        finally:
            ctx.forward.train()

    def clean_side(self, x: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        """x + d min(1, w_e s alpha / ||d||_2), d = xs - x: the iterate x^(s) on the warm-up ball around x."""
        c = self.cfg
        w = 1.0 if c.mix_warmup == 0 else min(1.0, (self.ctx.epoch + 1) / c.mix_warmup)
        d = (xs - x).float()
        norm = d.flatten(1).norm(dim=1).clamp_min(1e-12)
        scale = torch.clamp(w * c.mix_step * c.mix_alpha / norm, max=1.0).view((-1,) + (1,) * (x.dim() - 1))
        return (x + d * scale).to(x.dtype)

    def eta(self) -> float:
        """The mixup weight of the current epoch: mix_eta * min(1, (epoch + 1) / mix_warmup)."""
        c = self.cfg
        return c.mix_eta if c.mix_warmup == 0 else c.mix_eta * min(1.0, (self.ctx.epoch + 1) / c.mix_warmup)

    def mix_weights(self, n: int, device) -> torch.Tensor:
        """lam ~ U[0, 1/2] per sample, from a host generator seeded by the run's stream."""
        g = torch.Generator().manual_seed(self.ctx.seed())
        return (0.5 * torch.rand(n, generator=g)).to(device, non_blocking=True)

    def step(self, x, y):
        c, ctx = self.cfg, self.ctx
        m = c.noise_copies
        noise = draw_noise(x, m, c.sigma, ctx.seed())
        x_c, x_adv = self.attack(x, y, noise)
        lam = self.mix_weights(x.shape[0], x.device)
        x_mix = torch.lerp(x_c, x_adv, lam.view((-1,) + (1,) * (x.dim() - 1)))  # (1 - lam) x_c + lam x_adv
        xn, xn_mix = ctx.fmt(add_noise(x_c, noise)), ctx.fmt(add_noise(x_mix, noise))
        eta = self.eta()

        def closure(net):
            logits_c, logits_mix = net(xn, xn_mix)
            return smoothmix_loss(logits_c, logits_mix, y, lam, eta), logits_c

        loss, logits = ctx.update(closure)
        return ctx.stats(loss, logits, y.repeat_interleave(m))
