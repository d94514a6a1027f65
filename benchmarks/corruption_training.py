"""Training for common corruptions on digits-C, over seeds: the rows of `robustops demo --section corruptions`
(natural, Gaussian at a fixed sigma and with sigma ~ U(0, sigma), small-eps PGD-AT, AdA, AugRmixAT, RLAT; the
demo's SmallCNN, epochs and learning rate) trained once per seed, each scored on the 360 test digits under the 15
CIFAR-10-C corruptions x 5 severities. Prints mean (sd over seeds) of clean accuracy, mean corruption accuracy,
the four families and ECE beside natural training (the baseline every row is compared with), and the issue's
targets judged on the means; appends one CSV row per (seed, row) to results/corruption_training.csv as each seed
finishes. --quick: 2 rows, 1 seed, 3 epochs (< 1 min).

    python benchmarks/corruption_training.py [--seeds 0,1,2] [--epochs 30] [--quick]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

from common import append_csv, section_rows, seed_means, seed_table

FAMILIES = ("noise", "blur", "weather", "digital")
NOISE = ("gaussian_noise", "shot_noise", "impulse_noise")


def run_seed(seed: int, args, out: str) -> list:
    """One `robustops demo --section corruptions` run; its rows from results.json."""
    return section_rows("corruptions", seed, out, args.epochs, "--corruption-rows", args.rows)


def flat(seed: int, r: dict) -> dict:
    c = r["corruptions"]
    return {"seed": seed, "row": r["method"], "label": r["label"], "clean_acc": r["clean_acc"], "mca": r["mca"],
            **{f: c["per_family"].get(f) for f in FAMILIES}, "ece_clean": c["clean_ece"],
            "ece_corrupted": c["corruption_ece"], "pgd20_small": r.get("small_pgd_acc"), "train_s": r["train_time_s"],
            **{f"noise_s{s}": statistics.mean(c["accuracy"][n][str(s)] for n in NOISE) for s in range(1, 6)}}


def verdicts(rows: list) -> list:
    """The issue's targets judged on the means over seeds."""
    mean = {}
    for r in rows:
        mean.setdefault(r["row"], []).append(r)
    m = {k: {c: statistics.mean(r[c] for r in v) for c in v[0] if isinstance(v[0][c], float)} for k, v in mean.items()}
    out = []
    for name in ("ada", "augrmix", "rlat"):
        if name in m and "natural" in m and "pgd+small" in m:
            beat = m[name]["mca"] > max(m["natural"]["mca"], m["pgd+small"]["mca"])
            clean = m[name]["clean_acc"] >= m["natural"]["clean_acc"] - 0.02
            out.append(f"target {name}: mean corruption accuracy above natural and small-eps PGD-AT: "
                       f"{'met' if beat else 'MISSED'}; clean within 2 points of natural: {'met' if clean else 'MISSED'}")
    if "gaussian" in m and "gaussian+uniform" in m:
        out.append("noise family by severity, fixed / uniform sigma: " + ", ".join(
            f"s{s} {100 * m['gaussian'][f'noise_s{s}']:.1f} / {100 * m['gaussian+uniform'][f'noise_s{s}']:.1f}"
            for s in range(1, 6)))
    return out


def summary(rows: list) -> list:
    """Markdown: mean (sd) per row over the seeds, with each figure's gap to natural."""
    cols = ("clean_acc", "mca") + FAMILIES + ("ece_corrupted",)
    return seed_table(seed_means(rows, cols), cols, cols, "natural", "natural", percent=cols[:-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--rows", default="natural,gaussian,gaussian+uniform,pgd+small,ada,augrmix,rlat")
    p.add_argument("--quick", action="store_true", help="natural and gaussian+uniform, seed 0, 3 epochs")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.rows = "0", 3, "natural,gaussian+uniform"
    all_rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in (int(s) for s in args.seeds.split(",")):
            rows = [flat(seed, r) for r in run_seed(seed, args, os.path.join(tmp, str(seed)))]
            all_rows += rows
            path = append_csv("corruption_training_quick.csv" if args.quick else "corruption_training.csv", rows)
            print(f"seed {seed} done ({path})", flush=True)
    print("\n".join(summary(all_rows) + [""] + verdicts(all_rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
