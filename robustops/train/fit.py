"""fit: the training loop around a Trainer: epochs, validation, selection of the best epoch and
early stopping, checkpoints written atomically every epoch, exact resume, the CSV log, progress."""
from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn

from .._runfiles import (atomic_save, check_settings, entry_digest, read_checkpoint, resume_path, seal_entries,
                         write_csv_log)
from .._threads import default_threads, resolve_threads
from ..models import state_dict_digest, verify_checkpoint
from .budget import SCHEDULE_SETTINGS
from .config import CERTIFIED_METRICS, FitConfig
from .coreset import CoresetRun
from .trainer import Trainer, dist_info

__all__ = ["fit", "FitResult", "NonFiniteLoss", "CHECKPOINT_FORMAT", "LOG_COLUMNS", "log_columns"]

CHECKPOINT_FORMAT = "robustops.train/1"

LOG_COLUMNS = ("epoch", "equiv_epochs", "lr", "train_loss", "train_acc", "clean_acc", "robust_acc", "noise_acc",
               "val_loss", "train_time", "val_time", "total_train_time", "best")


def log_columns(cfg: FitConfig):
    """The CSV log's columns for a run: LOG_COLUMNS, with the method's log_metrics after train_acc,
    cert_acc, acr, acceps after noise_acc for the methods that train for deterministic certification, then the
    method's own val_metrics; ``train_eps`` (the epoch's mean attack budget) after them when the run
    schedules its budget (``budget_schedule`` other than constant)."""
    own = tuple(cfg.method_class.log_metrics) + (("train_eps",) if _scheduled(cfg) else ())
    extra = (CERTIFIED_METRICS if cfg.method_class.certified else ()) + tuple(cfg.method_class.val_metrics)
    if cfg.coreset is not None:  # robustops.train.coreset: samples trained per epoch, selection seconds
        own += ("coreset_size", "select_time")
    j = LOG_COLUMNS.index("train_acc") + 1
    i = LOG_COLUMNS.index("noise_acc") + 1
    return LOG_COLUMNS[:j] + own + LOG_COLUMNS[j:i] + extra + LOG_COLUMNS[i:]


def _scheduled(cfg: FitConfig) -> bool:
    return (cfg.budget_schedule or "constant") != "constant"


# Settings a resumed run must share with the checkpoint (the method's hyperparameters too).
_RESUME_MUST_MATCH = ("method", "epochs", "eps", "alpha", "steps", "norm", "optimizer", "lr", "schedule", "amp",
                      "awp", "ema", "mixup", "cutmix", "robust_mixup", "grad_clip", "coreset", "budget_schedule")
# and, for a coreset run, its settings (absent from checkpoints written before the option existed)
_CORESET_MUST_MATCH = ("coreset_frac", "coreset_every", "coreset_warmup")


class NonFiniteLoss(ValueError):
    """Training stopped at the first batch whose loss is NaN or infinite (NaN / inf data, or a diverging
    run); the message names the epoch and the batch. The epoch's weights are not checkpointed: last.pt
    and best.pt keep the last finished epoch."""


@dataclass
class FitResult:
    """What ``fit`` returns. The model itself is trained in place (holding the best weights when
    validation ran and ``restore_best``; under ``ema`` the weight average's: the last one, or the
    best epoch's)."""
    history: List[Dict[str, Any]] = field(default_factory=list)
    best_epoch: Optional[int] = None
    best_metric: Optional[float] = None
    select: str = "robust_acc"
    epochs_run: int = 0
    stopped_early: bool = False
    train_time: float = 0.0                # seconds spent training (validation excluded)
    out_dir: Optional[str] = None
    config: Optional[FitConfig] = None
    threads: Optional[int] = None          # torch's CPU threads during training (see fit's ``threads``)

    @property
    def last(self) -> Dict[str, Any]:
        return self.history[-1] if self.history else {}


def _settings_pairs(old: Dict[str, Any], cfg: FitConfig):
    """(the checkpoint's settings, cfg's) for ``check_settings``: the shared ones, then the method's."""
    old_params = old.get("params") if isinstance(old.get("params"), dict) else old  # flat in older checkpoints
    if old.get("budget_schedule") is None:  # a checkpoint written before budget schedules ran constant
        old = {**old, "budget_schedule": "constant"}
    old = {"ood_ratio": 0.0, "ood_weight": 1.0, "robust_mixup": None, **old}  # written before OOD data / robust mixup: none
    # and the settings of its schedule and of its coreset
    keys = (_RESUME_MUST_MATCH + ("ood_ratio", "ood_weight") + SCHEDULE_SETTINGS[cfg.budget_schedule]
            + (_CORESET_MUST_MATCH if cfg.coreset is not None else ()))
    return (old, {k: getattr(cfg, k) for k in keys}), (old_params, cfg.params)


