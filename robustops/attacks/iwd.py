"""The IWD attack: adversarial examples within an internal-Wasserstein budget (Wang, Zhang, Cao, Li, Tan
& Xiang, "Internal Wasserstein distance for adversarial attack and defense", arXiv 2103.07598).

    atk = IWDAttack(model, eps=0.3, steps=10, patch=3)        # eps: IWD_2 budget (per-value RMS scale)
    res = atk.perturb(images, labels)                          # IWDResult: ... and distance
    res.distance                                               # IWD(x, x_adv) <= eps, always

The budgeted formulation (per sample, [lo, hi] the box ``clip``, L the attack's loss; targeted: its
negative at the target):

    max_{x'}  L(f(x'), y)   subject to   IWD_p(x, x') <= eps,   x' in [lo, hi]^D,

IWD as :mod:`robustops.attacks.wasserstein` defines it (patches, solver, p). It runs on the shared
projected-gradient engine (:class:`~robustops.attacks.engine.Engine`: the loss's input gradient, the
recording of each sample's first success, the final evaluation), with its own projection step
(:class:`IWDStep`) in place of the L_p ball's:

1. the ascent: z = clip(x' + alpha * sign(g - lam * grad_x' IWD(x, x') / eps), lo, hi), g the loss's
   input gradient. lam >= 0 weighs a Lagrangian term of the constraint: it steers the step toward
   directions that change the image's patch distribution little (rearrangements), which the IWD ball
   admits far from x in L_p; lam = 0 is a plain sign ascent.
2. the projection onto the feasible set, which has no closed form: the largest t in [0, 1] with
   IWD(x, x + t (z - x)) <= eps (1 - MARGIN), on the segment from x (feasible: IWD 0) to z (the box is
   convex, so the segment stays in it), by ``search`` (default 4) steps of false position on the bracket
   [t_lo, t_hi] = [0, 1] (the secant through its ends: exact where the IWD grows linearly along the
   segment, which it nearly does), always keeping its feasible end t_lo, the point returned; samples
   already feasible are not touched. Each step is one evaluation of the distance.

The start is x plus a uniform draw in the L-inf ball of radius eps (``random_start``; the exact IWD of an
L-inf perturbation of size eps is at most eps), projected as in 2 in any case. Every iterate,
and so every recorded success, is feasible; at the end the returned x_adv's distance is measured again
(the ``distance`` column) and a sample found over budget there (a solver's rounding differing between a
sub-batch and the whole batch) falls back to x: x_adv never exceeds its budget.

What the paper leaves open, or could not be read (its method section could not be retrieved when this
was written; the formulation above is the closest faithful reading of its abstract: an attack that
maximises the loss under an IWD budget): the step rule (sign ascent, as PGD), the Lagrangian weight
(lam, default 0.0), the projection (radial false position: a projection onto a non-convex set along the
segment, not the Euclidean one), the start, the step size (default 2.5 eps / steps, Madry et al.'s
rule: an L-inf step of alpha changes the IWD by at most alpha) and the number of steps (default 10).
No restarts and no early exit: each sample runs all steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from .. import _checks, _rng, ops
from .base import Attack, Param, step_params
from .engine import AttackResult, Recorder, batch_view_shape
from .wasserstein import IWD

__all__ = ["IWDAttack", "IWDResult", "IWDStep", "project_iwd", "MARGIN", "DEFAULT_EPS"]

#: The projection aims at eps * (1 - MARGIN), so that float rounding between evaluations of the distance
#: (a sample alone or in a batch) does not put a projected point over eps.
MARGIN = 1e-4
#: The IWD budget by default where one is not given: method ``iwd``'s ``iwd_eps``, ``evaluate --threat iwd``
#: without --eps and the threat-models demo's IWD column (a digits setting, the demo's L-inf eps: the exact
#: IWD ball of radius 0.2 holds the L-inf ball of radius 0.2).
DEFAULT_EPS = 0.2


@dataclass
class IWDResult(AttackResult):
    """:class:`~robustops.attacks.engine.AttackResult` plus ``distance``: FloatTensor[B], IWD(x, x_adv)
    (<= eps)."""
    distance: Optional[torch.Tensor] = None


def _rows(p, idx):
    return p[idx] if isinstance(p, torch.Tensor) and p.dim() == 1 else p


def project_iwd(x: torch.Tensor, z: torch.Tensor, eps, distance: Callable, search: int = 4, *,
                masked: bool = False) -> torch.Tensor:
    """z moved toward x until IWD(x, z) <= eps (1 - MARGIN): x + t (z - x) with t in [0, 1] found by
    ``search`` steps of false position on the bracket [t_lo, t_hi] (t_lo feasible, from 0; t_hi
    infeasible, from 1; see the module docstring). x, z [B, ...]; eps a float or a Tensor[B];
    distance(x, z) -> Tensor[B]. Returns a new tensor; rows already feasible are z's.

    masked: search on all rows and keep the feasible ones' z with ``torch.where`` (no host sync: for a
    distance on an accelerator), instead of selecting the infeasible rows (one sync, the distance
    evaluated on those rows only). Both give the same rows (up to the distance's rounding between batch
    sizes, which the attack's final budget check covers)."""
    out = z.detach().clone()
    with torch.no_grad():
        target = eps * (1.0 - MARGIN)
        d_z = distance(x, out)
        if masked:
            bad, rows = d_z > target, slice(None)
        else:
            bad = rows = (d_z > target).nonzero().squeeze(1)
            if bad.numel() == 0:
                return out
        xb, delta, tb = x[rows], (z[rows] - x[rows]), _rows(target, rows)
        view = batch_view_shape(xb)
        t_lo, d_lo = torch.zeros_like(d_z[rows]), torch.zeros_like(d_z[rows])
        t_hi, d_hi = torch.ones_like(t_lo), d_z[rows]
        for _ in range(search):
            # the secant through the bracket's ends (exact where the IWD grows linearly along the segment),
            # kept strictly inside the bracket so that it always shrinks
            frac = ((tb - d_lo) / (d_hi - d_lo).clamp_min(1e-30)).clamp(0.05, 0.95)
            t = t_lo + frac * (t_hi - t_lo)
            d = distance(xb, xb + t.view(view) * delta)
            ok = d <= tb
            t_lo, d_lo = torch.where(ok, t, t_lo), torch.where(ok, d, d_lo)
            t_hi, d_hi = torch.where(ok, t_hi, t), torch.where(ok, d_hi, d)
        moved = (xb + t_lo.view(view) * delta).to(out.dtype)
        if masked:
            return torch.where(bad.view(view), moved, out)
        out[bad] = moved
    return out


class IWDStep:
    """The engine's step op of the IWD attack (``step(x_adv, x, grad, eps, alpha, norm, lo, hi)``, in
    place): the sign ascent with the Lagrangian term, then :func:`project_iwd`."""

    def __init__(self, distance: Callable, lam: float = 0.0, search: int = 4):
        self.distance, self.lam, self.search = distance, float(lam), int(search)

    def __call__(self, x_adv, x, grad, eps, alpha, norm, lo, hi):
        eps_t = eps.view(batch_view_shape(x)) if eps.dim() else eps
        g = grad.float()
        if self.lam > 0:
            xa = x_adv.detach().float().requires_grad_(True)
            with torch.enable_grad():
                (h,) = torch.autograd.grad(self.distance(x.float(), xa).sum(), xa)
            g = g - self.lam * h / eps_t.clamp_min(1e-12)
        alpha_t = alpha.view(batch_view_shape(x)) if alpha.dim() else alpha
        z = (x_adv.float() + alpha_t.to(x_adv.device) * g.sign()).clamp_(lo, hi)
        e = eps.to(x.device) if eps.dim() else float(eps)
        return x_adv.copy_(project_iwd(x.float(), z, e, self.distance, self.search, masked=x.device.type != "cpu"))


class IWDAttack(Attack):
    """The internal-Wasserstein attack (module docstring): maximises the loss subject to
    IWD_p(x, x_adv) <= eps and the box.

    eps: the IWD budget (float or Tensor[B], per sample); alpha: the sign step (default 2.5 eps / steps);
    steps; patch / stride / method / p / blur / projections / features: the distance
    (:func:`~robustops.attacks.wasserstein.internal_wasserstein`); lam: the Lagrangian weight of the
    ascent; search: false-position steps of the projection; random_start. The base options (loss, targeted,
    clip, mean / std, seed, train_mode, dtype) as :class:`~robustops.attacks.base.Attack`.
    """

    result_fields = ("distance",)
    #: no early exit: every sample runs all steps (robust_accuracy reads it)
    early_stop = False

    def __init__(self, model, eps: Param, alpha: Optional[Param] = None, steps: int = 10, *, patch: int = 3,
                 stride: int = 1, method: str = "auto", p: float = 2.0, blur: float = 0.01, projections: int = 64,
                 features: Optional[Callable] = None, lam: float = 0.0, search: int = 4,
                 random_start: bool = True, targeted: bool = False, loss: Union[str, Callable] = "ce",
                 clip=(0.0, 1.0), mean=None, std=None, seed: Optional[int] = None, train_mode: bool = False,
                 dtype=None, target_fn: Optional[Callable] = None):
        super().__init__(model, loss=loss, targeted=targeted, target_fn=target_fn, clip=clip, mean=mean, std=std,
                         seed=seed, train_mode=train_mode, dtype=dtype)
        self.eps = _checks.check_sample_param(eps, "eps (the IWD budget)")
        self.alpha = None if alpha is None else _checks.check_sample_param(alpha, "alpha (the IWD attack's step)")
        self.steps = _checks.check_int(steps, "steps", 1)
        self.distance = IWD(patch=patch, stride=stride, method=method, p=p, blur=blur, projections=projections,
                            features=features)
        self.lam = _checks.check_number(lam, "lam (the IWD attack's Lagrangian weight)", 0.0)
        self.search = _checks.check_int(search, "search (the IWD projection's false-position steps)", 0)
        self.random_start = bool(random_start)
        self.step_op = IWDStep(self.distance, self.lam, self.search)
        self.engine = self.make_engine("linf")
        self.engine.step_op = self.step_op

    def __repr__(self) -> str:
        eps = self.eps if not isinstance(self.eps, torch.Tensor) else f"Tensor[{self.eps.numel()}]"
        d = self.distance
        return (f"IWDAttack(eps={eps}, alpha={self.alpha}, steps={self.steps}, patch={d.patch}, stride={d.stride}, "
                f"method={d.method!r}, p={d.p}, lam={self.lam}, targeted={self.targeted})")

    def perturb(self, images: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor] = None,
                eps: Optional[Param] = None, alpha: Optional[Param] = None, offset: Optional[int] = None,
                skip: Optional[torch.Tensor] = None, evaluate: bool = True) -> IWDResult:
        """Runs the attack on images [B, C, H, W] in clip with labels [B] (targets [B] when targeted);
        eps / alpha override the attack's. Returns an :class:`IWDResult`."""
        return super().perturb(images, labels, targets, offset=offset, skip=skip, evaluate=evaluate, eps=eps,
                               alpha=alpha)

    def examples(self, x: torch.Tensor, y: torch.Tensor, seed: int, offset: int = 0) -> torch.Tensor:
        """The final iterate for (x, y) from ``seed`` (training's call, as ``perturb(..., evaluate=False)``
        with the attack's seed set to seed): without perturb's input checks, whose range check syncs the
        host; x a float batch in clip, y labels on its device (untargeted)."""
        x = x.detach()
        with self.model_state():
            return self.attack(x, y, None, seed=_rng.resolve_seed(seed), offset=offset, skip=None, evaluate=False,
                               **self.prepare(x)).x_adv

    def prepare(self, x: torch.Tensor, eps: Optional[Param] = None, alpha: Optional[Param] = None) -> dict:
        """eps / alpha per sample on x's device (alpha by default 2.5 eps / steps); x must be [B, C, H, W]."""
        if x.dim() != 4:
            raise ValueError(f"images must be [B, C, H, W] for the IWD attack (patches are 2-D windows), "
                             f"got shape {list(x.shape)}")
        return step_params(x, self.eps if eps is None else eps, self.alpha if alpha is None else alpha, self.steps)

    def empty_result(self, x: torch.Tensor, **params) -> IWDResult:
        res = super().empty_result(x, **params)
        return IWDResult(res.x_adv, res.success, res.success_step, res.restart, res.loss, res.pred,
                         distance=torch.zeros(0, device=x.device))

    def start(self, x: torch.Tensor, eps, seed: int, offset: int) -> torch.Tensor:
        """The feasible start: x, or with random_start a uniform L-inf draw of radius eps projected."""
        if not self.random_start:
            return x.float().clone()
        lo, hi = self.clip
        z = ops.random_init(x.float(), eps, "linf", lo, hi, seed=seed, offset=offset)
        return project_iwd(x.float(), z, eps, self.distance, self.search, masked=x.device.type != "cpu").contiguous()

    def attack(self, x, y, targets, *, seed, offset, skip, evaluate, eps, alpha) -> IWDResult:
        """The engine's loop with the IWD step from a feasible start (recording each sample's first
        success when evaluate, else returning the final iterate, as training wants); then the budget
        check and the final evaluation."""
        yt = (y, targets)
        xf = x.float()
        xa = self.start(x, eps, seed, offset)
        recorder = Recorder(xa) if evaluate else None
        self.engine.iterate(xf, xa, yt, eps, alpha, self.steps, recorder)
        res = AttackResult(xa)
        if recorder is not None:
            res = recorder.finish(xa, self.steps, *self.engine.evaluate(xa, yt)[1:])
        x_adv = res.x_adv.to(x.dtype)
        with torch.no_grad():
            dist = self.distance(xf, x_adv.float())
            over = dist > eps
            if recorder is None:  # training's path: no host sync (x itself is always feasible)
                x_adv = torch.where(over.view(batch_view_shape(x)), x, x_adv)
                dist = torch.where(over, torch.zeros_like(dist), dist)
            elif bool(over.any()):  # rounding put a point over budget: x itself is always feasible
                x_adv = torch.where(over.view(batch_view_shape(x)), x, x_adv)
                dist = torch.where(over, torch.zeros_like(dist), dist)
                _, res.success, res.loss, res.pred = self.engine.evaluate(x_adv, yt)
                res.success_step = torch.where(over, torch.where(res.success, 0, -1), res.success_step)
        restart = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
        success = res.success if skip is None or res.success is None else res.success | skip
        return IWDResult(x_adv, success, res.success_step, restart, res.loss, res.pred, distance=dist)
