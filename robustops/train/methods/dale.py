"""DALE: hybrid Langevin adversarial training and its primal-dual form (Robey, Chamon, Pappas,
Hassani and Ribeiro, "Adversarial robustness with semi-infinite constrained learning", NeurIPS 2021).

The paper recasts adversarial training as a constrained problem over perturbation distributions,

    min_theta  E[ E_{delta ~ lambda(.|x)} loss(f_theta(x + delta), y) ]
    s.t.       E[ loss(f_theta(x), y) ] <= rho                                   (the clean-loss margin)

whose optimal inner distribution concentrates where the loss is large, lambda(delta|x) ~ l(x + delta)^(1/T)
on the eps-ball. Samples of it come from a projected Langevin chain on log l, written with the sign of the
gradient (which makes PGD the noiseless chain), L steps from a start near x:

    Gaussian:  delta <- P(delta + eta * sign(grad_delta log l) + c * xi),   xi ~ N(0, I)
    Laplace:   delta <- P(delta + eta * sign(grad_delta log l + c * l_),   l_ ~ Laplace(0, I)

P projects onto the L-inf ball of radius eps and keeps x + delta in [lo, hi]. Each step is one fused
``ops.langevin_step_`` after one input-gradient pass. The outer problem is solved by the Lagrangian
with dual variable nu >= 0:

    dale:     theta <- theta - lr * grad_theta [ CE(f(x + delta), y) + nu * CE(f(x), y) ],  nu fixed
    dale_pd:  the same primal step, then the projected dual ascent
              nu <- max(0, nu + eta_nu * (CE(f(x), y) - rho))

(both losses batch means, nu updated with the clean loss of the batch the primal step used, before the
step changed theta; this is the paper's Algorithm 1 and its released code, arobey1/advbench).

Choices the paper leaves open, and what is done here:

- the inner objective log l: ``langevin_objective`` "log1m_softmax" is the paper code's
  log(1 - softmax(f(x + delta))_y), computed as logsumexp_{c != y} z_c - logsumexp_c z_c so that it
  stays finite (and its gradient defined) when the model is confident; "ce" ascends the cross-entropy
  instead. Its batch mean is ascended (as in the paper's code), so the Laplace noise scale c is
  measured against the gradient of a mean. amp "fp16" scales that gradient by a changing loss scale
  the noise would have to follow, so the Laplace form with noise > 0 refuses it (bf16 is fine).
- the noise scale: the paper writes the Gaussian noise as sqrt(2 * eta * T) * xi (temperature T);
  ``langevin_noise`` is the scale c itself (T = c^2 / (2 eta)), as in the released code. Default 0.001,
  the code's MNIST value for both forms (its CIFAR-10 Laplace value is 0.01).
- steps L and step size eta: the threat model's ``steps`` and ``alpha`` (default 2.5 eps / steps: 0.107
  at the code's MNIST eps 0.3 and 7 steps, where it uses 0.1).
- the start: with ``random_start``, x + 0.001 * N(0, I) as in the released code; otherwise x itself.
- the model runs in eval mode during the chain (as in the released code) and in train mode for the
  update, whose forward takes the clean and the perturbed batch in one call (one DDP all-reduce).
- the form: "laplace" by default (the paper's Algorithm 1); the released primal-dual code uses the
  Gaussian form, which ``langevin_form gaussian`` selects.
- defaults nu: 0.1 for dale (the code's fixed weight), 1.0 as dale_pd's initial value (the code's
  initial dual variable); margin rho 0.1 and dual step eta_nu 0.001 per minibatch (the code's values).
- distributed: the clean loss that drives the dual step is averaged over the processes (one
  all-reduce of a scalar, no host sync), so nu stays the same on every process.

The dual variable stays a device tensor (no host sync per step); it is logged once per epoch (column
``nu``, with ``clean_loss``, the epoch's mean clean cross-entropy) and saved in checkpoints for an exact
resume.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

from ... import _rng, ops
from ..registry import Hyper, Method, register

__all__ = ["Dale", "DalePD", "LangevinStep", "log1m_softmax", "OBJECTIVES"]

OBJECTIVES = ("log1m_softmax", "ce")


def log1m_softmax(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log(1 - softmax(logits)_y) per sample, as logsumexp over the other classes minus logsumexp over
    all: finite wherever the logits are, even when softmax_y rounds to 1."""
    z = logits.float()
    others = z.scatter(1, y[:, None], float("-inf"))
    return torch.logsumexp(others, dim=1) - torch.logsumexp(z, dim=1)


def _batch_mean(fn):
    # Per-sample values / B: the engine ascends their sum, i.e. the batch mean (the paper code's scale).
    def objective(logits, y):
        return fn(logits, y) / logits.shape[0]
    return objective


def _ce(logits, y):
    return F.cross_entropy(logits.float(), y, reduction="none")


class LangevinStep:
    """The engine's step op for one chain: ``ops.langevin_step_`` with the Philox key of step k
    derived from the chain's seed (``_rng.derive_seed(seed, k)``, k = 1, 2, ...), offset 0, so every
    step draws fresh noise, sample b's draw does not depend on the batch size, and the start (key
    ``seed``) and the steps never share a stream."""

    def __init__(self, noise: float, form: str):
        self.noise, self.form = noise, form
        self.seed, self.k = 0, 0

    def reset(self, seed: int) -> None:
        self.seed, self.k = seed, 0

    def __call__(self, x_adv, x, grad, eps, alpha, norm, lo, hi):
        self.k += 1
        return ops.langevin_step_(x_adv, x, grad, eps, alpha, self.noise, self.form, lo, hi,
                                  seed=_rng.derive_seed(self.seed, self.k), offset=0)


