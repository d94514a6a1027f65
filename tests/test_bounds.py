"""robustops.bounds: interval bound propagation is sound (sampled points, box corners and a PGD attack
inside the box stay within the bounds), equals a naive lower/upper interval arithmetic written here,
the elided margins are never looser than differences of logit bounds, per-sample radii equal separate
calls, and the bisection radius is never broken by PGD and grows with eps_max and finer tolerances."""
import itertools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import train_digits_model
from robustops import bounds as B
from robustops import models as M
from robustops.data import load_digits


def tiny_nets(dtype):
    """Small networks that together use every supported layer type."""
    torch.manual_seed(0)
    nets = {
        "mlp": nn.Sequential(nn.Flatten(), nn.Linear(6, 12), nn.ReLU(), nn.BatchNorm1d(12), nn.Linear(12, 8),
                             nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 4)),
        "cnn": nn.Sequential(M.Normalize([0.4, 0.6], [0.3, 0.2]), nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4),
                             nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, padding=1, stride=1), nn.ReLU(),
                             nn.AvgPool2d(2), nn.Identity(), nn.Flatten(), nn.Linear(6, 5)),
        "strided": nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1, groups=1), nn.ReLU(),
                                 nn.Conv2d(3, 6, 2, groups=3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(6, 3)),
    }
    for net in nets.values():
        for m in net.modules():  # non-trivial BatchNorm statistics, negative scales included
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                with torch.no_grad():
                    m.weight.uniform_(-1.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
                    m.running_mean.uniform_(-0.3, 0.3)
                    m.running_var.uniform_(0.5, 2.0)
        net.to(dtype).eval()
    return nets


def input_for(name, n, dtype, gen):
    shape = (n, 6) if name == "mlp" else (n, 2, 4, 4)
    return torch.rand(shape, generator=gen, dtype=dtype)


# ------------------------------------------------------------------- a naive interval reference

def naive(module, lower, upper):
    """Textbook interval arithmetic in lower/upper form, layer by layer (positive and negative parts
    of every weight), for the layer types of tiny_nets."""
    if isinstance(module, nn.Sequential):
        for m in module:
            lower, upper = naive(m, lower, upper)
        return lower, upper
    if isinstance(module, nn.Linear):
        wp, wn = module.weight.clamp(min=0), module.weight.clamp(max=0)
        return lower @ wp.T + upper @ wn.T + module.bias, upper @ wp.T + lower @ wn.T + module.bias
    if isinstance(module, nn.Conv2d):
        wp, wn = module.weight.clamp(min=0), module.weight.clamp(max=0)
        conv = lambda t, w: F.conv2d(t, w, None, module.stride, module.padding, module.dilation, module.groups)  # noqa: E731
        b = module.bias.view(1, -1, 1, 1) if module.bias is not None else 0
        return conv(lower, wp) + conv(upper, wn) + b, conv(upper, wp) + conv(lower, wn) + b
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, M.Normalize)):
        if isinstance(module, M.Normalize):
            scale, shift = 1 / module.std.flatten(), -module.mean.flatten() / module.std.flatten()
        else:
            scale = module.weight / torch.sqrt(module.running_var + module.eps)
            shift = module.bias - module.running_mean * scale
        shape = (1, -1) + (1,) * (lower.dim() - 2)
        s, t = scale.view(shape), shift.view(shape)
        a, b = lower * s + t, upper * s + t
        return torch.minimum(a, b), torch.maximum(a, b)
    if isinstance(module, (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten)):
        return module(lower), module(upper)
    if isinstance(module, (nn.Identity, nn.Dropout)):
        return lower, upper
    raise TypeError(type(module))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["mlp", "cnn", "strided"])
