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

       L = cls_weight * CE(f(G(x_adv)), y) + rec_weight * MSE(G(x_adv), x) + gan_weight * L_G,
       L_G = -log sigmoid(D(G(x_adv)))                       (the non-saturating generator loss)

   MSE the mean squared error over the elements (its scale does not depend on the image size).
3. Unless gan_weight is 0, one Adam step of the discriminator D (its own optimiser, lr ``disc_lr``, betas
   (0.5, 0.999)) on

       L_D = -log sigmoid(D(x)) - log(1 - sigmoid(D(G(x_adv)))),

   with G(x_adv) the denoised batch of step 2's forward (detached), D in fp32 outside autocast.

What the authors' code does (kaleab-k/VideoAT, ``training.py`` ``train_epoch`` with ``use_ape`` and a
discriminator D, read at commit 17de5efd; ``main.py`` builds ``Sequential(G, C)``); the paper's method
section could not be retrieved (its abstract: "Generative AT further couples AT with a denoising generative
adversarial network"), so the code is the reference. It is APE-GAN (Shen et al. 2017) in front of the
classifier, per minibatch:

a. x_adv: L-inf PGD (advertorch, random start, step size = eps) against ``Sequential(G, C)``, G in train mode;
b. one Adam step of D on ``BCE(D(x_adv), 1) + BCE(D(G(x_adv)), 0)`` (D ends in a sigmoid; the two terms
   summed): D's "real" input is the *adversarial* batch, not the clean one;
c. two Adam steps of G on ``0.7 * MSE(G(x_adv), x) + 0.3 * BCE(D(G(x_adv)), 1)``;
d. one step of the classifier's own optimiser (SGD over C's parameters only) on ``CE(C(G(x_adv)), y)``
   (G's parameters receive that gradient too, but opt_G zeroes it before its next use: CE never trains G);
e. opt_G and opt_D are Adam(lr 2e-4, betas (0.5, 0.999)), created anew at every epoch (their moments reset).

The code's G is a 3-D conv encoder-decoder ending in a sigmoid, its D a 3-D conv net with BatchNorm, both on
whole clips. (The stored ``main.py`` has the line building D commented out, so the run it launches passes
D=None: G is then loaded pre-trained, frozen in eval mode, and the attack starts from G(x); the end-to-end
path above, with its discriminator, is the denoising GAN the paper's abstract describes.)

This method, and where and why it differs:

- the loss weights are the code's: ``rec_weight`` 0.7 on the MSE and ``gan_weight`` 0.3 on the generator's
  BCE; ``disc_lr`` 2e-4 and betas (0.5, 0.999) are the code's; D's loss is the code's sum of two BCEs;
- one step of the pipeline (G and C together) through ``ctx.update`` with the run's optimiser, on
  ``cls_weight * CE + rec_weight * MSE + gan_weight * L_G``, instead of two Adam steps of G and one SGD
  step of C: ``ctx.update`` is the one path that gives every method mixed precision with loss scaling,
  gradient clipping, DDP's gradient averaging, AWP, EMA, coresets' sample weights, the run's learning-rate
  schedule and exact resume; a second optimiser stepping G outside it would bypass all of them. So G also
  receives the classifier's CE gradient (``cls_weight`` 1; the code's G never does) and G's learning rate is
  the run's. ``cls_weight`` 0 drops the CE: the classifier then only sees weight decay, it is not frozen;
- the order: the pipeline's step first, then D's step on that step's denoised batch (the code steps D
  first on a fresh G(x_adv)); this saves one denoiser forward per batch;
- D's "real" input is the clean x (APE-GAN's and pix2pix's), not the code's x_adv: with x_adv as "real",
  the generator's GAN term pulls G(x_adv) towards the adversarial inputs, against its reconstruction term;
- D's optimiser persists over epochs and is checkpointed (exact resume), not re-created each epoch;
- the attack is the run's threat model (eps / alpha / steps / norm / random_start), not step size = eps;
- the denoiser is :class:`~robustops.models.Denoiser` (a residual conv net starting as the identity, output
  clamped to the box) and D is :class:`~robustops.models.Discriminator` (two strided convs, one logit per
  image, BCE on logits: the code's sigmoid + BCE, numerically safer); video [B, T, C, H, W] is denoised and
  judged frame by frame (T folded into B), not by 3-D convolutions;
- ``gan_weight`` 0 skips D's step (its loss is then logged as NaN): nothing would read D;
- D's initial weights come from a seed of the run's generator and, when distributed, rank 0's are
  broadcast; its gradients are averaged over the processes (one flattened all-reduce) so every rank keeps
  the same D.

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
from ..collective import sync_tensors_
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
    """-mean log sigmoid(D(real)) - mean log(1 - sigmoid(D(fake))): the authors' code sums the two terms."""
    return (F.binary_cross_entropy_with_logits(logits_real, torch.ones_like(logits_real))
            + F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake)))


@register
class GenerativeAT(Method):
    name = "denoise"
    help = ("generative AT: PGD through a denoiser + classifier, trained on CE + rec_weight MSE(G(x_adv), x) + "
            "gan_weight * GAN loss against a discriminator (Kinfu & Vidal 2022; APE-GAN as in their code)")
    hyper = (Hyper("rec_weight", 0.7, "denoise: weight of the reconstruction loss MSE(G(x_adv), x) (the authors' "
                   "code: 0.7)", minimum=0.0),
             Hyper("gan_weight", 0.3, "denoise: weight of the denoiser's GAN loss (the authors' code: 0.3; 0 skips "
                   "the discriminator)", minimum=0.0),
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
            sync_tensors_([t for t in (*self.disc.parameters(), *self.disc.buffers()) if t.is_floating_point()],
                          "broadcast")
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
        # gan_weight 0: nothing reads D, so it takes no step (its loss is logged as NaN)
        d_loss = self.disc_step(x, x_hat.detach()) if c.gan_weight > 0 else rec.new_zeros((), dtype=torch.float64)
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
            sync_tensors_([p.grad for p in self.disc.parameters()], "mean")
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
        return {"rec_loss": rec / n, "gan_g_loss": g / n,
                "gan_d_loss": d / n if self.cfg.gan_weight > 0 else float("nan")}

    def state_dict(self):
        return {"disc": {k: v.detach().cpu().clone() for k, v in self.disc.state_dict().items()},
                "disc_opt": self.disc_opt.state_dict()}

    def load_state_dict(self, st) -> None:
        if "disc" in st:
            self.disc.load_state_dict(st["disc"])
            self.disc_opt.load_state_dict(st["disc_opt"])
