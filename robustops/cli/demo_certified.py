"""`robustops demo --section certified`: certified training and tighter certificates on the digits. Small
certified models (by default ``ibp``, ``fastibp``, ``crown_ibp`` and ``acert``, the demo's training
settings) are certified on the same first test images with every bound (IBP, CROWN-IBP, CROWN and best,
the elementwise max of IBP's and CROWN's margin bounds), L-inf radii by ``bounds.certified_radius``;
one table (clean accuracy, certified accuracy at the training eps, ACR with radii capped at eps as a
share of eps, the papers' reporting, and ACR up to 2 eps), one picture (certified accuracy against the
radius per model and bound), a CSV written row by row as the certificates come and results.json.
Called by ``robustops demo``; its arguments are the demo's plus those of :func:`add_arguments`."""
from __future__ import annotations

import argparse
import csv
import os
import time
from typing import List

from .common import CLIError, fmt_pct, parse_rows, require_min, write_summary

__all__ = ["SECTION", "METHODS", "BOUNDS", "STYLES", "add_arguments", "check_arguments", "certify_model", "table",
           "plot_curves", "run_section"]

SECTION = "certified"
#: The section's models by default: the certified-training methods that train on the digits in seconds.
METHODS = ("ibp", "fastibp", "crown_ibp", "acert")
#: The bounds each model is certified with (``bounds.certified_radius(bound=...)``).
BOUNDS = ("ibp", "crown-ibp", "crown", "best")
CSV_FIELDS = ("method", "label", "bound", "n", "eps", "clean_acc", "cert_acc_eps", "acr_capped_share", "acr_2eps",
              "passes", "seconds")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The section's flags (the model settings are the demo's: --epochs, --eps, --lr, ...)."""
    g = p.add_argument_group("--section certified")
    g.add_argument("--cert-methods", default=",".join(METHODS),
                   help="comma-separated certified-training methods of the section (default: "
                        f"{','.join(METHODS)})")
    g.add_argument("--cert-n", type=int, default=24,
                   help="certify the first N test images with every bound (full CROWN: about 0.04 CPU s per image and "
                        "bisection pass on a trained digits SmallCNN, one thread)")
    g.add_argument("--cert-tol", type=float, default=None,
                   help="grid step of the radius bisection (None: eps / 16, rounded down to a power of 2)")


def check_arguments(args) -> List[str]:
    """The section's methods, checked (a clear error naming the flag otherwise)."""
    from .. import train

    methods = parse_rows(args.cert_methods, train.METHODS, "--cert-methods")
    require_min(cert_n=(args.cert_n, 1))
    if args.cert_tol is not None and not 0 < args.cert_tol < float("inf"):
        raise CLIError(f"--cert-tol must be a finite number > 0, got {args.cert_tol}")
    if not args.eps > 0:
        raise CLIError(f"--section certified needs --eps > 0 (the training and certification radius), got {args.eps}")
    return methods


def certify_model(model, x, y, eps: float, bound: str, tol: float) -> dict:
    """The radii of one bound on x (labels y, model in eval mode): one bisection up to 2 eps, and one bound
    pass at eps itself on the samples whose radius stops within two grid steps below eps, so that a sample
    proven at eps counts as certified at eps even when the search's grid (which need not contain eps) stops
    just below it (a sample stopped further below is not proven at eps by a bound monotone in the radius). A radius proven beyond eps certifies the eps ball
    too (it contains it), so the capped radius min(r, eps) is sound for any verifier, monotone or not.
    Returns radius (uncapped, float64 numpy), capped (at eps), correct, passes and seconds."""
    import torch

    from .. import bounds, crown

    t0 = time.perf_counter()
    res = bounds.certified_radius(model, x, y, eps_max=2 * eps, tol=tol, bound=bound)
    correct = res.prediction == y
    # the grid's edge: proven within two grid steps below eps, perhaps proven at eps itself
    edge = (correct & (res.radius < eps) & (res.radius >= eps - 2 * res.step)).nonzero().squeeze(1)
    at_eps = torch.zeros_like(correct)
    passes = res.passes
    if edge.numel():
        with torch.no_grad():
            xe, ye = x[edge], y[edge]
            at_eps[edge] = (bounds.verified(model, xe, ye, eps) if bound == "ibp"
                            else crown.verified(model, xe, ye, eps, method=bound))
        passes += 1
    radius = res.radius.cpu()
    capped = torch.where(at_eps.cpu(), torch.full_like(radius, eps), radius.clamp(max=eps))
    return {"radius": radius.numpy(), "capped": capped.numpy(), "correct": correct.cpu().numpy(),
            "passes": passes, "seconds": time.perf_counter() - t0}


