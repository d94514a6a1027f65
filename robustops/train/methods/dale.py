"""DALE: hybrid Langevin adversarial training and its primal-dual form (Robey, Chamon, Pappas,
Hassani and Ribeiro, "Adversarial robustness with semi-infinite constrained learning", NeurIPS 2021).

The paper recasts adversarial training as a constrained problem over perturbation distributions,

    min_theta  E[ E_{delta ~ lambda(.|x)} loss(f_theta(x + delta), y) ]
    s.t.       E[ loss(f_theta(x), y) ] <= rho                                   (the clean-loss margin)

whose optimal inner distribution concentrates where the loss is large, lambda(delta|x) ~ l(x + delta)^(1/T)
on the eps-ball. Samples of it come from a projected Langevin chain on log l, L steps from a start near x,
and the outer problem is solved on the Lagrangian with a dual variable nu >= 0.

Two sources, and which one each choice follows (both read as references, nothing copied):

- [P] the paper's Algorithm 1, as far as its text can be read (the issue that asked for this, #25,
  reads it so; the algorithm's text could not be retrieved when this was written, and an earlier revision
  of this file read the same algorithm as the Laplace sign form below, so the reading is not settled and
  both forms are offered): an unsigned gradient with Gaussian noise,
  delta <- P(delta + eta * grad_delta log l + sqrt(2 eta T) xi), nu starting at 0 and updated once per
  epoch with the full-data clean loss.
- [A] the released code, arobey1/advbench at commit 8ad6d34 (attacks.py ``LMC_Gaussian_Linf`` /
  ``LMC_Laplacian_Linf``, optimizers.py ``PrimalDualOptimizer``, algorithms.py ``Gaussian_DALE_PD``,
  hparams_registry.py's MNIST values): a sign gradient, the start x + 0.001 N(0, I), the inner objective
  mean_b log(1 - softmax(f(x + delta))_y), nu starting at 1 and a projected dual step after every
  minibatch with that minibatch's clean loss. Its primal-dual class uses the Gaussian form only; the
  Laplace form belongs to its fixed-nu class ``Laplacian_DALE``.

The chains (``langevin_form`` x ``langevin_gradient``), P the projection onto the L-inf ball of radius eps
intersected with x + delta in [lo, hi]:

    gaussian, sign      delta <- P(delta + eta * sign(g) + c * xi),      xi ~ N(0, I)           [A]
    laplace,  sign      delta <- P(delta + eta * sign(g + c * l)),       l ~ Laplace(0, I)      [A, fixed nu]
    gaussian, unsigned  delta <- P(delta + eta * g_b + c * xi)                                  [P]

g is the gradient of the batch mean of log l (as in [A]); g_b = B * g is sample b's own gradient of
log l(x_b + delta_b), the paper's per-sample chain (the batch mean would shrink the drift by the batch
size). The sign forms are one fused ``ops.langevin_step_`` after each input-gradient pass; the unsigned
form, which that op does not have, is a few plain torch operations in :class:`LangevinStep` (its noise
drawn by ``ops.gaussian_noise`` from the same per-step Philox keys). Noise 0 with the sign form is PGD.

The update (losses are batch means):

    dale:     theta <- theta - lr * grad_theta [ CE(f(x + delta), y) + nu * CE(f(x), y) ],  nu fixed   [A]
    dale_pd:  the same primal step, then the projected dual ascent
              nu <- max(0, nu + eta_nu * (clean - rho))
              dual_update "batch" [A]: after every minibatch, clean = that minibatch's clean CE (computed
              before the primal step changed theta);
              dual_update "epoch" [P]: once per epoch, clean = the epoch's mean clean CE over its batches
              (each computed with the weights of its own step: the natural reading of "the full-data
              clean loss" that costs no extra pass over the data).

The paper's variant is ``--method dale_pd --langevin-form gaussian --langevin-gradient unsigned
--dual-update epoch --nu 0``; per-epoch dual steps are far fewer, so ``dual_lr`` should be larger (about
the number of batches per epoch times the per-batch value), and the unsigned drift's scale depends on the
loss, so ``alpha`` is worth setting for it (its default is the sign form's 2.5 eps / steps).

Choices the sources leave open, or where this code departs from [A]:

- the inner objective log l: ``langevin_objective`` "log1m_softmax" is [A]'s log(1 - softmax(z)_y),
  computed as logsumexp_{c != y} z_c - logsumexp_c z_c. A deliberate deviation: [A]'s literal
  torch.log(1 - p_y) is -inf once p_y rounds to 1 in float32 (a margin of about 17), its gradient is then
  NaN/zero, and those confident samples get no step (the sign of a NaN or zero gradient); the stable form
  stays finite and keeps attacking them, which is the purpose of the chain. On non-saturated logits the two
  agree to float rounding (tests/test_dale.py checks one whole dale_pd batch step against a plain
  transcription of [A]). "ce" ascends the cross-entropy instead. Under a sign drift with Gaussian (or no)
  noise the two objectives give the same chain: sample b's gradients of log(1 - p_y) and of CE are both
  positive multiples of -grad p_y, so their signs agree (up to saturation); the objective matters for the
  Laplace form (noise added before the sign, relative to the gradient's size) and the unsigned form. The batch mean is ascended (as in [A]),
  so the Laplace noise scale c is measured against the gradient of a mean. amp "fp16" scales that gradient
  by a changing loss scale the noise would have to follow, so the Laplace form with noise > 0 and the
  unsigned form refuse it (bf16 is fine).
- the noise scale: [P] writes the Gaussian noise as sqrt(2 * eta * T) * xi (temperature T);
  ``langevin_noise`` is the scale c itself (T = c^2 / (2 eta)), as in [A]. Default 0.001, [A]'s MNIST value
  for both forms (its CIFAR-10 Laplace value is 0.01).
- steps L and step size eta: the threat model's ``steps`` and ``alpha`` (default 2.5 eps / steps: 0.107
  at [A]'s MNIST eps 0.3 and 7 steps, where it uses 0.1).
- the start: with ``random_start``, x + 0.001 * N(0, I) as in [A]; otherwise x itself.
- the model runs in eval mode during the chain (as in [A]) and in train mode for the update, whose forward
  takes the clean and the perturbed batch in one call (one DDP all-reduce; [A] makes two calls, which
  differs only for batch-norm statistics).
- the form: "laplace" by default (the demo's historical setting; [A] uses it with a fixed nu only);
  ``langevin_form gaussian`` is [A]'s primal-dual form and, with ``langevin_gradient unsigned``, [P]'s.
- defaults: nu 0.1 for dale ([A]'s ``l_dale_nu``), 1.0 as dale_pd's initial value ([A]); [P] starts at 0
  (``--nu 0``). Margin rho 0.1 and dual step eta_nu 0.001 ([A]'s MNIST values, per minibatch).
- ``cutmix`` (Rebuffi et al. 2021, :mod:`robustops.train.cutmix`): the batch is composed first, as for
  pgd; the chain ascends the lam-weighted mixture of its objective at the two labels, and the robust and
  clean terms (the clean one driving the dual step) are the mixed cross-entropies of the composed batch.
- distributed: the clean loss that drives the dual step is averaged over the processes (one all-reduce of
  a scalar, no host sync), so nu stays the same on every process.

The dual variable stays a device tensor (no host sync per step); it is logged once per epoch (column
``nu``, with ``clean_loss``, the epoch's mean clean cross-entropy) and saved in checkpoints for an exact
resume (checkpoints are written at epoch ends, after the per-epoch dual step).
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

from ... import _rng, ops
from ...attacks.engine import batch_view_shape, memory_format
from ..context import mean_ce
from ..registry import Hyper, Method, register, require_linf

__all__ = ["Dale", "DalePD", "LangevinStep", "log1m_softmax", "OBJECTIVES", "GRADIENTS", "DUAL_UPDATES"]

OBJECTIVES = ("log1m_softmax", "ce")
GRADIENTS = ("sign", "unsigned")
DUAL_UPDATES = ("batch", "epoch")


def log1m_softmax(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log(1 - softmax(logits)_y) per sample, as logsumexp over the other classes minus logsumexp over
    all: finite wherever the logits are, even when softmax_y rounds to 1."""
    z = logits.float()
    others = z.scatter(1, y[:, None], float("-inf"))
    return torch.logsumexp(others, dim=1) - torch.logsumexp(z, dim=1)


