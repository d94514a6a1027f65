"""robustops.models.CNN7, the IBP benchmark network: its shapes, its parameter count (counted by hand
below), its registry name, and interval bounds through it (exact at eps = 0, enclosing sampled points
of a small box, with stacked and with separate convolutions; the fused blocks of a Sequential equal the
layer rules, gradients included, and the cached |W| follows weight updates)."""
import pytest
import torch
import torch.nn as nn

from robustops import bounds as B
from robustops import models as M


def cnn7_params(in_channels, num_classes, input_size):
    """Parameters of CNN-7 counted layer by layer: conv weights + biases, two per BatchNorm channel."""
    convs = [(in_channels, 64), (64, 64), (64, 128), (128, 128), (128, 128)]
    n = sum(cin * cout * 9 + cout + 2 * cout for cin, cout in convs)
    side = (input_size + 1) // 2
    n += 128 * side * side * 512 + 512 + 2 * 512  # linear(512) and its BatchNorm1d
    n += 512 * num_classes + num_classes
    return n


def with_bn_stats(model, seed=0):
    """Non-trivial BatchNorm running statistics and affine parameters (negative scales included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=gen) * 3 - 1.5)
                m.bias.copy_(torch.rand(c, generator=gen) - 0.5)
                m.running_mean.copy_(torch.rand(c, generator=gen) * 0.6 - 0.3)
                m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
    return model.eval()


def test_shapes_and_parameter_count():
    torch.manual_seed(0)
    m = M.CNN7().eval()
    assert isinstance(m.net, nn.Sequential)
    with torch.no_grad():
        assert m(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert sum(p.numel() for p in m.parameters()) == cnn7_params(3, 10, 32) == 17_192_650
    mnist = M.CNN7(in_channels=1, num_classes=10, input_size=28).eval()
    with torch.no_grad():
        assert mnist(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    assert sum(p.numel() for p in mnist.parameters()) == cnn7_params(1, 10, 28) == 13_259_338
    odd = M.CNN7(in_channels=2, num_classes=4, input_size=15).eval()  # the stride-2 conv rounds up
    with torch.no_grad():
        assert odd(torch.rand(2, 2, 15, 15)).shape == (2, 4)
    with pytest.raises(ValueError, match="input_size"):
        M.CNN7(input_size=0)


def test_registry():
    assert "cnn7" in M.MODEL_NAMES
    m = M.get_model("cnn7")
    assert isinstance(m, M.CNN7)
    assert sum(p.numel() for p in m.parameters()) == cnn7_params(3, 10, 32)
    m = M.get_model("CNN-7", in_channels=1, num_classes=4, input_size=28).eval()
    with torch.no_grad():
        assert m(torch.rand(2, 1, 28, 28)).shape == (2, 4)
    wrapped = M.get_model("cnn7", input_size=8, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))
    assert isinstance(wrapped[0], M.Normalize) and isinstance(wrapped[1], M.CNN7)
    assert "CNN7" in B.supported()


@pytest.mark.parametrize("stacked", [False, True])
def test_bounds_at_zero_eps_equal_the_forward(monkeypatch, stacked):
    monkeypatch.setitem(B.STACKED_CONV, "cpu", stacked)
    torch.manual_seed(0)
    m = with_bn_stats(M.CNN7())
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        ref = m(x)
        lower, upper = B.interval_bounds(m, x, 0.0)
    scale = ref.abs().max()
    torch.testing.assert_close(lower, ref, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(upper, ref, rtol=0, atol=1e-5 * scale)
    assert bool((upper - lower).abs().max() <= 1e-5 * scale)


@pytest.mark.parametrize("stacked", [False, True])
def test_sampled_points_lie_within_the_bounds(monkeypatch, stacked):
    monkeypatch.setitem(B.STACKED_CONV, "cpu", stacked)
    torch.manual_seed(1)
    m = with_bn_stats(M.CNN7(input_size=16), seed=1).double()
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(3, 3, 16, 16, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 4, 9])
    eps = torch.tensor([1e-3, 3e-3, 0.0], dtype=torch.float64)  # per-sample radii, one zero
    with torch.no_grad():
        lower, upper = B.interval_bounds(m, x, eps)
        margin = B.margin_bounds(m, x, y, eps)
        n = 64
        e = eps.view(-1, 1, 1, 1, 1)
        noise = torch.rand((3, n, 3, 16, 16), generator=gen, dtype=torch.float64) * 2 - 1
        noise[:, : n // 2] = noise[:, : n // 2].sign()  # half of them at corners of the box
        pts = (x.unsqueeze(1) + e * noise).clamp(0, 1)
        out = m(pts.reshape(-1, 3, 16, 16)).reshape(3, n, -1)
    tol = 1e-9 * (1 + out.abs().max())
    assert bool((out >= lower.unsqueeze(1) - tol).all()) and bool((out <= upper.unsqueeze(1) + tol).all())
    assert bool((upper - lower)[:2].min() > 0)  # a box of positive size gives intervals of positive width
    margins = out.gather(2, y.view(3, 1, 1).expand(3, n, 1)) - out  # z_y - z_j at the samples
    assert bool((margins >= margin.unsqueeze(1) - tol).all())
    # the elided margin is never looser than the difference of the logit bounds
    naive = lower.gather(1, y.view(-1, 1)) - upper
    assert bool((margin >= naive - tol).all())


def layer_by_layer(model, x, y, eps, bn):
    """The margin bounds through the layer rules one child at a time (no fused blocks): the reference of
    the fused path, the last Linear elided in the same way."""
    iv = B.input_box(x, eps)
    if bn == "centre" or not B.batch_statistics(model):  # no clean tensor: the centre rule
        iv = B.Interval(iv.c, iv.r)
    layers = list(model.net)
    for m in layers[:-1]:
        iv = B.propagate(m, iv)
    return B.propagate(layers[-1], iv, B.margin_spec(y, 10, torch.float64)).lower


@pytest.mark.parametrize("mode,bn,stacked", [("eval", "clean", False), ("eval", "clean", True),
                                             ("train", "clean", False), ("train", "centre", True)])
def test_fused_blocks_equal_the_layer_rules_with_gradients(monkeypatch, stacked, mode, bn):
    monkeypatch.setitem(B.STACKED_CONV, "cpu", stacked)
    torch.manual_seed(3)
    m = with_bn_stats(M.CNN7(input_size=8), seed=3).double().train(mode == "train")
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(4, 3, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.tensor([1, 0, 7, 3])
    grads = []
    for fn in (lambda: B.margin_bounds(m, x, y, 0.01, num_classes=10, bn=bn),
               lambda: layer_by_layer(m, x, y, 0.01, bn)):
        m.zero_grad()
        out = fn()
        (out * torch.linspace(0.5, 1.5, 10, dtype=torch.float64)).sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in m.parameters()]))
    (fused, g1), (ref, g0) = grads
    torch.testing.assert_close(fused, ref, rtol=1e-10, atol=1e-10 * float(ref.abs().max()))
    scale = max(float(g.abs().max()) for g in g0)  # conv biases before batch statistics: zero up to rounding
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10 * scale)


def test_the_cached_abs_weight_follows_weight_updates():
    """Without a graph |W| of a Linear is kept between calls: an in-place update of W must refresh it."""
    torch.manual_seed(5)
    m = with_bn_stats(M.CNN7(input_size=8), seed=5)
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        B.interval_bounds(m, x, 0.01)  # fills the cache
        m.net[16].weight.mul_(-2.0)
        lower, upper = B.interval_bounds(m, x, 0.01)
    ref_l, ref_u = B.interval_bounds(m, x, 0.01)  # with a graph: |W| computed afresh
    torch.testing.assert_close(lower, ref_l.detach(), rtol=0, atol=0)
    torch.testing.assert_close(upper, ref_u.detach(), rtol=0, atol=0)
    with torch.no_grad():
        m.net[16].weight.div_(-2.0)
        assert not torch.equal(B.interval_bounds(m, x, 0.01)[1], upper)
