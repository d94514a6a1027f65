"""The paper's quality criteria of a learned perturbation set (issue 25, item 6) on a toy perturbation
model whose measures have closed forms: a linear decoder g(z, x) = x + A z, a prior and an encoder with
fixed (mu, logvar). Each measure of robustops.perturbation is checked against its definition computed
independently in float64 (Gaussian moments, the truncated chi-square mean), not by the same sampling."""
import math

import pytest
import torch
import torch.nn as nn
from scipy.stats import chi2

from robustops import perturbation as P

B, D, PIX = 3, 2, 4  # pairs, latent dimension, pixels (images [B, 1, 2, 2])


class Toy(nn.Module):
    """prior N(mu_p(x), e^lv_p), encoder N(mu_q(x, x~), e^lv_q), decoder x + A z: everything linear."""

    latent_dim = D

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.A = nn.Parameter(torch.randn(PIX, D, generator=g) * 0.3)
        self.Wp = nn.Parameter(torch.randn(D, PIX, generator=g) * 0.5)
        self.lvp = nn.Parameter(torch.tensor([-0.4, 0.3]))
        self.lvq = nn.Parameter(torch.tensor([-1.2, -0.7]))

    def prior(self, x):
        return x.flatten(1) @ self.Wp.T, self.lvp.expand(x.shape[0], D)

    def posterior(self, x, xt):
        return (xt - x).flatten(1) @ self.A, self.lvq.expand(x.shape[0], D)

    def decode(self, z, x):
        return x + (z @ self.A.T).view_as(x)


@pytest.fixture(scope="module")
def toy():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(B, 1, 2, 2, generator=g)
    xt = x + 0.2 * torch.randn(B, 1, 2, 2, generator=g)
    m = Toy()
    with torch.no_grad():
        d = {k: v.double() for k, v in m.state_dict().items()}
    return m, x, xt, d


def member_moments(d, x, xt, mu, var_u):
    """E ||x + A (mu + s u) - x~||^2 / P for E[u] = 0, Cov(u) = var_u I: the residual at the mean plus
    var_u * sum_j ||A_j||^2 s_j^2 (s the prior's standard deviation)."""
    A = d["A"]
    r = (x.double() - xt.double()).flatten(1) + mu @ A.T
    s2 = d["lvp"].exp()
    return (r.pow(2).sum(1) + var_u * (A.pow(2).sum(0) * s2).sum()) / PIX


def test_sufficient_likelihood_is_the_expected_error_of_prior_members(toy):
    m, x, xt, d = toy
    mu = x.double().flatten(1) @ d["Wp"].T
    inf = math.inf
    gen = torch.Generator().manual_seed(0)
    got = P.prior_member_error(m, x, xt, None, draws=20000, generator=gen, lo=-inf, hi=inf)
    assert torch.allclose(got.double(), member_moments(d, x, xt, mu, 1.0), rtol=0.03)
    # in the eps-ball: E[u u^T] = E[||u||^2 | ||u|| <= eps] / D * I, E[||u||^2 | .] = D F_{D+2}(eps^2) / F_D(eps^2)
    eps = 1.1
    var_ball = chi2.cdf(eps ** 2, D + 2) / chi2.cdf(eps ** 2, D)
    got = P.prior_member_error(m, x, xt, eps, draws=20000, generator=gen, lo=-inf, hi=inf)
    assert torch.allclose(got.double(), member_moments(d, x, xt, mu, var_ball), rtol=0.03)
    # clamping to the data range is what member() does: with [0, 1] the error is that of clamped members
    clamped = P.prior_member_error(m, x, xt, eps, draws=3, generator=torch.Generator().manual_seed(2))
    assert clamped.shape == (B,) and (clamped >= 0).all()


def test_truncated_prior_is_the_gaussian_restricted_to_the_ball():
    gen = torch.Generator().manual_seed(3)
    u = P.truncated_prior((40000, 3), 1.5, gen)
    norms = u.double().norm(dim=1)
    assert norms.max() <= 1.5 + 1e-6
    # the radius distribution: P(||u|| <= r | ||u|| <= 1.5) = F_3(r^2) / F_3(2.25)
    for r in (0.5, 1.0, 1.3):
        assert float((norms <= r).double().mean()) == pytest.approx(chi2.cdf(r * r, 3) / chi2.cdf(2.25, 3), abs=0.01)
    assert u.mean(0).abs().max() < 0.02  # symmetric


def test_likelihood_bound_is_the_negative_elbo(toy):
    m, x, xt, d = toy
    v = 0.3
    A, lvq, lvp = d["A"], d["lvq"], d["lvp"]
    mu_q = (xt.double() - x.double()).flatten(1) @ A
    mu_p = x.double().flatten(1) @ d["Wp"].T
    # E_q ||x + A z - x~||^2 = residual at mu_q + sum_j ||A_j||^2 e^{lv_q, j}
    r = (x.double() - xt.double()).flatten(1) + mu_q @ A.T
    sq = r.pow(2).sum(1) + (A.pow(2).sum(0) * lvq.exp()).sum()
    kl = 0.5 * ((lvq.exp() + (mu_q - mu_p) ** 2) / lvp.exp() - 1 + lvp - lvq).sum(1)
    expect = sq / (2 * v) + PIX / 2 * math.log(2 * math.pi * v) + kl
    got = P.likelihood_bound(m, x, xt, draws=20000, decoder_var=v, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(got.double(), expect, rtol=0.01)


def test_quality_reports_the_measures_beside_the_necessary_subset(toy):
    m, x, xt, d = toy
    loader = [(x, xt)]
    q = P.quality(m, loader, eps=1.1, approx_steps=0, lo=-math.inf, hi=math.inf, draws=3, seed=7)
    gen = torch.Generator().manual_seed(7)  # quality's draws, in its order: ball, unrestricted, posterior
    ball = P.prior_member_error(m, x, xt, 1.1, 3, gen, -math.inf, math.inf)
    full = P.prior_member_error(m, x, xt, None, 3, gen, -math.inf, math.inf)
    nll = P.likelihood_bound(m, x, xt, 1, 0.5, gen)
    assert q["expected_mse"] == pytest.approx(float(ball.mean()), rel=1e-6)
    assert q["prior_expected_mse"] == pytest.approx(float(full.mean()), rel=1e-6)
    assert q["nll_bound"] == pytest.approx(float(nll.mean()), rel=1e-6)
    assert {"coverage", "approx_mse", "projected_mse", "recon_mse"} <= set(q)


def test_measure_arguments_are_checked(toy):
    m, x, xt, _ = toy
    with pytest.raises(ValueError, match="draws must be"):
        P.prior_member_error(m, x, xt, draws=0)
    with pytest.raises(ValueError, match="decoder_var must be"):
        P.likelihood_bound(m, x, xt, decoder_var=0.0)
    with pytest.raises(ValueError, match="eps must be"):
        P.prior_member_error(m, x, xt, eps=-1.0)
