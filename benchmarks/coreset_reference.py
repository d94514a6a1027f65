"""CRAIG's facility location (robustops.train.coreset_select.facility_location) against a reference
implementation: apricot-select's lazy greedy (FacilityLocationSelection, metric="precomputed",
optimizer="lazy"; Schreiber, Bilmes and Noble, JMLR 2020). robustops does not depend on apricot (NumPy and
numba on the CPU; robustops' selection works on the torch Gram matrices where the proxies are), so this
check is a script, not a test: it needs `pip install apricot-select==0.6.1` (numba) and prints, for random
instances of CRAIG's similarity (the largest distance minus the distance), whether both choose the same
points in the same order (or, where the order differs, an equal-gain tie: the same objective) and whether
robustops' weights equal the cluster sizes of its choice,
with the time of each.

    python benchmarks/coreset_reference.py --instances 20 --n 200 --k 20
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from robustops.train.coreset_select import facility_location


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--instances", type=int, default=20)
    p.add_argument("--n", type=int, default=200, help="points per instance")
    p.add_argument("--k", type=int, default=20, help="points chosen")
    p.add_argument("--dim", type=int, default=8)
    args = p.parse_args(argv)
    try:
        from apricot import FacilityLocationSelection
    except ImportError:
        print("apricot-select is not installed: pip install apricot-select==0.6.1")
        return 2
    same = ties = weights_ok = 0
    t_ours = t_ref = 0.0
    for seed in range(args.instances):
        X = np.random.default_rng(seed).normal(size=(args.n, args.dim))
        D = np.sqrt(((X[:, None] - X[None]) ** 2).sum(-1))
        S = D.max() - D
        t0 = time.perf_counter()
        ref = FacilityLocationSelection(args.k, metric="precomputed", optimizer="lazy").fit(S)
        t1 = time.perf_counter()
        idx, w = facility_location(torch.tensor(S), args.k)
        t2 = time.perf_counter()
        t_ref += t1 - t0 if seed else 0.0  # the first call compiles apricot's numba kernels
        t_ours += t2 - t1 if seed else 0.0
        ours, theirs = idx.tolist(), [int(i) for i in ref.ranking]
        same += ours == theirs
        # a different order is a tie when both choices reach the same objective F(T) = sum_i max_{j in T} S_ij
        ties += ours != theirs and bool(np.isclose(S[:, ours].max(1).sum(), S[:, theirs].max(1).sum(), rtol=1e-12))
        weights_ok += w.tolist() == np.bincount(S[:, ours].argmax(1), minlength=args.k).tolist()
    print(f"{args.instances} instances, n={args.n}, k={args.k}: same choice and order {same}/{args.instances} "
          f"(the others: {ties} ties of equal objective), weights = cluster sizes {weights_ok}/{args.instances}; time per instance (the first left out) "
          f"robustops {1e3 * t_ours / max(1, args.instances - 1):.1f} ms, apricot "
          f"{1e3 * t_ref / max(1, args.instances - 1):.1f} ms")
    return 0 if same + ties == weights_ok == args.instances else 1


if __name__ == "__main__":
    raise SystemExit(main())
