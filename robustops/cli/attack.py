"""`robustops attack`: clean and robust accuracy of a checkpoint under PGD / FGSM, per-sample results
as a TSV, inputs sharded over torchrun processes."""
from __future__ import annotations

import argparse
import csv
import math
import os

import torch

from .. import _rng, attacks
from .. import data as rodata
from .. import models
from .common import (CLIError, add_common, check_model_accepts, check_writable, distributed, load_data,
                     parse_fraction, require_min)

HELP = "robust accuracy of a checkpoint under PGD / FGSM"

#: Columns of the per-sample TSV, in order (target only for targeted attacks).
RESULT_COLUMNS = ("index", "label", "clean_pred", "adv_pred", "clean_correct", "robust_correct", "success",
                  "success_step", "restart", "linf", "l2", "target")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="model file: a robustops checkpoint, a raw state dict "
                   "(with --model), a TorchScript or a torch.export file")
    p.add_argument("--model", default=None, help="model name for a raw state dict (small_cnn, preact_resnet18, "
                   "resnet20, resnet110)")
    p.add_argument("--data", default="digits", help='"digits" (embedded), a .npz file, "cifar10:DIR" or '
                   '"imagefolder:DIR" (default: digits)')
    p.add_argument("--split", default="test", help="train or test (default: test)")
    p.add_argument("--norm", default="linf", choices=["linf", "l2"])
    p.add_argument("--eps", type=parse_fraction, default=None, help="radius, e.g. 0.1 or 8/255 (default: 8/255 "
                   "for linf, 0.5 for l2)")
    p.add_argument("--alpha", type=parse_fraction, default=None, help="step size (default: 2.5 * eps / steps)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--restarts", type=int, default=1)
    p.add_argument("--loss", default="ce", choices=["ce", "dlr"])
    p.add_argument("--fgsm", action="store_true", help="FGSM instead of PGD (one step of size eps)")
    p.add_argument("--no-random-start", dest="random_start", action="store_false")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--max", "--max-samples", dest="max", type=int, default=None,
                   help="attack only the first MAX samples (--max-samples: the same, for use under torchrun, "
                        "whose own --max-restarts option makes --max ambiguous)")
    p.add_argument("--out", default=None, help="per-sample results TSV (written when the attack has run)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--early-stop", action="store_true", help="samples that are fooled leave the batch")
    p.add_argument("--graph", action="store_true", help="CUDA-graph replay of the attack iteration (CUDA only)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "bf16", "float16", "fp16"],
                   help="autocast dtype of the model's forward")
    p.add_argument("--normalize", action="store_true", help="the model takes inputs normalized with the "
                   "dataset's mean/std: the attack normalizes in front of it")
    add_common(p, workers=False)


def result_rows(samples: dict) -> list:
    """robust_accuracy's per-sample tensors as a list of row dicts (TSV-ready values)."""
    cols = [c for c in RESULT_COLUMNS if c in samples]
    data = [samples[c].tolist() for c in cols]
    rows = []
    for vals in zip(*data):
        row = {}
        for c, v in zip(cols, vals):
            row[c] = int(v) if isinstance(v, bool) else (f"{v:.6g}" if isinstance(v, float) else v)
        rows.append(row)
    return rows


def save_results(path: str, samples_or_rows) -> str:
    """Writes per-sample results (robust_accuracy's "samples" dict, or a list of row dicts) as a TSV
    sorted by index, with a header line, atomically. Returns path."""
    rows = result_rows(samples_or_rows) if isinstance(samples_or_rows, dict) else list(samples_or_rows)
    rows.sort(key=lambda r: int(r["index"]))
    cols = [c for c in RESULT_COLUMNS if rows and c in rows[0]] or list(RESULT_COLUMNS[:-1])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(cols)
        for r in rows:
            w.writerow([r[c] for c in cols])
    os.replace(tmp, path)
    return path


