"""Training a perturbation model (:func:`fit_perturbation`) and its checkpoints
(:func:`save_perturbation_model`, :func:`load_perturbation_model`).

fit_perturbation maximises the beta-weighted ELBO of Wong and Kolter's CVAE objective
(:func:`robustops.perturbation.perturbation_loss`). Choices the paper leaves open (or that this
implementation makes for small images): beta may be warmed up linearly from 0 over the first
``warmup`` epochs (off by default); Adam; one latent draw per pair. Checkpoints are written atomically
every epoch and a run resumes exactly (``robustops._runfiles``, shared with ``robustops.train.fit``).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from .. import _checks, _rng
from .._runfiles import check_settings, read_checkpoint, resume_path, write_csv_log
from ..models import model_device, save_checkpoint, unwrap, verify_checkpoint
from .autoencoder import CorruptionAE, PriorMeanDecoder, is_autoencoder
from .cvae import CVAE, perturbation_loss
from .flow import Flow, is_flow
from .pairs import batch_pairs, pairs_per_epoch, set_pairs_epoch
from .protocol import check_perturbation_model

__all__ = ["frozen_model", "corruption_network", "fit_perturbation", "PerturbationFit", "save_perturbation_model", "load_perturbation_model",
           "CHECKPOINT_FORMAT", "LOG_COLUMNS", "FLOW_LOG_COLUMNS"]

CHECKPOINT_FORMAT = "robustops.perturbation/1"
LOG_COLUMNS = ("epoch", "lr", "beta", "loss", "recon_mse", "kl", "val_loss", "val_recon_mse", "val_kl", "train_time")
#: the log of a :class:`Flow`'s training: mean bits/dim of the (dequantised) training and held-out images
FLOW_LOG_COLUMNS = ("epoch", "lr", "bpd", "val_bpd", "train_time")


@dataclass
class PerturbationFit:
    """What :func:`fit_perturbation` returns (the model is trained in place)."""
    history: List[Dict[str, Any]] = field(default_factory=list)
    epochs_run: int = 0                    # epochs run by this call (not those restored by resume)
    resumed_from: Optional[int] = None     # the epoch of the checkpoint it resumed from
    train_time: float = 0.0
    out_dir: Optional[str] = None

    @property
    def last(self) -> Dict[str, Any]:
        return self.history[-1] if self.history else {}


def save_perturbation_model(path: str, model: nn.Module, **extra) -> str:
    """A checkpoint of a :class:`CVAE` with default networks (``models.save_checkpoint``: weights, their
    SHA-256, "model": "cvae", "model_kwargs": its config) plus ``extra`` (eps, percentile, ...); the
    model's eps is stored unless extra gives one. Loads with :func:`load_perturbation_model`."""
    base = unwrap(model)
    config = getattr(base, "config", None)
    extra.setdefault("eps", getattr(base, "eps", None))
    extra.setdefault("format", CHECKPOINT_FORMAT)
    kind = getattr(base, "kind", "cvae")  # CorruptionAE: "autoencoder"
    return save_checkpoint(path, base, kind if config is not None else "custom", dict(config or {}), **extra)


