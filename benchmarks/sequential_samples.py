"""Samples used by sequential certification against pA: the Bernoulli-oracle simulation
(``robustops.smoothing.sequential.simulate``, no network) of ``Smooth.certify_radius`` at each radius and
test, against the n0 + n = 100,100 samples of fixed-n CERTIFY, with the per-input points of a model
measured by ``bench_certify.py --sequential`` overlaid.

For each pA of a grid from 0.5 to 1 (dense near the thresholds Phi(r / sigma): Phi(1) = 0.841 for
r = 0.25 and Phi(2) = 0.977 for r = 0.5 at sigma = 0.25), ``--trials`` simulated inputs run the test
(n0 selection votes, then estimation samples at the looks of the default schedule) until it decides;
the curve is the mean of n0 + estimation samples. An input far from the threshold stops at one of the
first looks; one at the threshold runs to n_max (and abstains): no test can tell pA = p0 + 1e-4 from p0
with 100,000 samples, and fixed-n CERTIFY cannot either.

    python benchmarks/sequential_samples.py                          # docs/sequential_samples.png + .pdf
    python benchmarks/sequential_samples.py --trials 500 --out /tmp/s.png --no-csv

The simulated means go to benchmarks/results/sequential_sim.csv (rewritten). The overlaid points are
read from benchmarks/results/sequential_inputs_digits.csv (``--inputs``), written by
``python benchmarks/bench_certify.py --device cpu --sequential-only``: each input's pA estimated from
the fixed-n counts (nA / n), against the samples its sequential run used.
"""
from __future__ import annotations

import argparse
import csv
import os
import time

import numpy as np
from scipy import stats

_HERE = os.path.dirname(os.path.abspath(__file__))
from robustops.plotting import outside_legend
from robustops.smoothing.sequential import ABSTAINED, CERTIFIED, simulate
from common import RESULTS

DOCS = os.path.join(os.path.dirname(_HERE), "docs")
TESTS = ("betting", "cp")
RADII = (0.25, 0.5)


def pa_grid(thresholds) -> np.ndarray:
    """pA from 0.5 to 1: every 0.02, denser near each threshold (+- 5e-4 ... 0.03) and near 1."""
    pts = set(np.round(np.linspace(0.5, 1.0, 26), 6))
    for t in thresholds:
        for d in (0.0, 5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.5e-2, 3e-2):
            pts.update((round(t - d, 6), round(t + d, 6)))
    pts.update((0.99, 0.995, 0.998, 0.999))
    return np.array(sorted(p for p in pts if 0.5 <= p <= 1.0))


def simulate_curves(sigma=0.25, radii=RADII, tests=TESTS, n0=100, n_max=100_000, alpha=0.001, trials=2000,
                    grid=None, seed=0, verbose=True):
    """{(test, r): rows of (pA, mean samples, certified fraction, abstained fraction)}."""
    thresholds = [float(stats.norm.cdf(r / sigma)) for r in radii]
    grid = pa_grid(thresholds) if grid is None else np.asarray(grid, dtype=np.float64)
    out = {}
    for test in tests:
        for r, t in zip(radii, thresholds):
            t0 = time.perf_counter()
            rows = []
            for k, p in enumerate(grid):
                s = simulate(float(p), trials, seed=seed + k, n0=n0, test=test, alpha=alpha, n_max=n_max,
                             thresholds=[t])
                d = s.decisions[:, 0]
                rows.append((float(p), float(n0 + s.n.mean()), float(np.mean(d == CERTIFIED)),
                             float(np.mean(d == ABSTAINED))))
            out[(test, r)] = rows
            if verbose:
                print(f"simulated {test:>7} r={r:g} (p0 {t:.4f}): {len(grid)} pA x {trials} trials in "
                      f"{time.perf_counter() - t0:.1f}s", flush=True)
    return out


def write_sim_csv(path, curves, sigma, n0, n_max, alpha, trials) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["test", "radius", "sigma", "n0", "n_max", "alpha", "trials", "pA", "mean_samples",
                    "certified_frac", "abstained_frac", "fixed_samples", "sample_ratio"])
        for (test, r), rows in curves.items():
            for p, m, c, a in rows:
                w.writerow([test, r, sigma, n0, n_max, alpha, trials, f"{p:.6g}", f"{m:.1f}", f"{c:.4f}", f"{a:.4f}",
                            n0 + n_max, f"{(n0 + n_max) / m:.2f}"])
    return path


def read_points(path):
    """{(test, r): (pA estimates, samples)} from a per-input CSV of bench_certify.py --sequential."""
    pts = {}
    if not path or not os.path.exists(path):
        return pts, None
    label = None
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("mode") != "radius" or row.get("pa_hat", "") == "":
                continue
            key = (row["test"], float(row["radius"]))
            xs, ys = pts.setdefault(key, ([], []))
            xs.append(float(row["pa_hat"]))
            ys.append(float(row["samples"]))
            label = label or row.get("model", "model")
    n = max((len(xs) for xs, _ in pts.values()), default=0)
    return pts, (points_label(label, n) if pts else None)


