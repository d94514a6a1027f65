"""Figures of robustops's curves (certified accuracy, robust accuracy against eps, ...), drawn on
matplotlib's Agg canvas (pyplot's global state is never touched) and written at 300 dpi as a PNG with
a PDF (vector) beside it. Imports no robustops module."""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

__all__ = ["plot_curve", "plot_heatmap", "plot_image_grid", "figure", "save_figure", "frame", "outside_legend"]


def figure():
    """(figure, axes): a 6 x 4 inch figure on its own Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def outside_legend(ax, handles=None, labels=None, fontsize: float = 8, **kwargs):
    """The axes' legend to the right of the axes, outside them, so that it covers no curve, point or
    tick label; the figure widens by the legend's width, so the axes keep their size (by the widest
    legend's, for several axes side by side in rows). handles / labels: as for ``ax.legend`` (default:
    the labelled artists); kwargs go to ``ax.legend``. Returns the legend."""
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    kwargs.setdefault("borderaxespad", 0.0)
    leg = ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=fontsize, **kwargs)
    fig = ax.figure
    width = leg.get_window_extent(fig.canvas.get_renderer()).width / fig.dpi + 0.15
    added = getattr(fig, "robustops_legend_width", 0.0)
    if width > added:
        w, h = fig.get_size_inches()
        fig.set_size_inches(w + width - added, h)
        fig.robustops_legend_width = width
    return leg


def save_figure(fig, path: str) -> List[str]:
    """The figure at 300 dpi as PNG and as PDF (vector) beside it; returns both paths."""
    stem, ext = os.path.splitext(path)
    png = path if ext.lower() == ".png" else stem + ".png"
    pdf = stem + ".pdf"
    fig.tight_layout()
    fig.savefig(png, format="png", dpi=300)
    fig.savefig(pdf, format="pdf")
    return [png, pdf]


def frame(ax, xmax: float, ylabel: str, xlabel: str, title: Optional[str]) -> None:
    """Axes for a fraction (accuracy) against x in [0, xmax]: labels, grid and title."""
    # a margin around [0, 1], so that no curve runs along the frame and disappears in it
    ax.set_xlim(-0.01 * xmax, xmax * 1.01)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)


def plot_curve(path: str, xs, curves: Dict[str, Sequence[float]], xlabel: str, ylabel: str,
               title: Optional[str] = None, xticklabels: Optional[Sequence[str]] = None) -> List[str]:
    """Curves y(x) (one per label, points marked) overlaid, as PNG and PDF at 300 dpi (path: a file
    name, its extension replaced); xticklabels names the points xs (e.g. the stages of an attack suite).
    Returns the paths written."""
    fig, ax = figure()
    for label, ys in curves.items():
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
    frame(ax, max(xs) if len(xs) and max(xs) > 0 else 1.0, ylabel, xlabel, title)
    if xticklabels is not None:
        ax.set_xticks(list(xs), list(xticklabels))
    outside_legend(ax)
    return save_figure(fig, path)


def plot_heatmap(path: str, values: Sequence[Sequence[float]], row_labels: Sequence[str], col_labels: Sequence[str],
                 xlabel: str = "", title: Optional[str] = None, colorbar: str = "", vmin: float = 0.0,
                 vmax: float = 1.0) -> List[str]:
    """A matrix of fractions (rows x columns, e.g. accuracy per corruption and severity) as a heat map with
    each cell's value written in it (in percent), as PNG and PDF at 300 dpi. Returns the paths written."""
    import numpy as np

    arr = np.asarray(values, dtype=float)
    if arr.ndim != 2 or arr.shape != (len(row_labels), len(col_labels)):
        raise ValueError(f"values must be a matrix of {len(row_labels)} rows x {len(col_labels)} columns, got shape "
                         f"{arr.shape}")
    fig, ax = figure()
    # room for the row labels, the colorbar and the title, however few the rows and columns
    fig.set_size_inches(max(4.5, 2.6 + 0.7 * arr.shape[1]), max(2.6, 1.5 + 0.3 * arr.shape[0]))
    im = ax.imshow(arr, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(arr.shape[1]), list(col_labels))
    ax.set_yticks(range(arr.shape[0]), list(row_labels), fontsize=8)
    for i in range(arr.shape[0]):
        for j in range(arr.shape[1]):
            v = arr[i, j]
            # dark text on the bright end of viridis, light text on the dark end, so every number reads
            ax.text(j, i, "-" if np.isnan(v) else f"{100 * v:.0f}", ha="center", va="center", fontsize=7,
                    color="black" if v > vmin + 0.6 * (vmax - vmin) else "white")
    ax.set_xlabel(xlabel)
    if title:
        ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label=colorbar)
    return save_figure(fig, path)


def plot_image_grid(path: str, rows: Dict[str, Sequence], title: Optional[str] = None, cmaps: Optional[Dict[str, str]] = None,
                    size: float = 0.8) -> List[str]:
    """Rows of small images (each row a label and a sequence of [H, W] arrays in [0, 1], e.g. digits and
    their saliency maps) as one grid, the labels left of the rows, as PNG and PDF at 300 dpi. cmaps: a
    colormap per row label (default gray). Returns the paths written."""
    import numpy as np

    fig, _ = figure()
    fig.clf()
    n = max((len(v) for v in rows.values()), default=0)
    fig.set_size_inches(n * size + 1.8, len(rows) * size + (0.4 if title else 0.1))
    for r, (label, imgs) in enumerate(rows.items()):
        for c, img in enumerate(imgs):
            ax = fig.add_subplot(len(rows), n, r * n + c + 1)
            ax.imshow(np.asarray(img, dtype=float), cmap=(cmaps or {}).get(label, "gray"), vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=6, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=8)
    return save_figure(fig, path)