def test_bounds_equal_naive_interval_arithmetic(name, dtype):
    net = tiny_nets(dtype)[name]
    gen = torch.Generator().manual_seed(1)
    x = input_for(name, 16, dtype, gen)
    eps = torch.rand(16, generator=gen, dtype=dtype) * 0.2
    lower, upper = B.interval_bounds(net, x, eps)
    e = eps.view((-1,) + (1,) * (x.dim() - 1))
    ref_l, ref_u = naive(net, (x - e).clamp(0, 1), (x + e).clamp(0, 1))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(lower, ref_l, **tol)
    torch.testing.assert_close(upper, ref_u, **tol)
    # the elided margin bound is never looser than the difference of logit bounds
    y = torch.randint(0, lower.shape[1], (16,), generator=gen)
    m = B.margin_bounds(net, x, y, eps)
    diff = lower.gather(1, y.view(-1, 1)) - upper
    diff = diff.scatter(1, y.view(-1, 1), 0.0)
    assert bool((m >= diff - 1e-5).all())
    assert float((m - diff).detach().sum()) > 0  # and strictly tighter somewhere
    assert bool((m.gather(1, y.view(-1, 1)) == 0).all())


# ----------------------------------------------------------------------------------- soundness

def _within(z, lower, upper, dtype):
    slack = 1e-5 if dtype == torch.float32 else 1e-10
    scale = 1 + z.abs()
    return bool(((z >= lower - slack * scale) & (z <= upper + slack * scale)).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["mlp", "cnn", "strided"])
def test_sampled_points_corners_and_pgd_stay_within_the_bounds(name, dtype):
    net = tiny_nets(dtype)[name]
    gen = torch.Generator().manual_seed(2)
    x = input_for(name, 4, dtype, gen)
    eps = torch.tensor([0.0, 0.01, 0.1, 0.3], dtype=dtype)
    lower, upper = B.interval_bounds(net, x, eps)
    e = eps.view((-1,) + (1,) * (x.dim() - 1))
    lo_box, hi_box = (x - e).clamp(0, 1), (x + e).clamp(0, 1)
    with torch.no_grad():
        # 10^4 uniform points per input (2500 per sample, 4 samples) and random box corners
        for _ in range(5):
            u = torch.rand((500,) + tuple(x.shape), generator=gen, dtype=dtype)
            pts = lo_box + u * (hi_box - lo_box)
            z = net(pts.reshape((-1,) + tuple(x.shape[1:]))).reshape(500, 4, -1)
            assert _within(z, lower, upper, dtype)
            corner = torch.where(torch.rand(pts.shape, generator=gen) < 0.5, lo_box, hi_box)
            z = net(corner.reshape((-1,) + tuple(x.shape[1:]))).reshape(500, 4, -1)
            assert _within(z, lower, upper, dtype)
        if name == "mlp":  # D = 6: every corner of the box
            for bits in itertools.product((0, 1), repeat=6):
                pick = torch.tensor(bits, dtype=torch.bool)
                assert _within(net(torch.where(pick, hi_box, lo_box)), lower, upper, dtype)
    # PGD inside the box, pushing each output up and down
    k = lower.shape[1]
    for j in range(k):
        for sign in (1.0, -1.0):
            xa = (lo_box + torch.rand(x.shape, generator=gen, dtype=dtype) * (hi_box - lo_box)).requires_grad_()
            for _ in range(30):
                obj = sign * net(xa)[:, j].sum()
                g, = torch.autograd.grad(obj, xa)
                xa = torch.minimum(torch.maximum(xa.detach() + 0.05 * (hi_box - lo_box) * g.sign(), lo_box),
                                   hi_box).requires_grad_()
            with torch.no_grad():
                assert _within(net(xa), lower, upper, dtype)


