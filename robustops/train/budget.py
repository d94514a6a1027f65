"""Attack-budget schedules for adversarial training: the budget (eps, alpha) each minibatch is attacked
with, after Kinfu & Vidal, "Analysis and extensions of adversarial training for video classification"
(CVPR Workshops 2022, arXiv 2206.07953; official code kaleab-k/VideoAT, ``main.py`` / ``training.py``).

What the paper establishes, and how it is used here:

- The best attack step size grows linearly with the budget. So every schedule moves eps only, and alpha
  follows at the run's ratio c = alpha / eps: ``alpha_t = cfg.alpha * eps_t / cfg.eps``. When the user
  gave no alpha, cfg.alpha is the method's default (2.5 eps / steps for PGD / TRADES / DALE, 1.25 eps for
  FGSM, eps for free), linear in eps, so c is the method's default ratio; when the user gave alpha, c is
  their alpha / eps. (The official training code uses alpha = eps for its PGD whatever the budget, and a
  table of tuned step sizes, roughly 0.2-0.33 eps, for its attacks at test time.)
- Training with a smaller budget than the test budget is more robust at the test budget: no schedule
  exceeds ``cfg.eps``; validation keeps ``cfg.val_eps`` (set eps < val_eps for that).

The rules (s = ``budget_start``, w = ``budget_warmup``, p = the run's progress: the fraction of optimizer
steps done before this minibatch):

- ``constant``: (cfg.eps, cfg.alpha), the run without schedules bit for bit.
- ``linear``: eps_t = eps * (s + (1 - s) * min(1, p / w)), a continuous ramp.
- ``curriculum`` (Curriculum AT: "the attack budget is increased as training iterations proceed"): S =
  ``budget_stages`` levels eps_k = eps * (s + (1 - s) * k / S), stage k = min(S - 1, floor(S p / w)).
  With the defaults (S = the run's epochs, w = 1) this is the official code's rule: epoch e (0-based) is
  attacked with ``np.linspace(s * eps, eps, E + 1)[e]`` (it starts at 1/255 for eps 8/255: s = 1/8, our
  default; its last level, eps, is never used). The official code passes that array to its epoch loop,
  which indexes it by *batch* (``eps_rvs[i]``, i the batch); the per-epoch reading (its commented-out
  ``eps_rvs[i-1]``) is the one that matches the paper's description.
- ``adaptive`` (Adaptive AT: "the attack budget is drawn from a distribution that is adapted as training
  iterations proceed"): on the grid eps_j = eps * j / (K - 1), j = 0..K-1 (K = ``budget_grid``, 10 as the
  code's ``np.linspace(0, eps, 10)``), the current model's adversarial loss L_j (mean cross-entropy under
  PGD at eps_j: the run's steps, Madry's step 2.5 eps_j / steps, random start, eval mode) gives the
  distribution p_j = L_j / sum_k L_k; each minibatch's budget is drawn from it (``budget_adapt="batch"``,
  the code's rule; ``"sample"``: each sample draws its own, a Tensor[B]). The distribution is re-estimated
  at the first minibatch of epochs 0, R, 2R, ... (0-based; R = ``budget_every``, 10 as in the code). The
  code re-estimates where its 1-based epoch i is ``i == begin or i % 10 == 0``: 0-based epochs 0, 9, 19, ...;
  ours are every R epochs from 0 (0, 10, 20, ...), one epoch later than the code's after the first. The code
  measures L_j on the validation set (and keeps the last validation batch's loss, ``losses.val``); a
  method context sees no validation data, so here L_j is measured on the minibatch at hand. p and the
  epoch of its estimate are the schedule's state (checkpointed: a resumed run continues with the same
  distribution, where the code re-estimates at every restart). Draws come from the run's seeds
  (``ctx.seed()``). Cost: K - 1 PGD attacks on one minibatch every R epochs (L_0, at eps 0, is the clean
  loss: one forward pass).

Every schedule reports the mean budget it handed out over an epoch (``train_eps`` in the epoch log); a
pass that only needs a budget (a coreset selection pass) asks with ``log=False``, which neither logs nor,
under adaptive, re-estimates. Under DDP the adaptive losses L_j are averaged over the processes (one
all-reduce per estimate), so every process draws (from its own seeds) from one distribution and a resumed
run continues with it exactly.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import registry
from ..attacks.base import madry_step

__all__ = ["BUDGET_SCHEDULES", "BUDGET_ADAPT", "SCHEDULE_DEFAULTS", "SCHEDULE_SETTINGS", "BudgetSchedule",
           "ConstantBudget", "LinearBudget", "CurriculumBudget", "AdaptiveBudget", "make_schedule",
           "check_schedule", "check_budget_spelling", "budget_label", "linear_fraction", "curriculum_fraction",
           "adversarial_losses"]

BUDGET_SCHEDULES = ("constant", "linear", "curriculum", "adaptive")
BUDGET_ADAPT = ("batch", "sample")
#: the schedule settings of FitConfig and their defaults (budget_stages None: the run's epochs)
SCHEDULE_DEFAULTS = {"budget_schedule": "constant", "budget_start": 0.125, "budget_warmup": 1.0,
                     "budget_stages": None, "budget_grid": 10, "budget_every": 10, "budget_adapt": "batch"}
#: the settings each schedule reads (what a resumed run must share with its checkpoint)
SCHEDULE_SETTINGS = {"constant": (), "linear": ("budget_start", "budget_warmup"),
                     "curriculum": ("budget_start", "budget_warmup", "budget_stages"),
                     "adaptive": ("budget_grid", "budget_every", "budget_adapt")}

Budget = Union[float, torch.Tensor]


def _need(cond, msg):
    if not cond:
        raise ValueError(msg)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_schedule(c) -> None:
    """Checks and fills in (SCHEDULE_DEFAULTS) the schedule settings of a FitConfig; a ValueError names
    the setting and what was expected."""
    for k, v in SCHEDULE_DEFAULTS.items():
        if getattr(c, k) is None:
            setattr(c, k, c.passes if k == "budget_stages" else v)
    _need(c.budget_schedule in BUDGET_SCHEDULES,
          f"budget_schedule must be one of {', '.join(BUDGET_SCHEDULES)}; got {c.budget_schedule!r}")
    _need(_is_num(c.budget_start) and 0.0 <= c.budget_start <= 1.0,
          f"budget_start (the first budget, a fraction of eps) must be a number in [0, 1], got {c.budget_start!r}")
    _need(_is_num(c.budget_warmup) and 0.0 < c.budget_warmup <= 1.0,
          f"budget_warmup (the fraction of the run over which the budget rises) must be a number in (0, 1], "
          f"got {c.budget_warmup!r}")
    for name, what, low in (("budget_stages", "curriculum budget levels", 1), ("budget_grid", "adaptive grid size", 2),
                            ("budget_every", "epochs between adaptive estimates", 1)):
        v = getattr(c, name)
        _need(isinstance(v, int) and not isinstance(v, bool) and v >= low,
              f"{name} ({what}) must be an int >= {low}, got {v!r}")
    _need(c.budget_adapt in BUDGET_ADAPT, f"budget_adapt must be one of {', '.join(BUDGET_ADAPT)}; got {c.budget_adapt!r}")
    c.budget_start, c.budget_warmup = float(c.budget_start), float(c.budget_warmup)
    if c.budget_schedule != "constant":
        if not c.method_class.budget_schedules:
            having = [n for n in registry.names() if registry.get(n).budget_schedules]
            raise ValueError(f"budget_schedule={c.budget_schedule!r} applies to the methods that attack with the "
                             f"threat model's eps ({', '.join(having)}); {c.method!r} has its own budget "
                             f"(a latent radius, a certified eps ramp or no attack): use budget_schedule constant")
        _need(c.eps > 0, f"budget_schedule={c.budget_schedule!r} needs eps > 0 (it schedules fractions of eps), "
                         f"got eps {c.eps!r}")


def budget_label(cfg) -> str:
    """The schedule's part of a run's label: "" (constant), " + curriculum budget", ..."""
    name = getattr(cfg, "budget_schedule", None) or "constant"
    return "" if name == "constant" else f" + {name} budget"


def check_budget_spelling(method: str, hparams: Dict[str, Any]) -> None:
    """The issue's spelling ``eps_schedule`` of the attack-budget schedule, in place in ``hparams``.

    ``eps_schedule`` is two things, by method: for the certified methods (ibp, acert, crown_ibp,
    fastibp) the shape of their eps ramp (linear, smooth), left as it is; for a method that schedules
    its attack budget (``Method.budget_schedules``: pgd, fgsm, free, trades, dale, ...) a spelling of
    ``budget_schedule``: it is moved there (a method would otherwise ignore it silently, another
    method's hyperparameter). Refuses (ValueError) the two spellings set to different schedules, and
    "smooth" (a ramp shape, not a budget schedule) for such a method."""
    v = hparams.get("eps_schedule")
    if v is None or method not in registry.names() or not registry.get(method).budget_schedules:
        return
    if v not in BUDGET_SCHEDULES:
        raise ValueError(f"eps_schedule (the attack-budget schedule of {method!r}) must be one of "
                         f"{', '.join(BUDGET_SCHEDULES)}; got {v!r}")
    other = hparams.get("budget_schedule")
    if other not in (None, "constant", v):
        raise ValueError(f"eps_schedule={v!r} and budget_schedule={other!r} are two spellings of {method!r}'s "
                         f"attack-budget schedule: give one")
    hparams["budget_schedule"] = hparams.pop("eps_schedule")


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

    def peek(self, ctx, x: torch.Tensor, y: torch.Tensor) -> Budget:
        """:meth:`fraction` without changing the schedule's state (the same for the schedules that have none)."""
        return self.fraction(ctx, x, y)

    def __call__(self, ctx, x: torch.Tensor, y: torch.Tensor, log: bool = True) -> Tuple[Budget, Budget]:
        """(eps, alpha) for this minibatch; ``log=False``: a budget for a pass that trains nothing (a
        coreset selection pass), not counted in ``train_eps`` and (:meth:`peek`) leaving the state as it is."""
        c = self.cfg
        if not log:
            f = self.peek(ctx, x, y)
            return c.eps * f, c.alpha * f
        f = self.fraction(ctx, x, y)
        self._sum = self._sum + (f.mean() if torch.is_tensor(f) else f) * c.eps
        self._count += 1
        return c.eps * f, c.alpha * f

    def log_values(self, world_size: int = 1, device=None) -> Dict[str, float]:
        """{"train_eps": the mean budget handed out since the last call, over the processes when
        world_size > 1 (one all-reduce on ``device``, the run's: under adaptive each draws its own)}
        (one host sync), then resets."""
        total = torch.tensor([float(self._sum), float(self._count)], dtype=torch.float64, device=device)
        if world_size > 1:
            from .collective import sync_tensors_

            sync_tensors_([total], "mean")  # the mean of sums and of counts: their ratio is the overall mean
        self._sum, self._count = 0.0, 0
        return {"train_eps": float(total[0] / total[1]) if total[1] > 0 else float("nan")}

    def state_dict(self) -> Dict[str, Any]:
        """The schedule's persistent state (none: a pure function of the run's progress)."""
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores :meth:`state_dict`."""


class ConstantBudget(BudgetSchedule):
    """The threat model's budget for every minibatch: (cfg.eps, cfg.alpha) exactly, as before schedules."""

    def fraction(self, ctx, x, y) -> float:
        return 1.0

    def __call__(self, ctx, x, y, log: bool = True):
        return self.cfg.eps, self.cfg.alpha


class LinearBudget(BudgetSchedule):
    """eps_t = eps * (s + (1 - s) * min(1, p / w)) (s = budget_start, w = budget_warmup, p = ctx.progress)."""

    def fraction(self, ctx, x, y) -> float:
        return linear_fraction(ctx.progress, self.cfg.budget_start, self.cfg.budget_warmup)


def linear_fraction(p: float, start: float, warmup: float) -> float:
    """s + (1 - s) * min(1, p / w)."""
    return start + (1.0 - start) * min(1.0, p / warmup)


class CurriculumBudget(BudgetSchedule):
    """Curriculum AT: S = budget_stages levels eps * (s + (1 - s) * k / S), stage k = min(S - 1, floor(S p / w))."""

    def fraction(self, ctx, x, y) -> float:
        c = self.cfg
        return curriculum_fraction(ctx.progress, c.budget_start, c.budget_warmup, c.budget_stages)


def curriculum_fraction(p: float, start: float, warmup: float, stages: int) -> float:
    """s + (1 - s) * k / S with k = min(S - 1, floor(S * p / w))."""
    # the 1e-9: a stage boundary that p reaches exactly (p = w k / S) is not lost to rounding (4 * 0.6 / 0.8 < 3)
    k = min(stages - 1, math.floor(stages * p / warmup + 1e-9))
    return start + (1.0 - start) * k / stages


def adversarial_losses(ctx, x: torch.Tensor, y: torch.Tensor, grid) -> torch.Tensor:
    """The current model's mean cross-entropy on (x, y) under PGD at each budget of ``grid`` (floats):
    the run's norm and steps, step 2.5 eps / steps, a random start, eval mode (restored after); at
    eps 0 the clean loss (a forward pass: a PGD run in a ball of radius 0 returns x).
    Returns a float64 CPU Tensor[len(grid)]."""
    c, fwd = ctx.cfg, ctx.forward
    was = fwd.training
    fwd.eval()
    out = []
    try:
        for e in grid:
            xa = x if e == 0 else ctx.attack(x, y, e, madry_step(e, c.steps), c.steps, c.norm, True)
            with torch.no_grad(), ctx.autocast():
                out.append(F.cross_entropy(fwd(xa).float(), y))
    finally:
        fwd.train(was)
    return torch.stack(out).double().cpu()


class AdaptiveBudget(BudgetSchedule):
    """Adaptive AT: budgets drawn from the grid eps * j / (K - 1) with probabilities proportional to the
    current model's adversarial loss at each (re-estimated every budget_every epochs; see the module)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        K = cfg.budget_grid
        self.grid = torch.tensor([j / (K - 1) for j in range(K)], dtype=torch.float64)  # fractions of eps
        self.probs: Optional[torch.Tensor] = None
        self.estimated_epoch = -1

    def estimate(self, ctx, x, y) -> None:
        """p_j = L_j / sum_k L_k from this minibatch (uniform if every loss is 0); under DDP L is the mean
        over the processes' minibatches (every process reaches the estimate at the same epoch's first step)."""
        L = adversarial_losses(ctx, x, y, [self.cfg.eps * float(f) for f in self.grid])
        if ctx.world_size > 1 and dist.is_available() and dist.is_initialized():
            Ld = L.to(x.device)  # NCCL reduces device tensors only
            dist.all_reduce(Ld)
            L = Ld.cpu() / ctx.world_size
        total = float(L.sum())
        self.probs = L / total if total > 0 else torch.full_like(L, 1.0 / len(L))
        self.estimated_epoch = ctx.epoch

    def fraction(self, ctx, x, y) -> Budget:
        e = ctx.epoch
        if self.probs is None or (e != self.estimated_epoch and e % self.cfg.budget_every == 0):
            self.estimate(ctx, x, y)
        return self.draw(ctx, x, self.probs)

    def peek(self, ctx, x, y) -> Budget:
        """A draw from the current distribution, never re-estimated (uniform over the grid before the
        first estimate): a selection pass must not move the estimate's epoch or minibatch."""
        probs = self.probs if self.probs is not None else torch.full_like(self.grid, 1.0 / len(self.grid))
        return self.draw(ctx, x, probs)

    def draw(self, ctx, x, probs: torch.Tensor) -> Budget:
        """The grid fraction(s) drawn from probs with a generator seeded by ``ctx.seed()``: a float
        (``budget_adapt="batch"``) or a float32 Tensor[B] on x's device ("sample")."""
        g = torch.Generator().manual_seed(ctx.seed())
        n = x.shape[0] if self.cfg.budget_adapt == "sample" else 1
        f = self.grid[torch.multinomial(probs, n, replacement=True, generator=g)]
        if self.cfg.budget_adapt == "batch":
            return float(f[0])
        return f.to(device=x.device, dtype=torch.float32, non_blocking=True)

    def state_dict(self) -> Dict[str, Any]:
        return {"probs": self.probs, "estimated_epoch": self.estimated_epoch}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        p = state.get("probs")
        self.probs = None if p is None else p.clone()
        self.estimated_epoch = int(state.get("estimated_epoch", -1))


_SCHEDULES = {"constant": ConstantBudget, "linear": LinearBudget, "curriculum": CurriculumBudget,
              "adaptive": AdaptiveBudget}


def make_schedule(cfg) -> BudgetSchedule:
    """The BudgetSchedule of a resolved FitConfig (``cfg.budget_schedule``)."""
    return _SCHEDULES[getattr(cfg, "budget_schedule", None) or "constant"](cfg)
