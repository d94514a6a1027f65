"""Threat models beyond the L_p ball on the digits over seeds: the rows of `robustops demo --section
threat-models` (PGD-7 AT, iwd, ijsat; the demo's SmallCNN, 30 epochs, eps 0.2) trained once per seed, each
scored by clean, PGD-20 and AutoAttack accuracy (L-inf 0.2), accuracy under the IWD attack and the JSTM
attack and digits-C mean accuracy; and the section's preemptive robustification of test digits for the
PGD-7 AT model (PGD-20 errors of robustified images against the originals). Prints mean (sd over seeds) with
each figure's gap to PGD-7 AT (the baseline), and the issue's targets judged on the means; appends one CSV
row per (seed, row) to results/threat_models.csv as each seed finishes. --quick: 2 rows, 1 seed, 2 epochs.

    python benchmarks/threat_models.py [--seeds 0,1] [--epochs 30] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

from common import append_csv, section_rows, seed_means, seed_table

COLS = ("clean_acc", "robust_acc", "aa_acc", "iwd_acc", "jstm_acc", "mca")
NAMES = ("clean", "PGD-20", "AutoAttack", "IWD attack", "JSTM", "digits-C")


def main(argv=None) -> int:
    from robustops.cli.demo_threat import targets

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--rows", default="pgd,iwd,ijsat")
    p.add_argument("--quick", action="store_true", help="pgd and ijsat, seed 0, 2 epochs")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.rows = "0", 2, "pgd,ijsat"
    all_rows, robust = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in (int(s) for s in args.seeds.split(",")):
            out = os.path.join(tmp, str(seed))
            rows = [{"seed": seed, "row": r["method"], "label": r["label"], **{c: r.get(c) for c in COLS},
                     "train_s": r["train_time_s"]}
                    for r in section_rows("threat-models", seed, out, args.epochs, "--threat-rows", args.rows)]
            with open(os.path.join(out, "threat-models", "results.json")) as fh:
                rob = json.load(fh)["robustification"]
            if rob:
                robust.append(rob)
                rows.append({"seed": seed, "row": "robustify", "label": "PGD-7 AT: original -> robustified",
                             "clean_acc": rob["robustified"]["clean_acc"], "robust_acc": rob["robustified"]["pgd_acc"],
                             "orig_clean_acc": rob["original"]["clean_acc"], "orig_robust_acc": rob["original"]["pgd_acc"]})
            all_rows += rows
            path = append_csv("threat_models_quick.csv" if args.quick else "threat_models.csv", rows)
            print(f"seed {seed} done ({path})", flush=True)
    m = seed_means([r for r in all_rows if r["row"] != "robustify"], COLS)
    rob_mean = None
    if robust:
        rob_mean = {k: {c: statistics.mean(r[k][c] for r in robust) for c in ("clean_acc", "pgd_acc")}
                    for k in ("original", "robustified")}
        print(f"robustification (mean over {len(robust)} seeds): PGD-20 accuracy "
              f"{100 * rob_mean['original']['pgd_acc']:.1f}% -> {100 * rob_mean['robustified']['pgd_acc']:.1f}%, "
              f"clean {100 * rob_mean['original']['clean_acc']:.1f}% -> {100 * rob_mean['robustified']['clean_acc']:.1f}%")
    print("\n".join(seed_table(m, COLS, NAMES, "pgd", "PGD-7 AT") + [""] + targets(m, rob_mean)))  # the section's verdicts, on the means
    return 0


if __name__ == "__main__":
    sys.exit(main())
