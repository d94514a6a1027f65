"""The betting confidence sequences of sequential certification against Clopper-Pearson (issue 30, item 2):
the Bernoulli-oracle simulation (``robustops.smoothing.sequential.simulate``, no network) of one radius
at r / sigma in {0.5, 1, 2} and pA in {0.9, 0.95, 0.99, 0.999}, plus the near-threshold point pA = 0.979
at r = 2 sigma (Phi(2) = 0.9772), with n_max = 100,000, alpha = 0.001, n0 = n_min = 100, the package's
default look schedule (doubling when this was written).
Rows: mean samples per input (n0 + estimation) and the certified fraction, for "cp" (the baseline,
printed beside each figure), the first betting version (plug-in bets, no final look) and the new default
(pilot-weighted mixture of bets with a Clopper-Pearson final look, ``robustops.smoothing.betting``).

    python benchmarks/bench_sequential_bets.py            # 2000 trials per point (~1 min on 2 cores)
    python benchmarks/bench_sequential_bets.py --quick    # 300 trials

Results go to benchmarks/results/sequential_bets.csv as they are measured (rewritten).
"""
from __future__ import annotations

import argparse
import csv
import os
import time

import numpy as np
from scipy import stats

from common import RESULTS
from robustops.smoothing.sequential import CERTIFIED, simulate

VARIANTS = {
    "cp": dict(test="cp"),
    "betting plug-in (old)": dict(test="betting", bets="plugin", final_share=0.0),
    "betting mixture": dict(test="betting", bets="mixture", final_share=0.0),
    "betting mixture + final look (default)": dict(test="betting"),
}
POINTS = [(2.0, 0.979)] + [(z, p) for z in (0.5, 1.0, 2.0) for p in (0.9, 0.95, 0.99, 0.999) if p > stats.norm.cdf(z)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="300 trials per point")
    args = parser.parse_args()
    trials = 300 if args.quick else args.trials
    path = os.path.join(RESULTS, "sequential_bets.csv")
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["r_over_sigma", "pA", "variant", "mean_samples", "certified", "cp_mean_samples", "cp_certified"])
        for z, p in POINTS:
            base = None
            for name, kw in VARIANTS.items():
                t0 = time.perf_counter()
                t = simulate(p, trials, seed=1, n0=100, alpha=0.001, thresholds=[stats.norm.cdf(z)], n_min=100,
                             n_max=100_000, **kw)
                row = (100 + float(t.n.mean()), float(np.mean(t.decisions[:, 0] == CERTIFIED)))
                base = base or row
                out.writerow([z, p, name, f"{row[0]:.0f}", f"{row[1]:.3f}", f"{base[0]:.0f}", f"{base[1]:.3f}"])
                f.flush()
                print(f"r = {z} sigma, pA {p}: {name}: {row[0]:.0f} samples, certified {row[1]:.3f} "
                      f"(cp {base[0]:.0f}, {base[1]:.3f}; {time.perf_counter() - t0:.1f}s)", flush=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
