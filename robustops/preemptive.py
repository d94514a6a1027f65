"""Preemptive image robustification (Moon, An & Song, "Preemptive image robustification for protecting
users against man-in-the-middle adversarial attacks", AAAI 2022, arXiv 2112.05634); ``robustify`` is
also ``robustops.robustify``.

A user who uploads an image x fears a man-in-the-middle who perturbs it within eps_adv before the
classifier f sees it. Before uploading, the user moves x within eps_pre to a point x' around which f
resists such perturbations: the bi-level problem

    min_{||x' - x|| <= eps_pre, x' in [lo, hi]}  L(f(x' + delta*(x')), y)
    delta*(x') = argmax_{||delta|| <= eps_adv, x' + delta in [lo, hi]}  L(f(x' + delta), y)

with L the cross entropy and y the classifier's own prediction f(x) (the user has no label).

The algorithm (the paper's, and its official code's):

- Inner: the adversary's PGD within eps_adv from a uniform random start (``robustops.attacks.PGD``
  on the shared engine; sign steps for L-inf, normalised steps for L2, step 2.5 eps_adv / inner_steps
  by default, Madry et al.'s rule; the official configs use 20 steps of eps/4).
- Outer gradient: the first-order approximation. The dependence of delta* on x' is dropped (the
  official code's ``hessian: false``, its default and the one its tables use), so the gradient of the
  outer objective is the loss's input gradient at the adversarial point x' + delta*, as in Danskin's
  theorem (delta* a maximiser): grad_{x'} L(f(x' + delta*), y) = grad L at x' + delta*.
- Outer step: a projected step on x' descending that gradient, within eps_pre of x and in the box
  (``ops.pgd_step_`` on the negated gradient: a sign step for L-inf, a normalised step for L2; step
  ``alpha``, by default 2.5 eps_pre / steps).

The smoothed variant (``smooth=sigma`` or a ``Smooth``): the classifier is the smoothed soft classifier
G(x) = E[softmax(f(x + sigma n))], n ~ N(0, I), and L = -log G_y, estimated with ``noise_samples``
noise draws (``smoothing.soft``: one ``gaussian_noise`` call, the SmoothAdv estimate). The adversary
attacks G (L2 PGD on -log G_y, as SmoothAdv: the smoothed variant runs in L2 only, the norm of its
certified radius), the outer step descends the same loss at its point; y is
the smoothed classifier's vote (the top class of ``label_samples`` noisy forwards, ``Smooth.predict``'s
counts).

Choices the paper leaves open or where this implementation departs from the official code:

- The outer optimiser. The official L-inf code optimises a tanh reparametrisation of the eps_pre box
  with RMSprop (lr 0.1, 100 iterations); its L2 smoothed code takes plain gradient steps (lr 0.005)
  with projection. The paper's algorithm is a projected gradient step; here it is the projected
  *normalised* step of PGD for both norms (sign for L-inf), which needs no learning rate scale.
- The start. The official code starts from a uniform draw in the eps_pre ball; here from x itself, so
  step 0 measures the original image (``loss_start`` / ``robust_start``).
- The iterate returned. ``keep="last"`` (default) returns the final iterate, as the official code
  does; ``keep="best"`` returns, per image, the iterate whose inner attack reached the lowest loss.
  That estimate is noisy (the inner PGD's random start), so "best" can pick an earlier iterate by
  chance; on a linear classifier "last" is the exact optimum (tests/test_robustify.py).
- Noise in the smoothed variant: drawn afresh at every outer step and held fixed over that step's inner
  PGD and its outer gradient (SmoothAdv's convention here); the official code draws new noise at every
  inner step.
- Per-sample budgets: eps_pre, eps_adv (and the step sizes) may be a float or a Tensor[B].

Which eps the paper uses: eps_pre = eps_adv (CIFAR-10: 8/255 L-inf, 0.5 L2; the smoothed L2 runs
0.5 with sigma 0.1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F

from . import _checks, _rng, ops
from .attacks.base import frozen, madry_step
from .attacks.engine import Engine, batch_view_shape, predictions
from .attacks.pgd import PGD
from .models import Normalize
from .smoothing.smooth import Smooth
from .smoothing.soft import add_noise, draw_noise, smoothed_nll

__all__ = ["robustify", "RobustifyResult", "robustify_evaluation", "distance", "as_smooth", "smoothed_norm", "KEEP",
           "EVAL_SUITES"]

Param = Union[float, torch.Tensor]

#: Which iterate robustify returns: the last (the default), or the one with the lowest inner-attack loss.
KEEP = ("last", "best")


@dataclass
class RobustifyResult:
    """What :func:`robustify` returns, per image of the batch.

    x_pre: the robustified images [B, ...] (within eps_pre of x in the norm, in [lo, hi]).
    labels: LongTensor[B], the labels used (given, or the classifier's prediction at x).
    loss: FloatTensor[B], the inner adversary's loss at x_pre (the outer objective's estimate).
    loss_start: FloatTensor[B], the same at x (step 0).
    robust: BoolTensor[B], the inner attack at x_pre left the (soft) prediction at the label.
    robust_start: BoolTensor[B], the same at x.
    distance: FloatTensor[B], ||x_pre - x|| in the norm.
    step: LongTensor[B], the outer step whose iterate x_pre is (0 = x itself).
    """
    x_pre: torch.Tensor
    labels: torch.Tensor
    loss: torch.Tensor
    loss_start: torch.Tensor
    robust: torch.Tensor
    robust_start: torch.Tensor
    distance: torch.Tensor
    step: torch.Tensor


def distance(a: torch.Tensor, b: torch.Tensor, norm: str) -> torch.Tensor:
    """||a - b|| per sample in float32, [B]: the largest absolute difference (linf) or the L2 norm."""
    d = (a.float() - b.float()).flatten(1)
    return d.abs().amax(1) if norm == "linf" else d.norm(dim=1)


class _PlainInner:
    """The adversary on the classifier itself: PGD (random start) on the shared engine, then the loss's
    input gradient at its result."""

    def __init__(self, model, eps_adv, alpha, steps, norm, lo, hi, restarts, mean, std):
        self.attack = PGD(model, eps=eps_adv, alpha=alpha, steps=steps, norm=norm, random_start=True,
                          restarts=restarts, clip=(lo, hi), mean=mean, std=std, seed=0)

    def labels(self, x: torch.Tensor) -> torch.Tensor:
        with self.attack.model_state():
            return predictions(self.attack.predict(x)).clamp_min(0)

    def __call__(self, xp, y, seed: int, offset: int):
        """(gradient of the loss at the adversarial point, the loss there [B], fooled [B])."""
        self.attack.seed = seed
        x_adv = self.attack.perturb(xp, y, offset=offset, evaluate=False).x_adv
        with self.attack.model_state():
            g, logits, obj = self.attack.engine.gradient(x_adv, (y, None))
        return g, obj, predictions(logits) != y


class _SmoothedInner:
    """The adversary on the smoothed soft classifier of ``smooth`` (a Smooth: its base classifier, sigma
    and normalisation): PGD on -log G_y with the step's noise fixed (the engine's per-sample context),
    then that loss's input gradient at its result."""

    def __init__(self, smooth: Smooth, eps_adv, alpha, steps, norm, lo, hi, m, label_samples):
        self.smooth, self.m, self.label_samples = smooth, m, label_samples
        self.eps, self.alpha, self.steps = eps_adv, alpha, steps
        self.engine = Engine(self.forward, smoothed_nll, norm=norm, lo=lo, hi=hi, success=self.fooled)

    def forward(self, x, noise):
        xn, norm = add_noise(x, noise), self.smooth.normalize
        return self.smooth.base_classifier(xn if norm is None else norm.to(xn.device)(xn))

    @staticmethod
    def fooled(logits, y):
        """The soft smoothed prediction (argmax of the mean softmax over the noisy copies) is not y."""
        B = y.shape[0]
        soft = F.softmax(logits.float(), dim=1).view(B, -1, logits.shape[1]).mean(1)
        return soft.argmax(1) != y

    def labels(self, x: torch.Tensor, seed: int, offset: int) -> torch.Tensor:
        """The smoothed classifier's vote: the top class of label_samples noisy forwards (ties: the lowest)."""
        idx = list(range(offset, offset + x.shape[0]))
        res = self.smooth.predict(x, self.label_samples, 0.5, 1000, seed=seed, indices=idx, return_details=True)
        return res.counts.argmax(1).to(x.device)

    def __call__(self, xp, y, seed: int, offset: int):
        noise = draw_noise(xp, self.m, self.smooth.sigma, seed=seed, offset=offset * self.m)
        with frozen(self.smooth.base_classifier):
            x_adv = self.engine.run(xp, y, self.eps, self.alpha, self.steps, start="uniform", seed=seed,
                                    offset=offset, evaluate=False, context=noise).x_adv
            g, logits, obj = self.engine.gradient(x_adv, y, noise)
        return g, obj, self.fooled(logits, y)


