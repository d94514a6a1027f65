"""Stylized max-margin AT (method ``sat``, Naseer et al. 2022) beside PGD-7 AT on the digits, with the demo's
settings (SmallCNN, SGD with the cyclic schedule, lr 0.05, batch 64, 7 inner steps at --eps, 144 training
images held out to pick the best epoch by PGD-10 accuracy): clean accuracy and PGD-20 accuracy at --eps on
the test split, per seed, PGD-7 AT being the baseline of every "vs PGD" figure.

    python benchmarks/sat_digits.py                     # pgd and sat x seeds 0, 1; 30 epochs, eps 0.2
    python benchmarks/sat_digits.py --quick --no-csv    # seed 0, 2 epochs, under a minute
    python benchmarks/sat_digits.py --variants sat --sat sat_mm=0.5,sat_margin=2

Appends each row to benchmarks/results/sat_digits.csv as it finishes. CPU figures; the training times are
wall seconds of the fit, inflated by whatever else runs on the machine.
"""
from __future__ import annotations

import statistics

from common import add_digits_flags, digits_row, digits_variant_runs, parser

VARIANTS = ("pgd", "sat")


def sat_options(text: str) -> dict:
    """"k=v,..." -> sat hyperparameters (sat_layers stays a str, the others are floats)."""
    out = {}
    for item in filter(None, text.split(",")):
        k, _, v = item.partition("=")
        out[k.strip()] = v if k.strip() == "sat_layers" else float(v)
    return out


def run_one(method: str, seed: int, args, train_ds, val_ds, test_loader) -> dict:
    opts = sat_options(args.sat) if method == "sat" else {}
    return digits_row(method, method, opts, seed, args, train_ds, val_ds, test_loader)


def main(argv=None):
    p = parser(__doc__, "sat_digits.csv")
    add_digits_flags(p, VARIANTS)
    p.add_argument("--sat", default="", help="hyperparameters of the sat row, e.g. sat_mm=0.5,sat_layers=0")
    p.add_argument("--quick", action="store_true", help="seed 0, 2 epochs")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs = "0", 2
    print(f"eps {args.eps}, {args.epochs} epochs, PGD-{args.attack_steps}")
    rows = digits_variant_runs(p, args, VARIANTS, run_one)
    print(f"\n| variant | clean acc % | PGD-{args.attack_steps} acc % | train | seeds |")
    for key in args.variants.split(","):
        sel = [r for r in rows if r["variant"] == key]
        c, a = (statistics.fmean(100 * r[col] for r in sel) for col in ("clean_acc", "robust_acc"))
        print(f"| {key} | {c:.1f} | {a:.1f} | {statistics.fmean(r['train_s'] for r in sel):.0f} s | {len(sel)} |")


if __name__ == "__main__":
    main()
