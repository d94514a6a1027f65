"""Attacks in a learned perturbation set (Wong and Kolter 2021): projected gradient ascent over the
latent offset u in the L2 ball ||u||_2 <= eps, whose members are the decoded images

    x'(u) = clamp(g(mu(x) + sigma(x) * u, x), lo, hi)        (robustops.perturbation.member)

of a perturbation model (the protocol of :mod:`robustops.perturbation`). Everything runs on the
projected-gradient engine: the iterate is u (a float32 [B, D] tensor centred at 0, with no box: the
fused L2 step runs with lo = -inf, hi = +inf), and (x, mu, sigma) travel with it as the engine's
per-sample context, so early exit and restarts select their rows together with u's.

    atk = LatentPGD(classifier, cvae, eps=1.0, steps=10)
    res = atk.perturb(images, labels)      # LatentAttackResult: x_adv (decoded), u, success, ...
    x_best, u_best = nearest_member(cvae, images, x_tilde, eps=1.0)   # the set's closest member to x_tilde
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .. import _checks, _rng, ops
from ..perturbation import protocol as perturbation  # the protocol only: the rest of the package uses the attacks
from .base import Attack, Param, frozen, madry_step, scaled_step, step_params
from .engine import AttackResult, Engine, predictions

__all__ = ["LatentPGD", "LatentAttackResult", "nearest_member", "random_members"]

_INF = float("inf")


@dataclass
class LatentAttackResult(AttackResult):
    """An :class:`AttackResult` whose x_adv are decoded members of the set, plus u: the latent
    offsets [B, D] (float32, ||u||_2 <= eps per sample) that decode to them."""
    u: Optional[torch.Tensor] = None


def _check_pair(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise TypeError(f"{name} must be a floating-point Tensor[B, ...], got "
                        f"{list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
                        f"{' of ' + str(x.dtype) if isinstance(x, torch.Tensor) else ''}")
    return x.detach()


def _latent_start(B: int, model, device) -> torch.Tensor:
    """The centre of the latent ball: zeros [B, D], float32."""
    D = int(model.latent_dim)
    if D < 1:
        raise ValueError(f"the perturbation model's latent_dim must be >= 1, got {D}")
    return torch.zeros(B, D, device=device)


class LatentPGD(Attack):
    """PGD in a learned perturbation set: maximises the classifier's loss at the decoded member
    x'(u) over ||u||_2 <= eps (Wong and Kolter 2021's latent attack), with the fused L2 step.

    classifier: an nn.Module (or callable) mapping images to logits (``mean`` / ``std`` as in
      :class:`PGD` when it expects normalized inputs).
    perturbation_model: a module with the perturbation-model protocol (latent_dim, prior, decode);
      it is held in eval mode, without parameter gradients, while the attack runs.
    eps: the latent radius, a float or a Tensor[B]. alpha: the L2 step size in the latent space
      (default 2 * eps / steps: Wong and Kolter's code uses alpha = 0.2 with radius 1 and 10 steps).
    random_start: start at a uniform direction with radius eps * U (as their code does; the centre
      u = 0, the prior's mean, otherwise). lo, hi: the data range the members are clamped to (and the
      images must lie in). dtype: autocast dtype of the decoder and classifier forward.
    early_stop (default on) / record_steps / restarts / targeted / target_fn / loss / seed /
    train_mode: as :class:`~robustops.attacks.PGD`. No CUDA-graph replay (``graph`` is False).

    ``perturb(x, y)`` returns a :class:`LatentAttackResult` (x_adv: the decoded members, u: the
    offsets, success / loss / pred evaluated at x_adv); ``atk(x, y)`` returns x_adv.
    """

    ALPHA_PER_STEP = 2.0  # the default step size 2 * eps / steps

    def __init__(self, classifier, perturbation_model, eps: Param, alpha: Optional[Param] = None, steps: int = 10,
                 restarts: int = 1, random_start: bool = True, early_stop: bool = True,
                 loss: Union[str, Callable] = "ce", targeted: bool = False, seed: Optional[int] = 0, lo: float = 0.0,
                 hi: float = 1.0, dtype=None, record_steps: bool = False, mean=None, std=None,
                 train_mode: bool = False, target_fn: Optional[Callable] = None):
        perturbation.check_perturbation_model(perturbation_model, "perturbation_model")
        super().__init__(classifier, loss=loss, targeted=targeted, target_fn=target_fn, clip=(lo, hi), mean=mean,
                         std=std, seed=seed, train_mode=train_mode, dtype=dtype)
        self.eps = _checks.check_sample_param(eps, "eps")
        self.alpha = None if alpha is None else _checks.check_sample_param(alpha, "alpha")
        self.steps = _checks.check_int(steps, "steps", 1)
        self.norm = "l2"
        self.random_start = bool(random_start)
        self.restarts = _checks.check_int(restarts, "restarts", 1)
        self.early_stop = bool(early_stop)
        self.record_steps = bool(record_steps)
        self.graph = False
        self.perturbation_model = perturbation_model
        self.pixel_engine = self.make_engine("l2")  # the classifier on images: predict()
        self.engine = Engine(self._latent_forward, self.objective, norm="l2", lo=-_INF, hi=_INF,
                             dtype=self.dtype, success=self.success, score=self.pixel_engine.score_fn,
                             l2_radius="uniform")

    def __repr__(self) -> str:
        eps = self.eps if not isinstance(self.eps, torch.Tensor) else f"Tensor[{self.eps.numel()}]"
        return (f"LatentPGD(eps={eps}, alpha={self.alpha}, steps={self.steps}, random_start={self.random_start}, "
                f"restarts={self.restarts}, targeted={self.targeted}, loss={self.loss!r}, "
                f"early_stop={self.early_stop}, latent_dim={self.perturbation_model.latent_dim})")

    def _latent_forward(self, u: torch.Tensor, context) -> torch.Tensor:
        x, mu, sigma = context
        lo, hi = self.clip
        return self.forward(perturbation.member(self.perturbation_model, x, u, mu, sigma, lo, hi))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier's logits for images x (normalized as the attack does)."""
        return self.pixel_engine.logits(x)

    def members(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The members of S(x) at offsets u [B, D], without gradient."""
        with torch.no_grad(), frozen(self.perturbation_model):
            mu, sigma = perturbation.prior_scale(self.perturbation_model, x)
            return perturbation.member(self.perturbation_model, x, u, mu, sigma, *self.clip)

    def perturb(self, images: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor] = None,
                eps: Optional[Param] = None, alpha: Optional[Param] = None, offset: Optional[int] = None,
                skip: Optional[torch.Tensor] = None, evaluate: bool = True) -> LatentAttackResult:
        """Runs the attack on images [B, ...] in [lo, hi] with labels [B] (targets [B] when targeted).
        eps / alpha / offset / skip / evaluate as :meth:`PGD.perturb`; eps is the latent radius."""
        return super().perturb(images, labels, targets, offset=offset, skip=skip, evaluate=evaluate, eps=eps,
                               alpha=alpha)

    def prepare(self, x: torch.Tensor, eps: Optional[Param] = None, alpha: Optional[Param] = None) -> dict:
        """eps / alpha per sample on x's device (alpha by default ALPHA_PER_STEP * eps / steps)."""
        return step_params(x, self.eps if eps is None else eps, self.alpha if alpha is None else alpha, self.steps,
                           self.default_step)

    def default_step(self, eps: Param, steps: int) -> Param:
        """The latent step size when none is given: ALPHA_PER_STEP * eps / steps."""
        return scaled_step(eps, steps, self.ALPHA_PER_STEP)

    def empty_result(self, x: torch.Tensor, **params) -> LatentAttackResult:
        """No member and no offset [0, D]."""
        u0 = _latent_start(0, self.perturbation_model, x.device)
        return LatentAttackResult(**vars(super().empty_result(x)), u=u0)

    @contextlib.contextmanager
    def model_state(self):
        """The classifier's attack state (:meth:`Attack.model_state`) and the perturbation model in
        eval mode without parameter gradients."""
        with super().model_state(), frozen(self.perturbation_model):
            yield

    def attack(self, x, y, targets, *, seed, offset, skip, evaluate, eps, alpha) -> LatentAttackResult:
        """The engine's run on the offset u from the centre 0 (a uniform start with random_start), the
        images and their prior's (mu, sigma) as its context; x_adv the decoded members."""
        B, device = x.shape[0], x.device
        u0 = _latent_start(B, self.perturbation_model, device)
        mu, sigma = perturbation.prior_scale(self.perturbation_model, x)
        mu, sigma = mu.to(device), sigma.to(device)
        if mu.shape[1] != u0.shape[1]:
            raise ValueError(f"the perturbation model's prior has dimension {mu.shape[1]}, its latent_dim is "
                             f"{u0.shape[1]}")
        res = self.engine.run(u0, (y, targets), eps, alpha, self.steps,
                              start="uniform" if self.random_start else "clean", seed=seed, offset=offset,
                              restarts=self.restarts, record=self.record_steps, early_exit=self.early_stop,
                              evaluate=evaluate, skip=skip, context=(x, mu, sigma))
        with torch.no_grad():
            x_adv = perturbation.member(self.perturbation_model, x, res.x_adv, mu, sigma, *self.clip)
        return LatentAttackResult(x_adv, res.success, res.success_step, res.restart, res.loss, res.pred, u=res.x_adv)


def nearest_member(model, x: torch.Tensor, x_tilde: torch.Tensor, eps: Param, steps: int = 50,
                   alpha: Optional[Param] = None, restarts: int = 1, seed: int = 0, lo: float = 0.0,
                   hi: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """The member of S(x) closest to x_tilde: latent PGD (on the engine, fused L2 steps) minimising
    ||member(u) - x_tilde||^2 over ||u||_2 <= eps. Returns (x_best, u_best): the member [B, ...] (x's
    dtype) and its offset [B, D] (float32).

    eps: float or Tensor[B]; alpha: the latent step size (default 2.5 * eps / steps); restarts = 1
    starts at u = 0 (the prior's mean), more restarts start at uniform draws in the ball (seeded by
    seed) and keep, per sample, the one ending closest. The first half of the steps runs the restarts
    at alpha, the second half refines the chosen offset with alpha halved in each of four phases (a
    normalized-gradient step of fixed size oscillates within about alpha of a minimiser)."""
    perturbation.check_perturbation_model(model, "model")
    x = _check_pair(x, "x")
    x_tilde = _check_pair(x_tilde, "x_tilde")
    if x_tilde.shape != x.shape:
        raise ValueError(f"x_tilde must have x's shape {list(x.shape)}, got {list(x_tilde.shape)}")
    steps = _checks.check_int(steps, "steps", 1)
    restarts = _checks.check_int(restarts, "restarts", 1)
    B, device = x.shape[0], x.device
    eps = _checks.sample_param_on(eps, "eps", B, device)
    if alpha is None:
        alpha = madry_step(eps, steps)
    alpha = _checks.sample_param_on(alpha, "alpha", B, device)
    lo, hi = float(lo), float(hi)
    u0 = _latent_start(B, model, device)
    if B == 0:
        return x.clone(), u0

    def forward(u, context):
        xc, mu, sigma = context
        return perturbation.member(model, xc, u, mu, sigma, lo, hi).flatten(1)

    def objective(out, target):
        return -(out - target).pow(2).sum(1)

    def never(out, target):
        return torch.zeros(out.shape[0], dtype=torch.bool, device=out.device)

    engine = Engine(forward, objective, norm="l2", lo=-_INF, hi=_INF, success=never)
    target = x_tilde.flatten(1).float()
    first = (steps + 1) // 2
    with frozen(model):
        mu, sigma = perturbation.prior_scale(model, x)
        context = (x, mu.to(device), sigma.to(device))
        u = engine.run(u0, target, eps, alpha, first, start="clean" if restarts == 1 else "uniform",
                       seed=_rng.resolve_seed(seed), restarts=restarts, evaluate=False, context=context).x_adv
        # The rest of the steps refine the chosen offset with the step size halved in each of (up to)
        # four phases, so the normalized-gradient iteration settles instead of oscillating at alpha.
        rest = steps - first
        for k in range(min(4, rest)):
            n_k = rest // min(4, rest) + (1 if k < rest % min(4, rest) else 0)
            engine.iterate(u0, u, target, eps, alpha * 0.5 ** (k + 1), n_k, context=context)
        with torch.no_grad():
            x_best = perturbation.member(model, x, u, *context[1:], lo, hi)
    return x_best, u


def random_members(classifier, model, x: torch.Tensor, y: torch.Tensor, eps: Param, n: int = 100, seed: int = 0,
                   lo: float = 0.0, hi: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """The classifier on n random members of S(x) per input, u uniform in the ball ||u||_2 <= eps
    (uniform in its volume; ``ops.random_init``, seeded): (cross-entropy loss [B, n], misclassified
    BoolTensor[B, n]). A baseline any attack on the set must match: at least the worst of these."""
    perturbation.check_perturbation_model(model, "model")
    x = _check_pair(x, "x")
    B, device = x.shape[0], x.device
    y = _checks.check_labels(y, B, device, "y")
    n = _checks.check_int(n, "n", 1)
    eps = _checks.sample_param_on(eps, "eps", B, device)
    u0 = _latent_start(B, model, device)
    losses = torch.empty(B, n, device=device)
    fooled = torch.empty(B, n, dtype=torch.bool, device=device)
    with torch.no_grad(), frozen(model), frozen(classifier):
        mu, sigma = perturbation.prior_scale(model, x)
        for k in range(n):
            u = ops.random_init(u0, eps, "l2", -_INF, _INF, seed=_rng.derive_seed(int(seed), k), radius="ball")
            logits = classifier(perturbation.member(model, x, u, mu, sigma, lo, hi)).float()
            losses[:, k] = F.cross_entropy(logits, y, reduction="none")
            pred = predictions(logits)
            fooled[:, k] = (pred != y) & (pred >= 0)
    return losses, fooled
