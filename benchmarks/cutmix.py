"""Robust overfitting on the digits and what CutMix and weight averaging do to it (Rebuffi et al.
2021, "Data augmentation can improve robustness": spatial composition helps adversarial training
once combined with model weight averaging, where augmentation alone does not).

Four runs per seed, the demo's PGD-AT otherwise (SmallCNN, SGD lr 0.05, batch 64, eps 0.2, 7 inner
steps): PGD-AT (the baseline), + EMA (``ema``), + CutMix (``cutmix``, alpha 1: lam uniform), + both.
The learning rate is multistep (x0.1 at 50 % and 75 % of the run), the schedule under which Rice et al.
(2020) observed robust overfitting, and the runs are longer than the demo's 30 epochs so it can show.
After every epoch the model (the weight average under EMA) is measured on the digits test split:
clean accuracy and PGD-10 accuracy (random start), the robust-overfitting curve. Columns: clean and
PGD accuracy at the last epoch, at the best epoch of the curve (chosen on the test curve itself, as
in Rice et al.'s "best checkpoint": an optimistic figure that shows how much is lost by the end),
and the drop best - last. Each run is printed beside the PGD-AT run of its seed and appended to
benchmarks/results/cutmix.csv when it ends (the curves to cutmix_curves.csv); the mean curves over
the seeds are drawn in docs/cutmix_overfitting.png.

    python benchmarks/cutmix.py                 # 4 runs x seeds 0, 1, 2; 40 epochs
    python benchmarks/cutmix.py --quick         # 4 runs, seed 0, 4 epochs, 180 test images: < 1 min
    python benchmarks/cutmix.py --seeds 1 &     # seeds in parallel processes, then the table and the
    python benchmarks/cutmix.py --from-csv      # picture of the CSVs' rows (those of --epochs / --eps)

In --quick mode the models barely leave chance: it checks that the script runs, not the claim.

CPU figures (one thread); the comparison does not depend on the device.
"""
from __future__ import annotations

import csv
import os
import statistics
import time

import torch
from torch.utils.data import DataLoader, Subset

from robustops import models, train
from robustops.cli.common import DIGITS_MODEL
from robustops.plotting import plot_curve
from common import RESULTS, append_csv, digits_setup, parser

CONFIGS = ("PGD-AT", "+ EMA", "+ CutMix", "+ CutMix + EMA")
FIGURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "cutmix_overfitting.png")


def options(name: str, args) -> dict:
    """The training options of a configuration."""
    return {"ema": args.ema if "EMA" in name else None, "cutmix": args.cutmix if "CutMix" in name else None}


