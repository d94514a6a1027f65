"""FGSM-SDI: fast adversarial training from a learned, sample-dependent initialisation (Jia, Zhang, Wu,
Wang and Cao, "Boosting fast adversarial training with learnable adversarial initialization", IEEE TIP
2022, arXiv 2110.05007).

A small generator G, conditioned on the clean input and the sign of its input gradient, proposes the
start of a single FGSM step; G and the classifier f are trained against each other:

    g0     = grad_x CE(f(x), y)                                    (plain CE, the model in train mode)
    delta0 = G([x, sign(g0)]) = eps * tanh(G'(...))                |delta0| < eps
    x0     = clamp(x + delta0, lo, hi)
    x_adv  = clamp(x + clamp(x0 + alpha * sign(grad_x CE(f(x0), y)) - x, -eps, eps), lo, hi)   (ops.pgd_step_)
    classifier:  min_w   CE_s(f_w(x_adv), y)                        (label-smoothed, see below)
    generator:   max_G   CE_s(f(x_adv(G)), y)    on batches 0, k, 2k, ... of every epoch, one Adam step

The generator's objective, as the official code computes it (FGSM_SDI_loss.py, read for reference only):
the classifier's label-smoothed loss at the adversarial example *after* the FGSM step, differentiated
through delta0 with the step's direction sign(grad) held constant (it is piecewise constant in delta0:
the official code takes that gradient without create_graph, so no second-order term), through the two
clamps. On a generator batch the classifier's own step is recomputed with the updated generator; the
clean gradient g0 is computed once per batch and shared by both (as in the official code).

The generator (:class:`SDIGenerator`): Conv3x3(2C -> 64, no bias) + BN + ReLU, one pre-activation
residual block (BN, PReLU, Conv3x3, BN, PReLU, Conv3x3) with an identity shortcut, BN, Conv3x3(64 -> C),
tanh * eps. Details from the official code where the paper's figure leaves them open: the first BN has
eps 1e-3, the block's and the final BN are not affine, the block's convolutions and the last one have a
bias, the block's convolutions start Xavier-uniform with gain sqrt(2). Video inputs [B, T, C, H, W] fold
T into the batch for G's 2-D convolutions (a per-frame initialisation; the FGSM step is over the clip).
The hidden width is ``sdi_width`` (64, the paper's): on tiny inputs such as the 8x8 digits G costs more
than the classifier, and a smaller width is the one knob that cuts it (not in the paper).

Choices and where this code differs from the official code:

- Label smoothing: the official code smooths the classifier's loss (and therefore the generator's,
  which is its negative) with ``factor`` 0.9 on the true class and (1 - factor) / (C - 1) on each other
  class; the inner FGSM gradients use plain CE. ``sdi_factor`` is that factor (1: plain CE). It is
  ``F.cross_entropy``'s label_smoothing ls = (1 - factor) * C / (C - 1); the context's per-sample
  weights still apply (``weighted_cross_entropy``).
- Generator optimiser: Adam, lr ``sdi_lr`` (1e-3) and weight decay ``sdi_weight_decay`` (5e-4, the
  official code's --weight-decay, which it also gives Adam). Its learning rate never decays in the
  official code: it builds a MultiStepLR with the classifier's milestones (100/110 and 105/110 of all
  batches) but steps it only on generator steps (1 in k batches), so the milestones are never reached.
  ``sdi_lr_schedule`` "constant" (the default) is that behaviour; "multistep" is the evident intent:
  lr * 0.1 from 10/11 of the run's progress and * 0.01 from 21/22.
- The box: the official code works on normalised CIFAR inputs and never clamps to the image box; here
  x0 and x_adv are clamped to [lo, hi] (the one fused ``ops.pgd_step_`` on the engine, as for every
  other method). G sees the raw input in [lo, hi] (the model's normalisation sits inside the forward).
- Modes: as in the official code, G runs in train mode for its own step (its BN statistics move only
  then) and in eval mode when it initialises the classifier's step; the classifier stays in train mode.
- The generator's parameters start from the run's seed (``ctx.seed()`` when G is built at the first
  batch), so a run is reproducible; G, its Adam state and the batch counter are saved per rank for an
  exact resume. Under DDP G's gradients are averaged over the processes (one all-reduce per generator
  step) and so are its BN statistics after the step: every rank keeps the same generator.
- Mixed precision: the classifier's forwards run under the run's autocast; G runs in float32. The
  generator's loss is not fp16-scaled (its gradient reaches G through the model's input gradient).
- Step size: alpha defaults to eps (the paper's 8/255 at eps 8/255); L-inf only. The budget is the
  run's (``ctx.budget``: with a budget schedule eps and alpha may change per batch or per sample).
- ``cutmix`` (:mod:`robustops.train.cutmix`): the batch is composed first; g0, the FGSM step, the
  classifier's and the generator's losses all use its mixed target (label smoothing applied to it).
- The generator's batches are counted within each epoch (``batch_idx % k`` in the official code): on a
  data set of fewer than k batches per epoch it steps once per epoch.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from ...attacks.engine import batch_view_shape, layout, to_layout
from ..collective import sync_tensors_
from ..registry import Hyper, Method, register, require_linf

__all__ = ["SDIGenerator", "FGSMSDI", "LR_SCHEDULES", "smoothing_from_factor"]

LR_SCHEDULES = ("constant", "multistep")


def smoothing_from_factor(factor: float, num_classes: int) -> float:
    """The official code's smoothed target (factor on the true class, (1 - factor) / (C - 1) on each
    other one) as ``F.cross_entropy``'s label_smoothing: ls = (1 - factor) * C / (C - 1)."""
    if num_classes < 2:
        return 0.0
    return (1.0 - factor) * num_classes / (num_classes - 1)


