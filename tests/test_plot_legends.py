"""No legend covers data: in every plot the project draws (robustops.plotting.plot_curve, the
certified-accuracy plots of the demo, certify --plot and `robustops plot`, and the benchmark figures),
the legend's box holds no point of any plotted line (the segments between points included), no
scatter point, no bar and no tick label, and it lies inside the figure."""
import os
import sys

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from robustops import plotting, smoothing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")


@pytest.fixture
def figures(monkeypatch):
    """The figures saved while the fixture is active (Figure.savefig records its figure)."""
    saved = []
    real = Figure.savefig

    def savefig(self, *args, **kwargs):
        saved.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return saved


def _line_points(line, samples=24):
    """A line's vertices and points along its segments, in display coordinates."""
    xy = np.asarray(line.get_transform().transform(np.asarray(line.get_xydata(), dtype=float)))
    xy = xy[np.isfinite(xy).all(axis=1)]
    if len(xy) < 2 or line.get_linestyle() in ("None", "none", "", " "):
        return xy
    t = np.linspace(0.0, 1.0, samples)[:, None, None]
    return np.concatenate([xy, (xy[:-1] + t * (xy[1:] - xy[:-1])).reshape(-1, 2)])


def _inside(box, pts):
    """Which display points lie in box (a Bbox)."""
    return (pts[:, 0] >= box.x0) & (pts[:, 0] <= box.x1) & (pts[:, 1] >= box.y0) & (pts[:, 1] <= box.y1)


def legend_faults(fig):
    """What each legend of fig covers (an empty list: nothing)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    faults = []
    for ax in fig.axes:
        leg = ax.get_legend()
        if leg is None:
            continue
        box = leg.get_window_extent(renderer)
        if not (fig.bbox.x0 - 1 <= box.x0 and box.x1 <= fig.bbox.x1 + 1 and fig.bbox.y0 - 1 <= box.y0
                and box.y1 <= fig.bbox.y1 + 1):
            faults.append(f"legend {box} outside the figure {fig.bbox}")
        inside_axes = ax.bbox
        for line in ax.lines:
            pts = _line_points(line)
            hit = _inside(inside_axes, pts) & _inside(box, pts)  # points outside the axes are clipped away
            if hit.any():
                faults.append(f"legend covers line {line.get_label()!r} at {pts[hit][0]}")
        for coll in ax.collections:
            pts = coll.get_offset_transform().transform(np.asarray(coll.get_offsets(), dtype=float))
            if len(pts) and _inside(box, pts).any():
                faults.append(f"legend covers scatter points of {coll.get_label()!r}")
        for patch in ax.patches:
            if patch.get_window_extent(renderer).overlaps(box):
                faults.append(f"legend covers a bar {patch}")
        for text in ax.get_xticklabels() + ax.get_yticklabels() + ax.texts:
            if text.get_visible() and text.get_text() and text.get_window_extent(renderer).overlaps(box):
                faults.append(f"legend covers the label {text.get_text()!r}")
    return faults


def _curve(rng, n, top):
    radius = torch.tensor(rng.uniform(0.0, top, n), dtype=torch.float32)
    return radius, torch.tensor(rng.uniform(size=n) < 0.97)


def test_the_check_finds_a_covering_legend(tmp_path, figures):
    fig, ax = plotting.figure()
    ax.plot([0, 1], [0, 1], label="a line up to the top right corner")
    ax.legend(loc="upper right")
    plotting.save_figure(fig, str(tmp_path / "bad.png"))
    assert legend_faults(figures[-1])


def test_certified_accuracy_plots(tmp_path, figures):
    """The demo's plots: three long labels, curves high at small radii, certifiable-radius markers."""
    rng = np.random.default_rng(0)
    names = ["Gaussian noise (sigma=0.25)", "consistency (sigma=0.25, m=2, lambda=10, eta=0.5)",
             "MACER (sigma=0.25, k=8, lambda=1, gamma=8, beta=16, warm-up 10)"]
    curves = {name: _curve(rng, 360, 0.62) for name in names}
    smoothing.plot_certified_accuracy(str(tmp_path / "cert.png"), curves, max_radius=1.0,
                                      certifiable={name: 0.62 for name in names})
    smoothing.plot_certified_accuracy(str(tmp_path / "ibp.png"), {"IBP (kappa=0.5)": _curve(rng, 360, 0.2),
                                                                  "ACERT (kappa=0)": _curve(rng, 360, 0.2)},
                                      norm="L-inf")
    smoothing.plot_certified_accuracy(str(tmp_path / "one.png"), _curve(rng, 50, 0.5))
    assert len(figures) == 6
    for fig in figures:
        assert legend_faults(fig) == []


def test_plot_curve(tmp_path, figures):
    eps = [0, 1 / 255, 2 / 255, 4 / 255, 8 / 255]
    plotting.plot_curve(str(tmp_path / "sweep.png"), eps, {"PGD-10 L-inf (360 inputs)": [0.99, 0.9, 0.7, 0.4, 0.1],
                                                           "FGSM (360 inputs)": [0.99, 0.95, 0.85, 0.6, 0.3]},
                        "eps", "robust accuracy")
    assert figures and all(legend_faults(fig) == [] for fig in figures)


@pytest.fixture
def benchmarks_path(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    return BENCH


def test_benchmark_bar_charts(tmp_path, figures, benchmarks_path):
    import plot as bench_plot

    for name in ("attack.csv", "l2_start.csv"):
        bench_plot.plot(os.path.join(benchmarks_path, "results", name), str(tmp_path))
    assert len(figures) == 2
    for fig in figures:
        assert legend_faults(fig) == []


def test_benchmark_figures(tmp_path, figures, benchmarks_path):
    import certified_tradeoff
    import sequential_samples

    certified_tradeoff.plot_tradeoff({"IBP": [(0.078, 0.025, 0), (0.736, 0.152, 0.5), (0.935, 0.142, 0.9)],
                              "ACERT": [(0.792, 0.151, 0), (0.921, 0.171, 0.5), (0.971, 0.103, 0.9)]},
                             str(tmp_path / "tradeoff.png"))
    pa = np.linspace(0.5, 1.0, 30)
    curves = {(test, r): [(p, 200 + 1e5 * np.exp(-((p - 0.6 - r / 2) / 0.02) ** 2)) for p in pa]
              for test in ("cp", "betting") for r in (0.25, 0.5)}
    points = {("cp", 0.25): ([0.95, 0.99, 0.999], [400, 300, 200])}
    sequential_samples.draw(str(tmp_path / "seq.png"), curves, points=points, points_label="digits, 3 inputs")
    assert len(figures) == 3
    for fig in figures:
        assert legend_faults(fig) == []