def as_smooth(smooth, model, x: torch.Tensor, mean=None, std=None) -> Smooth:
    """smooth as a Smooth: itself, or for a noise level sigma the Smooth of model at sigma (its class
    count read from one forward of x[:1]; mean / std its fused normalisation)."""
    if isinstance(smooth, Smooth):
        if mean is not None or std is not None:
            raise ValueError("mean / std: give the normalisation to the Smooth (its mean / std), not to robustify")
        return smooth
    sigma = _checks.check_number(smooth, "smooth", 0.0, strict=True)
    normalize = None if mean is None and std is None else Normalize(mean, std).to(x.device)
    with torch.no_grad(), frozen(model):
        classes = int(model(x[:1] if normalize is None else normalize(x[:1])).shape[1])
    return Smooth(model, classes, sigma, mean=mean, std=std)


def _check_images(x, lo: float, hi: float) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise TypeError(f"x must be a float Tensor[B, ...] of images, got "
                        f"{type(x).__name__ if not isinstance(x, torch.Tensor) else f'{x.dtype} {list(x.shape)}'}")
    if x.numel() and not (float(x.min()) >= lo and float(x.max()) <= hi):
        raise ValueError(f"x must lie in [lo, hi] = [{lo}, {hi}], got values in [{float(x.min())}, {float(x.max())}]")
    return x.detach()