def load_perturbation_model(path: str, device="cpu", model: Optional[nn.Module] = None) -> nn.Module:
    """The perturbation model of a checkpoint (:func:`save_perturbation_model`, or fit_perturbation's
    last.pt), on device, in eval mode, with ``model.eps`` set from the checkpoint (None when it has
    none). A CVAE with default networks is rebuilt from the checkpoint's config; for one with user
    networks pass ``model`` (the same architecture) and the weights are loaded into it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no perturbation-model checkpoint at {path!r}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"cannot read {path!r} as a perturbation-model checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT or "state_dict" not in ck:
        raise ValueError(f"{path!r} is not a perturbation-model checkpoint (robustops perturbation train / "
                         f"save_perturbation_model write them)")
    verify_checkpoint(ck, path)
    if model is None and ck.get("model") == "autoencoder":
        model = CorruptionAE(**ck.get("model_kwargs", {}))
    if model is None and ck.get("model") == "flow":
        model = Flow(**ck.get("model_kwargs", {}))
    if model is None:
        if ck.get("model") != "cvae":
            raise ValueError(f"{path!r} holds a perturbation model with user networks; pass model= (the same "
                             f"architecture) to load its weights")
        model = CVAE(**ck.get("model_kwargs", {}))
    try:
        unwrap(model).load_state_dict(ck["state_dict"])
    except RuntimeError as e:
        raise ValueError(f"{path!r}: the weights do not fit the model ({str(e).splitlines()[0]})") from None
    eps = ck.get("eps")
    model.eps = float(eps) if eps is not None else None
    for k in ("percentile", "data"):
        if k in ck:
            setattr(model, f"checkpoint_{k}", ck[k])
    return model.to(device).eval()


def frozen_model(source, device="cpu", check: Optional[Callable[[nn.Module], Any]] = None) -> nn.Module:
    """The module of ``source`` (an nn.Module, a run config's recorded module, or a checkpoint path of
    :func:`save_perturbation_model` / fit_perturbation) on device, in eval mode, its parameters frozen: what
    every method and command that perturbs through a perturbation model, a corruption network or a flow
    holds it as. ``check(module)`` (e.g. ``protocol.check_flow``) may refuse it before it is moved."""
    module = getattr(source, "module", source)  # a run config's recorded module (a str with .module)
    if isinstance(module, (str, os.PathLike)):
        module = load_perturbation_model(os.fspath(module), device)
    if check is not None:
        check(module)
    module = module.to(device).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def corruption_network(source, device="cpu") -> nn.Module:
    """The corruption network of ``source``: a checkpoint path (``robustops perturbation train``, either
    kind), a :class:`CorruptionAE`, a CVAE (wrapped in :class:`PriorMeanDecoder`) or any other nn.Module
    (its forward(x) must keep x's shape: checked at first use). On device, eval mode, parameters frozen.
    ValueError when source is neither."""
    source = getattr(source, "module", source)  # a run config's recorded module (a str with .module)
    if isinstance(source, (str, os.PathLike)):
        try:
            source = load_perturbation_model(os.fspath(source), device)
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"not a corruption network: {e}") from None
    if not isinstance(source, nn.Module):
        raise ValueError(f"a corruption network must be an nn.Module (image -> image) or a checkpoint path, got "
                         f"{type(source).__name__}")
    if hasattr(source, "prior") and hasattr(source, "decode") and not isinstance(source, PriorMeanDecoder):
        source = PriorMeanDecoder(source)
    return frozen_model(source, device)


def _checked_settings(model, epochs, lr, beta, warmup, schedule, weight_decay, amp, grad_clip,
                      stop_after, data_settings=None) -> Tuple[Dict[str, Any], Optional[torch.dtype], Optional[int]]:
    """(the settings a checkpoint stores and a resumed run must share, the autocast dtype, stop_after),
    every argument checked."""
    if is_autoencoder(model) or is_flow(model):
        pass  # trained by reconstruction or by maximum likelihood: no latent-set protocol
    elif not hasattr(check_perturbation_model(model), "posterior"):
        raise TypeError("model must have posterior(x, x_tilde) -> (mu, logvar) to be trained (the encoder q(z|x, x~))")
    epochs = _checks.check_int(epochs, "epochs", 1)
    lr = _checks.check_number(lr, "lr", 0.0, strict=True)
    beta = _checks.check_number(beta, "beta", 0.0)
    warmup = _checks.check_number(warmup, "warmup", 0.0)
    weight_decay = _checks.check_number(weight_decay, "weight_decay", 0.0)
    if grad_clip is not None:
        grad_clip = _checks.check_number(grad_clip, "grad_clip", 0.0, strict=True)
    if stop_after is not None:
        stop_after = _checks.check_int(stop_after, "stop_after", 1)
    if schedule not in ("constant", "cosine"):
        raise ValueError(f'schedule must be "constant" or "cosine", got {schedule!r}')
    amp_dtype = _checks.autocast_dtype(amp, "amp")
    if amp_dtype is not None and is_flow(model):
        raise ValueError(f"amp must be None for a Flow (its inverse and log-determinant run in float32), got {amp!r}")
    amp_name = {None: "none", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
    settings = {"epochs": epochs, "lr": lr, "beta": beta, "warmup": warmup, "schedule": schedule,
                "weight_decay": weight_decay, "amp": amp_name, "grad_clip": grad_clip}
    if data_settings is not None:
        if not isinstance(data_settings, Mapping) or not all(isinstance(k, str) for k in data_settings):
            raise TypeError(f"data_settings must be a mapping of names (str) to values, got {data_settings!r}")
        clash = sorted(set(data_settings) & set(settings))
        if clash:
            raise ValueError(f"data_settings must not reuse fit_perturbation's own setting names, got {clash}")
        settings.update(data_settings)
    return settings, amp_dtype, stop_after


def _batch_loss(model, batch, beta, generator, device, what: str = "loader"):
    """(loss, squared error per sample, KL per sample, x) of one batch on device: the CVAE's beta-ELBO on
    pairs (x, x~[, y]), or for an autoencoder (:class:`CorruptionAE`) the reconstruction error of the batch's
    images (its first element; KL zero), or for a :class:`Flow` the bits/dim of the batch's dequantised images
    (in the squared error's place; KL zero): the mean of -log_prob, up to the constants of bits/dim."""
    if is_flow(model):
        x = (batch[0] if isinstance(batch, (list, tuple)) else batch).to(device, non_blocking=True)
        bpd = model.bits_per_dim(x, generator)
        return bpd.mean(), bpd, torch.zeros_like(bpd), x
    if is_autoencoder(model):
        x = (batch[0] if isinstance(batch, (list, tuple)) else batch).to(device, non_blocking=True)
        sq = (model(x).float() - x.float()).pow(2).flatten(1).sum(1)
        return sq.mean(), sq, torch.zeros_like(sq), x
    x, xt = (t.to(device, non_blocking=True) for t in batch_pairs(batch, what))
    loss, sq, kl = perturbation_loss(model, x, xt, beta, generator)
    return loss, sq, kl, x


def _evaluate_loss(model, loader, beta, device, amp_dtype, seed) -> Dict[str, float]:
    g = torch.Generator(device=device).manual_seed(seed)
    tot = {"loss": 0.0, "sq": 0.0, "kl": 0.0}
    n = numel = 0
    was = model.training
    model.eval()
    with torch.no_grad():
        for batch in loader:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                _, sq, kl, x = _batch_loss(model, batch, beta, g, device, "val_loader")
            tot["sq"] += sq.sum().item()
            tot["kl"] += kl.sum().item()
            tot["loss"] += (sq + beta * kl).sum().item()
            n += x.shape[0]
            numel = x[0].numel()
    model.train(was)
    n = max(n, 1)
    if is_flow(model):
        return {"val_bpd": tot["sq"] / n}
    return {"val_loss": tot["loss"] / n, "val_recon_mse": tot["sq"] / n / max(numel, 1), "val_kl": tot["kl"] / n}


class _PerturbationRun:
    """The state of one fit_perturbation call: optimizer, schedule, gradient scaler, the latent noise's
    and the loader's generators, the result so far; one method per part of the loop."""

    def __init__(self, model: nn.Module, loader, settings: Dict[str, Any], amp_dtype, *, device, seed,
                 out_dir, progress, verbose):
        self.model, self.loader, self.settings, self.amp_dtype = model, loader, settings, amp_dtype
        self.out_dir, self.progress, self.verbose = out_dir, progress, verbose
        self.steps_per_epoch = len(loader)
        if self.steps_per_epoch == 0:
            raise ValueError("loader is empty")
        self.dev = dev = torch.device(device) if device is not None else model_device(model)
        model.to(dev)
        self.opt = torch.optim.Adam(model.parameters(), lr=settings["lr"], weight_decay=settings["weight_decay"])
        total = settings["epochs"] * self.steps_per_epoch
        if settings["schedule"] == "cosine":
            self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=total)
        else:
            self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda step: 1.0)
        self.scaler = torch.amp.GradScaler(dev.type, enabled=amp_dtype == torch.float16)
        self.base_seed = _rng.resolve_seed(seed)
        if seed is not None:
            torch.manual_seed(seed)
        self.noise_gen = torch.Generator(device=dev).manual_seed(_rng.derive_seed(self.base_seed, 1))
        self.loader_gen = getattr(loader, "generator", None)
        self.res = PerturbationFit(out_dir=out_dir)
        self.start = 0

    def resume(self, ckpt_path: str) -> None:
        """Continues after the epoch of a checkpoint written by a run with the same settings."""
        ck = read_checkpoint(ckpt_path, CHECKPOINT_FORMAT, "training checkpoint of fit_perturbation (last.pt)",
                             requires=("optimizer",), detail=False)
        verify_checkpoint(ck, ckpt_path)
        check_settings((ck["settings"], self.settings))
        if ck.get("steps_per_epoch") != self.steps_per_epoch:
            raise ValueError(f"resume: the checkpoint's loader had {ck.get('steps_per_epoch')} batches per epoch, "
                             f"this one has {self.steps_per_epoch}")
        unwrap(self.model).load_state_dict(ck["state_dict"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        self.scaler.load_state_dict(ck["scaler"])
        rng = ck["rng"]
        torch.set_rng_state(rng["torch"])
        if self.dev.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], self.dev)
        self.noise_gen.set_state(rng["noise"].to(self.noise_gen.get_state().device))
        if self.loader_gen is not None and rng.get("loader") is not None:
            self.loader_gen.set_state(rng["loader"])
        self.start = int(ck["epoch"])
        res = self.res
        res.history = list(ck["history"])
        res.train_time = float(ck.get("train_time", 0.0))
        res.resumed_from = self.start
        if self.verbose:
            print(f"resumed from {ckpt_path} after epoch {self.start}/{self.settings['epochs']}", flush=True)

    def train_epoch(self, epoch: int) -> Dict[str, Any]:
        """One pass over the pairs; returns the epoch's log row (validation columns NaN)."""
        from tqdm.auto import tqdm

        model, opt, scaler, dev, s = self.model, self.opt, self.scaler, self.dev, self.settings
        beta, grad_clip, amp_dtype = s["beta"], s["grad_clip"], self.amp_dtype
        warm_steps = s["warmup"] * self.steps_per_epoch
        t0 = time.perf_counter()
        sums = torch.zeros(3, dtype=torch.float64, device=dev)
        seen, numel = 0, 1
        # before iter(): loader workers take a copy of the dataset when the iterator is made
        set_pairs_epoch(getattr(self.loader, "dataset", None), epoch)
        if getattr(self.loader, "persistent_workers", False) and pairs_per_epoch(self.loader.dataset):
            # persistent workers keep their first copy: every epoch would silently get epoch 1's pairs
            raise ValueError("loader: persistent_workers=True keeps each worker's copy of the pairs from the first "
                             "epoch, so the pairs drawn per epoch cannot reach them; build the DataLoader without "
                             "persistent_workers")
        bar = tqdm(iter(self.loader), total=self.steps_per_epoch, desc=f"perturbation {epoch}/{s['epochs']}",
                   leave=False, disable=not self.progress, dynamic_ncols=True)
        step = (epoch - 1) * self.steps_per_epoch
        b = beta
        for batch in bar:
            b = beta * min(1.0, (step + 1) / warm_steps) if warm_steps > 0 else beta
            with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss, sq, kl, x = _batch_loss(model, batch, b, self.noise_gen, dev)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if grad_clip is not None:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(opt)
            scaler.update()
            self.sched.step()
            step += 1
            with torch.no_grad():
                sums += torch.stack([(sq + b * kl).sum(), sq.sum(), kl.sum()]).double()
            seen += x.shape[0]
            numel = x[0].numel()
            if self.progress and (step % 20 == 0):
                bar.set_postfix(loss=f"{sums[0].item() / seen:.4f}")
        bar.close()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t_train = time.perf_counter() - t0
        self.res.train_time += t_train
        m = (sums / max(seen, 1)).tolist()
        if is_flow(model):
            return {"epoch": epoch, "lr": opt.param_groups[0]["lr"], "bpd": m[1], "val_bpd": float("nan"),
                    "train_time": t_train}
        return {"epoch": epoch, "lr": opt.param_groups[0]["lr"], "beta": b, "loss": m[0], "recon_mse": m[1] / numel,
                "kl": m[2], "val_loss": float("nan"), "val_recon_mse": float("nan"), "val_kl": float("nan"),
                "train_time": t_train}

    def end_epoch(self, row: Dict[str, Any], val_loader) -> None:
        """Validation (on its own generator: it does not change the training stream), the log row, the
        report and the checkpoint, with the RNG states captured after the epoch's training."""
        rng_after = {"torch": torch.get_rng_state(), "noise": self.noise_gen.get_state().cpu(),
                     "cuda": torch.cuda.get_rng_state(self.dev) if self.dev.type == "cuda" else None,
                     "loader": self.loader_gen.get_state() if self.loader_gen is not None else None}
        if val_loader is not None:
            row.update(_evaluate_loss(self.model, val_loader, self.settings["beta"], self.dev, self.amp_dtype,
                                      _rng.derive_seed(self.base_seed, 2)))
            # a DataLoader draws its base seed from torch's generator even unshuffled: without this, the next
            # epoch's shuffle would differ between an uninterrupted run and one resumed from rng_after
            torch.set_rng_state(rng_after["torch"])
            if rng_after["cuda"] is not None:
                torch.cuda.set_rng_state(rng_after["cuda"], self.dev)
        res = self.res
        res.history.append(row)
        res.epochs_run += 1
        flow = is_flow(self.model)
        if self.verbose and flow:
            val = f" | held-out bits/dim {row['val_bpd']:.4f}" if val_loader is not None else ""
            print(f"[flow] epoch {row['epoch']}/{self.settings['epochs']} bits/dim {row['bpd']:.4f}{val} | "
                  f"{row['train_time']:.1f}s", flush=True)
        elif self.verbose:
            msg = f"[perturbation] epoch {row['epoch']}/{self.settings['epochs']} loss {row['loss']:.4f} " \
                  f"recon_mse {row['recon_mse']:.5f} kl {row['kl']:.3f}"
            if val_loader is not None:
                msg += f" | val loss {row['val_loss']:.4f} recon_mse {row['val_recon_mse']:.5f}"
            print(msg + f" | {row['train_time']:.1f}s", flush=True)
        if self.out_dir is not None:
            save_perturbation_model(os.path.join(self.out_dir, "last.pt"), self.model, epoch=row["epoch"],
                                    settings=self.settings, steps_per_epoch=self.steps_per_epoch,
                                    optimizer=self.opt.state_dict(), scheduler=self.sched.state_dict(),
                                    scaler=self.scaler.state_dict(), rng=rng_after, history=res.history,
                                    train_time=res.train_time)
            write_csv_log(os.path.join(self.out_dir, "log.csv"), res.history, FLOW_LOG_COLUMNS if flow else LOG_COLUMNS)