def _batch_mean(fn):
    # Per-sample values / B: the engine ascends their sum, i.e. the batch mean (the paper code's scale).
    # A CutMix batch's mixed target (the engine's rows of it: a plain tuple (y, y2, lam)): the
    # lam-weighted mixture of the two labels' objectives, as the mixed cross-entropy.
    def objective(logits, y):
        if isinstance(y, tuple):
            y1, y2, lam = y
            return (lam * fn(logits, y1) + (1.0 - lam) * fn(logits, y2)) / logits.shape[0]
        return fn(logits, y) / logits.shape[0]
    return objective


def _ce(logits, y):
    return F.cross_entropy(logits.float(), y, reduction="none")


def _per_sample(p, x: torch.Tensor):
    """A float or Tensor[B] parameter broadcastable against x: a scalar as it is (a float or a 0-dim
    CPU tensor, which CUDA ops take as a scalar: no copy to the device, no host sync per step), a
    Tensor[B] as float32 on x's device viewed per sample."""
    if not isinstance(p, torch.Tensor) or p.dim() == 0:
        return p
    return p.to(x.device, torch.float32, non_blocking=True).view(batch_view_shape(x))


class LangevinStep:
    """The engine's step op for one chain: ``ops.langevin_step_`` (the sign forms) or the unsigned
    Gaussian step, with the Philox key of step k derived from the chain's seed
    (``_rng.derive_seed(seed, k)``, k = 1, 2, ...), offset 0, so every step draws fresh noise, sample b's
    draw does not depend on the batch size, and the start (key ``seed``) and the steps never share a
    stream."""

    def __init__(self, noise: float, form: str, gradient: str = "sign"):
        self.noise, self.form, self.gradient = noise, form, gradient
        self.seed, self.k = 0, 0

    def reset(self, seed: int) -> None:
        self.seed, self.k = seed, 0

    def __call__(self, x_adv, x, grad, eps, alpha, norm, lo, hi):
        self.k += 1
        seed = _rng.derive_seed(self.seed, self.k)
        if self.gradient == "unsigned":
            return self._unsigned(x_adv, x, grad, eps, alpha, lo, hi, seed)
        return ops.langevin_step_(x_adv, x, grad, eps, alpha, self.noise, self.form, lo, hi, seed=seed, offset=0)

    def _unsigned(self, x_adv, x, grad, eps, alpha, lo, hi, seed):
        # grad is that of the batch mean: times B it is each sample's own gradient (the paper's chain)
        eps_t, alpha_t = _per_sample(eps, x_adv), _per_sample(alpha, x_adv)
        v = x_adv.float() + alpha_t * grad.float() * x_adv.shape[0]
        if self.noise > 0:  # v + noise in one pass (the fused op's Philox draws, key seed)
            v = ops.gaussian_noise(v, 1, self.noise, seed=seed, offset=0,
                                   channels_last=memory_format(x_adv) == torch.channels_last)
        xf = x.float()
        v = torch.minimum(torch.maximum(v, xf - eps_t), xf + eps_t).clamp_(lo, hi)
        return x_adv.copy_(v)


