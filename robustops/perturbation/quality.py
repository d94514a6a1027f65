"""The measures of a learned set (Wong and Kolter 2021) and pictures of it.

The paper's two criteria, and what measures them here (:func:`quality`):

- *necessary subset*: every true perturbation x~ of x should be close to some member of S(x); measured
  by the *approximation error* min_{||u|| <= eps} ||g(mu + sigma u, x) - x~||^2 (latent PGD,
  ``robustops.attacks.latent.nearest_member``) and its search-free upper bound ``projected_mse`` (the
  posterior mean projected onto the ball: the reference's "fast approximation");
- *sufficient likelihood*: random members of S(x) should be likely perturbations of x; measured, as the
  reference code does, by the *expected approximation error* of members drawn from the prior
  (:func:`prior_member_error`: in the eps-ball, and unrestricted);

and the quantity the CVAE maximises, the likelihood bound (the ELBO, :func:`likelihood_bound`), which the
paper's theorems tie to both criteria. This implementation adds the *coverage* (how often the posterior
mean, in the prior's standardised coordinates u = (mu_q - mu_p) / sigma_p, lies in the eps-ball), the
*reconstruction error* of x~ through the posterior mean, and the errors of the identity map and of the
set's centre for comparison. eps is chosen as a percentile of ||u|| over the training pairs
(:func:`choose_eps`), so that held-out coverage is close to that percentile when the model generalises.
:func:`sample`, :func:`plot_perturbations`: members of S(x) drawn uniformly in the eps-ball, and a
picture of them next to true perturbations.

This file sits above the attacks (it uses their latent PGD), :mod:`.protocol` below them.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .. import _rng
from ..models import model_device
from .cvae import kl_gaussians
from .pairs import batch_pairs
from .protocol import check_perturbation_model, member, prior_scale

__all__ = ["latent_norms", "choose_eps", "quality", "sample", "plot_perturbations", "prior_member_error",
           "likelihood_bound", "truncated_prior"]


def _check_eps(eps, name: str = "eps") -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (the radius of the latent L2 ball), got {eps!r}")
    return float(eps)


def _check_percentile(p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 100:
        raise ValueError(f"percentile must be a number in [0, 100], got {p!r}")
    return float(p)


def _posterior_u(model, x, x_tilde):
    """(u, mu_p, sigma_p, mu_q, logvar_q, logvar_p) with u = (mu_q - mu_p) / sigma_p, float32, no gradient."""
    with torch.no_grad():
        mu_p, logvar_p = model.prior(x)
        mu_q, logvar_q = model.posterior(x, x_tilde)
    mu_p, logvar_p, mu_q, logvar_q = (t.float() for t in (mu_p, logvar_p, mu_q, logvar_q))
    sigma_p = torch.exp(0.5 * logvar_p)
    return (mu_q - mu_p) / sigma_p, mu_p, sigma_p, mu_q, logvar_q, logvar_p


def latent_norms(model: nn.Module, loader, device=None, max_batches: Optional[int] = None) -> torch.Tensor:
    """||u||_2 of every pair of a loader, u = (mu_q(x, x~) - mu_p(x)) / sigma_p(x): where the posterior
    mean lies in the prior's standardised coordinates (the coordinates of S(x)'s ball). CPU float32 [N]."""
    check_perturbation_model(model)
    dev = torch.device(device) if device is not None else model_device(model)
    was = model.training
    model.eval()
    out = []
    for k, batch in enumerate(loader):
        if max_batches is not None and k >= max_batches:
            break
        x, xt = (t.to(dev) for t in batch_pairs(batch))
        out.append(_posterior_u(model, x, xt)[0].norm(dim=1).cpu())
    model.train(was)
    if not out:
        raise ValueError("loader is empty")
    return torch.cat(out)


def choose_eps(model: nn.Module, loader, percentile: float = 95.0, device=None) -> float:
    """eps of the set S(x): the ``percentile``-th percentile (linear interpolation between order
    statistics, torch.quantile) of ||u|| over the (training) pairs of loader, as Wong and Kolter choose
    the radius; about that percentage of pairs then has its posterior mean inside the ball."""
    q = _check_percentile(percentile) / 100.0
    norms = latent_norms(model, loader, device)
    return float(torch.quantile(norms.double(), q))


def _add_batch(sums: Dict[str, float], model, x, xt, eps: float, lo: float, hi: float) -> torch.Tensor:
    """Adds one batch's posterior-side errors (reconstruction, identity, centre, projected) and KL to sums;
    returns ||u|| [B]."""
    u, mu_p, sigma_p, mu_q, logvar_q, logvar_p = _posterior_u(model, x, xt)
    norm = u.norm(dim=1)

    def err(a):
        return (a.float() - xt.float()).pow(2).flatten(1).mean(1).sum().item()

    with torch.no_grad():
        sums["recon_mse"] += err(member(model, x, u, mu_p, sigma_p, lo, hi))
        sums["identity_mse"] += err(x)
        sums["prior_mean_mse"] += err(member(model, x, torch.zeros_like(u), mu_p, sigma_p, lo, hi))
        u_proj = u * torch.clamp(eps / norm.clamp_min(1e-12), max=1.0).unsqueeze(1)
        sums["projected_mse"] += err(member(model, x, u_proj, mu_p, sigma_p, lo, hi))
        sums["kl"] += kl_gaussians(mu_q, logvar_q, mu_p, logvar_p.float()).sum().item()
    return norm


def quality(model: nn.Module, loader, eps: Optional[float] = None, percentile: float = 95.0, *, train_loader=None,
            approx_steps: int = 50, device=None, lo: float = 0.0, hi: float = 1.0,
            max_batches: Optional[int] = None, draws: int = 5, seed: int = 0,
            decoder_var: float = 0.5) -> Dict[str, Any]:
    """The measures of a learned perturbation set on (held-out) pairs (x, x~) of loader.

    eps: the set's radius; None: ``model.eps`` (set by load_perturbation_model / the CLI), else chosen
    by :func:`choose_eps` at ``percentile`` on ``train_loader`` (one of them is needed: choosing eps on
    the evaluated pairs themselves would make the coverage equal the percentile by construction).

    Returns a dict (means over the pairs; errors are per-pixel mean squared errors):

    - ``recon_mse``: ||clamp(g(mu_q(x, x~), x)) - x~||^2, x~ reconstructed through the posterior mean;
    - ``identity_mse``: ||x - x~||^2, the error of the identity map, for comparison;
    - ``prior_mean_mse``: ||clamp(g(mu_p(x), x)) - x~||^2, the set's centre (u = 0);
    - ``coverage``: the fraction of pairs with ||u|| <= eps, u = (mu_q - mu_p) / sigma_p;
    - ``projected_mse``: the error of the member at u projected onto the eps-ball (an upper bound on
      the approximation error that needs no search);
    - ``approx_mse``: the approximation error min over ||u|| <= eps of ||member(u) - x~||^2, by latent PGD
      (``robustops.attacks.latent.nearest_member``, ``approx_steps`` steps; None when approx_steps is 0);
    - ``kl``: KL(q || p) per pair; ``latent_norm_mean``, ``latent_norm_median``; ``eps``, ``n``;

    the paper's "sufficient likelihood" (random members should look like true perturbations), by
    :func:`prior_member_error` with ``draws`` draws per pair (seeded by ``seed``): ``expected_mse``, u ~
    N(0, I) restricted to the eps-ball (the reference's "expected approximation error"), and
    ``prior_expected_mse``, u ~ N(0, I) unrestricted (z ~ p(z|x)); and the likelihood the CVAE maximises: ``nll_bound``, the negative ELBO in nats per pair, a bound on
    -log p(x~ | x) with decoder variance ``decoder_var`` (:func:`likelihood_bound`, one posterior draw)."""
    check_perturbation_model(model)
    if not hasattr(model, "posterior"):
        raise TypeError("quality needs the model's posterior(x, x_tilde) (the encoder)")
    if isinstance(approx_steps, bool) or not isinstance(approx_steps, int) or approx_steps < 0:
        raise ValueError(f"approx_steps must be an int >= 0 (0: no latent search), got {approx_steps!r}")
    dev = torch.device(device) if device is not None else model_device(model)
    if eps is None:
        eps = getattr(model, "eps", None)
    if eps is None:
        if train_loader is None:
            raise ValueError("quality needs eps, a model with eps set (load_perturbation_model), or train_loader to "
                             "choose eps on the training pairs (choose_eps)")
        eps = choose_eps(model, train_loader, percentile, dev)
    eps = _check_eps(eps)
    nearest = None
    if approx_steps > 0:
        # imported on use: importing robustops.attacks loads this package (for .protocol) before it has nearest_member
        from ..attacks.latent import nearest_member as nearest

    was = model.training
    model.eval()
    sums = {k: 0.0 for k in ("recon_mse", "identity_mse", "prior_mean_mse", "projected_mse", "approx_mse", "kl",
                             "expected_mse", "prior_expected_mse", "nll_bound")}
    gen = torch.Generator().manual_seed(int(seed))
    norms = []
    n = 0
    for k, batch in enumerate(loader):
        if max_batches is not None and k >= max_batches:
            break
        x, xt = (t.to(dev) for t in batch_pairs(batch))
        norm = _add_batch(sums, model, x, xt, eps, lo, hi)
        sums["expected_mse"] += prior_member_error(model, x, xt, eps, draws, gen, lo, hi).sum().item()
        sums["prior_expected_mse"] += prior_member_error(model, x, xt, None, draws, gen, lo, hi).sum().item()
        sums["nll_bound"] += likelihood_bound(model, x, xt, 1, decoder_var, gen).sum().item()
        if nearest is not None:
            x_best, _ = nearest(model, x, xt, eps, steps=approx_steps, lo=lo, hi=hi)
            sums["approx_mse"] += (x_best.detach().float() - xt.float()).pow(2).flatten(1).mean(1).sum().item()
        norms.append(norm.detach().cpu())
        n += x.shape[0]
    model.train(was)
    if n == 0:
        raise ValueError("loader is empty")
    norms_t = torch.cat(norms)
    out: Dict[str, Any] = {k: v / n for k, v in sums.items()}
    if nearest is None:
        out["approx_mse"] = None
    out.update({"coverage": float((norms_t <= eps).double().mean()), "eps": eps, "n": n,
                "latent_norm_mean": float(norms_t.mean()), "latent_norm_median": float(norms_t.median()),
                "approx_steps": approx_steps, "draws": draws, "decoder_var": float(decoder_var)})
    return out


# ------------------------------------------------------------------ sufficient likelihood, likelihood

def truncated_prior(shape, eps: Optional[float], generator: torch.Generator, device=None) -> torch.Tensor:
    """u ~ N(0, I) [*shape[:-1], D], conditioned on ||u||_2 <= eps when eps is given: a Gaussian direction
    times a radius whose square is the chi^2_D distribution truncated to [0, eps^2], drawn by inverting its
    CDF (exact, no rejection). Float32, from ``generator`` (so deterministic per seed)."""
    from scipy.stats import chi2

    d = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float64)
    if eps is None:
        return d.float().to(device or d.device)
    D = shape[-1]
    top = float(chi2.cdf(eps * eps, D))
    q = torch.rand(shape[:-1], generator=generator, device=generator.device, dtype=torch.float64) * top
    r = torch.from_numpy(chi2.ppf(q.cpu().numpy(), D)).clamp_min(0).sqrt().to(d.device)
    u = d / d.norm(dim=-1, keepdim=True).clamp_min(1e-300) * r.unsqueeze(-1)
    return u.float().to(device or u.device)


def prior_member_error(model: nn.Module, x: torch.Tensor, x_tilde: torch.Tensor, eps: Optional[float] = None,
                       draws: int = 5, generator: Optional[torch.Generator] = None, lo: float = 0.0,
                       hi: float = 1.0) -> torch.Tensor:
    """The "sufficient likelihood" measure of Wong and Kolter (2021) as their reference measures it (the
    *expected approximation error*): the per-pixel mean squared error between random members of the set
    and the true perturbation x~, E_{u}[ ||member(x, u) - x~||^2 ] / P, u from the prior in its
    standardised coordinates, estimated with ``draws`` draws per pair. eps None: u ~ N(0, I) (z ~ p(z|x),
    the paper's expectation over the prior); eps given: u ~ N(0, I) restricted to the set's ball ||u|| <=
    eps (:func:`truncated_prior`; the reference's eval.py instead truncates each coordinate to [-eps, eps]
    when a draw leaves the ball, a choice this implementation does not copy). Returns [B], float32."""
    check_perturbation_model(model)
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be an int >= 1 (prior draws per pair), got {draws!r}")
    if eps is not None:
        eps = _check_eps(eps)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    mu, sigma = prior_scale(model, x)
    B, D = mu.shape
    u = truncated_prior((draws, B, D), eps, gen, mu.device).flatten(0, 1)  # draw-major: row j * B + b

    def rep(t):
        return t.repeat(draws, *([1] * (t.dim() - 1)))

    with torch.no_grad():
        m = member(model, rep(x), u, rep(mu), rep(sigma), lo, hi)
        err = (m.float() - rep(x_tilde).float()).pow(2).flatten(1).mean(1)
    return err.view(draws, B).mean(0)


def likelihood_bound(model: nn.Module, x: torch.Tensor, x_tilde: torch.Tensor, draws: int = 1,
                     decoder_var: float = 0.5, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The bound on the likelihood the CVAE is trained on (Wong and Kolter 2021, the ELBO): per pair, in nats,

        -log p(x~ | x) <= E_{z ~ q(z|x, x~)}[ ||g(z, x) - x~||^2 / (2 v) ] + P/2 * log(2 pi v) + KL(q || p),

    with the Gaussian decoder of fixed variance v = ``decoder_var`` (the paper leaves v open; 0.5 makes the
    first term the squared error of training at beta = 1, as the reference's eval.py reports it), P the
    number of pixels, the expectation by ``draws`` reparameterised posterior draws, g unclamped (the
    decoder's own distribution). Lower is better. Returns [B], float32."""
    check_perturbation_model(model)
    if not hasattr(model, "posterior"):
        raise TypeError("likelihood_bound needs the model's posterior(x, x_tilde) (the encoder)")
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be an int >= 1 (posterior draws per pair), got {draws!r}")
    if isinstance(decoder_var, bool) or not isinstance(decoder_var, (int, float)) or not 0 < decoder_var < math.inf:
        raise ValueError(f"decoder_var must be a finite number > 0 (the decoder's variance), got {decoder_var!r}")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    with torch.no_grad():
        mu_p, logvar_p = model.prior(x)
        mu_q, logvar_q = model.posterior(x, x_tilde)
        mu_q, logvar_q = mu_q.float(), logvar_q.float()
        P, B = x_tilde[0].numel(), x.shape[0]
        n = torch.randn((draws,) + tuple(mu_q.shape), generator=gen, device=gen.device,
                        dtype=torch.float32).to(mu_q.device)
        z = (mu_q + torch.exp(0.5 * logvar_q) * n).flatten(0, 1)  # draw-major, as prior_member_error
        g = model.decode(z, x.repeat(draws, *([1] * (x.dim() - 1))))
        sq = (g.float() - x_tilde.float().repeat(draws, *([1] * (x.dim() - 1)))).pow(2).flatten(1).sum(1)
        kl = kl_gaussians(mu_q, logvar_q, mu_p, logvar_p)
    return sq.view(draws, B).mean(0) / (2 * decoder_var) + 0.5 * P * math.log(2 * math.pi * decoder_var) + kl


# ---------------------------------------------------------------------------------- sampling, plot

def sample(model: nn.Module, x: torch.Tensor, eps: float, n: int = 8, seed: Optional[int] = None, offset: int = 0,
           lo: float = 0.0, hi: float = 1.0, return_u: bool = False):
    """n members of S(x) per input, u uniform in the eps-ball: [B, n, *x.shape[1:]] (and u [B, n, D] with
    return_u). u is drawn by ``ops.random_init`` (L2 ball, radius eps * U^(1/D), a normalised Gaussian
    direction) around zero, keyed by (seed, offset + b * n + j) for draw j of input b: the same seed
    gives the same members, for any split of the inputs into calls (pass offset = index of the first
    input * n). seed None: from torch's generator."""
    from .. import ops

    check_perturbation_model(model)
    eps = _check_eps(eps)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1 (members per input), got {n!r}")
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"x must be a batch [B, ...] of inputs, got {getattr(x, 'shape', type(x).__name__)}")
    seed = _rng.resolve_seed(seed)
    B = x.shape[0]
    mu, sigma = prior_scale(model, x)
    zero = torch.zeros(B * n, mu.shape[1], device=mu.device, dtype=torch.float32)
    u = ops.random_init(zero, eps, "l2", lo=-math.inf, hi=math.inf, seed=seed, offset=offset)
    xr = x.repeat_interleave(n, 0)
    with torch.no_grad():
        out = member(model, xr, u, mu.repeat_interleave(n, 0), sigma.repeat_interleave(n, 0), lo, hi)
    out = out.view(B, n, *x.shape[1:])
    return (out, u.view(B, n, -1)) if return_u else out


def plot_perturbations(model: nn.Module, x: torch.Tensor, x_tilde_true: torch.Tensor, eps_list: Sequence[float],
                       path: str, adversarial: Optional[torch.Tensor] = None, n: int = 4, seed: int = 0,
                       title: Optional[str] = None) -> List[str]:
    """A grid of images, one row per input: x, its true perturbations (x_tilde_true [B, ...] or
    [B, k, ...]), n samples of S(x) (:func:`sample`) at each eps of eps_list, and, when given, the
    adversarial member (adversarial [B, ...], found by the caller). Written at 200 dpi as a PNG at path and
    a PDF beside it (matplotlib's Agg canvas; pyplot's global state is not touched). Returns both paths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be images [B, C, H, W], got {getattr(x, 'shape', type(x).__name__)}")
    B = x.shape[0]
    true = x_tilde_true.unsqueeze(1) if x_tilde_true.dim() == x.dim() else x_tilde_true
    if true.dim() != 5 or true.shape[0] != B or true.shape[2:] != x.shape[1:]:
        raise ValueError(f"x_tilde_true must be [B, ...] or [B, k, ...] with x's image shape {list(x.shape[1:])} and "
                         f"B = {B}, got {list(x_tilde_true.shape)}")
    if adversarial is not None and adversarial.shape != x.shape:
        raise ValueError(f"adversarial must have x's shape {list(x.shape)}, got {list(adversarial.shape)}")
    eps_list = [_check_eps(e, "eps_list entries") for e in eps_list]
    dev = model_device(model)
    cols: List[Tuple[str, torch.Tensor]] = [("x", x.detach().cpu().unsqueeze(1))]
    cols.append(("true", true.detach().cpu()))
    for e in eps_list:
        cols.append((f"eps={e:.3g}", sample(model, x.to(dev), e, n, seed=seed).cpu()))
    if adversarial is not None:
        cols.append(("adversarial", adversarial.detach().cpu().unsqueeze(1)))
    ncols = sum(c.shape[1] for _, c in cols)
    fig = Figure(figsize=(0.75 * ncols + 0.2, 0.75 * B + 0.5), dpi=200)
    FigureCanvasAgg(fig)
    col = 0
    for name, imgs in cols:
        for j in range(imgs.shape[1]):
            for b in range(B):
                ax = fig.add_subplot(B, ncols, b * ncols + col + 1)
                im = imgs[b, j].float().clamp(0, 1)
                if im.shape[0] == 1:
                    ax.imshow(im[0].numpy(), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
                else:
                    ax.imshow(im.permute(1, 2, 0).numpy(), interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if b == 0 and j == 0:
                    ax.set_title(name, fontsize=6, loc="left")
            col += 1
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout(pad=0.3)
    stem, ext = os.path.splitext(os.fspath(path))
    png = path if ext.lower() == ".png" else stem + ".png"
    pdf = stem + ".pdf"
    d = os.path.dirname(os.path.abspath(png))
    os.makedirs(d, exist_ok=True)
    fig.savefig(png, format="png", dpi=200)
    fig.savefig(pdf, format="pdf")
    return [png, pdf]