def points_label(model: str, inputs: int) -> str:
    return f"{model}, {inputs} inputs\n(pA = nA / n of fixed n; o betting, \u25a1 cp)"


def draw(path, curves, points=None, points_label=None, sigma=0.25, n0=100, n_max=100_000, alpha=0.001,
         trials=2000):
    """The figure at 300 dpi as PNG and PDF (path's extension replaced); returns both paths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(7.5, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    radii = sorted({r for _, r in curves})
    color = {r: f"C{i}" for i, r in enumerate(radii)}
    style = {"betting": ("-", "o"), "cp": ("--", "s")}
    fixed = n0 + n_max
    ax.axhline(fixed, color="0.3", lw=1.2, label=f"fixed-n CERTIFY (n0 + n = {fixed:,})")
    for r in radii:
        t = float(stats.norm.cdf(r / sigma))
        ax.axvline(t, color=color[r], lw=0.8, ls=":", label=f"Phi({r / sigma:g}) = {t:.3f}: pA needed at r = {r:g}")
    for (test, r), rows in curves.items():
        ls, mk = style.get(test, ("-", "o"))
        a = np.array(rows)
        ax.plot(a[:, 0], a[:, 1], ls=ls, marker=mk, markersize=2.5, lw=1.2, color=color[r],
                label=f"r = {r:g}, {test} (mean of {trials} simulated)")
    if points:
        for (test, r), (xs, ys) in points.items():
            if r not in color:
                continue
            _, mk = style.get(test, ("-", "o"))
            # a small horizontal jitter by test, so that the two tests' points of one input do not hide each other
            dx = -0.0015 if test == "betting" else 0.0015
            ax.scatter(np.asarray(xs) + dx, ys, s=14, marker=mk, facecolors="none", edgecolors=color[r], alpha=0.6,
                       linewidths=0.7)
    ax.set_yscale("log")
    ax.set_xlim(0.5, 1.005)
    ax.set_ylim(150, fixed * 2.5)
    ax.set_xlabel("pA (probability that the base classifier votes cA under noise)")
    ax.set_ylabel("samples used per input (n0 + estimation)")
    ax.set_title(f"sequential certify_radius: samples against pA (sigma {sigma:g}, n0 {n0}, n_max {n_max:,}, "
                 f"alpha {alpha:g})", fontsize=9)
    ax.grid(True, which="both", alpha=0.25)
    handles, labels = ax.get_legend_handles_labels()
    if points:
        handles.append(Line2D([], [], ls="none", marker="o", markerfacecolor="none", markeredgecolor="0.4"))
        labels.append(points_label or "model inputs")
        handles[-1].set_label(labels[-1])
    outside_legend(ax, handles, labels, fontsize=6.5)
    stem, _ = os.path.splitext(path)
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    fig.tight_layout()
    png, pdf = stem + ".png", stem + ".pdf"
    fig.savefig(png, format="png", dpi=300)
    fig.savefig(pdf, format="pdf")
    return [png, pdf]


def make_plot(out, inputs=None, points=None, points_label=None, trials=2000, sigma=0.25, n0=100, n_max=100_000,
              alpha=0.001, sim_csv=None):
    """Simulates the curves, draws them with the given points (or those read from ``inputs``), writes
    ``sim_csv`` when given; returns the paths written."""
    curves = simulate_curves(sigma=sigma, n0=n0, n_max=n_max, alpha=alpha, trials=trials)
    if points is None:
        points, points_label = read_points(inputs)
    paths = draw(out, curves, points, points_label, sigma=sigma, n0=n0, n_max=n_max, alpha=alpha, trials=trials)
    if sim_csv:
        paths.append(write_sim_csv(sim_csv, curves, sigma, n0, n_max, alpha, trials))
    for p in paths:
        print(f"wrote {p}")
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(DOCS, "sequential_samples.png"),
                   help="the PNG (a PDF beside it); default docs/sequential_samples.png")
    p.add_argument("--trials", type=int, default=2000, help="simulated inputs per pA (default 2000)")
    p.add_argument("--inputs", default=os.path.join(RESULTS, "sequential_inputs_digits.csv"),
                   help="per-input CSV of bench_certify.py --sequential to overlay (default: the digits model's)")
    p.add_argument("--no-inputs", action="store_true", help="draw the simulated curves only")
    p.add_argument("--no-csv", action="store_true", help="do not write benchmarks/results/sequential_sim.csv")
    args = p.parse_args(argv)
    make_plot(args.out, inputs=None if args.no_inputs else args.inputs, points={} if args.no_inputs else None,
              trials=args.trials, sim_csv=None if args.no_csv else os.path.join(RESULTS, "sequential_sim.csv"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