#: --clean-weight: the spelling torchrun accepts (its own parser takes --nu for its --numa-binding)
NU_FLAGS = ("--nu", "--clean-weight")
_NU_HELP = "DALE's weight nu of the clean loss (dale_pd: the dual variable's initial value)"
_LANGEVIN = (
    Hyper("langevin_noise", 0.001, "DALE's Langevin noise scale c (Gaussian: sqrt(2*alpha*T))", minimum=0.0),
    Hyper("langevin_form", "laplace", "DALE's Langevin noise: laplace (inside the sign) or gaussian (added)",
          kind="choice", choices=("laplace", "gaussian")),
    Hyper("langevin_objective", "log1m_softmax", "the objective DALE's Langevin chain ascends: log(1 - p_y) or ce",
          kind="choice", choices=OBJECTIVES),
    Hyper("langevin_gradient", "sign", "DALE's Langevin drift: sign (advbench; PGD at noise 0) or unsigned "
          "(the paper's eta * per-sample gradient; langevin_form gaussian)", kind="choice", choices=GRADIENTS),
)


def _chain_label(cfg) -> str:
    return cfg.langevin_form + (", unsigned" if cfg.langevin_gradient == "unsigned" else "")


@register
class Dale(Method):
    name = "dale"
    help = "DALE: hybrid Langevin AT, robust CE + nu * clean CE (Robey et al. 2021)"
    hyper = (Hyper("nu", 0.1, _NU_HELP, minimum=0.0, flags=NU_FLAGS),) + _LANGEVIN
    options = ("ema", "cutmix")
    log_metrics = ("clean_loss",)
    budget_schedules = True

    @classmethod
    def check_config(cls, cfg) -> None:
        require_linf(cfg, cls.name, "its Langevin step projects on the L-inf ball")
        if cfg.amp == "fp16" and cfg.langevin_form == "laplace" and cfg.langevin_noise > 0:
            raise ValueError("amp fp16 scales the input gradient by a changing loss scale that the Laplace noise "
                             "(added to the gradient) would have to follow: use amp bf16, langevin_form gaussian "
                             "or langevin_noise 0")
        if cfg.langevin_gradient == "unsigned" and cfg.langevin_form != "gaussian":
            raise ValueError("langevin_gradient unsigned takes langevin_form gaussian (the paper's step adds Gaussian "
                             f"noise to an unsigned gradient step), got langevin_form {cfg.langevin_form!r}")
        if cfg.amp == "fp16" and cfg.langevin_gradient == "unsigned":
            raise ValueError("amp fp16 scales the input gradient by a changing loss scale, which the unsigned "
                             "Langevin step would take as its size: use amp bf16 or langevin_gradient sign")

    @classmethod
    def label(cls, cfg) -> str:
        return f"DALE ({_chain_label(cfg)}, {cfg.steps} steps)"

    def __init__(self, ctx):
        super().__init__(ctx)
        c = self.cfg
        objective = _batch_mean(log1m_softmax if c.langevin_objective == "log1m_softmax" else _ce)
        self.langevin = LangevinStep(c.langevin_noise, c.langevin_form, c.langevin_gradient)
        self.engine = ctx.engine("linf", objective, step=self.langevin)
        self.nu = torch.tensor(float(c.nu), dtype=torch.float32, device=ctx.device)
        # the epoch's clean-loss sum and sample count (device tensors: no sync per step)
        self._clean_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
        self._seen = torch.zeros((), dtype=torch.float64, device=ctx.device)

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The chain's last iterate x + delta_L, model in eval mode."""
        c, ctx = self.cfg, self.ctx
        eps, alpha = ctx.budget(x, y)
        seed = ctx.seed()
        self.langevin.reset(seed)
        was = ctx.forward.training
        ctx.forward.eval()
        try:
            start = "normal" if c.random_start else "clean"
            return self.engine.run(x, y, eps, alpha, c.steps, start=start, start_sigma=0.001, seed=seed,
                                   evaluate=False).x_adv
        finally:
            ctx.forward.train(was)

    def step(self, x, y):
        ctx = self.ctx
        if self.cfg.cutmix is not None:  # the composed batch and its mixed target (robustops.train.cutmix)
            x, y = ctx.cutmix(x, y)
        x_adv = self.perturb(x, y)

        def closure(net):
            logits, logits_adv = net(x, x_adv)
            clean = mean_ce(logits.float(), y)
            robust = mean_ce(logits_adv.float(), y)
            return robust + self.nu * clean, (robust, clean, logits_adv)

        _, (robust, clean, logits_adv) = ctx.update(closure)
        clean = clean.detach()
        self._clean_sum += clean.double() * x.shape[0]
        self._seen += x.shape[0]
        self.dual_step(clean)
        return ctx.stats(robust, logits_adv, y)

    def dual_step(self, clean: torch.Tensor) -> None:
        """After each minibatch, with its clean loss (a device scalar); dale: nu stays fixed."""

    def epoch_dual_step(self, clean: float) -> None:
        """At each epoch's end, with the epoch's mean clean loss over all processes; dale: nu stays fixed."""

    def log_values(self) -> Dict[str, float]:
        s = torch.stack([self._clean_sum, self._seen])
        if self.ctx.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(s)
        self._clean_sum.zero_()
        self._seen.zero_()
        clean_sum, seen = s.tolist()
        if seen:
            self.epoch_dual_step(clean_sum / seen)
        out = {"clean_loss": clean_sum / seen if seen else float("nan")}
        if "nu" in self.log_metrics:
            out["nu"] = float(self.nu)
        return out


