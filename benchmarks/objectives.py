"""Adversarial training that uses more than the label, on the digits over seeds: the rows of `robustops demo
--section objectives` (PGD-7 AT, TRADES, stylized max-margin AT, InfoAT, J-SIGR, PGD-7 AT + OOD data at the
same number of steps; the demo's SmallCNN, 30 epochs, eps 0.2) trained once per seed, each scored by clean,
PGD-20 and AutoAttack accuracy and by transfer accuracy (PGD-20 crafted on a separately trained PGD-7 AT
source). Prints mean (sd over seeds) with each figure's gap to PGD-7 AT (the baseline), and the issue's
targets judged on the means; appends one CSV row per (seed, row) to results/objectives.csv as each seed
finishes. --quick: 2 rows, 1 seed, 2 epochs (< 1 min).

    python benchmarks/objectives.py [--seeds 0,1] [--epochs 30] [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

from common import append_csv, section_rows, seed_means, seed_table

COLS = ("clean_acc", "robust_acc", "aa_acc", "transfer_acc")


def run_seed(seed: int, args, out: str) -> list:
    """One `robustops demo --section objectives` run; its rows from results.json."""
    return section_rows("objectives", seed, out, args.epochs, "--objectives-rows", args.rows)


def main(argv=None) -> int:
    from robustops.cli.demo_objectives import targets

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--rows", default="pgd,trades,sat,infoat,jsigr,pgd+ood")
    p.add_argument("--quick", action="store_true", help="pgd and pgd+ood, seed 0, 2 epochs")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.rows = "0", 2, "pgd,pgd+ood"
    all_rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in (int(s) for s in args.seeds.split(",")):
            rows = [{"seed": seed, "row": r["method"], "label": r["label"], **{c: r[c] for c in COLS},
                     "train_s": r["train_time_s"]} for r in run_seed(seed, args, os.path.join(tmp, str(seed)))]
            all_rows += rows
            path = append_csv("objectives_quick.csv" if args.quick else "objectives.csv", rows)
            print(f"seed {seed} done ({path})", flush=True)
    m = seed_means(all_rows, COLS)
    print("\n".join(seed_table(m, COLS, ("clean", "PGD-20", "AutoAttack", "transfer"), "pgd", "PGD-7 AT") + [""]
                    + targets(m)))  # the section's own verdicts, on the means over seeds
    return 0


if __name__ == "__main__":
    sys.exit(main())
