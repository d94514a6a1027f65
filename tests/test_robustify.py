"""Preemptive robustification (robustops.robustify, Moon et al. 2022): the budget and the box, the
closed-form optimum on a linear classifier, a trained digits model, the smoothed variant, the
evaluation and the bad arguments. The command line is tested in test_cli_robustify.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from robustops.data import load_digits
from robustops.preemptive import distance, robustify, robustify_evaluation
from robustops.smoothing import Smooth

D = 12


@pytest.fixture(scope="module")
def linear():
    """A binary linear classifier, inputs in the middle of the box (so that no budget here reaches it),
    the classifier's labels, and the unit direction s that raises each input's logit margin."""
    torch.manual_seed(0)
    lin = nn.Linear(D, 2)
    x = 0.3 + 0.4 * torch.rand(6, D)
    with torch.no_grad():
        y = lin(x).argmax(1)
    w = (lin.weight[1] - lin.weight[0]).detach()
    s = torch.where(y[:, None] == 1, w, -w)
    return lin, x, y, s


def test_linear_linf_optimum_in_closed_form(linear):
    # The robust margin under an L-inf adversary eps_adv is s.x' + c - eps_adv ||w||_1, maximised over the
    # eps_pre box at x' = x + eps_pre sign(s); the cross entropy at the worst point falls with the margin.
    lin, x, y, s = linear
    eps_pre = torch.tensor([0.05, 0.1, 0.02, 0.08, 0.0, 0.03])
    r = robustify(lin, x, eps_pre, 0.05, steps=6, inner_steps=4, seed=1)
    torch.testing.assert_close(r.x_pre, x + eps_pre[:, None] * s.sign(), atol=1e-3, rtol=0)
    assert torch.equal(r.labels, y)
    assert (r.loss <= r.loss_start + 1e-6).all() and (r.loss[:4] < r.loss_start[:4]).all()


def test_linear_l2_optimum_in_closed_form(linear):
    # Under L2 the margin term is -eps_adv ||w||_2, so x' = x + eps_pre s / ||s||_2.
    lin, x, y, s = linear
    eps_pre = torch.tensor([0.3, 0.1, 0.2, 0.0, 0.25, 0.15])
    r = robustify(lin, x, eps_pre, 0.2, norm="l2", steps=6, inner_steps=4, seed=1)
    torch.testing.assert_close(r.x_pre, x + eps_pre[:, None] * s / s.norm(dim=1, keepdim=True), atol=1e-3, rtol=0)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_budget_and_box_hold_per_sample(norm):
    # Inputs at the box's faces, per-sample budgets (one zero), a small classifier: x_pre never leaves
    # the eps_pre ball nor [lo, hi].
    torch.manual_seed(1)
    net = nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 3))
    lo, hi = -0.5, 0.5
    x = (torch.rand(5, 2, 4, 4) - 0.5).clamp(-0.4, 0.4)
    x[0] = hi
    x[1, 0] = lo
    eps_pre = torch.tensor([0.2, 0.0, 0.05, 0.5, 0.1]) * (1.0 if norm == "linf" else 4.0)
    r = robustify(net, x, eps_pre, 0.1, norm=norm, steps=6, inner_steps=3, lo=lo, hi=hi, seed=2, keep="best")
    assert (r.distance <= eps_pre * (1 + 1e-5) + 1e-6).all()
    torch.testing.assert_close(r.distance, distance(r.x_pre, x, norm))
    assert float(r.x_pre.min()) >= lo and float(r.x_pre.max()) <= hi
    assert torch.equal(r.x_pre[1], x[1])


def test_reproducible_and_independent_of_the_batch_split(linear):
    lin, x, y, s = linear
    kw = dict(steps=4, inner_steps=3, seed=5, keep="best")
    a = robustify(lin, x, 0.05, 0.1, **kw)
    b1, b2 = robustify(lin, x[:2], 0.05, 0.1, **kw), robustify(lin, x[2:], 0.05, 0.1, offset=2, **kw)
    torch.testing.assert_close(torch.cat([b1.x_pre, b2.x_pre]), a.x_pre)
    torch.testing.assert_close(torch.cat([b1.loss, b2.loss]), a.loss)


@pytest.fixture(scope="module")
def digits_mlp():
    """A small MLP after 60 Adam steps on the digits (about 90 % test accuracy, not robust), and 48 test images."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x, y = load_digits("train").tensors
    for k in range(60):
        b = slice(64 * k % 1280, 64 * k % 1280 + 64)
        opt.zero_grad()
        F.cross_entropy(net(x[b]), y[b]).backward()
        opt.step()
    xt, yt = load_digits("test").tensors
    return net.eval(), xt[:48], yt[:48]


