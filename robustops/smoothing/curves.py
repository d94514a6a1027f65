"""Average certified radius, certified accuracy against radius, and its plot (plot_curve, robust accuracy
against eps and the like, lives in robustops.plotting and is re-exported here)."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import torch

from ..plotting import figure, frame, outside_legend, plot_curve, save_figure

__all__ = ["acr", "certified_accuracy", "plot_certified_accuracy", "plot_curve", "largest_certifiable_radius",
           "STANDARD_RADII"]

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


def largest_certifiable_radius(sigma: float, n: int, alpha: float) -> float:
    """sigma * Phi^-1(pA_lower) when all n samples vote for the class (pA_lower = alpha^(1/n)): no
    input can be certified beyond it with n samples at level alpha."""
    from scipy.stats import norm

    return float(sigma * norm.ppf(alpha ** (1.0 / n)))


def plot_certified_accuracy(path: str, curves, max_radius: Optional[float] = None, title: Optional[str] = None,
                            certifiable: Optional[Dict[str, float]] = None, norm: str = "L2") -> str:
    """Certified accuracy against radius, several curves overlaid, written at 300 dpi as a PNG to path
    and as a PDF beside it (matplotlib's Agg canvas; pyplot's global state is not touched).

    curves: (radius, correct) for one curve, or {label: (radius, correct)}; each legend entry says
    how many inputs its curve has. certifiable: {label: the largest radius its n samples can certify}
    (largest_certifiable_radius): a marker on the curve there, since no input can reach beyond it.
    norm: the radius axis's norm ("L2" for randomized smoothing, "L-inf" for IBP). Returns path."""
    if not isinstance(curves, dict):
        curves = {None: curves}
    data = {label: _radius_correct(*rc) for label, rc in curves.items()}
    certifiable = certifiable or {}
    top = max_radius
    if top is None:
        top = max([float(r[c].max()) for r, c in data.values() if c.any()] + list(certifiable.values()) + [0.0])
        top = top * 1.05 or 1.0
    grid = np.linspace(0.0, top, 400)
    fig, ax = figure()
    for label, (r, c) in data.items():
        name = f"{label} ({r.size} inputs)" if label is not None else f"{r.size} inputs"
        line, = ax.plot(grid, certified_accuracy(r, c, grid), label=name)
        limit = certifiable.get(label)
        if limit is not None and limit <= top:
            ax.plot([limit], [certified_accuracy(r, c, limit)], marker="v", color=line.get_color(), markersize=7,
                    linestyle="none")
    if certifiable:
        ax.plot([], [], marker="v", color="gray", linestyle="none", label="largest radius n samples can certify")
    frame(ax, top, "certified accuracy", f"radius ({norm})", title)
    outside_legend(ax)
    save_figure(fig, path)
    return path
