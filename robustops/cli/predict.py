"""`robustops predict`: randomized-smoothing prediction (Cohen et al.'s PREDICT) over a dataset, in
Cohen et al.'s predict.py TSV (idx label predict correct time); the machinery (resume, torchrun
shards, settings and summary beside the TSV, locks) is certify's."""
from __future__ import annotations

import argparse

from . import certify

HELP = "randomized-smoothing prediction (Cohen et al.'s PREDICT), Cohen's predict.py TSV"


def add_arguments(p: argparse.ArgumentParser) -> None:
    certify.add_arguments(p, mode="predict")


def run(args) -> int:
    return certify.run(args, mode="predict")