def smoothed_norm(norm: Optional[str], smooth) -> str:
    """The norm of the budgets: norm checked ("linf" or "l2"), None resolved ("l2" with smooth, else
    "linf"); with smooth only "l2" (the smoothed classifier's certificate is an L2 radius, and its
    adversary SmoothAdv's L2 PGD)."""
    if norm is None:
        return "linf" if smooth is None else "l2"
    if norm not in ("linf", "l2"):
        raise ValueError(f'norm must be "linf" or "l2", got {norm!r}')
    if smooth is not None and norm != "l2":
        raise ValueError(f'norm must be "l2" with smooth (the smoothed classifier is certified in L2), got {norm!r}')
    return norm


def _inner(model, smooth, x, mean, std, eps_adv, inner_alpha, inner_steps, norm, lo, hi, restarts, noise_samples,
           label_samples):
    if smooth is None:
        return _PlainInner(model, eps_adv, inner_alpha, inner_steps, norm, lo, hi, restarts, mean, std)
    return _SmoothedInner(as_smooth(smooth, model, x, mean, std), eps_adv, inner_alpha, inner_steps, norm, lo, hi,
                          _checks.check_int(noise_samples, "noise_samples", 1),
                          _checks.check_int(label_samples, "label_samples", 1))


def robustify(model, x: torch.Tensor, eps_pre: Param, eps_adv: Param, *, norm: Optional[str] = None,
              steps: int = 20, inner_steps: int = 10, alpha: Optional[Param] = None,
              inner_alpha: Optional[Param] = None, lo: float = 0.0, hi: float = 1.0,
              labels: Optional[torch.Tensor] = None, smooth=None, noise_samples: int = 8, label_samples: int = 100,
              restarts: int = 1, keep: str = "last", seed: Optional[int] = None, offset: int = 0, mean=None,
              std=None) -> RobustifyResult:
    """Preemptively robustified images of x [B, ...] (in [lo, hi]) for ``model`` (see the module docstring).

    eps_pre: the user's budget, eps_adv: the adversary's (floats or Tensor[B], in the norm: "linf" or
    "l2"; None: "l2" with smooth, the smoothed variant's only norm, else "linf"). steps: outer steps;
    inner_steps: the adversary's PGD steps; alpha / inner_alpha: their step sizes (default 2.5 eps /
    steps). labels: the labels to protect (default the model's prediction at x, or the smoothed
    classifier's vote). smooth: None, a noise level sigma, or a ``robustops.smoothing.Smooth`` (its base
    classifier, sigma and normalisation are used; model may then be None) for the smoothed variant, with
    ``noise_samples`` noise draws per estimate and ``label_samples`` noisy votes for the labels.
    restarts: the inner PGD's random restarts (plain classifier). keep: "last" or "best" (:data:`KEEP`).
    seed / offset: the random streams (offset: the index of x[0] in the data, so that any split of a data
    set into batches draws the same numbers). mean / std: the model's input normalisation (the images
    stay in pixels).
    """
    lo, hi = _checks.check_number(lo, "lo"), _checks.check_number(hi, "hi")
    if not lo < hi:
        raise ValueError(f"lo must be < hi, got lo={lo}, hi={hi}")
    x = _check_images(x, lo, hi)
    norm = smoothed_norm(norm, smooth)
    if keep not in KEEP:
        raise ValueError(f"keep must be one of {', '.join(KEEP)}, got {keep!r}")
    steps, inner_steps = _checks.check_int(steps, "steps", 1), _checks.check_int(inner_steps, "inner_steps", 1)
    offset = _checks.check_int(offset, "offset", 0)
    if model is None and not isinstance(smooth, Smooth):
        raise TypeError("model must be an nn.Module or callable returning logits (None only with smooth a Smooth)")
    B, dev = x.shape[0], x.device
    eps_pre = _checks.sample_param_on(eps_pre, "eps_pre", B, dev)
    eps_adv = _checks.sample_param_on(eps_adv, "eps_adv", B, dev)
    alpha = _checks.sample_param_on(madry_step(eps_pre, steps) if alpha is None else alpha, "alpha", B, dev)
    inner_alpha = _checks.sample_param_on(madry_step(eps_adv, inner_steps) if inner_alpha is None else inner_alpha,
                                          "inner_alpha", B, dev)
    inner = _inner(model, smooth, x, mean, std, eps_adv, inner_alpha, inner_steps, norm, lo, hi,
                   _checks.check_int(restarts, "restarts", 1), noise_samples, label_samples)
    seed = _rng.resolve_seed(seed)
    if labels is None:
        labels = inner.labels(x) if smooth is None else inner.labels(x, _rng.derive_seed(seed, steps + 1), offset)
    y = _checks.check_labels(labels, B, dev)
    return _outer(inner, x, y, eps_pre, alpha, steps, norm, lo, hi, keep, seed, offset)


