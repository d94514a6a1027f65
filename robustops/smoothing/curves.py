"""Average certified radius, certified accuracy against radius, and its plot."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

__all__ = ["acr", "certified_accuracy", "plot_certified_accuracy", "STANDARD_RADII"]

#: Radii at which `robustops certify` reports certified accuracy (Cohen et al.'s CIFAR-10 and ImageNet tables).
STANDARD_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0)


def _as_numpy(v, name: str) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().numpy()
    a = np.asarray(v)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per input), got shape {list(a.shape)}")
    return a


def _radius_correct(radius, correct) -> Tuple[np.ndarray, np.ndarray]:
    r = _as_numpy(radius, "radius").astype(np.float64)
    c = _as_numpy(correct, "correct").astype(bool)
    if r.shape != c.shape:
        raise ValueError(f"radius and correct must have the same length, got {r.shape[0]} and {c.shape[0]}")
    return r, c


def acr(radius, correct) -> float:
    """Average certified radius: mean over inputs of the radius where the (non-abstaining) prediction
    is correct and 0 elsewhere. radius, correct: 1-D tensors / arrays / lists of one value per input."""
    r, c = _radius_correct(radius, correct)
    return float(np.where(c, r, 0.0).mean()) if r.size else 0.0


def certified_accuracy(radius, correct, radii):
    """Certified accuracy at each radius in radii: the fraction of inputs predicted correctly with a
    certified radius >= r. A float for a scalar radii, else a float64 numpy array."""
    r, c = _radius_correct(radius, correct)
    rs = np.asarray(radii, dtype=np.float64)
    if r.size == 0:
        out = np.zeros(rs.shape)
    else:
        out = (c[None, :] & (r[None, :] >= rs.reshape(-1, 1))).mean(axis=1).reshape(rs.shape)
    return float(out) if out.ndim == 0 else out


def plot_certified_accuracy(path: str, curves, max_radius: Optional[float] = None, title: Optional[str] = None) -> str:
    """Certified accuracy against radius, written as a PNG to path (matplotlib's Agg canvas; pyplot's
    global state is not touched). curves: (radius, correct) for one curve, or {label: (radius, correct)}.
    Returns path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not isinstance(curves, dict):
        curves = {None: curves}
    data = {label: _radius_correct(*rc) for label, rc in curves.items()}
    top = max_radius
    if top is None:
        top = max([float(r[c].max()) for r, c in data.values() if c.any()] + [0.0]) * 1.05 or 1.0
    grid = np.linspace(0.0, top, 400)
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label, (r, c) in data.items():
        ax.plot(grid, certified_accuracy(r, c, grid), label=label)
    ax.set_xlabel("radius (L2)")
    ax.set_ylabel("certified accuracy")
    ax.set_xlim(0.0, top)
    ax.set_ylim(0.0, 1.0)
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    if any(label is not None for label in data):
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
