"""Sequential certification against the ORACLE, per pA bin (simulation: a Bernoulli oracle, no network).

The oracle of an input with (true) pA at radius r: the smallest n whose one-sided Clopper-Pearson lower
bound at level alpha, computed with the EXPECTED successes n * pA (a fractional count: the Beta quantile
interpolates), reaches Phi(r / sigma) (``robustops.smoothing.sequential.clearing_n``). It is what a
single look at the right place would need if pA were known: no selection samples, no split of alpha over
looks, no bad luck. A sequential test that must find cA (n0 selection samples) and spread alpha over
its looks cannot reach it; the table says how close each configuration comes.

Each row: a configuration (test, schedule, growth, n0, n_min), r (in units of sigma), pA (the bins 0.9,
0.95, 0.99, 0.999), the oracle n, the mean estimation samples of ``--trials`` simulated inputs and its
ratio to the oracle (est / oracle: the issue's figure, its target <= 1.3 for pA >= 0.9 at r = sigma), the
mean total n0 + estimation, the ratio total / (n0 + oracle) (the selection samples counted on both sides),
the certified fraction, and clear_at_1.3x: the probability that ONE look at 1.3x the oracle with all of
alpha (what a test that knew pA could do at best with one look) certifies, P(Binomial(n, pA) >= k*) with
k* the fewest successes whose bound clears: where it is far below 1, a mean of 1.3x the oracle is out of
reach of any test that must see the votes (the binomial noise of the votes, not the schedule, dominates). alpha 0.001, n_max 100,000 (the README's setting). Rows are written to
benchmarks/results/sequential_oracle.csv as they complete (rewritten each run; --quick: _quick.csv).

    python benchmarks/sequential_oracle.py --quick          # 1000 trials, the default configurations
    python benchmarks/sequential_oracle.py --configs cp:geometric:2:100:100,cp:threshold:2:100:100
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import time

import numpy as np
from scipy import stats

from robustops.smoothing.sequential import CERTIFIED, clearing_n, clopper_pearson_lower, simulate
from common import RESULTS

BINS = (0.9, 0.95, 0.99, 0.999)
#: test:schedule:growth:n0:n_min; the first is the old default (the baseline of every ratio printed), the
#: last two the new defaults of the two tests
CONFIGS = ("cp:geometric:2:100:100", "betting:geometric:2:100:100", "cp:geometric:1.5:50:50",
           "cp:threshold:1.5:50:50", "betting:threshold:1.5:50:50")


def parse_config(text: str) -> dict:
    """test:schedule:growth:n0:n_min -> simulate's keyword arguments (n0 included)."""
    test, schedule, growth, n0, n_min = text.split(":")
    return dict(test=test, schedule=schedule, growth=float(growth), n0=int(n0), n_min=int(n_min))


def clear_probability(p: float, t: float, n: int, alpha: float) -> float:
    """P(Binomial(n, p) >= k*), k* the fewest successes whose (1 - alpha) Clopper-Pearson bound reaches t."""
    k = np.arange(n + 1)
    ok = np.nonzero(clopper_pearson_lower(k, n, alpha) >= t)[0]
    return float(stats.binom.sf(ok[0] - 1, n, p)) if len(ok) else 0.0


def oracle_row(cfg: dict, z: float, p: float, *, trials: int, alpha: float, n_max: int, seed: int) -> dict:
    """One configuration at r = z sigma and pA = p: the oracle and the simulated means."""
    t = float(stats.norm.cdf(z))
    oracle = int(clearing_n(p, t, alpha, n_max))
    sim = simulate(p, trials, seed=seed, alpha=alpha, n_max=n_max, thresholds=[t], **cfg)
    est = float(sim.n.mean())
    return dict(test=cfg["test"], schedule=cfg["schedule"], growth=cfg["growth"], n0=cfg["n0"],
                n_min=cfg["n_min"], r_over_sigma=z, pA=p, oracle=oracle, mean_est=round(est, 1),
                ratio_est=round(est / oracle, 3), mean_total=round(cfg["n0"] + est, 1),
                ratio_total=round((cfg["n0"] + est) / (cfg["n0"] + oracle), 3),
                certified=round(float(np.mean(sim.decisions[:, 0] == CERTIFIED)), 4), trials=trials,
                clear_at_13=round(clear_probability(p, t, math.ceil(1.3 * oracle), alpha), 3))


def main(argv=None) -> None:
    """Runs the table; prints each row beside the baseline configuration's ratio at the same point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS), help="test:schedule:growth:n0:n_min, comma-separated")
    p.add_argument("--radii", default="1,0.5", help="r / sigma values (default 1,0.5)")
    p.add_argument("--bins", default=",".join(map(str, BINS)))
    p.add_argument("--trials", type=int, default=10_000)
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--n-max", type=int, default=100_000)
    p.add_argument("--quick", action="store_true", help="1000 trials (under a minute)")
    p.add_argument("--csv", default=None, help="default benchmarks/results/sequential_oracle.csv (--quick: "
                   "sequential_oracle_quick.csv, so a quick run leaves the full table alone)")
    args = p.parse_args(argv)
    trials = 1000 if args.quick else args.trials
    if args.csv is None:
        args.csv = os.path.join(RESULTS, "sequential_oracle_quick.csv" if args.quick else "sequential_oracle.csv")
    configs = [parse_config(c) for c in args.configs.split(",")]
    os.makedirs(os.path.dirname(args.csv) or ".", exist_ok=True)
    base = {}
    t0 = time.perf_counter()
    with open(args.csv, "w", newline="") as f:
        writer = None
        for z in (float(v) for v in args.radii.split(",")):
            for pa in (float(v) for v in args.bins.split(",")):
                for k, cfg in enumerate(configs):
                    row = oracle_row(cfg, z, pa, trials=trials, alpha=args.alpha, n_max=args.n_max, seed=k)
                    if writer is None:
                        writer = csv.DictWriter(f, fieldnames=list(row))
                        writer.writeheader()
                    writer.writerow(row)
                    f.flush()
                    base.setdefault((z, pa), row)
                    b = base[(z, pa)]
                    name = f"{cfg['test']}:{cfg['schedule']}:{cfg['growth']:g}:{cfg['n0']}:{cfg['n_min']}"
                    print(f"r={z:g}sigma pA={pa:<6} {name:<28} oracle {row['oracle']:>4}  est {row['mean_est']:>7.1f} "
                          f"({row['ratio_est']:.2f}x, baseline {b['ratio_est']:.2f}x)  total {row['mean_total']:>7.1f} "
                          f"({row['ratio_total']:.2f}x, baseline {b['ratio_total']:.2f}x)  cert {row['certified']:.3f}  "
                          f"one look at 1.3x clears {row['clear_at_13']:.2f}",
                          flush=True)
    print(f"{time.perf_counter() - t0:.0f}s; rows in {args.csv} (timings inflated by a shared machine)")


if __name__ == "__main__":
    main()