def _outer(inner, x, y, eps_pre, alpha, steps, norm, lo, hi, keep, seed, offset) -> RobustifyResult:
    """The outer loop: steps projected descent steps on x', each on the inner attack's gradient; the
    kept iterate per image."""
    xp = x.clone(memory_format=torch.preserve_format)
    best = xp.clone(memory_format=torch.preserve_format)
    best_loss = torch.full((x.shape[0],), float("inf"), device=x.device)
    best_fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    best_step = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    eps_k = eps_pre if isinstance(eps_pre, torch.Tensor) else torch.tensor(float(eps_pre))
    alpha_k = alpha if isinstance(alpha, torch.Tensor) else torch.tensor(float(alpha))
    for t in range(steps + 1):
        g, loss, fooled = inner(xp, y, _rng.derive_seed(seed, t), offset)
        loss = loss.float()
        if t == 0:
            loss_start, fooled_start = loss, fooled
        take = loss < best_loss if keep == "best" else torch.full_like(fooled, t == steps)
        best = torch.where(take.view(batch_view_shape(x)), xp, best)
        best_loss = torch.where(take, loss, best_loss)
        best_fooled = torch.where(take, fooled, best_fooled)
        best_step = torch.where(take, t, best_step)
        if t < steps:
            # descent on the outer objective: the PGD step ascends its gradient argument
            ops.pgd_step_(xp, x, (-g).to(xp.dtype), eps_k, alpha_k, norm, lo, hi)
    return RobustifyResult(best, y, best_loss, loss_start, ~best_fooled, ~fooled_start, distance(best, x, norm),
                           best_step)


#: The attack suites robustify_evaluation runs by default (``robustops.evaluate``'s names).
EVAL_SUITES = ("pgd", "autoattack")


def _attacked(model, x, y, eps, norm, suite, *, steps, seed, mean, std, batch_size) -> dict:
    """robustops.evaluate of one suite on (x, y): robust accuracy and the per-image robust column."""
    from .attacks.suites import evaluate

    res = evaluate(model, (x, y), suite, eps, norm, batch_size=batch_size, progress=False, keep_adv=False,
                   steps=steps, seed=seed, mean=mean, std=std)
    cols = res["samples"]
    return {"acc": float(res["robust_acc"]), "correct": cols["robust_correct"].bool(),
            "clean_acc": float(res["clean_acc"]), "clean_correct": cols["clean_correct"].bool()}


