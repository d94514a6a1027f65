"""Attack-budget schedules for adversarial training: the budget (eps, alpha) each minibatch is attacked
with, after Kinfu & Vidal, "Analysis and extensions of adversarial training for video classification"
(CVPR Workshops 2022, arXiv 2206.07953).

What the paper establishes, and how it is used here:

- The best attack step size grows linearly with the budget (their step-size sweeps: alpha* = c * eps).
  So every schedule here moves eps only, and alpha follows it at the run's ratio c = alpha / eps:
  ``alpha_t = cfg.alpha * (eps_t / cfg.eps)``. When the user gave no alpha, cfg.alpha is the method's
  default (2.5 eps / steps for PGD / TRADES / DALE, 1.25 eps for FGSM, eps for free), which is linear in
  eps, so c is the method's default ratio; when the user gave alpha, c is their alpha / eps.
- Training with a budget smaller than the test budget gives better robustness at the test budget: the
  schedules never exceed ``cfg.eps``; validation keeps ``cfg.val_eps`` (set eps < val_eps for that).
- *Curriculum AT*: the budget increases as training proceeds.
- *Adaptive AT*: the budget is drawn from a distribution that is adapted as training proceeds, from
  the current model.

Open choices (the paper's method section was not available to us: only its abstract and summary; each
rule below is the closest faithful reading of "budget rising over training" and "budget drawn from a
distribution adapted to the current model", stated so that it can be checked):

- ``linear``: a continuous ramp, eps_t = eps * (s + (1 - s) * min(1, p / w)), p the run's progress
  (fraction of optimizer steps done before this minibatch), s = ``budget_start``, w = ``budget_warmup``.
- ``curriculum``: the paper's curriculum as a staircase of S = ``budget_stages`` equal budget levels,
  eps_k = eps * (s + (1 - s) * (k + 1) / S), k = min(S - 1, floor(S * p / w)): the first level is
  already an attack, the last (eps) is reached at p = w (S - 1) / S and kept.
- ``adaptive``: the distribution of the budgets is that of the current model's robust radii on the
  batch. For each sample, the radius r_i is estimated on the grid eps * j / K (K = ``budget_grid``) by a
  one-step search in eval mode: one gradient of the cross-entropy at x, then K forwards (no grad) at
  x + eps_j * d (d = sign(grad) for L-inf, grad / ||grad||_2 for L2; clamped to [lo, hi]); r_i is the
  largest grid budget below which no level fools the model (0 if x is misclassified). The sample is
  attacked just past it: eps_i = min(eps, r_i + eps / K). ``budget_adapt="sample"`` (default) returns these
  per-sample budgets (Tensor[B]); ``"batch"`` attacks the whole batch with a running estimate of their
  mean, m <- (1 - mu) m + mu mean_i eps_i (mu = ``ADAPTIVE_MOMENTUM``; m starts at the first batch's
  mean), kept in the schedule's state_dict for an exact resume. For a linear model the one-step search
  is exact (the sign of the gradient is the worst L-inf direction of a two-class linear model).
  Cost: one forward/backward and K forwards per minibatch (PGD-7 AT does 8 forward/backwards: about +30 %
  at K = 4).

Every schedule reports the mean budget it handed out over an epoch (``train_eps`` in the epoch log).
Under DDP each process measures its own batches (the estimate is per process, like its data).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple, Union

import torch

from . import registry

__all__ = ["BUDGET_SCHEDULES", "BUDGET_ADAPT", "ADAPTIVE_MOMENTUM", "SCHEDULE_DEFAULTS", "BudgetSchedule",
           "ConstantBudget", "LinearBudget", "CurriculumBudget", "AdaptiveBudget", "make_schedule",
           "check_schedule", "check_budget_spelling", "budget_label", "robust_radius", "linear_fraction", "curriculum_fraction"]

BUDGET_SCHEDULES = ("constant", "linear", "curriculum", "adaptive")
BUDGET_ADAPT = ("sample", "batch")
#: adaptive "batch": the weight of each batch in the running estimate of the budget
ADAPTIVE_MOMENTUM = 0.1
#: the schedule settings of FitConfig and their defaults (what an older checkpoint, written without them, ran)
SCHEDULE_DEFAULTS = {"budget_schedule": "constant", "budget_start": 0.0, "budget_warmup": 0.5, "budget_stages": 4,
                     "budget_grid": 4, "budget_adapt": "sample"}

Budget = Union[float, torch.Tensor]


def check_schedule(c) -> None:
    """Checks and fills in (defaults of SCHEDULE_DEFAULTS) the schedule settings of a FitConfig; a
    ValueError names the setting and what was expected."""
    def need(cond, msg):
        if not cond:
            raise ValueError(msg)

    for k, v in SCHEDULE_DEFAULTS.items():
        if getattr(c, k) is None:
            setattr(c, k, v)
    need(c.budget_schedule in BUDGET_SCHEDULES,
         f"budget_schedule must be one of {', '.join(BUDGET_SCHEDULES)}; got {c.budget_schedule!r}")
    num = (int, float)
    need(isinstance(c.budget_start, num) and not isinstance(c.budget_start, bool) and 0.0 <= c.budget_start <= 1.0,
         f"budget_start (the schedule's first budget, a fraction of eps) must be a number in [0, 1], got {c.budget_start!r}")
    need(isinstance(c.budget_warmup, num) and not isinstance(c.budget_warmup, bool) and 0.0 < c.budget_warmup <= 1.0,
         f"budget_warmup (the fraction of the run over which the budget rises) must be a number in (0, 1], "
         f"got {c.budget_warmup!r}")
    for name, what in (("budget_stages", "curriculum budget levels"), ("budget_grid", "adaptive search grid levels")):
        v = getattr(c, name)
        need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{name} ({what}) must be an int >= 1, got {v!r}")
    need(c.budget_adapt in BUDGET_ADAPT, f"budget_adapt must be one of {', '.join(BUDGET_ADAPT)}; got {c.budget_adapt!r}")
    c.budget_start, c.budget_warmup = float(c.budget_start), float(c.budget_warmup)
    if c.budget_schedule != "constant":
        cls = c.method_class
        if not cls.budget_schedules:
            having = [n for n in registry.names() if registry.get(n).budget_schedules]
            raise ValueError(f"budget_schedule={c.budget_schedule!r} applies to the methods that attack with the "
                             f"threat model's eps ({', '.join(having)}); {c.method!r} has its own budget "
                             f"(a latent radius, a certified eps ramp or no attack): use budget_schedule constant")
        need(c.eps > 0, f"budget_schedule={c.budget_schedule!r} needs eps > 0 (it schedules fractions of eps), got eps {c.eps!r}")


def budget_label(cfg) -> str:
    """The schedule's part of a run's label: "" (constant), " + curriculum budget", ..."""
    name = getattr(cfg, "budget_schedule", None) or "constant"
    return "" if name == "constant" else f" + {name} budget"


def check_budget_spelling(method: str, hparams: Dict[str, Any]) -> None:
    """Refuses ``eps_schedule`` set to a budget schedule for a method that schedules its attack budget:
    ``eps_schedule`` is the certified methods' eps-ramp shape (linear, smooth), which such a method would
    silently ignore; its schedule is ``budget_schedule``."""
    v = hparams.get("eps_schedule")
    if method in registry.names() and registry.get(method).budget_schedules and v in BUDGET_SCHEDULES \
            and v != "linear":
        raise ValueError(f"eps_schedule={v!r} is not a setting of {method!r} (eps_schedule is the certified "
                         f"methods' eps-ramp shape: linear, smooth); the attack-budget schedule is "
                         f"budget_schedule={v!r}")


class BudgetSchedule:
    """The budget of each minibatch: ``schedule(ctx, x, y) -> (eps, alpha)`` (floats, or Tensor[B]
    per sample), from the run's progress (``ctx.progress``) and, for adaptive, the current model.
    Subclasses give the fraction of eps (``fraction``); alpha follows at the run's ratio alpha / eps.
    Keeps the sum of the budgets handed out (``log_values``: the epoch's mean, ``train_eps``)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self._sum: Any = 0.0
        self._count = 0

    def fraction(self, ctx, x: torch.Tensor, y: torch.Tensor) -> Budget:
        """eps_t / eps for this minibatch: a float, or a float32 Tensor[B] on x's device."""
        raise NotImplementedError

    def __call__(self, ctx, x: torch.Tensor, y: torch.Tensor) -> Tuple[Budget, Budget]:
        f = self.fraction(ctx, x, y)
        c = self.cfg
        self._sum = self._sum + (f.mean() if torch.is_tensor(f) else f) * c.eps
        self._count += 1
        return c.eps * f, c.alpha * f

    def log_values(self) -> Dict[str, float]:
        """{"train_eps": the mean budget handed out since the last call} (one host sync), then resets."""
        mean = float(self._sum) / self._count if self._count else float("nan")
        self._sum, self._count = 0.0, 0
        return {"train_eps": mean}

    def state_dict(self) -> Dict[str, Any]:
        """The schedule's persistent state (none: a pure function of the run's progress)."""
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores :meth:`state_dict`."""


class ConstantBudget(BudgetSchedule):
    """The threat model's budget for every minibatch: (cfg.eps, cfg.alpha) exactly, as before schedules."""

    def fraction(self, ctx, x, y) -> float:
        return 1.0

    def __call__(self, ctx, x, y):
        return self.cfg.eps, self.cfg.alpha


class LinearBudget(BudgetSchedule):
    """eps_t = eps * (s + (1 - s) * min(1, p / w)): a linear ramp from s * eps to eps over the first w of
    the run (s = budget_start, w = budget_warmup, p = ctx.progress)."""

    def fraction(self, ctx, x, y) -> float:
        return linear_fraction(ctx.progress, self.cfg.budget_start, self.cfg.budget_warmup)


def linear_fraction(p: float, start: float, warmup: float) -> float:
    """s + (1 - s) * min(1, p / w)."""
    return start + (1.0 - start) * min(1.0, p / warmup)


class CurriculumBudget(BudgetSchedule):
    """Curriculum AT: S = budget_stages equal levels eps * (s + (1 - s) * (k + 1) / S), stage
    k = min(S - 1, floor(S * p / w)) (s = budget_start, w = budget_warmup, p = ctx.progress)."""

    def fraction(self, ctx, x, y) -> float:
        return curriculum_fraction(ctx.progress, self.cfg.budget_start, self.cfg.budget_warmup, self.cfg.budget_stages)


def curriculum_fraction(p: float, start: float, warmup: float, stages: int) -> float:
    """s + (1 - s) * (k + 1) / S with k = min(S - 1, floor(S * p / w))."""
    # the 1e-9: a stage boundary that p reaches exactly (p = w k / S) is not lost to rounding (4 * 0.6 / 0.8 < 3)
    k = min(stages - 1, math.floor(stages * p / warmup + 1e-9))
    return start + (1.0 - start) * (k + 1) / stages


@torch.no_grad()
def robust_radius(ctx, x: torch.Tensor, y: torch.Tensor, eps: float, levels: int) -> torch.Tensor:
    """Per-sample robust radius of the current model (eval mode) on the grid eps * j / levels, by a
    one-step search: the input gradient of the cross-entropy at x, then one forward at
    x + eps_j * d for each level j (d = sign(grad), or grad / ||grad||_2 under L2; clamped to the box).
    Returns a float32 Tensor[B]: the largest eps_j such that neither x nor any level up to eps_j is
    misclassified (0 when x itself is). The model's mode is restored."""
    c, fwd = ctx.cfg, ctx.forward
    was = fwd.training
    fwd.eval()
    try:
        g, logits, _ = ctx.engine(c.norm).gradient(x, y)
        g = g.float()
        if c.norm == "l2":
            d = g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
        else:
            d = g.sign()
        ok = logits.argmax(1) == y
        count = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
        for j in range(1, levels + 1):
            xj = ctx.fmt((x + (eps * j / levels) * d).clamp_(c.lo, c.hi))
            with ctx.autocast():
                ok = ok & (fwd(xj).argmax(1) == y)
            count += ok.float()
    finally:
        fwd.train(was)
    return count * (eps / levels)


class AdaptiveBudget(BudgetSchedule):
    """Adaptive AT: each sample attacked just past its current robust radius (see the module's
    docstring): eps_i = min(eps, r_i + eps / K); budget_adapt "batch": a running estimate of their mean."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.estimate: Optional[torch.Tensor] = None

    def fraction(self, ctx, x, y) -> torch.Tensor:
        c, K = self.cfg, self.cfg.budget_grid
        r = robust_radius(ctx, x, y, c.eps, K)
        f = torch.clamp(r / c.eps + 1.0 / K, max=1.0)
        if c.budget_adapt == "sample":
            return f
        m = f.mean()
        self.estimate = m if self.estimate is None else torch.lerp(self.estimate.to(m.device), m, ADAPTIVE_MOMENTUM)
        return self.estimate.expand(x.shape[0]).contiguous()

    def state_dict(self) -> Dict[str, Any]:
        return {"estimate": None if self.estimate is None else self.estimate.detach().cpu()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        e = state.get("estimate")
        self.estimate = None if e is None else e.clone()


_SCHEDULES = {"constant": ConstantBudget, "linear": LinearBudget, "curriculum": CurriculumBudget,
              "adaptive": AdaptiveBudget}


def make_schedule(cfg) -> BudgetSchedule:
    """The BudgetSchedule of a resolved FitConfig (``cfg.budget_schedule``)."""
    return _SCHEDULES[getattr(cfg, "budget_schedule", None) or "constant"](cfg)
