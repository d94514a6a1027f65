"""`robustops demo|train|attack|certify|bench`.

Each subcommand lives with the module it drives: module M defines `cli_<name>_args(parser)` to add
its arguments and `cli_<name>(args) -> int` to run it. This file only wires them together.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = [
    ("demo", "robustops.train", "train natural / PGD / free / Gaussian models on the embedded digits "
                                "data, evaluate and certify them, print a comparison table"),
    ("train", "robustops.train", "adversarial training (natural, pgd, free, fgsm, trades, gaussian)"),
    ("attack", "robustops.attacks", "robust accuracy of a checkpoint under PGD / FGSM"),
    ("certify", "robustops.smoothing", "randomized-smoothing certification (Cohen et al.'s CERTIFY)"),
    ("bench", "robustops.bench", "run the benchmark suite"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="robustops", description="Fast robust machine learning in PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name, help_text in COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            continue  # that part of the package is not installed in this build
        p = sub.add_parser(name, help=help_text, description=help_text)
        getattr(module, f"cli_{name}_args")(p)
        p.set_defaults(_run=getattr(module, f"cli_{name}"))
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
