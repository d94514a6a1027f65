"""Stylized max-margin AT (method ``sat``, Naseer et al. 2022) beside PGD-7 AT on the digits, with the demo's
settings (SmallCNN, SGD with the cyclic schedule, lr 0.05, batch 64, 7 inner steps at --eps, 144 training
images held out to pick the best epoch by PGD-10 accuracy): clean accuracy and PGD-20 accuracy at --eps on
the test split, per seed, PGD-7 AT being the baseline of every "vs PGD" figure.

    python benchmarks/sat_digits.py                     # pgd and sat x seeds 0, 1; 30 epochs, eps 0.2
    python benchmarks/sat_digits.py --quick --no-csv    # seed 0, 2 epochs, under a minute
    python benchmarks/sat_digits.py --sat sat_mm=0.5,sat_margin=2

Appends each row to benchmarks/results/sat_digits.csv as it finishes. CPU figures; the training times are
wall seconds of the fit, inflated by whatever else runs on the machine.
"""
from __future__ import annotations

import itertools
import statistics

import torch

from robustops import models
from robustops.cli.common import DIGITS_MODEL, split_holdout
from common import digits_setup, finish, fit_digits, parser, pgd_accuracy

METHODS = ("pgd", "sat")


def sat_options(text: str) -> dict:
    """"k=v,..." -> sat hyperparameters (sat_layers stays a str, the others are floats)."""
    out = {}
    for item in filter(None, text.split(",")):
        k, _, v = item.partition("=")
        out[k.strip()] = v if k.strip() == "sat_layers" else float(v)
    return out


def run_one(method: str, seed: int, args, train_ds, val_ds, test_loader) -> dict:
    opts = sat_options(args.sat) if method == "sat" else {}
    torch.manual_seed(seed)
    model = models.get_model("small_cnn", **DIGITS_MODEL).to(args.device)
    res, train_s = fit_digits(model, method, train_ds, val_ds, args, seed, **opts)
    ev = pgd_accuracy(model, test_loader, args, seed)
    return {"method": method, "options": ";".join(f"{k}={v}" for k, v in opts.items()), "epochs": args.epochs,
            "seed": seed, "eps": args.eps, "clean_acc": ev["clean_acc"], "pgd20_acc": ev["robust_acc"],
            "best_epoch": res.best_epoch, "train_s": train_s}


def main(argv=None):
    p = parser(__doc__, "sat_digits.csv")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--eps", type=float, default=0.2)
    p.add_argument("--sat", default="", help="hyperparameters of the sat row, e.g. sat_mm=0.5,sat_layers=0")
    p.add_argument("--quick", action="store_true", help="seed 0, 2 epochs")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs = "0", 2
    keys = args.methods.split(",")
    if any(k not in METHODS for k in keys):
        p.error(f"--methods must be a comma-separated list of {', '.join(METHODS)}; got {args.methods}")
    base, full_train, test_loader = digits_setup(args)
    print(f"device: {base['device']}; torch {torch.__version__}; eps {args.eps}, {args.epochs} epochs; baseline: pgd")
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for seed, key in itertools.product(seeds, keys):
        r = run_one(key, seed, args, *split_holdout(full_train, 144, seed), test_loader)
        rows.append(r)
        ref = [b for b in rows if b["method"] == "pgd" and b["seed"] == seed]
        vs = f" (PGD-7 AT: {ref[0]['clean_acc']:.4f} / {ref[0]['pgd20_acc']:.4f})" if ref and key != "pgd" else ""
        print(f"{key:<4} seed {seed}: clean {r['clean_acc']:.4f}  PGD-20 {r['pgd20_acc']:.4f}{vs}  "
              f"train {r['train_s']:.1f}s", flush=True)
        finish(args, [dict(base, **{k: (f"{v:.5g}" if isinstance(v, float) else v) for k, v in r.items()})])
    for key in keys:
        sel = [r for r in rows if r["method"] == key]
        c, a = (statistics.fmean(100 * r[col] for r in sel) for col in ("clean_acc", "pgd20_acc"))
        print(f"| {key} | {c:.1f} | {a:.1f} | {statistics.fmean(r['train_s'] for r in sel):.0f} s | {len(sel)} |")


if __name__ == "__main__":
    main()
