"""Validation of a model as training measures it: clean, PGD, noisy and IBP-certified accuracy and the
method's own metrics, as a free function (:func:`evaluate`) and on a method's context
(:func:`evaluate_context`, what ``Trainer.evaluate`` and ``fit``'s validation run)."""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _rng, bounds, ops
from .config import FitConfig, resolve_config
from .context import MethodContext, bind_model, dist_info, prepare_batch

__all__ = ["evaluate", "evaluate_context", "capped_radii", "acceps", "RADIUS_TOL"]


def evaluate(model: nn.Module, loader, cfg: Optional[FitConfig] = None, *, progress: bool = False, device=None,
             **settings) -> Dict[str, float]:
    """What ``Trainer(model, cfg).evaluate(loader)`` measures, without a trainer: clean accuracy, PGD
    accuracy (val_eps / val_alpha / val_steps / val_norm; skipped when the eps is 0), for methods that
    train for smoothing the accuracy under their noise, for certified methods ``cert_acc``, and the
    method's own ``val_metrics`` (e.g. ``set_acc``), in eval mode, as a dict (val_loss too).

    cfg: a FitConfig, or its fields and the method's hyperparameters as keyword ``settings`` (as
    ``Trainer`` takes them; ``eps`` is the config's, the PGD radius is val_eps); the seeds of the attack and the noise come from the process generator of
    cfg.seed (``_rng.process_generator``), as a fresh trainer's would. device: default the model's.
    Counts are not summed over processes (each process evaluates what it is given)."""
    cfg = resolve_config(cfg, settings)
    rank, _ = dist_info()
    device, fwd = bind_model(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    ctx = MethodContext(cfg, fwd, device, _rng.process_generator(cfg.seed, rank), scaler=scaler, rank=rank)
    method = cfg.method_class(ctx) if cfg.method_class.val_metrics else None
    return evaluate_context(ctx, loader, progress=progress, method=method)


def evaluate_context(ctx: MethodContext, loader, *, eps: Optional[float] = None, progress: bool = False,
                     method=None) -> Dict[str, float]:
    """:func:`evaluate` on a method context (its forward, seeds, autocast; counts summed over its
    processes when world_size > 1: every process must call it then). eps: the PGD radius (default
    cfg.val_eps). method: the Method whose ``validation_counts`` give the cfg's method's
    ``val_metrics`` (needed when it has any)."""
    c = ctx.cfg
    eps = c.val_eps if eps is None else eps
    sigma = c.noise_sigma
    certified = bool(c.method_class.certified)
    val_metrics = tuple(c.method_class.val_metrics)
    fwd = ctx.forward
    was = fwd.training
    fwd.eval()
    # n, clean, robust, noise, loss, cert, sum of radii, then the method's val_metrics
    sums = torch.zeros(7 + len(val_metrics), dtype=torch.float64, device=ctx.device)
    from tqdm.auto import tqdm

    try:
        for batch in tqdm(iter(loader), total=len(loader), desc="  validate", leave=False,
                          disable=not progress or ctx.rank != 0):
            x, y = prepare_batch(ctx, batch[0], batch[1])
            sums += _batch_counts(ctx, method, x, y, eps, sigma, certified)
    finally:
        fwd.train(was)
    if ctx.world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(sums)
    n, clean, robust, noise, loss, cert, radius, *own = sums.tolist()
    n = max(n, 1.0)
    out = {"clean_acc": clean / n, "robust_acc": robust / n if eps > 0 else float("nan"), "val_loss": loss / n}
    if sigma is not None:
        out["noise_acc"] = noise / n
    if certified:
        out["cert_acc"] = cert / n
        out["acr"] = radius / n
        out["acceps"] = acceps(clean / n, radius / n, c.eps)
    out.update({name: v / n for name, v in zip(val_metrics, own)})
    return out


#: Grid step of validation's radius search as a fraction of the training eps: about 6 bound passes per
#: batch (ceil(log2(17))), each radius at most eps / 16 below its exact IBP value and never above it.
RADIUS_TOL = 1.0 / 16


def capped_radii(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, lo: float = 0.0,
                 hi: float = 1.0) -> torch.Tensor:
    """Per-sample IBP certified radii capped at the training eps (Tensor[B], float64; 0 where the label is
    not predicted): ``bounds.certified_radius`` with eps_max = eps and tol = eps * RADIUS_TOL (eval mode,
    fp32, no gradient). A sample proven at eps gets exactly eps. Their mean is the ACR that the ACERT
    authors report ("radii capped at the training eps")."""
    return bounds.certified_radius(model, x, y, eps_max=eps, tol=eps * RADIUS_TOL, lo=lo, hi=hi).radius


def acceps(clean_acc: float, acr: float, eps: float) -> float:
    """The ACERT authors' checkpoint selection score sqrt(clean_acc * acr / eps): the geometric mean of
    clean accuracy and the mean capped radius as a share of eps (both in [0, 1]); 0 when eps is 0."""
    if eps <= 0:
        return 0.0
    return math.sqrt(max(0.0, clean_acc) * max(0.0, acr) / eps)


def _batch_counts(ctx: MethodContext, method, x, y, eps, sigma, certified: bool) -> torch.Tensor:
    c, fwd = ctx.cfg, ctx.forward
    val_metrics = tuple(c.method_class.val_metrics)
    zero = torch.zeros((), dtype=torch.float64, device=ctx.device)
    with torch.no_grad(), ctx.autocast():
        logits = fwd(x)
        loss = F.cross_entropy(logits.float(), y, reduction="sum").double()
    clean = (logits.argmax(1) == y).sum()
    robust = noise = cert = radius = zero
    if eps > 0:
        x_adv = ctx.attack(x, y, eps, c.val_alpha, c.val_steps, c.val_norm, True)
        with torch.no_grad(), ctx.autocast():
            robust = (fwd(x_adv).argmax(1) == y).sum()
    if sigma is not None:
        with torch.no_grad(), ctx.autocast():
            xn = ctx.fmt(ops.gaussian_noise(x, 1, sigma, seed=ctx.seed()))
            noise = (fwd(xn).argmax(1) == y).sum()
    if certified:
        with torch.no_grad():  # outside autocast: the proof is computed in fp32
            cert = bounds.verified(fwd, x, y, eps, c.lo, c.hi, num_classes=logits.shape[1]).sum()
        if c.eps > 0:
            radius = capped_radii(fwd, x, y, c.eps, c.lo, c.hi).sum()
    counts = method.validation_counts(x, y) if val_metrics else {}
    missing = [k for k in val_metrics if k not in counts]
    if missing:
        raise RuntimeError(f"method {c.method!r}: validation_counts returned no {', '.join(missing)}")
    return torch.stack([zero + y.shape[0], zero + clean, zero + robust, zero + noise, loss, zero + cert,
                        zero + radius] + [zero + counts[k] for k in val_metrics])
