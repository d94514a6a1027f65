"""`robustops bench`: runs the benchmark scripts of a source checkout (benchmarks/bench_*.py)."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BENCH_DIR = os.path.join(_ROOT, "benchmarks")
SUITES = ("pgd_step", "attack", "certify", "train")


def cli_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("suites", nargs="*", default=list(SUITES), metavar="SUITE",
                   help=f"which benchmarks to run: {', '.join(SUITES)} (default: all)")
    p.add_argument("--args", default="", help="extra arguments passed to every script, e.g. \"--device cpu\"")


def cli_bench(args) -> int:
    unknown = [s for s in args.suites if s not in SUITES]
    if unknown:
        raise SystemExit(f"robustops bench: unknown suite(s) {unknown}; choose from {list(SUITES)}")
    if not os.path.isdir(_BENCH_DIR):
        raise SystemExit("robustops bench: the benchmark scripts ship with the source tree "
                         f"(benchmarks/), which is not next to this installation ({_ROOT})")
    rc = 0
    for s in args.suites:
        script = os.path.join(_BENCH_DIR, f"bench_{s}.py")
        print(f"== {os.path.relpath(script, _ROOT)}", flush=True)
        rc |= subprocess.call([sys.executable, script] + args.args.split())
    return rc