class _ResidualBlock(nn.Module):
    # pre-activation block (BN, PReLU, conv, BN, PReLU, conv) + identity, BNs not affine as in the official code
    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(width, affine=False), nn.PReLU(), nn.Conv2d(width, width, 3, padding=1),
                                  nn.BatchNorm2d(width, affine=False), nn.PReLU(), nn.Conv2d(width, width, 3, padding=1))
        for conv in (self.body[2], self.body[5]):
            nn.init.xavier_uniform_(conv.weight, gain=math.sqrt(2.0))

    def forward(self, h):
        return h + self.body(h)


class SDIGenerator(nn.Module):
    """FGSM-SDI's initialisation generator: [x, sign(grad)] -> delta0 with |delta0| < eps (L-inf).

    channels: C, the input's channels; width: the hidden channels (64 in the paper). Input x and
    sign_grad: Tensor[B, C, H, W] or video Tensor[B, T, C, H, W] (T folded into the batch); returns
    delta0 of x's shape: eps * tanh(net(cat[x, sign_grad] along channels)). eps: float or Tensor[B]."""

    def __init__(self, channels: int, width: int = 64):
        super().__init__()
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be an int >= 1, got {channels!r}")
        self.channels = channels
        self.net = nn.Sequential(
            nn.Conv2d(2 * channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width, eps=1e-3), nn.ReLU(),
            _ResidualBlock(width), nn.BatchNorm2d(width, affine=False), nn.Conv2d(width, channels, 3, padding=1))

    @property
    def last(self) -> nn.Conv2d:
        """The last convolution (64 -> C): zeroed, the generator proposes delta0 = 0."""
        return self.net[-1]

    def forward(self, x: torch.Tensor, sign_grad: torch.Tensor, eps) -> torch.Tensor:
        if x.dim() not in (4, 5) or x.shape[-3] != self.channels:
            raise ValueError(f"x must be a Tensor[B, {self.channels}, H, W] or Tensor[B, T, {self.channels}, H, W], "
                             f"got shape {list(x.shape)}")
        if sign_grad.shape != x.shape:
            raise ValueError(f"sign_grad must have x's shape {list(x.shape)}, got {list(sign_grad.shape)}")
        inp = torch.cat([x, sign_grad], dim=-3).reshape(-1, 2 * self.channels, *x.shape[-2:])
        out = torch.tanh(self.net(inp.float())).reshape(x.shape)
        if isinstance(eps, torch.Tensor) and eps.dim() == 1:
            eps = eps.view(batch_view_shape(x))
        return out * eps