def _summary(row: dict, bound: str, c: dict, eps: float) -> dict:
    from .. import smoothing

    n = len(c["correct"])
    return {"method": row["method"], "label": row["label"], "bound": bound, "n": n, "eps": eps,
            "clean_acc": float(c["correct"].mean()),
            "cert_acc_eps": float(smoothing.certified_accuracy(c["capped"], c["correct"], eps)),
            "acr_capped_share": smoothing.acr(c["capped"], c["correct"]) / eps,
            "acr_2eps": smoothing.acr(c["radius"], c["correct"]), "passes": c["passes"], "seconds": c["seconds"]}


def table(results: List[dict], eps: float) -> List[str]:
    """The section's markdown table: one row per (model, bound)."""
    header = ["model", "bound", "clean acc", f"certified acc at eps={eps:g}", "ACR capped at eps (share of eps)",
              f"ACR (radii <= {2 * eps:g})", "time"]
    body = [[r["label"], r["bound"], fmt_pct(r["clean_acc"]), fmt_pct(r["cert_acc_eps"]),
             f"{r['acr_capped_share']:.3f}", f"{r['acr_2eps']:.4f}", f"{r['seconds']:.1f} s"] for r in results]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    md = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
          "|" + "|".join(("-" * (w + 1) + ":") if i > 1 else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|"]
    md += ["| " + " | ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(b, widths))) + " |"
           for b in body]
    return md


#: Line style of each bound in the picture (a model keeps one colour).
STYLES = {"ibp": "-", "crown-ibp": ":", "crown": "--", "best": "-."}


def plot_curves(path: str, grid, curves: dict, eps: float, title: str) -> List[str]:
    """Certified accuracy against the radius, curves[(method, bound)] on grid: a colour per model, a line
    style per bound, the training eps marked. PNG and PDF (robustops.plotting); returns the paths."""
    from ..plotting import figure, frame, outside_legend, save_figure

    fig, ax = figure()
    colours = {}
    for (method, bound), ys in curves.items():
        colour = colours.setdefault(method, f"C{len(colours) % 10}")
        ax.plot(grid, ys, color=colour, linestyle=STYLES.get(bound, "-"), label=f"{method} / {bound}")
    ax.axvline(eps, color="0.5", linewidth=0.8)
    frame(ax, float(grid[-1]), "certified accuracy", "L-inf radius (grey: the training eps)", title)
    outside_legend(ax)
    return save_figure(fig, path)


def run_section(args, data, rows, dev) -> List[str]:
    """Certifies the rows' models (the demo's trained certified models, in eval mode) on the first
    --cert-n test images with every bound; prints the table, writes OUT/certified/ (results.csv row by row,
    results.json, certified_accuracy.png/.pdf). Returns the printed lines."""
    import numpy as np

    from .. import smoothing

    eps = args.eps
    tol = args.cert_tol if args.cert_tol is not None else eps / 16
    n = max(1, min(args.cert_n, len(data.test_ds)))
    x, y = data.x_test[:n].to(dev), data.y_test[:n].to(dev)
    out = os.path.join(args.out, SECTION)
    os.makedirs(out, exist_ok=True)
    csv_path = os.path.join(out, "results.csv")
    results, curves = [], {}
    grid = np.linspace(0.0, 2 * eps, 41)
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            for b in BOUNDS:
                c = certify_model(row["model"], x, y, eps, b, tol)
                r = _summary(row, b, c, eps)
                results.append(r)
                curves[(row["method"], b)] = smoothing.certified_accuracy(c["radius"], c["correct"], grid)
                w.writerow({k: (f"{v:.5f}" if isinstance(v, float) else v) for k, v in r.items()})
                fh.flush()  # the rows so far survive an interrupted run
                print(f"  {row['label']:<33} {b:<9} certified {fmt_pct(r['cert_acc_eps']):>6} at eps, capped ACR "
                      f"{r['acr_capped_share']:.3f} eps ({c['passes']} bound passes, {c['seconds']:.1f}s)", flush=True)
    md = table(results, eps)
    lines = [f"certified training on digits ({n} test images, L-inf eps {eps:g}, {args.epochs} epochs; radii by "
             f"bisection on a grid of step <= {tol:.3g} up to 2 eps, 0 where mispredicted)"] + md
    print("\n" + "\n".join(lines))
    plots = plot_curves(os.path.join(out, "certified_accuracy.png"), grid, curves, eps,
                        f"digits, certified accuracy per model / bound ({n} images)")
    summary = write_summary(os.path.join(out, "results.json"), {
        "command": "demo --section certified", "eps": eps, "tol": tol, "n": n, "epochs": args.epochs,
        "seed": args.seed, "table": md, "results": results,
        "models": [{k: v for k, v in r.items() if k != "model"} for r in rows]})
    print(f"\nwrote {', '.join([csv_path] + plots + [summary])}")
    return lines
