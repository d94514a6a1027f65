"""Sizing the latent noise level so that certificates can cover a learned set (issue 25, item 4):
robustops.smoothing.sigma_for_radius / samples_for_radius against the closed form. With n samples at
level alpha the largest certifiable radius is sigma * Phi^-1(alpha^(1/n)) (all n votes for the top class,
Clopper-Pearson lower bound alpha^(1/n)); simulation-free (scipy.stats)."""
import math

import pytest
from scipy.stats import beta, norm

from robustops.smoothing import COVER_DISSENT, largest_certifiable_radius, samples_for_radius, sigma_for_radius


def reach(sigma, n, alpha):
    """The closed form, written out: sigma * Phi^-1(alpha^(1/n))."""
    return sigma * norm.ppf(math.exp(math.log(alpha) / n))


@pytest.mark.parametrize("eps,n,alpha", [(3.61, 500, 0.001), (1.0, 64, 0.01), (2.7, 10_000, 0.001), (0.3, 100, 0.05)])
def test_unanimous_sigma_is_the_smallest_that_reaches_eps(eps, n, alpha):
    sigma = sigma_for_radius(eps, n, alpha, dissent=0.0)
    assert reach(sigma, n, alpha) >= eps * (1 - 1e-12)
    assert reach(sigma * (1 - 1e-6), n, alpha) < eps  # a smaller sigma does not
    assert largest_certifiable_radius(sigma, n, alpha) == pytest.approx(eps, rel=1e-12)
    # and at that sigma, n is the smallest sample count that reaches eps
    assert samples_for_radius(eps, sigma, alpha, dissent=0.0) == n


def test_the_reference_sigmas_are_the_unanimous_rule():
    """locuslab/perturbation_learning certifies CIFAR-10-C at sigma 0.84 / 1.22 / 3.19 with n = 10,000,
    alpha = 0.001 beside latent attacks at 2.7 / 3.9 / 10.2: the unanimous rule, to two decimals."""
    for eps, sigma in ((2.7, 0.84), (3.9, 1.22), (10.2, 3.19)):
        assert round(sigma_for_radius(eps, 10_000, 0.001, dissent=0.0), 2) == sigma


@pytest.mark.parametrize("eps,sigma,alpha", [(3.61, 1.0, 0.001), (1.0, 0.5, 0.01), (2.0, 2.0, 0.001)])
def test_samples_needed_at_a_given_sigma(eps, sigma, alpha):
    n = samples_for_radius(eps, sigma, alpha, dissent=0.0)
    assert reach(sigma, n, alpha) >= eps * (1 - 1e-12)
    assert n == 1 or reach(sigma, n - 1, alpha) < eps  # one sample fewer does not reach eps
    assert n == math.ceil(math.log(alpha) / math.log(norm.cdf(eps / sigma))) or abs(
        reach(sigma, n - 1, alpha) - eps) < 1e-9  # the closed form, up to rounding at the boundary


def test_the_demo_case_needs_a_larger_sigma_or_many_samples():
    """The issue's case: sigma 1, n 500, alpha 0.001 certifies at most 2.2 < eps 3.61."""
    assert reach(1.0, 500, 0.001) == pytest.approx(2.205, abs=1e-3)
    assert sigma_for_radius(3.61, 500, 0.001, 0.0) == pytest.approx(3.61 / norm.ppf(0.001 ** (1 / 500)))
    assert samples_for_radius(3.61, 1.0, 0.001, 0.0) > 40_000


@pytest.mark.parametrize("dissent", [COVER_DISSENT, 0.05])
def test_dissent_margin_is_the_clopper_pearson_bound_of_the_remaining_votes(dissent):
    eps, n, alpha = 3.61, 500, 0.001
    sigma = sigma_for_radius(eps, n, alpha, dissent)
    # the alpha quantile of Beta((1 - dissent) n, dissent n + 1): the lower bound after (1 - dissent) n votes
    p = beta.ppf(alpha, (1 - dissent) * n, dissent * n + 1)
    assert sigma * norm.ppf(p) == pytest.approx(eps, rel=1e-9)
    assert sigma > sigma_for_radius(eps, n, alpha, 0.0)  # a margin: unanimous votes reach past eps
    assert reach(sigma, n, alpha) > eps
    m = samples_for_radius(eps, sigma, alpha, dissent)
    assert m == n or abs(m - n) <= 1  # the converse gives n back (the bound is smooth in n)
    assert sigma * norm.ppf(beta.ppf(alpha, (1 - dissent) * (m - 1), dissent * (m - 1) + 1)) < eps


def test_sizing_errors_name_the_argument():
    with pytest.raises(ValueError, match="radius must be"):
        sigma_for_radius(0.0, 100, 0.001)
    with pytest.raises(ValueError, match="alpha must be"):
        sigma_for_radius(1.0, 100, 1.5)
    with pytest.raises(ValueError, match="dissent must be"):
        sigma_for_radius(1.0, 100, 0.001, dissent=0.6)
    with pytest.raises(ValueError, match="n must be"):
        sigma_for_radius(1.0, 0, 0.001)
    with pytest.raises(ValueError, match="raise n"):
        sigma_for_radius(1.0, 5, 0.001, dissent=0.3)
    with pytest.raises(ValueError, match="raise sigma"):
        samples_for_radius(3.0, 1.0, 0.001, dissent=0.1)  # Phi(3) > 0.9: no n with 10% dissent reaches it
