"""InfoAT on digits beside its bases: PGD-7 AT, TRADES and InfoAT on either base, with the demo's settings
(SmallCNN, SGD with the cyclic schedule, lr 0.05, batch 64, eps 0.2, 7 inner steps, 144 training images held
out to pick the best epoch by PGD-10 accuracy), for several seeds; then clean and PGD-20 accuracy (eps 0.2,
random start) on the digits test split.

    python benchmarks/infoat_digits.py --threads 1                  # 4 variants x seeds 0, 1, 30 epochs (~5 min)
    python benchmarks/infoat_digits.py --quick --no-csv             # 3 epochs, seed 0 (under a minute)

Variants (VARIANTS): pgd (PGD-7 AT, the baseline), trades (TRADES, beta 6), infoat_trades (InfoAT on TRADES),
infoat (InfoAT on PGD-7 AT, the method's defaults: info_mix 0.5, info_tau 1). The paper's abstract (its
tables could not be read here) claims the best robustness among several state-of-the-art methods on
several datasets and models; digits is a much smaller problem. Appends the rows to
benchmarks/results/infoat_digits.csv as each run ends. CPU figures.
"""
from __future__ import annotations

import statistics

from common import add_digits_flags, digits_row, digits_variant_runs, parser

VARIANTS = {"pgd": ("pgd", {}),
            "trades": ("trades", {}),
            "infoat_trades": ("infoat", {"info_base": "trades"}),
            "infoat": ("infoat", {"info_base": "pgd"})}


def run_one(key: str, seed: int, args, train_ds, val_ds, test_loader) -> dict:
    method, opts = VARIANTS[key]
    opts = dict(opts, **({k: v for k, v in (("info_mix", args.info_mix), ("info_tau", args.info_tau))
                          if v is not None} if method == "infoat" else {}))
    return digits_row(key, method, opts, seed, args, train_ds, val_ds, test_loader)


def summary(rows, keys) -> list:
    """Markdown rows: variant, clean and PGD acc (mean +- std over seeds, %), and the gap to PGD-7 AT."""
    def ms(vals):
        return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

    out, ref = [], None
    for key in keys:
        sel = [r for r in rows if r["variant"] == key]
        if not sel:
            continue
        (c, sc), (a, sa) = ms([100 * r["clean_acc"] for r in sel]), ms([100 * r["robust_acc"] for r in sel])
        ref = (c, a) if key == "pgd" else ref
        gap = "-" if ref is None or key == "pgd" else f"{c - ref[0]:+.1f} / {a - ref[1]:+.1f}"
        out.append(f"| {key} | {c:.1f} +- {sc:.1f} | {a:.1f} +- {sa:.1f} | {gap} | {len(sel)} |")
    return out


def main(argv=None):
    p = parser(__doc__, "infoat_digits.csv")
    add_digits_flags(p, VARIANTS)
    p.add_argument("--info-mix", type=float, default=None, help="InfoAT's info_mix (default: the method's)")
    p.add_argument("--info-tau", type=float, default=None, help="InfoAT's info_tau (default: the method's)")
    p.add_argument("--quick", action="store_true", help="3 epochs, seed 0 (under a minute)")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.seeds = 3, "0"
    print(f"eps {args.eps}, {args.epochs} epochs, PGD-{args.attack_steps}")
    rows = digits_variant_runs(p, args, VARIANTS, run_one)
    keys = args.variants.split(",")
    print(f"\n| variant | clean acc % | PGD-{args.attack_steps} acc % | vs PGD-7 AT (clean / PGD) | seeds |")
    print("|---|---:|---:|---:|---:|")
    print("\n".join(summary(rows, keys)))


if __name__ == "__main__":
    main()