@register
class DalePD(Dale):
    name = "dale_pd"
    help = "DALE primal-dual: robust CE + nu * clean CE, nu <- max(0, nu + dual_lr (clean CE - margin))"
    hyper = (Hyper("nu", 1.0, _NU_HELP, minimum=0.0, flags=NU_FLAGS),
             Hyper("margin", 0.1, "dale_pd: the bound rho on the clean loss (the constraint E CE(f(x), y) <= rho)",
                   minimum=0.0),
             Hyper("dual_lr", 0.001, "dale_pd: the dual step size eta_nu (per dual update)", minimum=0.0),
             Hyper("dual_update", "batch", "dale_pd: when nu moves: batch (advbench: each minibatch's clean CE) or "
                   "epoch (the paper: once per epoch, the epoch's mean clean CE)", kind="choice",
                   choices=DUAL_UPDATES)) + _LANGEVIN
    log_metrics = ("nu", "clean_loss")

    @classmethod
    def label(cls, cfg) -> str:
        dual = ", per-epoch dual" if cfg.dual_update == "epoch" else ""
        return f"DALE-PD ({_chain_label(cfg)}, {cfg.steps} steps, margin {cfg.margin:g}{dual})"

    def dual_step(self, clean: torch.Tensor) -> None:
        """nu <- max(0, nu + dual_lr * (clean - margin)), on the device; the clean loss is the mean over
        all processes' batches (dual_update batch only)."""
        if self.cfg.dual_update != "batch":
            return
        ctx = self.ctx
        if ctx.world_size > 1:
            import torch.distributed as dist

            clean = clean.clone()
            dist.all_reduce(clean)
            clean /= ctx.world_size
        self.nu.add_(clean.float() - self.cfg.margin, alpha=self.cfg.dual_lr).clamp_(min=0.0)

    def epoch_dual_step(self, clean: float) -> None:
        """dual_update epoch: nu <- max(0, nu + dual_lr * (the epoch's mean clean loss - margin))."""
        if self.cfg.dual_update == "epoch":
            self.nu.add_(self.cfg.dual_lr * (clean - self.cfg.margin)).clamp_(min=0.0)

    def state_dict(self):
        return {"nu": self.nu.detach().cpu()}

    def load_state_dict(self, st) -> None:
        if "nu" in st:
            self.nu.copy_(st["nu"].to(self.nu.device))
