"""Draws each results CSV as a PNG: the providers side by side for every benchmark case, one panel
per device, from the newest run of each (device, case, provider).

    python benchmarks/plot.py                          # every benchmarks/results/*.csv
    python benchmarks/plot.py benchmarks/results/pgd_step.csv --out /tmp/plots

A bar's height is the time (lower is better); its label is the figure the benchmark reports as a
ratio: the fraction of the copy bandwidth where the CSV has one, else the speed-up over the eager
baseline, else the ratio to natural training, else the ratio to the plain forward pass (bounds).
"""
from __future__ import annotations

import argparse
import csv
import glob
import os
from collections import OrderedDict

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from robustops.plotting import outside_legend

_HERE = os.path.dirname(os.path.abspath(__file__))

# Per results file: which columns name a case, which the provider, which holds the time.
LAYOUTS = {
    "pgd_step": dict(case=("op", "shape", "dtype", "norm"), provider="provider", metric="time_ms", unit="ms"),
    "attack": dict(case=("config", "batch", "steps"), provider="method", metric="time_s", unit="s"),
    "certify": dict(case=("bench", "model", "N0", "N", "batch"), provider="provider", metric="s_per_image",
                    unit="s per image", where=("bench", "certify")),
    "train": dict(case=("model", "batch", "shape", "dtype"), provider="method", metric="ms_per_unit", unit="ms"),
    "bounds": dict(case=("model", "batch", "shape"), provider="provider", metric="time_ms", unit="ms"),
    "perturbation": dict(case=("bench", "config", "batch", "N"), provider="provider", metric="time_s",
                         unit="s per attack (pgd) or per input (certify)"),
    "l2_start": dict(case=("eps", "steps", "restarts"), provider="law", metric="robust_acc_mean",
                     unit="robust accuracy: lower = stronger attack", log=False),
}
LABEL_COLUMNS = (("fraction_of_copy", "{:.0%} of copy"), ("speedup_vs_eager", "{:.2f}x"),
                 ("vs_cohen", "{:.2f}x vs Cohen"), ("ratio_vs_natural", "{:.2f}x natural"),
                 ("ratio_vs_forward", "{:.2f}x forward"))


def _layout(name: str, fields):
    if name in LAYOUTS:
        return LAYOUTS[name]
    provider = "provider" if "provider" in fields else "method"
    metric = next((f for f in fields if "time" in f or f.startswith("ms_") or f.startswith("s_per")), None)
    if metric is None:
        return None
    skip = {"date", "torch", "device", provider, metric}
    return dict(case=tuple(f for f in fields if f not in skip)[:3], provider=provider, metric=metric, unit=metric)


def _label(row) -> str:
    for col, fmt in LABEL_COLUMNS:
        v = row.get(col, "")
        if v not in ("", None):
            try:
                return fmt.format(float(v))
            except ValueError:
                pass
    return ""


def latest(rows, layout):
    """{device: {case: {provider: row}}}, the last row of each triple winning (rows are appended)."""
    out = OrderedDict()
    for r in rows:
        w = layout.get("where")
        if w and r.get(w[0]) != w[1]:
            continue
        try:
            float(r[layout["metric"]])
        except (KeyError, ValueError):
            continue
        case = " ".join(str(r.get(c, "")) for c in layout["case"] if r.get(c, "") != "")
        out.setdefault(r["device"], OrderedDict()).setdefault(case, OrderedDict())[r[layout["provider"]]] = r
    return out


def plot(path: str, out_dir: str) -> str:
    name = os.path.splitext(os.path.basename(path))[0]
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        layout = _layout(name, reader.fieldnames or [])
    if layout is None:
        print(f"{path}: no time column and no layout in benchmarks/plot.py; skipped")
        return None
    data = latest(rows, layout)
    if not data:
        raise SystemExit(f"{path}: no rows to plot")
    fig = Figure(figsize=(11, 3.6 * len(data)), dpi=100)
    FigureCanvasAgg(fig)
    for i, (device, cases) in enumerate(data.items()):
        ax = fig.add_subplot(len(data), 1, i + 1)
        providers = list(OrderedDict.fromkeys(p for c in cases.values() for p in c))
        width = 0.8 / max(1, len(providers))
        for j, prov in enumerate(providers):
            xs, hs, labels = [], [], []
            for k, (_case, by_prov) in enumerate(cases.items()):
                if prov in by_prov:
                    xs.append(k + (j - (len(providers) - 1) / 2) * width)
                    hs.append(float(by_prov[prov][layout["metric"]]))
                    labels.append(_label(by_prov[prov]))
            bars = ax.bar(xs, hs, width, label=prov)
            ax.bar_label(bars, labels=labels, fontsize=6, rotation=90, padding=2)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(list(cases), fontsize=7, rotation=15, ha="right")
        note = "" if "lower" in layout["unit"] else ", lower is better"
        ax.set_ylabel(f"{layout['metric']} ({layout['unit']}{note})", fontsize=8)
        if layout.get("log", True):
            ax.set_yscale("log")
            lo, hi = ax.get_ylim()
            ax.set_ylim(lo, hi * 10)  # room for the labels above the tallest bar
        ax.set_title(f"{name} on {device}", fontsize=9)
        outside_legend(ax, fontsize=7)
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    os.makedirs(out_dir, exist_ok=True)
    png = os.path.join(out_dir, f"{name}.png")
    fig.savefig(png, format="png")
    return png


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csvs", nargs="*", help="results files (default: benchmarks/results/*.csv)")
    p.add_argument("--out", default=os.path.join(_HERE, "results"), help="directory of the PNGs (default: beside "
                                                                            "the CSVs in benchmarks/results)")
    args = p.parse_args(argv)
    for path in args.csvs or sorted(glob.glob(os.path.join(_HERE, "results", "*.csv"))):
        png = plot(path, args.out)
        if png:
            print(f"{path} -> {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