def test_robustified_digits_survive_the_adversary_more_often(digits_mlp):
    net, x, y = digits_mlp
    eps = 0.1
    r = robustify(net, x, eps, eps, steps=8, inner_steps=5, seed=0)
    ev = robustify_evaluation(net, x, r.x_pre, y, eps, suites=("pgd",), steps=10)
    before, after = ev["original"]["pgd_acc"], ev["robustified"]["pgd_acc"]
    assert after >= before + 0.15, (before, after)
    assert ev["robustified"]["clean_acc"] >= ev["original"]["clean_acc"] - 0.03
    assert ev["samples"]["pgd_robust_pre"].shape == (48,)


def test_smoothed_variant_raises_the_certified_radius(linear):
    # For a linear classifier the smoothed classifier's radius sigma * Phi^-1(pA) is the distance to the
    # decision boundary, m / ||w||: moving x by eps_pre along s (what the smoothed L2 robustification
    # finds) must raise it by eps_pre.
    lin, x, y, s = linear
    smooth = Smooth(lin, 2, 0.1)
    r = robustify(None, x, 0.1, 0.1, norm="l2", smooth=smooth, steps=6, inner_steps=2, noise_samples=4, seed=3)
    assert torch.equal(r.labels, y)
    torch.testing.assert_close(r.x_pre, x + 0.1 * s / s.norm(dim=1, keepdim=True), atol=1e-3, rtol=0)
    ev = robustify_evaluation(lin, x, r.x_pre, y, 0.1, suites=(), smooth=smooth, n0=50, n=2000, seed=0)
    rb, ra = ev["samples"]["radius_orig"], ev["samples"]["radius_pre"]
    assert ((ra > rb + 0.05) | (ra > 0.3)).all(), (rb, ra)
    assert ev["robustified"]["acr"] > ev["original"]["acr"] + 0.05


@pytest.mark.parametrize("kwargs, match", [
    (dict(eps_pre=-0.1), "eps_pre"),
    (dict(eps_adv=torch.tensor([0.1, 0.2])), "eps_adv"),
    (dict(norm="l1"), "norm"),
    (dict(steps=0), "steps"),
    (dict(inner_steps=0), "inner_steps"),
    (dict(keep="first"), "keep"),
    (dict(lo=1.0, hi=0.0), "lo"),
    (dict(labels=torch.tensor([0, 1])), "labels"),
    (dict(smooth=-0.25), "smooth"),
    (dict(smooth=0.25, noise_samples=0), "noise_samples"),
    (dict(smooth=0.25, norm="linf"), 'norm must be "l2" with smooth'),
])
def test_bad_arguments_name_themselves(linear, kwargs, match):
    lin, x, y, s = linear
    args = dict(eps_pre=0.1, eps_adv=0.1)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        robustify(lin, x, args.pop("eps_pre"), args.pop("eps_adv"), steps=args.pop("steps", 2), **args)


def test_images_outside_the_box_and_a_missing_model_are_refused(linear):
    lin, x, y, s = linear
    with pytest.raises(ValueError, match=r"x must lie in \[lo, hi\]"):
        robustify(lin, x + 1.0, 0.1, 0.1, steps=1)
    with pytest.raises(TypeError, match="model"):
        robustify(None, x, 0.1, 0.1, steps=1)
    with pytest.raises(ValueError, match="x_pre"):
        robustify_evaluation(lin, x, x[:2], y, 0.1)