def _on_cpu(obj):
    # checkpoints hold CPU tensors (loadable anywhere); Adam's load_state_dict moves its state to G's device
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_on_cpu(v) for v in obj)
    return obj


@register
class FGSMSDI(Method):
    name = "fgsm_sdi"
    help = "FGSM-SDI: one FGSM step from a learned, sample-dependent initialisation (Jia et al. 2022)"
    hyper = (Hyper("sdi_every", 20, "FGSM-SDI batches per generator step (k)", kind="int", minimum=1),
             Hyper("sdi_lr", 1e-3, "FGSM-SDI generator learning rate (Adam)", minimum=0.0, strict=True),
             Hyper("sdi_weight_decay", 5e-4, "FGSM-SDI generator weight decay (Adam)", minimum=0.0),
             Hyper("sdi_factor", 0.9, "FGSM-SDI label smoothing: the target's mass on the true class (1: plain CE)",
                   minimum=0.5, maximum=1.0),
             Hyper("sdi_lr_schedule", "constant", "FGSM-SDI generator lr: constant (official code) or multistep",
                   kind="choice", choices=LR_SCHEDULES),
             Hyper("sdi_width", 64, "FGSM-SDI generator hidden channels (the paper's 64)", kind="int", minimum=1))
    options = ("ema", "cutmix")
    sample_weights = True
    budget_schedules = True

    @classmethod
    def check_config(cls, cfg) -> None:
        require_linf(cfg, cls.name, "its generator is tanh * eps, an L-inf ball")

    @classmethod
    def default_alpha(cls, cfg) -> float:
        return cfg.eps  # the paper's alpha = eps (8/255 at 8/255)

    @classmethod
    def label(cls, cfg) -> str:
        return "FGSM-SDI AT"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.generator: Optional[SDIGenerator] = None
        self.optimizer: Optional[torch.optim.Adam] = None
        self.batches = 0       # minibatches stepped this epoch (the generator steps on batches 0, k, 2k, ...)
        self.epoch_seen = 0    # the epoch (ctx.epoch) they belong to
        self.generator_steps = 0

    # ---- the generator and its optimiser (built at the first batch: C comes from the data)

    def build(self, channels: int, seed: Optional[int] = None) -> SDIGenerator:
        """The generator for C input channels (``sdi_width`` hidden) on the run's device, with its Adam
        optimiser; initial weights from ``seed`` (default: a fresh ``ctx.seed()``). Returns it."""
        seed = self.ctx.seed() if seed is None else seed
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only (torch.manual_seed would also reseed CUDA's, which resume restores)
            torch.default_generator.manual_seed(seed % (1 << 63))
            self.generator = SDIGenerator(channels, self.cfg.sdi_width).to(self.ctx.device)
        if self.ctx.world_size > 1:  # each rank draws its own seed: every rank starts from rank 0's generator
            with torch.no_grad():
                sync_tensors_([t for t in (*self.generator.parameters(), *self.generator.buffers())
                               if t.is_floating_point()], "broadcast")
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=self.cfg.sdi_lr,
                                          weight_decay=self.cfg.sdi_weight_decay)
        return self.generator

    def ensure_generator(self, x: torch.Tensor) -> SDIGenerator:
        """The generator for inputs like x, built on first use."""
        if x.dim() not in (4, 5):
            raise ValueError(f"{self.name} takes images [B, C, H, W] or videos [B, T, C, H, W], got shape "
                             f"{list(x.shape)}")
        if self.generator is None:
            self.build(int(x.shape[-3]))
        elif self.generator.channels != x.shape[-3]:
            raise ValueError(f"{self.name}: the generator was built for {self.generator.channels} channels, the "
                             f"batch has {x.shape[-3]} (shape {list(x.shape)})")
        return self.generator

    def generator_lr(self) -> float:
        """The generator's learning rate now (``sdi_lr_schedule``)."""
        lr = self.cfg.sdi_lr
        if self.cfg.sdi_lr_schedule == "multistep":
            p = self.ctx.progress
            lr *= 0.01 if p >= 105 / 110 else 0.1 if p >= 100 / 110 else 1.0
        return lr

    # ---- the work

    def start(self, x, sign_g, eps):
        """x0 = clamp(x + G([x, sign g]), lo, hi), in x's layout (differentiable in G's parameters)."""
        c = self.cfg
        delta0 = self.generator(x, sign_g, eps).to(x.dtype)
        return to_layout((x + delta0).clamp(c.lo, c.hi), layout(x))  # x's layout, video channels-last too

    def smoothed_ce(self, logits, y):
        """The label-smoothed, per-sample-weighted cross-entropy of the classifier (and, negated, of G)."""
        return self.ctx.cross_entropy(logits, y, smoothing_from_factor(self.cfg.sdi_factor, logits.shape[1]))

    def generator_step(self, x, y, sign_g, eps, alpha) -> torch.Tensor:
        """One Adam ascent step of G on CE_s(f(x_adv(G)), y); returns that loss (detached)."""
        c, ctx, gen = self.cfg, self.ctx, self.generator
        engine = ctx.engine("linf")
        gen.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.generator_lr()
        with torch.enable_grad():
            x0 = self.start(x, sign_g, eps)
            g, _, _ = engine.gradient(x0.detach(), y)
            # pgd_step_'s L-inf formula written out so the loss reaches delta0; sign(g) is constant in it
            e, a = (v.view(batch_view_shape(x)) if isinstance(v, torch.Tensor) else v for v in (eps, alpha))
            x_adv = (x + (x0 + a * torch.sign(g) - x).clamp(-e, e)).clamp(c.lo, c.hi)
            loss = self.smoothed_ce(engine.logits(x_adv), y)
            params = [p for p in gen.parameters() if p.requires_grad]
            grads = torch.autograd.grad(-loss, params)
        self.optimizer.zero_grad(set_to_none=True)
        for p, gp in zip(params, grads):
            p.grad = gp
        if ctx.world_size > 1:
            self._average_over_ranks(params)
        self.optimizer.step()
        if ctx.world_size > 1:
            self._average_over_ranks(None)
        self.generator_steps += 1
        return loss.detach()

    def _average_over_ranks(self, params) -> None:
        # params: average their gradients; None: average G's floating buffers (BN statistics)
        ts = [p.grad for p in params] if params is not None else \
            [b for b in self.generator.buffers() if b.is_floating_point()]
        sync_tensors_(ts, "mean")

    def step(self, x, y):
        c, ctx = self.cfg, self.ctx
        if c.cutmix is not None:  # the composed batch and its mixed target (robustops.train.cutmix)
            x, y = ctx.cutmix(x, y)
        eps, alpha = ctx.budget(x, y)
        self.ensure_generator(x)
        engine = ctx.engine("linf")
        g0, _, _ = engine.gradient(x, y)
        sign_g = torch.sign(g0)
        if ctx.epoch != self.epoch_seen:
            self.batches, self.epoch_seen = 0, ctx.epoch
        if self.batches % c.sdi_every == 0:
            self.generator_step(x, y, sign_g, eps, alpha)
        self.batches += 1
        self.generator.eval()
        with torch.no_grad():
            x0 = self.start(x, sign_g, eps)
        x_adv = engine.iterate(x, x0, y, eps, alpha, 1)  # one fused pgd_step_ from the learned start

        def closure(net):
            logits = net(x_adv)
            return self.smoothed_ce(logits, y), logits

        loss, logits = ctx.update(closure)
        return ctx.stats(loss, logits, y)

    def state_dict(self):
        if self.generator is None:
            return {"batches": self.batches, "epoch_seen": self.epoch_seen, "generator_steps": self.generator_steps}
        return {"batches": self.batches, "epoch_seen": self.epoch_seen, "generator_steps": self.generator_steps,
                "channels": self.generator.channels, "generator": _on_cpu(self.generator.state_dict()),
                "optimizer": _on_cpu(self.optimizer.state_dict())}

    def load_state_dict(self, st) -> None:
        self.batches = int(st.get("batches", 0))
        self.epoch_seen = int(st.get("epoch_seen", 0))
        self.generator_steps = int(st.get("generator_steps", 0))
        if "generator" not in st:
            self.generator = self.optimizer = None
            return
        self.build(int(st["channels"]), seed=0)  # the weights are overwritten: no draw from the run's stream
        self.generator.load_state_dict(st["generator"])
        self.optimizer.load_state_dict(st["optimizer"])