def _certified(smooth: Smooth, x, y, *, n0, n, alpha, seed, offset, batch_size) -> dict:
    """CERTIFY on x: the radius per image (0 where abstaining or wrong) and its summaries."""
    res = smooth.certify(x, n0, n, alpha, batch_size, seed=seed, indices=list(range(offset, offset + x.shape[0])))
    correct = res.prediction == y.cpu()
    radius = torch.where(correct, res.radius, torch.zeros_like(res.radius))
    return {"radius": radius, "acr": float(radius.mean()) if radius.numel() else 0.0,
            "certified_acc": float((correct & (res.radius > 0)).double().mean()) if radius.numel() else 0.0}


def robustify_evaluation(model, x: torch.Tensor, x_pre: torch.Tensor, y: torch.Tensor, eps_adv: float, *,
                         norm: Optional[str] = None, suites=EVAL_SUITES, steps: Optional[int] = None, smooth=None,
                         n0: int = 100, n: int = 1000, alpha: float = 0.001, seed: int = 0, offset: int = 0,
                         mean=None, std=None, batch_size: int = 256) -> dict:
    """Robustified images x_pre against the originals x (both [B, ...] in [0, 1]; y [B] the true labels):
    for each, clean accuracy, robust accuracy under each suite of ``suites`` at eps_adv in ``norm`` ("linf"
    or "l2"; None: "l2" with smooth, else "linf"; with smooth only "l2", the radii's norm)
    (``robustops.evaluate``: "pgd", "apgd", "autoattack", ...; steps: the suite's, None for its
    default), and with ``smooth`` (a sigma or a Smooth) the smoothed classifier's certified radii
    (CERTIFY with n0 / n / alpha; radius 0 where it abstains or is wrong), their mean (ACR) and the
    certified accuracy at radius > 0, and at radius eps_adv.

    Returns {"original": {...}, "robustified": {...}}, each with "clean_acc", "<suite>_acc" per suite
    and, with smooth, "acr", "certified_acc", "certified_acc_at_eps"; and "samples": per-image columns
    ("clean_correct", "<suite>_robust", "radius") for both, suffixed "_orig" / "_pre". The adversary
    attacks x_pre as it would attack x: the images uploaded are the robustified ones."""
    if tuple(x.shape) != tuple(x_pre.shape):
        raise ValueError(f"x_pre must have x's shape {list(x.shape)}, got {list(x_pre.shape)}")
    y = _checks.check_labels(y, x.shape[0], x.device, "y")
    eps_adv = _checks.check_number(eps_adv, "eps_adv", 0.0, strict=True)
    norm = smoothed_norm(norm, smooth)
    if isinstance(suites, str):
        suites = (suites,)
    sm = None if smooth is None else as_smooth(smooth, model, x, mean, std)
    out, samples = {}, {}
    for key, imgs, tag in (("original", x, "orig"), ("robustified", x_pre, "pre")):
        row = {}
        for suite in suites:
            r = _attacked(model, imgs, y, eps_adv, norm, suite, steps=steps, seed=seed, mean=mean, std=std,
                          batch_size=batch_size)
            row["clean_acc"], row[f"{suite}_acc"] = r["clean_acc"], r["acc"]
            samples[f"{suite}_robust_{tag}"] = r["correct"]
            samples[f"clean_correct_{tag}"] = r["clean_correct"]
        if not suites:
            with torch.no_grad(), frozen(model):
                logits = model(imgs if mean is None else Normalize(mean, std).to(imgs.device)(imgs))
            samples[f"clean_correct_{tag}"] = (logits.argmax(1) == y).cpu()
            row["clean_acc"] = float(samples[f"clean_correct_{tag}"].float().mean())
        if sm is not None:
            c = _certified(sm, imgs, y, n0=n0, n=n, alpha=alpha, seed=seed, offset=offset, batch_size=batch_size)
            row.update(acr=c["acr"], certified_acc=c["certified_acc"],
                       certified_acc_at_eps=float((c["radius"] >= eps_adv).double().mean()))
            samples[f"radius_{tag}"] = c["radius"]
        out[key] = row
    return {**out, "samples": samples, "eps_adv": eps_adv, "norm": norm, "suites": list(suites)}