def _attack(args, model, info, eps, rank: int):
    mean = std = None
    if args.normalize:
        if info.get("mean") is None:
            raise CLIError(f"--normalize: dataset {info['name']} has no mean/std")
        mean, std = info["mean"], info["std"]
    common = dict(norm=args.norm, loss=args.loss, mean=mean, std=std, early_stop=args.early_stop,
                  seed=_rng.derive_seed(args.seed, rank), graph=args.graph, dtype=args.dtype,
                  random_start=args.random_start, restarts=args.restarts)
    if args.fgsm:
        return attacks.FGSM(model, eps=eps, alpha=args.alpha, **common)
    return attacks.PGD(model, eps=eps, alpha=args.alpha, steps=args.steps, **common)


def _gather(d, rows, stats):
    """Rank 0 receives every rank's rows and the summed counts."""
    import torch.distributed as dist

    gathered = [None] * d.world if d.rank == 0 else None
    dist.gather_object((rows, stats), gathered, dst=0)
    if d.rank != 0:
        return rows, stats
    parts = [s for _, s in gathered]
    return ([r for part_rows, _ in gathered for r in part_rows],
            [sum(s[0] for s in parts), sum(s[1] for s in parts), sum(s[2] for s in parts), max(s[3] for s in parts)])


def _load(args):
    """Everything checked before the attack runs: (model, dataset, info, eps)."""
    require_min(steps=(args.steps, 1), restarts=(args.restarts, 1), batch=(args.batch, 1))
    eps = args.eps if args.eps is not None else (8 / 255 if args.norm == "linf" else 0.5)
    for flag, v in (("--eps", eps), ("--alpha", args.alpha)):
        if v is not None and not 0.0 <= v < math.inf:
            raise CLIError(f"{flag} must be a finite number >= 0, got {v}")
    if args.out:
        check_writable(args.out, "--out")
        if os.path.exists(args.out) and not args.force:
            raise CLIError(f"--out {args.out} already exists; --force replaces it")
    dataset, info = load_data(args.data, args.split)
    try:
        model = models.load_model(args.checkpoint, name=args.model)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as e:
        raise CLIError(str(e) if str(e).startswith("--") else f"--checkpoint {args.checkpoint!r}: {e}") from None
    check_model_accepts(model, info, torch.device("cpu"))
    return model, dataset, info, eps


def run(args) -> int:
    from torch.utils.data import DataLoader, Subset

    model, dataset, info, eps = _load(args)
    with distributed(args.device) as d:
        model = model.to(d.device)
        if args.max is not None:
            dataset = Subset(dataset, list(range(min(args.max, len(dataset)))))
        part = rodata.shard(dataset, d.rank, d.world) if d.distributed else dataset
        loader = DataLoader(rodata.IndexedDataset(part), batch_size=args.batch, shuffle=False)
        try:
            attack = _attack(args, model, info, eps, d.rank)
        except (ValueError, TypeError) as e:
            raise CLIError(str(e)) from None
        res = attacks.robust_accuracy(model, loader, attack, device=d.device, progress=args.progress and d.rank == 0)
        rows = result_rows(res["samples"])
        stats = [res["n"], res["clean_correct"], res["robust_correct"], res["time_s"]]
        if d.distributed:
            rows, stats = _gather(d, rows, stats)
        if d.rank == 0:
            _report(args, info, eps, d, rows, stats)
    return 0


def _report(args, info, eps, d, rows, stats) -> None:
    n, clean, robust, elapsed = stats
    if args.out:
        save_results(args.out, rows)
    what = "FGSM" if args.fgsm else f"PGD-{args.steps}"
    print(f"{what} {args.norm} eps={eps:.6g} restarts={args.restarts} on {info['name']}/{args.split} "
          f"({n} samples, {d.world} rank{'s' if d.world > 1 else ''}, {d.device.type}, {elapsed:.1f}s)")
    print(f"clean_acc {clean / max(n, 1):.4f}  robust_acc {robust / max(n, 1):.4f}  n {n}  "
          f"clean_correct {clean}  robust_correct {robust}")
    if args.out:
        print(f"per-sample results: {args.out}")