@pytest.mark.parametrize("model_name", ["small_cnn", "resnet20", "cohen", "preact_resnet18"])
def test_the_models_of_robustops_are_supported_and_sound(model_name):
    torch.manual_seed(0)
    if model_name == "small_cnn":
        net, shape = M.SmallCNN(1, 10, 16), (1, 16, 16)
    elif model_name == "resnet20":
        net, shape = M.cifar_resnet(20), (3, 16, 16)
    elif model_name == "cohen":
        net, shape = M.cohen_cifar_resnet(20), (3, 32, 32)
    else:
        net, shape = M.PreActResNet18(), (3, 8, 8)
    net = nn.Sequential(M.Normalize([0.5] * shape[0], [0.25] * shape[0]), net)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_var.uniform_(0.5, 2.0)
                m.running_mean.uniform_(-0.2, 0.2)
    net.eval()
    gen = torch.Generator().manual_seed(3)
    x = torch.rand((2,) + shape, generator=gen)
    eps = 0.002
    lower, upper = B.interval_bounds(net, x, eps)
    l0, u0 = B.interval_bounds(net, x, 0.0)
    with torch.no_grad():
        z = net(x)
        torch.testing.assert_close(l0, z, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(u0, z, rtol=1e-4, atol=1e-4)
        for _ in range(4):
            pts = (x.unsqueeze(0) + (torch.rand((50,) + x.shape, generator=gen) * 2 - 1) * eps).clamp(0, 1)
            zp = net(pts.reshape((-1,) + shape)).reshape(50, 2, -1)
            assert _within(zp, lower, upper, torch.float32)


def test_per_sample_eps_equals_separate_calls():
    net = tiny_nets(torch.float64)["cnn"]
    gen = torch.Generator().manual_seed(4)
    x = input_for("cnn", 6, torch.float64, gen)
    y = torch.randint(0, 5, (6,), generator=gen)
    eps = torch.tensor([0.0, 0.003, 0.02, 0.05, 0.2, 1.0], dtype=torch.float64)
    lower, upper = B.interval_bounds(net, x, eps)
    m = B.margin_bounds(net, x, y, eps)
    for i in range(6):
        li, ui = B.interval_bounds(net, x[i:i + 1], float(eps[i]))
        torch.testing.assert_close(lower[i:i + 1], li, rtol=0, atol=1e-12)
        torch.testing.assert_close(upper[i:i + 1], ui, rtol=0, atol=1e-12)
        torch.testing.assert_close(m[i:i + 1], B.margin_bounds(net, x[i:i + 1], y[i:i + 1], float(eps[i])),
                                   rtol=0, atol=1e-12)


def test_stacked_and_separate_convolutions_agree(monkeypatch):
    net = tiny_nets(torch.float64)["strided"]
    x = input_for("strided", 5, torch.float64, torch.Generator().manual_seed(5))
    monkeypatch.setitem(B.STACKED_CONV, "cpu", True)
    a = B.interval_bounds(net, x, 0.07)
    monkeypatch.setitem(B.STACKED_CONV, "cpu", False)
    b = B.interval_bounds(net, x, 0.07)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=0, atol=1e-12)


@pytest.mark.parametrize("stacked", [False, True])
def test_margin_bounds_compile_fullgraph(monkeypatch, stacked):
    """torch.compile(fullgraph=True) traces the bound pass whole (float and per-sample eps, with and
    without the stacked convolution) and gives the eager margins; the data-dependent argument checks
    run in eager mode only."""
    monkeypatch.setitem(B.STACKED_CONV, "cpu", stacked)
    torch._dynamo.reset()
    net = tiny_nets(torch.float32)["cnn"]
    gen = torch.Generator().manual_seed(8)
    x = input_for("cnn", 6, torch.float32, gen)
    y = torch.randint(0, 5, (6,), generator=gen)
    fn = torch.compile(B.margin_bounds, fullgraph=True)
    with torch.no_grad():
        for eps in (0.02, torch.rand(6, generator=gen) * 0.05, 0.05):
            torch.testing.assert_close(fn(net, x, y, eps, num_classes=5), B.margin_bounds(net, x, y, eps),
                                       rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="y must lie in"):  # eager: still checked
        B.margin_bounds(net, x, y + 5, 0.02)