def fit_perturbation(model: nn.Module, loader, epochs: int = 20, lr: float = 2e-3, *, beta: float = 0.01,
                     warmup: float = 0.0, schedule: str = "constant", weight_decay: float = 0.0,
                     amp: Optional[str] = None, device=None, out_dir: Optional[str] = None,
                     resume: Union[bool, str] = False, progress: bool = True, seed: Optional[int] = 0,
                     val_loader=None, grad_clip: Optional[float] = None, stop_after: Optional[int] = None,
                     verbose: bool = False, data_settings: Optional[Mapping[str, Any]] = None) -> PerturbationFit:
    """Trains a perturbation model (a :class:`CVAE`, or any module with prior / posterior / decode) on
    a loader of pairs (x, x_tilde[, y]) by the beta-weighted ELBO (:func:`perturbation_loss`), with Adam;
    or a :class:`CorruptionAE` (AdA's corruption network) on a loader of images (x[, y]) by the squared
    reconstruction error summed over pixels (beta and warmup then have no effect; the KL columns are 0);
    or a :class:`Flow` on a loader of images (x[, y]) by maximum likelihood: the mean bits/dim of the
    dequantised images (``Flow.bits_per_dim``, one dequantisation draw per image and epoch from the seeded
    noise generator; beta and warmup have no effect, amp must be None; log.csv has FLOW_LOG_COLUMNS).

    beta: the KL weight (loss per pair = squared error summed over pixels + beta * KL; see
    ``robustops.perturbation.cvae``); warmup: epochs over which beta rises linearly from 0 (per step; 0: none);
    schedule: "constant" or "cosine" (cosine annealing of lr to 0 over all steps); amp: None / "none",
    "bf16" or "fp16" (autocast; fp16 with gradient scaling); grad_clip: max gradient norm (None: off);
    seed: seeds torch's generator (the loader's shuffling) and the latent noise (None: not seeded).

    out_dir: after every epoch, ``last.pt`` (weights, optimizer, scheduler, gradient scaler, RNG states,
    epoch, history; written atomically) and ``log.csv`` (one row per epoch: LOG_COLUMNS) there.
    resume: True continues from out_dir/last.pt when it exists (else starts afresh), a path continues from
    that checkpoint; the run then continues exactly (the same weights as an uninterrupted run, to
    float rounding), provided the settings are the same (checked) and the loader is built the same way.
    data_settings: how the loader's pairs are made, which the loader does not show (the command line passes
    its --fixed-pairs, --crop-flip, --family, ... under those names): stored with the settings, and a resumed
    run whose data_settings differ is refused naming them (a checkpoint without them counts as None).
    Each epoch e (from 1) first calls ``set_epoch(e)`` on the loader's dataset when it has one
    (``set_pairs_epoch``: DigitsPairs' fresh pairs, CropFlipPairs' crops), so resumed epochs see their pairs;
    on return the dataset is back at epoch 0 (the fixed pairs), however many epochs this call ran.
    stop_after: end this call after that epoch (a planned interruption: a later call with resume
    continues the same schedule); None: run to ``epochs``.
    Returns a :class:`PerturbationFit`; the model ends in eval mode."""
    settings, amp_dtype, stop_after = _checked_settings(model, epochs, lr, beta, warmup, schedule, weight_decay,
                                                        amp, grad_clip, stop_after, data_settings)
    run = _PerturbationRun(model, loader, settings, amp_dtype, device=device, seed=seed, out_dir=out_dir,
                           progress=progress, verbose=verbose)
    ckpt_path = resume_path(resume, out_dir)
    if ckpt_path is not None:
        run.resume(ckpt_path)
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
    model.train()
    epochs = settings["epochs"]
    last_epoch = epochs if stop_after is None else min(epochs, stop_after)
    for epoch in range(run.start + 1, last_epoch + 1):
        run.end_epoch(run.train_epoch(epoch), val_loader)
    # back to the epoch-0 pairs, so what the caller does next with the data (choose_eps, quality) sees the
    # same pairs whether this call trained epochs or resumed a finished run
    set_pairs_epoch(getattr(loader, "dataset", None), 0)
    model.eval()
    return run.res
