"""The joint-space threat model (JSTM) of Lau, Liu, Souri, Lin, Feizi and Chellappa, "Interpolated joint
space adversarial training for robust and generalizable defenses" (TPAMI 2023, arXiv 2112.06323): a
normalising flow G (an exact bijection between images and latents, :func:`perturbation.check_flow`)
places the data manifold, and the adversary perturbs an image on it (a latent offset dz) and off it (a
pixel offset dx) together:

    x_adv = clamp(G(G^-1(x) + dz) + dx, lo, hi),   ||dz||_inf <= eps_z,   ||dx||_inf <= eps_x,

maximising the classifier's loss at x_adv (the joint space attack). eps_z = 0 is the pixel L-inf
threat model, eps_x = 0 the exact on-manifold one (the flow's image of the latent ball).

How it runs: on the projected-gradient engine (:class:`JointEngine`, an :class:`Engine` whose iterate
is the pair t = [z', dx] flattened to [B, 2D], z' = G^-1(x) + dz, and whose centre is [G^-1(x), 0]).
Each step takes one gradient of the loss at x_adv(t) with respect to both parts and makes the signed
L-inf step of each part with its own step size, then projects each part on its own ball (the
concatenation in one L-inf iterate: one forward, one backward per step). The pixel part is further
projected so that G(z') + dx lies in [lo, hi] (as ``pgd_step_`` keeps x + delta in the box), which makes
the attack with eps_z = 0 the pixel PGD of ``attacks.PGD`` step for step (the same seed gives the same
start) up to the flow's reconstruction error. Budgets are per sample (floats or Tensor[B] for each part).

Choices the paper leaves open here (its method section could not be read for this implementation; this
is the closest faithful reading of its definition of JSTM and its attack, built from the abstract and
the threat model's definition): both norms are L-inf (the pixel budget is the usual L-inf one; the latent
budget is an L-inf box around G^-1(x)); the two parts are iterated jointly, not alternately; the random
start draws dz uniform in its box and dx uniform in its box (then projected on [lo, hi]); step sizes
default to Madry et al.'s 2.5 * eps / steps per part.

    atk = JSTMAttack(classifier, flow, eps=0.2, eps_z=0.1, steps=10)
    res = atk.perturb(images, labels)     # JSTMAttackResult: x_adv, dz [B, D], dx (x's shape), success, ...
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from .. import _checks, _rng, ops
from ..perturbation import protocol as perturbation  # the protocol only: the rest of the package uses the attacks
from .base import Attack, Param, ce_score, frozen, madry_step
from .engine import AttackResult, Engine

__all__ = ["JSTMAttack", "JSTMAttackResult", "JointEngine", "joint_budget"]

_INF = float("inf")
#: the sub-stream (``_rng.derive_seed``) of the latent start, so the pixel start uses the run's own seed
#: (the same draw as PGD's start)
LATENT_STREAM = 0x4A53


@dataclass
class JSTMAttackResult(AttackResult):
    """An :class:`AttackResult` plus the two parts of the joint perturbation: dz, the latent offsets
    [B, D] (float32, ||dz||_inf <= eps_z per sample), and dx, the pixel offsets (x's shape, float32,
    ||dx||_inf <= eps_x), with x_adv = clamp(G(G^-1(x) + dz) + dx, lo, hi)."""
    dz: Optional[torch.Tensor] = None
    dx: Optional[torch.Tensor] = None


def joint_budget(eps_z: Param, eps_x: Param, B: int, device) -> torch.Tensor:
    """The per-sample joint budget the engine carries: a float32 Tensor[B, 2] of (latent, pixel) values,
    from floats or Tensor[B] for each part (checked: finite, >= 0)."""
    parts = []
    for p, name in ((eps_z, "eps_z"), (eps_x, "eps")):
        p = _checks.sample_param_on(p, name, B, device)
        parts.append(p if isinstance(p, torch.Tensor) else torch.full((B,), float(p), device=device))
    return torch.stack(parts, 1).to(torch.float32)


class JointEngine(Engine):
    """The projected-gradient engine of the joint space: the iterate is t = [z', dx] ([B, 2D], float32),
    its centre [G^-1(x), 0] (:meth:`centre`), eps / alpha Tensor[B, 2] of (latent, pixel) values
    (:func:`joint_budget`). ``forward`` and ``objective`` are those of an image engine (the classifier on
    images, the loss); :meth:`member` maps t to the adversarial image. start "clean" (dz = dx = 0) or
    "uniform" (each part uniform in its box; the pixel draw is PGD's for the same seed and offset)."""

    def __init__(self, flow, forward: Callable, objective: Callable, *, lo: float = 0.0, hi: float = 1.0,
                 dtype=None, success: Optional[Callable] = None, score: Optional[Callable] = None, scaler=None):
        self.flow = perturbation.check_flow(flow, "flow")
        self.image_shape = tuple(int(s) for s in flow.image_shape)
        self.dim = math.prod(self.image_shape)
        self.box = (float(lo), float(hi))
        self.image_forward = forward
        super().__init__(self._joint_forward, objective, norm="linf", lo=-_INF, hi=_INF, dtype=dtype,
                         success=success, score=score, scaler=scaler)

    @classmethod
    def like(cls, engine: Engine, flow) -> "JointEngine":
        """The joint engine with an image engine's forward, objective, box, dtype, success, score and loss
        scaler (e.g. a training context's ``ctx.engine()``)."""
        return cls(flow, engine.forward, engine.objective, lo=engine.lo, hi=engine.hi, dtype=engine.dtype,
                   success=engine.success, score=engine.score_fn, scaler=engine.scaler)

    def _check_images(self, x: torch.Tensor) -> None:
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"images must have the flow's image_shape {list(self.image_shape)} after the batch "
                             f"dimension, got {list(x.shape)}")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """G^-1(x) as float32 [B, D], without gradient."""
        self._check_images(x)
        with torch.no_grad():
            z = self.flow.encode(x)
        if z.shape != (x.shape[0], self.dim):
            raise ValueError(f"flow.encode(x) must return [B, D] = {[x.shape[0], self.dim]}, got {list(z.shape)}")
        return z.float()

    def centre(self, x: torch.Tensor) -> torch.Tensor:
        """The iterate's centre [G^-1(x), 0] for images x [B, C, H, W]."""
        z0 = self.encode(x)
        return torch.cat([z0, torch.zeros_like(z0)], 1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """G(z) as float32 [B, D] (differentiable in z)."""
        return self.flow.decode(z).reshape(z.shape[0], -1).float()

    def member(self, t: torch.Tensor) -> torch.Tensor:
        """The image of the iterate t: clamp(G(z') + dx, lo, hi) [B, C, H, W] (differentiable in t)."""
        D = self.dim
        x = self.decode(t[:, :D]) + t[:, D:]
        # The steps keep G(z') + dx in the box already (up to the flow's rounding), so the clamp only
        # removes that rounding: straight through, so a pixel the flow rounds to just outside the box
        # keeps its gradient (as pgd_step_'s iterate, which never leaves the box, has it).
        x = x + (x.clamp(*self.box) - x).detach()
        return x.view(t.shape[0], *self.image_shape)

    def split(self, t: torch.Tensor, centre: torch.Tensor):
        """(dz [B, D], dx [B, C, H, W]) of an iterate t and its centre."""
        D = self.dim
        return t[:, :D] - centre[:, :D], t[:, D:].reshape(t.shape[0], *self.image_shape)

    def _joint_forward(self, t: torch.Tensor, context=None) -> torch.Tensor:
        # The flow runs in float32 even under the engine's autocast: its reconstruction (and so the
        # budgets the adversary is held to) must not carry bf16 / fp16 rounding; the classifier is autocast.
        with torch.autocast(device_type=t.device.type, enabled=False):
            x = self.member(t)
        return self.image_forward(x) if context is None else self.image_forward(x, context)

    def _fit_pixels(self, z: torch.Tensor, dx: torch.Tensor, eps_x: torch.Tensor) -> torch.Tensor:
        """dx projected so that G(z) + dx lies in the box and |dx| <= eps_x (pgd_step_'s box rule)."""
        base = self.decode(z)
        return ((base + dx).clamp(*self.box) - base).clamp(-eps_x, eps_x)

    def step_(self, xa: torch.Tensor, x: torch.Tensor, g: torch.Tensor, eps, alpha) -> torch.Tensor:
        """The signed L-inf step of each part with its own step size, each projected on its own ball
        (the latent one around G^-1(x)), the pixel part also on the box; in place on xa."""
        D = self.dim
        eps, alpha = eps.view(-1, 2), alpha.view(-1, 2)
        e_z, e_x, a_z, a_x = eps[:, :1], eps[:, 1:], alpha[:, :1], alpha[:, 1:]
        with torch.no_grad():
            z0 = x[:, :D]
            z = z0 + (xa[:, :D] + a_z * g[:, :D].sign() - z0).clamp(-e_z, e_z)
            dx = (xa[:, D:] + a_x * g[:, D:].sign()).clamp(-e_x, e_x)
            xa[:, D:] = self._fit_pixels(z, dx, e_x)
            xa[:, :D] = z
        return xa

    def start(self, x: torch.Tensor, eps, start: str = "uniform", seed: int = 0, offset: int = 0,
              start_sigma: float = 0.0) -> torch.Tensor:
        """The start iterate from the centre x: the centre itself ("clean") or each part uniform in its
        box ("uniform": the pixel draw is ``random_init``'s for (seed, offset) on the images, PGD's start;
        the latent draw uses the sub-stream ``derive_seed(seed, LATENT_STREAM)``)."""
        t = x.clone()
        if start == "clean":
            return t
        if start != "uniform":
            raise ValueError(f'the joint-space attack starts "clean" or "uniform", got {start!r}')
        D, B = self.dim, x.shape[0]
        eps = eps.view(-1, 2)
        zeros = torch.zeros(B, *self.image_shape, device=x.device)
        dz = ops.random_init(zeros.view(B, D), eps[:, 0].contiguous(), "linf", -_INF, _INF,
                             seed=_rng.derive_seed(seed, LATENT_STREAM), offset=offset)
        noise = ops.random_init(zeros, eps[:, 1].contiguous(), "linf", -_INF, _INF, seed=seed, offset=offset)
        with torch.no_grad():
            t[:, :D] += dz
            t[:, D:] = self._fit_pixels(t[:, :D], noise.view(B, D), eps[:, 1:])
        return t


class JSTMAttack(Attack):
    """The joint space attack (module docstring): PGD over a latent offset dz through the flow and a
    pixel offset dx at once, x_adv = clamp(G(G^-1(x) + dz) + dx, lo, hi), ||dz||_inf <= eps_z,
    ||dx||_inf <= eps.

    classifier: an nn.Module (or callable) mapping images to logits (``mean`` / ``std`` as in :class:`PGD`).
    flow: a module with the flow protocol (image_shape, encode, decode, log_prob); held in eval mode
      without parameter gradients while the attack runs.
    eps / eps_z: the pixel and latent L-inf budgets, floats or Tensor[B]; alpha / alpha_z: their step
      sizes (default 2.5 * budget / steps each). steps / restarts / random_start / early_stop /
      record_steps / loss / targeted / target_fn / seed / train_mode / dtype: as :class:`PGD`; lo, hi: the
      pixel box.

    ``perturb(x, y)`` returns a :class:`JSTMAttackResult`; ``atk(x, y)`` returns x_adv.
    """

    def __init__(self, classifier, flow, eps: Param, eps_z: Param, alpha: Optional[Param] = None,
                 alpha_z: Optional[Param] = None, steps: int = 10, restarts: int = 1, random_start: bool = True,
                 early_stop: bool = False, loss: Union[str, Callable] = "ce", targeted: bool = False,
                 seed: Optional[int] = 0, lo: float = 0.0, hi: float = 1.0, dtype=None, record_steps: bool = False,
                 mean=None, std=None, train_mode: bool = False, target_fn: Optional[Callable] = None):
        perturbation.check_flow(flow, "flow")
        super().__init__(classifier, loss=loss, targeted=targeted, target_fn=target_fn, clip=(lo, hi), mean=mean,
                         std=std, seed=seed, train_mode=train_mode, dtype=dtype)
        self.eps = _checks.check_sample_param(eps, "eps")
        self.eps_z = _checks.check_sample_param(eps_z, "eps_z")
        self.alpha = None if alpha is None else _checks.check_sample_param(alpha, "alpha")
        self.alpha_z = None if alpha_z is None else _checks.check_sample_param(alpha_z, "alpha_z")
        self.steps = _checks.check_int(steps, "steps", 1)
        self.restarts = _checks.check_int(restarts, "restarts", 1)
        self.random_start = bool(random_start)
        self.early_stop = bool(early_stop)
        self.record_steps = bool(record_steps)
        self.norm = "linf"
        self.flow = flow
        self.pixel_engine = self.make_engine("linf")
        self.engine = JointEngine(flow, self.forward, self.objective, lo=lo, hi=hi, dtype=self.dtype,
                                  success=self.success, score=ce_score)

    def __repr__(self) -> str:
        def show(p):
            return f"Tensor[{p.numel()}]" if isinstance(p, torch.Tensor) else p
        return (f"JSTMAttack(eps={show(self.eps)}, eps_z={show(self.eps_z)}, steps={self.steps}, "
                f"restarts={self.restarts}, random_start={self.random_start}, image_shape={self.engine.image_shape})")

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier's logits for images x (normalized as the attack does)."""
        return self.pixel_engine.logits(x)

    def prepare(self, x: torch.Tensor, eps: Optional[Param] = None, eps_z: Optional[Param] = None,
                alpha: Optional[Param] = None, alpha_z: Optional[Param] = None) -> dict:
        """The joint budget and step size, Tensor[B, 2] each on x's device (:func:`joint_budget`)."""
        B, device = x.shape[0], x.device
        eps = self.eps if eps is None else eps
        eps_z = self.eps_z if eps_z is None else eps_z
        alpha = self.alpha if alpha is None else alpha
        alpha_z = self.alpha_z if alpha_z is None else alpha_z
        budget = joint_budget(eps_z, eps, B, device)
        steps = joint_budget(madry_step(eps_z, self.steps) if alpha_z is None else alpha_z,
                             madry_step(eps, self.steps) if alpha is None else alpha, B, device)
        return {"eps": budget, "alpha": steps}

    def empty_result(self, x: torch.Tensor, **params) -> JSTMAttackResult:
        """No adversary: empty columns, dz [0, D] and dx like x."""
        return JSTMAttackResult(**vars(super().empty_result(x)), dz=x.new_zeros(0, self.engine.dim),
                                dx=torch.zeros_like(x, dtype=torch.float32))

    @contextlib.contextmanager
    def model_state(self):
        """The classifier's attack state and the flow in eval mode without parameter gradients."""
        with super().model_state(), frozen(self.flow):
            yield

    def attack(self, x, y, targets, *, seed, offset, skip, evaluate, eps, alpha) -> JSTMAttackResult:
        """The joint engine's run from [G^-1(x), 0]; x_adv the image of the chosen iterate."""
        engine = self.engine
        centre = engine.centre(x)
        res = engine.run(centre, (y, targets), eps, alpha, self.steps,
                         start="uniform" if self.random_start else "clean", seed=seed, offset=offset,
                         restarts=self.restarts, record=self.record_steps, early_exit=self.early_stop,
                         evaluate=evaluate, skip=skip)
        with torch.no_grad():
            x_adv = engine.member(res.x_adv).to(x.dtype)
        dz, dx = engine.split(res.x_adv, centre)
        return JSTMAttackResult(x_adv, res.success, res.success_step, res.restart, res.loss, res.pred, dz=dz, dx=dx)