def test_batchnorm_in_training_mode_uses_the_centres_statistics():
    net = tiny_nets(torch.float64)["cnn"]
    bn = net[2]
    net.train()
    x = input_for("cnn", 8, torch.float64, torch.Generator().manual_seed(6))
    before = bn.running_mean.clone()
    lower, upper = B.interval_bounds(net, x, 0.0)
    assert torch.equal(bn.running_mean, before)  # no running-statistics update
    z = net(x)  # train-mode forward: normalised with the batch's statistics
    torch.testing.assert_close(lower, z, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(upper, z, rtol=1e-9, atol=1e-9)
    net.eval()


def test_gradients_flow_to_the_parameters():
    net = tiny_nets(torch.float32)["cnn"].train()
    x = input_for("cnn", 8, torch.float32, torch.Generator().manual_seed(7))
    y = torch.arange(8) % 5
    loss = F.cross_entropy(B.worst_case_logits(net, x, y, 0.05), y)
    loss.backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    net.eval()


def test_unsupported_layers_and_bad_arguments_are_named():
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.rand(3, 4)
    with pytest.raises(B.UnsupportedLayerError, match=r"no rule for Tanh \(at model\.2\); supported: .*Conv2d"):
        B.interval_bounds(net, x, 0.1)
    ok = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="eps"):
        B.interval_bounds(ok, x, -0.1)
    with pytest.raises(ValueError, match="eps"):
        B.interval_bounds(ok, x, torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="y must lie"):
        B.margin_bounds(ok, x, torch.tensor([0, 1, 2]), 0.1)
    with pytest.raises(ValueError, match="eps_max"):
        B.certified_radius(ok, x, eps_max=0.0)
    with pytest.raises(ValueError, match="tol"):
        B.certified_radius(ok, x, eps_max=0.1, tol=-1)


def test_a_registered_rule_extends_ibp():
    class Scale(nn.Module):
        def forward(self, t):
            return 2 * t

    net = nn.Sequential(nn.Flatten(), Scale(), nn.Linear(4, 2))
    B.register(Scale)(lambda m, iv, spec: B.apply_spec(B.Interval(2 * iv.c, 2 * iv.r), spec))
    try:
        lower, upper = B.interval_bounds(net, torch.rand(3, 4), 0.1)
        assert bool((lower <= upper).all())
    finally:
        B._RULES.pop(Scale)


# ------------------------------------------------------------------------------ certified radii

@pytest.fixture(scope="module")
def digits_model():
    return train_digits_model(epochs=3, seed=0)


def test_certified_radius_is_never_broken_by_pgd(digits_model):
    x, y = load_digits("test").tensors
    x, y = x[:48], y[:48]
    res = B.certified_radius(digits_model, x, y, eps_max=0.2, tol=1e-3)
    assert res.passes == math.ceil(math.log2(math.ceil(0.2 / res.step) + 1)) <= 12
    assert res.step <= 1e-3
    assert bool((res.radius >= 0).all()) and bool((res.radius <= 0.2).all())
    with torch.no_grad():
        pred = digits_model(x).argmax(1)
    assert torch.equal(res.prediction, pred)
    assert bool((res.radius[pred != y] == 0).all())
    cert = res.radius > 0
    assert int(cert.sum()) >= 10  # something to attack
    # the radius is proven: verified there, and PGD with restarts cannot break it
    assert bool(B.verified(digits_model, x[cert], y[cert], res.radius[cert]).all())
    from robustops.attacks import PGD

    atk = PGD(digits_model, eps=res.radius[cert], steps=40, restarts=5, seed=0)
    assert not bool(atk.perturb(x[cert], y[cert]).success.any())
    # the next grid point is not proven (the bisection found the edge), unless the radius is eps_max
    below_cap = cert & (res.radius < 0.2)
    nxt = torch.clamp(res.radius[below_cap] + res.step, max=0.2)
    assert not bool(B.verified(digits_model, x[below_cap], y[below_cap], nxt).any())