class _FitRun:
    """The state of one fit call: the trainer, the result so far, the best weights, the count of
    validations without improvement; one method per part of the loop."""

    def __init__(self, model: nn.Module, train_loader, cfg: FitConfig, *, val_loader, out_dir, progress, verbose,
                 device, model_name, model_kwargs, extra, tensorboard=None, threads=None, ood_data=None):
        self.model, self.loader, self.cfg, self.val_loader = model, train_loader, cfg, val_loader
        self.out_dir, self.progress = out_dir, progress
        self.rank, self.world = dist_info()
        self.ood, self.ood_id = cfg.ood_ratio > 0, None
        if self.ood:  # OOD rows mixed into every batch (robustops.train.ood): the loader yields (x, y, is_ood)
            train_loader = self.loader = self.ood_loader(train_loader, ood_data)
        self.steps_per_epoch = len(train_loader)
        if self.steps_per_epoch == 0:
            raise ValueError("train_loader is empty")
        # a coreset run's passes are its warm-start and coreset epochs, its schedule their exact steps
        self.coreset = CoresetRun(cfg, train_loader, self.rank, self.world) if cfg.coreset is not None else None
        self.passes = cfg.passes if self.coreset is None else self.coreset.plan.passes
        total = None if self.coreset is None else self.coreset.total_steps(self.steps_per_epoch, cfg.updates_per_batch)
        self.trainer = Trainer(model, cfg, steps_per_epoch=self.steps_per_epoch, device=device, total_steps=total)
        if self.coreset is not None:
            self.coreset.bind(self.trainer)
        self.dev = self.trainer.device
        if cfg.seed is not None:
            torch.manual_seed(cfg.seed + self.rank)
            random.seed(cfg.seed + self.rank)
            np.random.seed((cfg.seed + self.rank) % (1 << 32))
        if out_dir is not None and self.rank == 0:
            os.makedirs(out_dir, exist_ok=True)
        self.verbose = verbose and self.rank == 0
        self.meta = {"format": CHECKPOINT_FORMAT, "model": model_name, "model_kwargs": dict(model_kwargs or {}),
                     "method": cfg.method, "eps": cfg.eps, "norm": cfg.norm, "sigma": cfg.noise_sigma,
                     "mean": cfg.mean, "std": cfg.std, "lo": cfg.lo, "hi": cfg.hi,
                     "config": dataclasses.asdict(cfg), **cfg.method_class.checkpoint_entries(cfg), **(extra or {})}
        if self.ood:  # which OOD images: a resume with other ones is refused
            self.meta["ood_data"] = self.ood_id
        self.res = FitResult(select=cfg.select, out_dir=out_dir, config=cfg)
        # None: the thread rule, applied at the first batch (it needs the per-sample size); else set now
        self.rule_pending = threads is None
        if not self.rule_pending:
            count = resolve_threads(threads)
            if count is not None:
                torch.set_num_threads(count)
            self.res.threads = torch.get_num_threads()
        self.writer = None
        if tensorboard is not None and self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter  # ImportError without the tensorboard package

            self.writer = SummaryWriter(log_dir=tensorboard)
        self.best_state = None
        self.bad = 0
        self.start = 0

    def ood_loader(self, train_loader, ood_data):
        """The mixed loader of the training data and the OOD images (a spec for ``robustops.ood.load_ood``,
        made at the training images' shape, or a tensor [N, C, H, W]); sets self.ood_id, the checkpoint's record
        of them: the spec, or the tensor's N and digest."""
        from ..ood import load_ood
        from .ood import ood_loader

        if ood_data is None:
            raise ValueError(f"ood_ratio {self.cfg.ood_ratio:g} > 0 needs ood_data (OOD images, or a spec such as "
                             f"'digits-ood')")
        seed = self.cfg.seed if self.cfg.seed is not None else 0
        if isinstance(ood_data, str):
            self.ood_id = {"spec": ood_data}
            shape = getattr(train_loader, "real_x", None)
            shape = tuple(shape.shape[1:]) if shape is not None else tuple(train_loader.dataset[0][0].shape)
            ood_data = load_ood(ood_data, shape, seed)
        ood_data = torch.as_tensor(ood_data).float()
        if self.ood_id is None:
            self.ood_id = {"images": int(ood_data.shape[0]) if ood_data.dim() else 0, "sha256": entry_digest(ood_data)}
        return ood_loader(train_loader, ood_data, self.cfg.ood_ratio, seed=seed,
                          rank=self.rank, world_size=self.world, lo=self.cfg.lo, hi=self.cfg.hi)

    def say(self, msg: str) -> None:
        if self.verbose:
            print(msg, flush=True)

    def resume(self, ckpt_path: str) -> None:
        """Loads a checkpoint written by a run with the same settings and continues after its epoch."""
        ck = read_checkpoint(ckpt_path, CHECKPOINT_FORMAT, "robustops.train checkpoint")
        verify_checkpoint(ck, ckpt_path)
        check_settings(*_settings_pairs(ck["config"], self.cfg))
        if self.ood and "ood_data" in ck and ck["ood_data"] != self.ood_id:  # absent: written before the record
            raise ValueError(f"resume: ood_data {self.ood_id} differs from the checkpoint's {ck['ood_data']}")
        if "train_state_dict" in ck:  # under ema: state_dict holds the weight average, this the trained weights
            if state_dict_digest(ck["train_state_dict"]) != ck.get("train_sha256"):
                raise ValueError(f"{ckpt_path!r} is corrupt: its trained weights do not match their checksum")
            self.model.load_state_dict(ck["train_state_dict"])
        else:
            self.model.load_state_dict(ck["state_dict"])
        self.trainer.load_state_dict(ck)
        states = ck["rank_states"]
        if len(states) != self.world:
            raise ValueError(f"resume: the checkpoint was written by {len(states)} processes, this run has "
                             f"{self.world}")
        self.trainer.load_rank_state(states[self.rank])
        if self.coreset is not None:
            self.coreset.load_state_dict(ck["coreset"])
        self.start = ck["epoch"]
        res = self.res
        res.history = list(ck["history"])
        res.best_epoch, res.best_metric = ck["best_epoch"], ck["best_metric"]
        res.stopped_early = ck.get("stopped_early", False)
        res.train_time = ck["train_time"]
        self.bad = ck["bad_epochs"]
        if res.best_epoch is not None and self.out_dir is not None:
            bp = os.path.join(self.out_dir, "best.pt")
            if os.path.exists(bp):
                best = torch.load(bp, map_location="cpu", weights_only=True)
                verify_checkpoint(best, bp)
                self.best_state = best["state_dict"]
        self.say(f"resumed from {ckpt_path} after epoch {self.start}/{self.passes}")

    def train_epoch(self, epoch: int):
        """One pass over the training data; returns (the log row's training part, seconds)."""
        from tqdm.auto import tqdm

        cfg, tr = self.cfg, self.trainer
        tr.pass_index = epoch - 1
        t0 = time.perf_counter()
        loader, weighted, t_select = self.loader, False, 0.0
        if self.coreset is not None:  # a coreset epoch's loader yields (x, y, w); selection time counts
            loader, weighted, t_select = self.coreset.epoch_loader(epoch)
            self.steps_per_epoch = len(loader)
        sampler = getattr(loader, "sampler", None)
        batch_sampler = getattr(loader, "batch_sampler", None)
        for s in (sampler, batch_sampler, getattr(batch_sampler, "sampler", None)):
            if hasattr(s, "set_epoch"):
                s.set_epoch(epoch)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.dev)
        correct = torch.zeros((), dtype=torch.int64, device=self.dev)
        # batches before the first non-finite loss: a NaN / inf loss keeps the running sum non-finite, so
        # counting the steps whose sum is still finite finds the first bad batch on the device (no sync)
        finite = torch.zeros((), dtype=torch.int64, device=self.dev)
        seen = 0
        show = self.progress and self.rank == 0
        # tqdm wraps the loader's iterator, not the loader: handed a DataLoader it draws from the
        # global RNG itself, which would make the shuffling depend on whether the bar exists.
        bar = tqdm(iter(loader), total=self.steps_per_epoch, desc=f"{cfg.method} {epoch}/{self.passes}",
                   leave=False, disable=not show, dynamic_ncols=True)
        for i, batch in enumerate(bar):
            if self.rule_pending:
                self.apply_thread_rule(batch[0])
            batch_loss, batch_correct, n = tr.train_step(batch[0], batch[1], batch[2] if weighted else None,
                                                         ood=batch[2] if self.ood else None)
            loss_sum += batch_loss
            finite += torch.isfinite(loss_sum)
            correct += batch_correct
            seen += n
            if show and (i % 20 == 0 or i == self.steps_per_epoch - 1):
                shown = loss_sum.item()  # read for the bar anyway: stop here rather than at the epoch's end
                if self.world == 1 and not math.isfinite(shown):
                    bar.close()
                    self.check_finite(epoch, loss_sum, finite)
                bar.set_postfix(loss=f"{shown / max(seen, 1):.3f}", acc=f"{correct.item() / max(seen, 1):.3f}")
        bar.close()
        self.check_finite(epoch, loss_sum, finite)
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
        t_train = time.perf_counter() - t0
        stats = torch.stack([loss_sum, correct.double(),
                             torch.tensor(float(seen), dtype=torch.float64, device=self.dev)])
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(stats)
        n = max(stats[2].item(), 1)
        row = {"epoch": epoch, "equiv_epochs": epoch * cfg.updates_per_batch,
               "lr": tr.optimizer.param_groups[0]["lr"], "train_loss": stats[0].item() / n,
               "train_acc": stats[1].item() / n}
        if self.coreset is not None:
            row.update(self.coreset.row(), coreset_size=int(stats[2].item()), select_time=t_select)
        return row, t_train

    def apply_thread_rule(self, x: torch.Tensor) -> None:
        """fit(threads=None): torch's threads by robustops' rule for samples like x's (``_threads``)."""
        self.rule_pending = False
        count = default_threads(x[0].numel() if x.dim() > 0 and x.shape[0] > 0 else None)
        torch.set_num_threads(count)
        self.res.threads = count

    def check_finite(self, epoch: int, loss_sum: torch.Tensor, finite: torch.Tensor) -> None:
        """NonFiniteLoss naming the epoch and the first batch (over all processes) whose loss was not
        finite, if any; one host read (and one all-reduce when distributed)."""
        first = torch.where(torch.isfinite(loss_sum), torch.full_like(finite, self.steps_per_epoch), finite)
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        b = int(first.item())
        if b >= self.steps_per_epoch:
            return
        kept = "no checkpoint was written (no out_dir)" if self.out_dir is None else \
            f"{os.path.join(self.out_dir, 'last.pt')} keeps epoch {epoch - 1}" if epoch > 1 else \
            "no epoch finished, so no checkpoint was written"
        raise NonFiniteLoss(f"training stopped: the loss is not finite (NaN or inf) at epoch {epoch}, batch {b + 1} "
                            f"of {self.steps_per_epoch}; {kept}. Check the data for NaN / inf values, or lower the "
                            f"learning rate")

    def validate(self, row: Dict[str, Any], epoch: int) -> bool:
        """Validation metrics into row; returns whether the selected metric improved."""
        cfg, res = self.cfg, self.res
        if self.val_loader is None or not (epoch % cfg.val_every == 0 or epoch == self.passes):
            return False
        t1 = time.perf_counter()
        row.update(self.trainer.evaluate(self.val_loader, progress=self.progress))
        row["val_time"] = time.perf_counter() - t1
        value = row["epoch"] if cfg.select == "last" else row.get(cfg.select, float("nan"))
        improved = False
        if res.best_metric is None or value > res.best_metric:
            res.best_metric, res.best_epoch, improved, self.bad = value, epoch, True, 0
            self.best_state = self.trainer.evaluated_state_dict()  # under ema: the weight average
        else:
            self.bad += 1
        if cfg.patience is not None and self.bad >= cfg.patience and epoch < self.passes:
            res.stopped_early = True
        return improved

    def report(self, row: Dict[str, Any], improved: bool) -> None:
        cfg = self.cfg
        msg = (f"[{cfg.method}] epoch {row['epoch']}/{self.passes} loss {row['train_loss']:.4f} "
               f"train_acc {row['train_acc']:.4f}")
        for k in cfg.method_class.log_metrics + ("train_eps", "coreset_size", "select_time"):
            if k in row:
                msg += f" {k} {row[k]:.4g}"
        if self.val_loader is not None and row["val_time"] > 0:
            msg += f" | clean {row['clean_acc']:.4f}"
            if not math.isnan(row["robust_acc"]):
                msg += f" robust {row['robust_acc']:.4f}"
            if "noise_acc" in row and not math.isnan(row["noise_acc"]):
                msg += f" noisy {row['noise_acc']:.4f}"
            if "cert_acc" in row and not math.isnan(row["cert_acc"]):
                msg += f" certified {row['cert_acc']:.4f}"
            if not math.isnan(row.get("acr", float("nan"))):
                msg += f" acr {row['acr']:.4g} acceps {row['acceps']:.4f}"
            for k in self.trainer.val_metrics:
                if not math.isnan(row.get(k, float("nan"))):
                    msg += f" {k} {row[k]:.4f}"
            msg += " *" if improved else ""
        msg += f" | {row['train_time']:.1f}s"
        self.say(msg)
        if self.res.stopped_early:
            self.say(f"early stopping: no improvement of {cfg.select} in {self.bad} validations; "
                     f"best epoch {self.res.best_epoch}")

    def checkpoint(self, row: Dict[str, Any], improved: bool) -> None:
        """Everything needed to continue exactly, captured after this epoch's last RNG use. Under
        ``ema`` the checkpoint's ``state_dict`` is the weight average (what validation measured and
        what ``load_model`` gives), ``train_state_dict`` the trained weights, ``ema`` its update count."""
        res, tr = self.res, self.trainer
        rank_states = [tr.rank_state()]
        if self.world > 1:
            import torch.distributed as dist

            gathered = [None] * self.world
            dist.all_gather_object(gathered, rank_states[0])
            rank_states = gathered
        if self.out_dir is not None and self.rank == 0:
            epoch = row["epoch"]
            if improved:
                atomic_save(seal_entries({**self.meta, "state_dict": self.best_state,
                                          "sha256": state_dict_digest(self.best_state), "epoch": epoch,
                                          "metrics": row}), os.path.join(self.out_dir, "best.pt"))
            state = self.model.state_dict()
            weights = {}
            if tr.ema is not None:
                weights = {"train_state_dict": state, "train_sha256": state_dict_digest(state)}
                state = tr.ema.averaged_state_dict()
            ck = {**self.meta, "state_dict": state, "sha256": state_dict_digest(state), "epoch": epoch,
                  "rank_states": rank_states,
                  "history": res.history, "best_epoch": res.best_epoch, "best_metric": res.best_metric,
                  "bad_epochs": self.bad, "stopped_early": res.stopped_early, "train_time": res.train_time,
                  **weights, **tr.state_dict(ema_weights=False)}
            if self.coreset is not None:
                ck["coreset"] = self.coreset.state_dict()
            ck = seal_entries(ck)
            atomic_save(ck, os.path.join(self.out_dir, "last.pt"))
            if self.cfg.keep_all:
                atomic_save(ck, os.path.join(self.out_dir, f"epoch_{epoch}.pt"))
            write_csv_log(os.path.join(self.out_dir, "log.csv"), res.history, log_columns(self.cfg))
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def run(self) -> FitResult:
        res = self.res
        for epoch in range(self.start + 1, self.passes + 1):
            if res.stopped_early:
                break
            row, t_train = self.train_epoch(epoch)
            row.update(self.trainer.method.log_values())
            if _scheduled(self.cfg):
                row.update(self.trainer.budget.log_values(self.trainer.ctx.world_size, self.dev))
            res.train_time += t_train
            metrics = (("clean_acc", "robust_acc", "noise_acc")
                       + (CERTIFIED_METRICS if self.trainer.certified else ()) + self.trainer.val_metrics)
            row.update({**{k: float("nan") for k in metrics}, "val_loss": float("nan"), "train_time": t_train,
                        "val_time": 0.0, "total_train_time": res.train_time, "best": False})
            improved = self.validate(row, epoch)
            row["best"] = improved
            res.history.append(row)
            self.report(row, improved)
            if self.writer is not None:
                for k, v in row.items():
                    if isinstance(v, (int, float)) and k != "epoch" and not (isinstance(v, float) and math.isnan(v)):
                        self.writer.add_scalar(k, v, epoch)
                self.writer.flush()
            self.checkpoint(row, improved)
        if self.writer is not None:
            self.writer.close()
        res.epochs_run = len(res.history)
        if self.trainer.ema is not None:  # the run's model is the weight average
            self.trainer.ema.copy_to_model()
        if self.cfg.restore_best and self.best_state is not None and res.best_epoch != res.epochs_run:
            self.model.load_state_dict(self.best_state)
            self.say(f"restored the best epoch ({res.best_epoch}, {self.cfg.select} {res.best_metric:.4f})")
        return res


