"""`robustops bench`: runs the benchmark scripts of a source checkout (benchmarks/bench_*.py)."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from .common import CLIError

HELP = "run the benchmark suite"

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_BENCH_DIR = os.path.join(_ROOT, "benchmarks")
SUITES = ("pgd_step", "attack", "certify", "train")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("suites", nargs="*", default=list(SUITES), metavar="SUITE",
                   help=f"which benchmarks to run: {', '.join(SUITES)}")
    p.add_argument("--args", default="", help="extra arguments passed to every script, e.g. \"--device cpu\"")
    p.add_argument("--save", action="store_true",
                   help="append the figures to benchmarks/results/*.csv (tracked files; by default only printed)")


def run(args) -> int:
    unknown = [s for s in args.suites if s not in SUITES]
    if unknown:
        raise CLIError(f"unknown suite(s) {unknown}; choose from {list(SUITES)}")
    if not os.path.isdir(_BENCH_DIR):
        raise CLIError("the benchmark scripts ship with the source tree (benchmarks/), which is not next to this "
                       f"installation ({_ROOT})")
    rc = 0
    for s in args.suites:
        script = os.path.join(_BENCH_DIR, f"bench_{s}.py")
        print(f"== {os.path.relpath(script, _ROOT)}", flush=True)
        rc |= subprocess.call([sys.executable, script] + args.args.split() + ([] if args.save else ["--no-csv"]))
    return rc