def test_a_sample_proven_at_eps_max_gets_eps_max_exactly(digits_model):
    """eps_max is on the grid even when it is not a multiple of the step (2/255 with tol 1e-3): samples
    IBP proves there get exactly eps_max, so the certified accuracy at eps_max counts them, and it equals
    the fraction verified() proves at eps_max directly."""
    from robustops.smoothing import certified_accuracy

    x, y = load_digits("test").tensors
    x, y = x[:64], y[:64]
    eps_max = 2 / 255  # this naturally trained model's radii are around 0.01
    res = B.certified_radius(digits_model, x, y, eps_max=eps_max, tol=1e-3)
    assert eps_max / res.step != math.floor(eps_max / res.step)
    capped = res.radius == eps_max
    proven = B.verified(digits_model, x, y, eps_max)
    assert int(capped.sum()) >= 5 and torch.equal(capped, proven)
    acc = certified_accuracy(res.radius.numpy(), (res.prediction == y).numpy(), eps_max)
    assert acc == float(proven.float().mean())
    # below the cap the radii are grid points
    below = res.radius[~capped]
    torch.testing.assert_close(below / res.step, torch.round(below / res.step), rtol=0, atol=0)


def test_certified_radius_grows_with_eps_max_and_finer_tolerance(digits_model):
    x, y = load_digits("test").tensors
    x = x[:64]
    prev = prev_cap = None
    for eps_max in (0.002, 0.005, 0.01, 0.05, 0.4):
        res = B.certified_radius(digits_model, x, eps_max=eps_max, tol=1e-3)
        r = res.radius
        assert r.dtype == torch.float64 and bool((r <= eps_max).all())
        if prev is not None:  # never smaller, except a radius at the old cap may drop to the grid point below it
            below_cap = res.step * math.floor(prev_cap / res.step)
            assert bool((r >= torch.clamp(prev, max=below_cap)).all())
        prev, prev_cap = r, eps_max
    prev = prev_step = None
    for tol in (0.05, 0.01, 3e-3, 1e-3, 1e-4):
        res = B.certified_radius(digits_model, x, eps_max=0.3, tol=tol)
        r = res.radius
        if prev is not None:
            assert bool((r >= prev).all())
            assert bool((r - prev <= prev_step + 1e-7).all())  # within the coarser grid's step
        prev, prev_step = r, res.step
    # the predicted class (y=None) is certified, so the radii are those of the label where it is right
    with torch.no_grad():
        pred = digits_model(x).argmax(1)
    r_pred = B.certified_radius(digits_model, x, eps_max=0.3).radius
    r_lab = B.certified_radius(digits_model, x, y[:64], eps_max=0.3).radius
    right = pred == y[:64]
    assert torch.equal(r_pred[right], r_lab[right])


def test_certified_radius_restores_the_mode_and_ignores_autocast(digits_model):
    x, _ = load_digits("test").tensors
    digits_model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = B.certified_radius(digits_model, x[:16], eps_max=0.1).radius
    assert digits_model.training and r.dtype == torch.float64
    digits_model.eval()
    torch.testing.assert_close(r, B.certified_radius(digits_model, x[:16], eps_max=0.1).radius)


def test_fused_linear_stack_takes_inputs_with_leading_dimensions():
    # the fused Linear + ReLU path on [B, T, D] (a sequence MLP) equals the same stack on the flattened
    # [B * T, D] rows: the bias-with-a-fused-ReLU branch is a matrix product over any leading dims
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.rand(2, 3, 4)
    out = B.propagate(m, B.Interval(x, torch.full_like(x, 0.05)))
    ref = B.propagate(m, B.Interval(x.flatten(0, 1), torch.full((6, 4), 0.05)))
    assert out.c.shape == (2, 3, 3)
    torch.testing.assert_close(out.lower.flatten(0, 1), ref.lower, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.upper.flatten(0, 1), ref.upper, rtol=0, atol=1e-6)
