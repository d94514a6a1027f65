"""`robustops plot A.tsv B.tsv ... -o curves.png`: certified accuracy against radius of several
certification TSVs (robustops certify's or Cohen et al.'s: columns idx label predict radius correct
time), overlaid, as PNG and PDF at 300 dpi, with a JSON summary (ACR and certified accuracy per curve)."""
from __future__ import annotations

import argparse
import csv
import json
import os

from .certifiers.ibp import BOUND_METHODS
from .common import CLIError, check_writable, write_summary

HELP = "overlay certified-accuracy curves of certification TSVs (PNG + PDF)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("tsvs", nargs="+", metavar="TSV", help="certification results (idx label predict radius correct "
                                                          "time)")
    p.add_argument("-o", "--out", required=True, help="the plot (PNG; a PDF and a JSON summary go beside it)")
    p.add_argument("--labels", default=None,
                   help="comma-separated curve labels (None: each file's name and, when robustops certify wrote "
                        "it, its sigma)")
    p.add_argument("--max-radius", type=float, default=None, help="right end of the radius axis (None: automatic)")
    p.add_argument("--title", default=None)


def read_tsv(path: str):
    """(radius, correct, settings or {}) of a certification TSV; CLIError naming the file otherwise."""
    import numpy as np

    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
    except OSError as e:
        raise CLIError(f"{path}: {e.strerror or e}") from None
    if not rows or not {"radius", "correct"} <= set(rows[0]):
        raise CLIError(f"{path}: not a certification TSV (needs the columns radius and correct, and one row at least)")
    try:
        radius = np.array([float(r["radius"]) for r in rows])
        correct = np.array([int(r["correct"]) for r in rows], dtype=bool)
    except (TypeError, ValueError) as e:
        raise CLIError(f"{path}: a row is not a number ({e})") from None
    settings = {}
    if os.path.exists(path + ".json"):
        try:
            with open(path + ".json") as fh:
                settings = json.load(fh).get("settings", {})
        except (OSError, ValueError):
            settings = {}
    return radius, correct, settings


def run(args) -> int:
    from ..smoothing import STANDARD_RADII, acr, certified_accuracy, largest_certifiable_radius, plot_certified_accuracy

    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    if labels is not None and len(labels) != len(args.tsvs):
        raise CLIError(f"--labels names {len(labels)} curves for {len(args.tsvs)} files")
    check_writable(args.out, "-o")
    curves, limits, summary = {}, {}, {"command": "plot", "curves": []}
    norms = {}
    for k, path in enumerate(args.tsvs):
        radius, correct, st = read_tsv(path)
        ibp = st.get("method") in BOUND_METHODS  # an L-inf bound's radii (IBP, CROWN, ...)
        norms[path] = "L-inf" if ibp else "L2"
        name = labels[k] if labels else os.path.splitext(os.path.basename(path))[0] + (
            f" (sigma {st['sigma']:g})" if isinstance(st.get("sigma"), (int, float)) else f" ({BOUND_METHODS[st['method']]})" if ibp else "")
        if name in curves:
            name = f"{name} [{k + 1}]"
        curves[name] = (radius, correct)
        if all(isinstance(st.get(key), (int, float)) for key in ("sigma", "n", "alpha")):
            limits[name] = largest_certifiable_radius(st["sigma"], int(st["n"]), st["alpha"])
        radii = STANDARD_RADII
        if ibp:  # L-inf radii: fractions of the largest searched
            top = float(st["eps_max"]) if isinstance(st.get("eps_max"), (int, float)) else float(radius.max(initial=0))
            radii = sorted({0.0, top / 8, top / 4, top / 2, top})
        acc = certified_accuracy(radius, correct, radii)
        summary["curves"].append({"label": name, "tsv": os.path.abspath(path), "inputs": int(radius.size),
                                  "acr": acr(radius, correct), "largest_certifiable_radius": limits.get(name),
                                  "certified_accuracy": {f"{r:g}": float(a) for r, a in zip(radii, acc)}})
        print(f"{name}: {radius.size} inputs, ACR {summary['curves'][-1]['acr']:.4f}, "
              + "  ".join(f"r={r:.4g}: {a:.3f}" for r, a in zip(radii, acc)))
    if len(set(norms.values())) > 1:
        raise CLIError("these TSVs hold radii of different norms (L2 from randomized smoothing, L-inf from "
                       f"--method ibp: {', '.join(f'{os.path.basename(p)} {n}' for p, n in norms.items())}); plot "
                       "them separately")
    plot_certified_accuracy(args.out, curves, max_radius=args.max_radius, title=args.title, certifiable=limits,
                            norm=next(iter(norms.values())))
    out_json = write_summary(args.out + ".json", summary)
    print(f"plot -> {args.out} and {os.path.splitext(args.out)[0]}.pdf; summary -> {out_json}")
    return 0
