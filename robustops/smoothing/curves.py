"""Average certified radius, certified accuracy against radius, and its plot (plot_curve, robust accuracy
against eps and the like, lives in robustops.plotting and is re-exported here)."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import torch

from ..plotting import figure, frame, outside_legend, plot_curve, save_figure

__all__ = ["acr", "certified_accuracy", "plot_certified_accuracy", "plot_curve", "largest_certifiable_radius",
           "sigma_for_radius", "samples_for_radius", "COVER_DISSENT", "STANDARD_RADII"]

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


#: The default margin of :func:`sigma_for_radius` / :func:`samples_for_radius`: the fraction of the n
#: votes that may go to other classes while the radius is still certified (1%).
COVER_DISSENT = 0.01


def _check_sizing(radius, alpha, dissent) -> Tuple[float, float, float]:
    import math

    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not 0 < radius < math.inf:
        raise ValueError(f"radius must be a finite number > 0 (the radius to certify, e.g. the set's eps), got {radius!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise ValueError(f"alpha must be a number in (0, 1) (the failure probability), got {alpha!r}")
    if isinstance(dissent, bool) or not isinstance(dissent, (int, float)) or not 0 <= dissent < 0.5:
        raise ValueError(f"dissent must be a number in [0, 0.5) (the fraction of the n votes that may go to other "
                         f"classes), got {dissent!r}")
    return float(radius), float(alpha), float(dissent)


def _top_lower(n: int, alpha: float, dissent: float) -> float:
    """Clopper-Pearson lower bound on pA after (1 - dissent) * n of n votes: alpha^(1/n) when unanimous, else
    the fractional-count bound (smooth and increasing in n, unlike a rounded vote count)."""
    from .sequential import clopper_pearson_lower

    return alpha ** (1.0 / n) if dissent == 0 else float(clopper_pearson_lower((1.0 - dissent) * n, n, alpha))


def sigma_for_radius(radius: float, n: int, alpha: float, dissent: float = COVER_DISSENT) -> float:
    """The smallest noise level sigma at which CERTIFY with n estimation samples at level alpha can certify
    ``radius`` even when a fraction ``dissent`` of the n votes goes to other classes:

        sigma = radius / Phi^-1(p),  p = the one-sided Clopper-Pearson lower bound after (1 - dissent) n of
        n votes (the alpha quantile of Beta((1 - dissent) n, dissent n + 1), a fractional count),

    p = alpha^(1/n) for dissent = 0 (all n votes for the top class), where sigma * Phi^-1(alpha^(1/n)) is the
    largest radius n samples can certify (:func:`largest_certifiable_radius`). dissent = 0 is the rule of
    Wong and Kolter's reference code (locuslab/perturbation_learning: sigma 0.84 / 1.22 / 3.19 put the
    largest radius of n = 10,000, alpha = 0.001 at the attack radii 2.7 / 3.9 / 10.2): the set's radius is
    then certified only by unanimous votes (and float rounding may put the computed radius a hair below it);
    the default 1% keeps the radius certifiable for an input whose base classifier errs on a few noisy
    codes. A larger sigma certifies larger radii but costs base accuracy (the noise leaves the set)."""
    from scipy.stats import norm

    radius, alpha, dissent = _check_sizing(radius, alpha, dissent)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1 (estimation samples), got {n!r}")
    p = _top_lower(n, alpha, dissent)
    if not p > 0.5:
        raise ValueError(f"n={n} samples at alpha={alpha:g} with dissent={dissent:g} cannot certify any radius "
                         f"(the lower bound on pA is {p:.4g} <= 1/2); raise n")
    return float(radius / norm.ppf(p))


def samples_for_radius(radius: float, sigma: float, alpha: float, dissent: float = COVER_DISSENT,
                       n_max: int = 10 ** 9) -> int:
    """The smallest n with which CERTIFY at noise level sigma and level alpha can certify ``radius`` when a
    fraction ``dissent`` of the n votes goes to other classes (the converse of :func:`sigma_for_radius`):
    the smallest n with sigma * Phi^-1(p(n)) >= radius, p(n) as there. For dissent = 0 in closed form,
    n = ceil(log(alpha) / log(Phi(radius / sigma))); else by bisection (p(n) increases with n towards
    1 - dissent). Radii are compared with a relative tolerance of 1e-12, so that sigma_for_radius(r, n)
    gives back n. A ValueError when no n <= n_max suffices (radius / sigma too large for the dissent)."""
    import math

    from scipy.stats import norm

    radius, alpha, dissent = _check_sizing(radius, alpha, dissent)
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 < sigma < math.inf:
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    target = float(norm.cdf(radius / sigma))
    if target >= 1.0 or (dissent > 0 and target >= 1.0 - dissent):
        raise ValueError(f"radius {radius:g} at sigma {sigma:g} needs pA >= {target:.6g}: no n certifies it with "
                         f"dissent={dissent:g}; raise sigma")

    def reaches(n: int) -> bool:
        p = _top_lower(n, alpha, dissent)
        return p > 0.5 and sigma * float(norm.ppf(p)) >= radius * (1.0 - 1e-12)

    if dissent == 0:
        hi = max(1, math.ceil(math.log(alpha) / math.log(target)))
        while not reaches(hi):  # the closed form, corrected for float rounding either way
            hi += 1
        while hi > 1 and reaches(hi - 1):
            hi -= 1
    else:
        hi = 1
        while not reaches(hi):
            if hi >= n_max:
                raise ValueError(f"radius {radius:g} at sigma {sigma:g} needs more than n_max={n_max} samples")
            hi = min(2 * hi, n_max)
        lo = hi // 2  # reaches(lo) is False (or lo = 0)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if reaches(mid) else (mid, hi)
    if hi > n_max:
        raise ValueError(f"radius {radius:g} at sigma {sigma:g} needs n={hi} > n_max={n_max} samples")
    return int(hi)


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
