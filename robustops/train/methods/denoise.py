"""Generative adversarial training: adversarial training coupled with a denoising GAN (Kinfu & Vidal,
"Analysis and extensions of adversarial training for video classification", CVPR Workshops 2022, arXiv
2206.07953, their "Generative AT").

The model is a :class:`~robustops.models.Denoised` pipeline f(G(x)): a denoiser G in front of the
classifier f (``get_model("denoised_<name>")``; ``robustops train --method denoise`` picks the denoised
variant of ``--model`` itself). Per minibatch:

1. x_adv: PGD-k against the whole pipeline (the run's threat model eps / alpha / steps / norm /
   random_start; the model in train mode, as ``pgd``): the attack is white-box through the denoiser,
   as is every later attack, evaluation and certification of the saved model.
2. One step of the pipeline's parameters (denoiser and classifier, the run's optimiser, through
   ``ctx.update``) on

       L = cls_weight * CE(f(G(x_adv)), y) + rec_weight * ||G(x_adv) - x||^2 + gan_weight * L_G,
       L_G = -log sigmoid(D(G(x_adv)))                       (the non-saturating generator loss)

   the reconstruction term the mean squared error over the elements (so its scale does not depend on
   the image size).
3. One Adam step of the discriminator D (its own optimiser, lr ``disc_lr``, betas (0.5, 0.999)) on

       L_D = 1/2 [ -log sigmoid(D(x)) - log(1 - sigmoid(D(G(x_adv)))) ],

   with G(x_adv) the denoised batch of step 2's forward (detached), D in fp32 outside autocast.

What the paper says and what is this module's reading: the text of the paper's method section could not
be retrieved when this was written (only its abstract: "Generative AT further couples AT with a denoising
generative adversarial network"), so this is the closest faithful reading of a denoising GAN in front of an
adversarially trained classifier, with pix2pix's (Isola et al. 2017) losses and order of terms:

- the classifier is trained jointly with the denoiser on f(G(x_adv)) (the "AT" the GAN is coupled with;
  ``cls_weight`` 0 drops its loss: the classifier then only sees weight decay, it is not frozen);
- the reconstruction norm: squared L2 (the pix2pix code uses L1); the weights: pix2pix's ratio of the
  reconstruction to the adversarial term (100 : 1) as ``rec_weight`` 1, ``gan_weight`` 0.01; ``disc_lr``
  2e-4 and Adam betas (0.5, 0.999) are pix2pix's / DCGAN's;
- the order: the pipeline's step first, then the discriminator's on that step's denoised batch (pix2pix
  steps D first on a fresh G output; this order saves one denoiser forward per batch);
- the discriminator is not conditioned on x_adv (an unconditional GAN on denoised vs clean images) and is
  :class:`~robustops.models.Discriminator` (two strided convs, one logit per image); its initial weights
  come from a seed of the run's generator and, when distributed, rank 0's are broadcast; its gradients are
  averaged over the processes (one all-reduce per parameter) so every rank keeps the same D;
- video [B, T, C, H, W]: the denoiser and the discriminator work frame by frame (T folded into B).

The training loss and accuracy reported per step are CE(f(G(x_adv)), y) and its accuracy (comparable with
``pgd``'s); the epoch log adds ``rec_loss``, ``gan_g_loss`` and ``gan_d_loss`` (epoch means over all
processes). The discriminator and its optimiser are the method's checkpointed state (exact resume).
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...models import Denoised, Discriminator, unwrap
from ..registry import Hyper, Method, register

__all__ = ["GenerativeAT", "find_denoised", "generator_loss", "discriminator_loss"]


def find_denoised(model: nn.Module) -> Denoised:
    """The :class:`~robustops.models.Denoised` the model is (DDP / torch.compile wrappers stripped); a
    ValueError naming what is needed otherwise."""
    inner = unwrap(model)
    if isinstance(inner, Denoised):
        return inner
    raise ValueError(f"model: method denoise needs a model with a denoiser in front of the classifier (a "
                    f"robustops.models.Denoised: get_model('denoised_small_cnn'), or Denoised(Denoiser(C), "
                    f"classifier)); got a {type(inner).__name__}")


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """-mean log sigmoid(D(fake)): the non-saturating GAN loss of the generator (the denoiser)."""
    return F.binary_cross_entropy_with_logits(logits_fake, torch.ones_like(logits_fake))


def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """1/2 [-mean log sigmoid(D(real)) - mean log(1 - sigmoid(D(fake)))] (pix2pix halves it)."""
    return 0.5 * (F.binary_cross_entropy_with_logits(logits_real, torch.ones_like(logits_real))
                  + F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake)))


@register
class GenerativeAT(Method):
    name = "denoise"
    help = ("generative AT: PGD through a denoiser + classifier, trained on CE + rec_weight ||G(x_adv) - x||^2 + "
            "gan_weight * GAN loss against a discriminator (Kinfu & Vidal 2022)")
    hyper = (Hyper("rec_weight", 1.0, "denoise: weight of the reconstruction loss ||G(x_adv) - x||^2", minimum=0.0),
             Hyper("gan_weight", 0.01, "denoise: weight lambda_adv of the denoiser's GAN loss", minimum=0.0),
             Hyper("cls_weight", 1.0, "denoise: weight of the classifier's CE on G(x_adv)", minimum=0.0),
             Hyper("disc_lr", 2e-4, "denoise: the discriminator's Adam learning rate", minimum=0.0, strict=True))
    log_metrics = ("rec_loss", "gan_g_loss", "gan_d_loss")
    budget_schedules = True

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.mean is not None:
            raise ValueError("mean / std: method denoise needs the normalisation inside the model (get_model(..., "
                             "mean=, std=) puts it behind the denoiser), so that the denoiser works on pixels; "
                             "give no mean / std to fit")

    @staticmethod
    def model_variant(name: str) -> str:
        """The model name this method trains for ``--model name``: "denoised_<name>" (unchanged when it is one)."""
        from ...models import DENOISED_PREFIX

        return name if name.lower().replace("-", "_").startswith(DENOISED_PREFIX) else DENOISED_PREFIX + name

    def __init__(self, ctx):
        super().__init__(ctx)
        self.pipeline = find_denoised(ctx.forward)
        channels = next(m for m in self.pipeline.denoiser.modules() if isinstance(m, nn.Conv2d)).in_channels
        with torch.random.fork_rng(devices=[]):
            # D's initial weights from the run's seeds, not the global stream; the CPU generator only
            # (torch.manual_seed would also reseed CUDA's)
            torch.default_generator.manual_seed(ctx.seed())
            self.disc = Discriminator(channels).to(ctx.device)
        if ctx.world_size > 1:
            import torch.distributed as dist

            for p in self.disc.parameters():
                dist.broadcast(p.data, 0)
        self.disc_opt = torch.optim.Adam(self.disc.parameters(), lr=self.cfg.disc_lr, betas=(0.5, 0.999))
        # epoch sums of rec, G and D losses and the sample count (device tensors: no sync per step)
        self._sums = torch.zeros(4, dtype=torch.float64, device=ctx.device)

    def perturb(self, x: torch.Tensor, y: torch.Tensor, eps, alpha) -> torch.Tensor:
        """PGD against the whole pipeline (white-box through the denoiser), the model in its current mode."""
        c = self.cfg
        return self.ctx.attack(x, y, eps, alpha, c.steps, c.norm, c.random_start)

    def step(self, x, y):
        c, ctx = self.cfg, self.ctx
        eps, alpha = ctx.budget(x, y)
        x_adv = self.perturb(x, y, eps, alpha)

        def closure(net):
            with self.pipeline.capture() as seen:
                logits = net(x_adv)
            x_hat = seen[-1]
            ce = ctx.cross_entropy(logits, y)
            rec = F.mse_loss(x_hat.float(), x.float())
            gan = generator_loss(self.disc(x_hat).float()) if c.gan_weight > 0 else rec.new_zeros(())
            return c.cls_weight * ce + c.rec_weight * rec + c.gan_weight * gan, (ce, rec, gan, logits, x_hat)

        _, (ce, rec, gan, logits, x_hat) = ctx.update(closure)
        d_loss = self.disc_step(x, x_hat.detach())
        self._sums += torch.stack([rec.detach().double(), gan.detach().double(), d_loss.double(),
                                   torch.ones((), dtype=torch.float64, device=ctx.device)]) * y.shape[0]
        return ctx.stats(ce, logits, y)

    def disc_step(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """One Adam step of the discriminator on clean (real) vs denoised (fake) inputs, fp32; its gradients
        averaged over the processes when distributed. Returns the loss (detached)."""
        self.disc_opt.zero_grad(set_to_none=True)  # also drops the grads the generator's loss left on D
        loss = discriminator_loss(self.disc(real.float()), self.disc(fake.float()))
        loss.backward()
        if self.ctx.world_size > 1:
            import torch.distributed as dist

            for p in self.disc.parameters():
                dist.all_reduce(p.grad)
                p.grad /= self.ctx.world_size
        self.disc_opt.step()
        return loss.detach()

    def log_values(self) -> Dict[str, float]:
        s = self._sums.clone()
        self._sums.zero_()
        if self.ctx.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(s)
        rec, g, d, n = s.tolist()
        if not n:
            return {k: float("nan") for k in self.log_metrics}
        return {"rec_loss": rec / n, "gan_g_loss": g / n, "gan_d_loss": d / n}

    def state_dict(self):
        return {"disc": {k: v.detach().cpu().clone() for k, v in self.disc.state_dict().items()},
                "disc_opt": self.disc_opt.state_dict()}

    def load_state_dict(self, st) -> None:
        if "disc" in st:
            self.disc.load_state_dict(st["disc"])
            self.disc_opt.load_state_dict(st["disc_opt"])