def fit(model: nn.Module, train_loader, method: str = "natural", *, val_loader=None, out_dir: Optional[str] = None,
        resume=None, progress: bool = True, verbose: bool = True, device=None, model_name: Optional[str] = None,
        model_kwargs: Optional[Dict[str, Any]] = None, extra: Optional[Dict[str, Any]] = None,
        tensorboard: Optional[str] = None, threads=None, ood_data=None, **hparams) -> FitResult:
    """Train ``model`` in place with ``method`` on ``train_loader`` (batches ``(x, y, ...)``, x in
    [lo, hi]); returns a :class:`FitResult`.

    method: a registered training method (``robustops.train.METHODS``: natural, pgd, free, fgsm,
    trades, gaussian, ...).
    hparams: the fields of :class:`FitConfig` (epochs, eps, alpha, steps, norm ("linf"/"l2"),
    random_start, lo, hi, mean/std (input normalisation inside the forward), optimizer
    ("sgd"/"adam"), lr, momentum, weight_decay, nesterov, schedule
    ("cyclic"/"multistep"/"cosine"/"constant"/"onecycle"), milestones, gamma, grad_clip (max gradient
    norm), amp (None/"bf16"/"fp16"), channels_last, seed, val_eps, val_alpha, val_steps, val_norm,
    val_every, select (also "acr" / "acceps" for the certified methods), patience,
    restore_best, keep_all), the training options (awp=gamma: adversarial weight perturbation, pgd and
    trades; ema=decay: weight averaging, every method; mixup=alpha: mixup, natural, and interpolated
    adversarial training, pgd; cutmix=alpha: CutMix, pgd, trades, fgsm, free, fgsm_sdi and natural,
    robustops.train.cutmix; robust_mixup=alpha: robust mixup, natural, pgd, trades and ijsat,
    robustops.train.robust_mixup; see robustops.train.awp / .ema and the methods) and the methods'
    hyperparameters (m for free, fgsm_init for fgsm, beta for trades, sigma for gaussian, ...; those
    of other methods are ignored); coreset=craig|gradmatch|random with coreset_frac, coreset_every,
    coreset_warmup: adversarial coreset selection (:mod:`robustops.train.coreset`: pgd, fgsm, trades;
    train_loader must then be a DataLoader over a map-style dataset). Under ema, validation, the selection of the best epoch, best.pt and
    the returned model are the weight average's.
    val_loader: validation data (clean / PGD / noisy accuracy every ``val_every`` epochs; selection of
    the best epoch and early stopping after ``patience`` validations without improvement).
    out_dir: where last.pt (every epoch), best.pt, epoch_<k>.pt (keep_all) and log.csv go.
    resume: a checkpoint path, a run directory, or True (out_dir/last.pt when it exists): continue
    that run exactly where its last finished epoch left it.
    model_name / model_kwargs / extra: stored in the checkpoints (``models.load_model`` rebuilds
    the model from them).
    tensorboard: a directory for TensorBoard event files (every epoch's log row as scalars); needs
    the tensorboard package.
    threads: torch's CPU threads while fit runs. None: robustops' rule, the one the command line
    applies (``robustops._threads``: 1 for inputs under 1024 values per sample such as the 8x8 digits,
    where more threads only cost time, else the physical cores, divided among the torchrun processes
    of the machine, at most 8); an int >= 1: that many; 0 or "keep": torch's current setting. The
    caller's setting is restored when fit returns (or raises); ``FitResult.threads`` says what ran.
    ood_data: out-of-distribution images for ``ood_ratio`` > 0 (with ``ood_weight``; pgd, trades;
    :mod:`robustops.train.ood`, Lee et al. 2021): a spec (``robustops.ood.load_ood``: "digits-ood[:N]",
    made from the run's seed at the training images' shape, or any dataset spec) or a tensor [N, C, H, W]
    in [lo, hi]; mixed into train_loader's batches (a DataLoader over a map-style dataset) by
    ``robustops.proxy.MixedLoader``. Ignored when ood_ratio is 0.
    """
    cfg = FitConfig.make(method, **hparams).resolved()
    resolve_threads(threads)  # a bad value fails here, before anything runs
    caller_threads = torch.get_num_threads()
    try:
        run = _FitRun(model, train_loader, cfg, val_loader=val_loader, out_dir=out_dir, progress=progress,
                      verbose=verbose, device=device, model_name=model_name, model_kwargs=model_kwargs, extra=extra,
                      tensorboard=tensorboard, threads=threads, ood_data=ood_data)
        ckpt_path = resume_path(resume, out_dir)
        if ckpt_path is not None:
            run.resume(ckpt_path)
        return run.run()
    finally:
        if torch.get_num_threads() != caller_threads:
            torch.set_num_threads(caller_threads)