def run_one(name: str, seed: int, args, train_ds, test_loader):
    """(the row, the curve): one PGD-AT run and its per-epoch test accuracies."""
    torch.manual_seed(seed)
    model = models.get_model("small_cnn", **DIGITS_MODEL).to(args.device)
    loader = DataLoader(train_ds, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    t0 = time.perf_counter()
    res = train.fit(model, loader, "pgd", val_loader=test_loader, epochs=args.epochs, eps=args.eps, steps=args.steps,
                    lr=args.lr, schedule="multistep", seed=seed, val_steps=10, restore_best=False, progress=False,
                    verbose=False, device=args.device, threads=args.threads, **options(name, args))
    curve = [(int(h["epoch"]), float(h["clean_acc"]), float(h["robust_acc"])) for h in res.history]
    best = max(range(len(curve)), key=lambda i: (curve[i][2], -i))  # the first epoch of the highest PGD accuracy
    row = {"config": name, "label": res.config.label, "seed": seed, "epochs": args.epochs, "eps": args.eps,
           "clean_last": curve[-1][1], "pgd_last": curve[-1][2], "best_epoch": curve[best][0],
           "clean_best": curve[best][1], "pgd_best": curve[best][2], "pgd_drop": curve[best][2] - curve[-1][2],
           "train_s": res.train_time}
    row["wall_s"] = time.perf_counter() - t0
    return row, curve


COLUMNS = ("clean_last", "pgd_last", "clean_best", "pgd_best", "pgd_drop")


def summary(rows) -> None:
    """The table: mean (sd) over the seeds of each configuration."""
    print(f"\n{'':<16}" + "".join(f"{c:>18}" for c in COLUMNS))
    for name in CONFIGS:
        rs = [r for r in rows if r["config"] == name]
        if not rs:
            continue
        cells = []
        for c in COLUMNS:
            v = [r[c] for r in rs]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            cells.append(f"{100 * statistics.mean(v):>10.1f} ({100 * sd:4.1f})")
        print(f"{name:<16}" + "".join(f"{s:>18}" for s in cells) + f"   n={len(rs)}")


def draw(curves, path: str, args) -> None:
    """Mean PGD-10 test accuracy per epoch over the seeds, one curve per configuration."""
    means = {}
    for name in CONFIGS:
        cs = [c for (n, _), c in curves.items() if n == name]
        if cs:
            means[name] = [statistics.mean(c[e][2] for c in cs) for e in range(len(cs[0]))]
    xs = [e + 1 for e in range(args.epochs)]
    seeds = ", ".join(map(str, args.seed_list))
    out = plot_curve(path, xs, means, "epoch", f"PGD-10 test accuracy (eps {args.eps:g})",
                     title=f"robust overfitting on the digits (PGD-{args.steps} AT, mean over seeds {seeds})")
    print("wrote", ", ".join(out))


def read_csv(args):
    """(rows, curves) of the CSVs for --epochs / --eps / --seeds, the latest row of each (config, seed)."""
    rows, curves = {}, {}
    with open(os.path.join(RESULTS, args.csv), newline="") as f:
        for r in csv.DictReader(f):
            if int(r["epochs"]) == args.epochs and float(r["eps"]) == args.eps and int(r["seed"]) in args.seed_list:
                rows[(r["config"], int(r["seed"]))] = {**r, "seed": int(r["seed"]),
                                                       **{c: float(r[c]) for c in COLUMNS + ("train_s",)}}
    with open(os.path.join(RESULTS, os.path.splitext(args.csv)[0] + "_curves.csv"), newline="") as f:
        for r in csv.DictReader(f):
            key = (r["config"], int(r["seed"]))
            if key in rows:
                curve = curves.setdefault(key, {})
                curve[int(r["epoch"])] = (int(r["epoch"]), float(r["clean_acc"]), float(r["pgd_acc"]))
    curves = {k: [c[e] for e in sorted(c)][-args.epochs:] for k, c in curves.items() if len(c) >= args.epochs}
    return [rows[k] for k in sorted(rows, key=lambda k: (k[1], CONFIGS.index(k[0])))], curves


def main(argv=None):
    p = parser(__doc__, "cutmix.csv")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--eps", type=float, default=0.2)
    p.add_argument("--steps", type=int, default=7, help="PGD-AT inner steps")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--ema", type=float, default=0.99,
                   help="EMA decay (the paper's 0.999 is for ~50k steps; the digits run ~2k)")
    p.add_argument("--cutmix", type=float, default=1.0, help="CutMix Beta(alpha, alpha) (the paper's 1)")
    p.add_argument("--test-size", type=int, default=None, help="test images measured each epoch (default: all)")
    p.add_argument("--figure", default=None, help=f"the curves' picture (default {FIGURE}; --quick: under results/)")
    p.add_argument("--quick", action="store_true", help="seed 0, 4 epochs, 180 test images")
    p.add_argument("--from-csv", action="store_true", help="train nothing: the table and the picture of the CSVs")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.test_size = "0", 4, 180
        args.figure = args.figure or os.path.join(RESULTS, "cutmix_quick.png")
    args.figure = args.figure or FIGURE
    args.seed_list = [int(s) for s in args.seeds.split(",")]
    if args.from_csv:
        rows, curves = read_csv(args)
        summary(rows)
        args.seed_list = sorted({k[1] for k in curves})
        draw(curves, args.figure, args)
        return
    base, train_ds, test_loader = digits_setup(args)
    if args.test_size is not None:
        test_loader = DataLoader(Subset(test_loader.dataset, range(args.test_size)), batch_size=360)
    print(f"device: {base['device']}; torch {torch.__version__}; PGD-{args.steps} AT, eps {args.eps}, {args.epochs} "
          f"epochs, multistep lr {args.lr}; EMA {args.ema}, CutMix alpha {args.cutmix}; test PGD-10 each epoch "
          f"(in brackets: PGD-AT of the same seed; timings shared with other work on this machine)")
    rows, curves = [], {}
    for seed in args.seed_list:
        ref = None
        for name in CONFIGS:
            row, curve = run_one(name, seed, args, train_ds, test_loader)
            ref = ref or row
            rows.append(row)
            curves[(name, seed)] = curve
            figs = "  ".join(f"{c} {row[c]:.3f} ({ref[c]:.3f})" for c in COLUMNS)
            print(f"{name:<16} seed {seed}  {figs}  best epoch {row['best_epoch']}  train {row['train_s']:.1f}s "
                  f"({ref['train_s']:.1f}s)", flush=True)
            if not args.no_csv:  # written as they go: a stopped run keeps its finished rows
                append_csv(args.csv, [dict(base, **{k: (f"{v:.5g}" if isinstance(v, float) else v)
                                                    for k, v in row.items()})])
                append_csv(os.path.splitext(args.csv)[0] + "_curves.csv",
                           [dict(base, config=name, seed=seed, epoch=e, clean_acc=f"{c:.5g}", pgd_acc=f"{r:.5g}")
                            for e, c, r in curve])
    summary(rows)
    draw(curves, args.figure, args)


if __name__ == "__main__":
    main()