#: --clean-weight: the spelling torchrun accepts (its own parser takes --nu for its --numa-binding)
NU_FLAGS = ("--nu", "--clean-weight")
_NU_HELP = "DALE's weight nu of the clean loss (dale_pd: the dual variable's initial value)"
_LANGEVIN = (
    Hyper("langevin_noise", 0.001, "DALE's Langevin noise scale c (Gaussian: sqrt(2*alpha*T))", minimum=0.0),
    Hyper("langevin_form", "laplace", "DALE's Langevin noise: laplace (inside the sign) or gaussian (added)",
          kind="choice", choices=("laplace", "gaussian")),
    Hyper("langevin_objective", "log1m_softmax", "the objective DALE's Langevin chain ascends: log(1 - p_y) or ce",
          kind="choice", choices=OBJECTIVES),
)


@register
class Dale(Method):
    name = "dale"
    help = "DALE: hybrid Langevin AT, robust CE + nu * clean CE (Robey et al. 2021)"
    hyper = (Hyper("nu", 0.1, _NU_HELP, minimum=0.0, flags=NU_FLAGS),) + _LANGEVIN
    log_metrics = ("clean_loss",)

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.norm != "linf":
            raise ValueError(f'norm must be "linf" for {cls.name} (its Langevin step projects on the L-inf ball), '
                             f"got {cfg.norm!r}")
        if cfg.amp == "fp16" and cfg.langevin_form == "laplace" and cfg.langevin_noise > 0:
            raise ValueError("amp fp16 scales the input gradient by a changing loss scale that the Laplace noise "
                             "(added to the gradient) would have to follow: use amp bf16, langevin_form gaussian "
                             "or langevin_noise 0")

    @classmethod
    def label(cls, cfg) -> str:
        return f"DALE ({cfg.langevin_form}, {cfg.steps} steps)"

    def __init__(self, ctx):
        super().__init__(ctx)
        c = self.cfg
        objective = _batch_mean(log1m_softmax if c.langevin_objective == "log1m_softmax" else _ce)
        self.langevin = LangevinStep(c.langevin_noise, c.langevin_form)
        self.engine = ctx.engine("linf", objective, step=self.langevin)
        self.nu = torch.tensor(float(c.nu), dtype=torch.float32, device=ctx.device)
        # the epoch's clean-loss sum and sample count (device tensors: no sync per step)
        self._clean_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
        self._seen = torch.zeros((), dtype=torch.float64, device=ctx.device)

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The chain's last iterate x + delta_L, model in eval mode."""
        c, ctx = self.cfg, self.ctx
        seed = ctx.seed()
        self.langevin.reset(seed)
        was = ctx.forward.training
        ctx.forward.eval()
        try:
            start = "normal" if c.random_start else "clean"
            return self.engine.run(x, y, c.eps, c.alpha, c.steps, start=start, start_sigma=0.001, seed=seed,
                                   evaluate=False).x_adv
        finally:
            ctx.forward.train(was)

    def step(self, x, y):
        ctx = self.ctx
        x_adv = self.perturb(x, y)
        def closure(net):
            logits, logits_adv = net(x, x_adv)
            clean = F.cross_entropy(logits.float(), y)
            robust = F.cross_entropy(logits_adv.float(), y)
            return robust + self.nu * clean, (robust, clean, logits_adv)

        _, (robust, clean, logits_adv) = ctx.update(closure)
        clean = clean.detach()
        self._clean_sum += clean.double() * y.shape[0]
        self._seen += y.shape[0]
        self.dual_step(clean)
        return ctx.stats(robust, logits_adv, y)

    def dual_step(self, clean: torch.Tensor) -> None:
        """dale: nu stays fixed."""

    def log_values(self) -> Dict[str, float]:
        s = torch.stack([self._clean_sum, self._seen])
        if self.ctx.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(s)
        self._clean_sum.zero_()
        self._seen.zero_()
        clean_sum, seen = s.tolist()
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
             Hyper("dual_lr", 0.001, "dale_pd: the dual step size eta_nu (per minibatch)", minimum=0.0)) + _LANGEVIN
    log_metrics = ("nu", "clean_loss")

    @classmethod
    def label(cls, cfg) -> str:
        return f"DALE-PD ({cfg.langevin_form}, {cfg.steps} steps, margin {cfg.margin:g})"

    def dual_step(self, clean: torch.Tensor) -> None:
        """nu <- max(0, nu + dual_lr * (clean - margin)), on the device; the clean loss is the mean over
        all processes' batches."""
        ctx = self.ctx
        if ctx.world_size > 1:
            import torch.distributed as dist

            clean = clean.clone()
            dist.all_reduce(clean)
            clean /= ctx.world_size
        self.nu.add_(clean.float() - self.cfg.margin, alpha=self.cfg.dual_lr).clamp_(min=0.0)

    def state_dict(self):
        return {"nu": self.nu.detach().cpu()}

    def load_state_dict(self, st) -> None:
        if "nu" in st:
            self.nu.copy_(st["nu"].to(self.nu.device))
