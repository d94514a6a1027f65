"""Kireev et al. (UAI 2022): the LPIPS distance of robustops.train.perceptual against the lpips package's own
formulation, RLAT's relaxed attack on closed-form toys (its layer-wise step, the linearised-LPIPS step of a
frozen network), gaussian's --sigma-dist uniform:MAX, exact resume of both, and their errors."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import one_thread, resume_matches_uninterrupted, tiny_cnn  # noqa: F401 (one_thread: autouse)
from torch.utils.data import DataLoader, Subset

from robustops import ops
from robustops import train as rt
from robustops.data import load_digits
from robustops.models import get_model, save_checkpoint
from robustops.train.methods.gaussian import parse_sigma_dist
from robustops.train.methods.rlat import layer_radii, linearised_lpips_step, relaxed_perturbations
from robustops.train.perceptual import (PerceptualDistance, feature_modules, feature_taps, load_feature_net,
                                        lpips_distance)


@pytest.fixture(scope="module")
def digits():
    return load_digits("train"), load_digits("test")


@pytest.fixture(scope="module")
def feature_net(tmp_path_factory):
    """A digits small_cnn checkpoint, the frozen feature network of the --rlat-net tests."""
    torch.manual_seed(1)
    path = str(tmp_path_factory.mktemp("net") / "net.pt")
    return save_checkpoint(path, get_model("small_cnn", in_channels=1, input_size=8), "small_cnn",
                           {"in_channels": 1, "input_size": 8})


# --------------------------------------------------------------------------- the LPIPS distance

def test_lpips_distance_is_the_lpips_packages_formulation():
    lpips = pytest.importorskip("lpips")
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4, 5, 5), (3, 6, 3, 3), (3, 8)]
    f0 = [torch.randn(s, generator=g) for s in shapes]
    f1 = [torch.randn(s, generator=g) for s in shapes]
    w = [torch.rand(s[1], generator=g) for s in shapes]

    def package(weights):
        total = 0
        for i, (a, b) in enumerate(zip(f0, f1)):
            a, b = a.reshape(*a.shape[:2], 1, 1) if a.dim() == 2 else a, b.reshape(*b.shape[:2], 1, 1) if b.dim() == 2 else b
            diff = (lpips.normalize_tensor(a) - lpips.normalize_tensor(b)) ** 2
            if weights is None:  # the package's lpips=False mode
                total = total + lpips.spatial_average(diff.sum(dim=1, keepdim=True), keepdim=True)
            else:  # its learned layer: a 1x1 convolution without bias
                lin = lpips.NetLinLayer(a.shape[1], use_dropout=False)
                lin.model[-1].weight.data = weights[i].view(1, -1, 1, 1)
                total = total + lpips.spatial_average(lin(diff), keepdim=True)
        return total.flatten()

    torch.testing.assert_close(lpips_distance(f0, f1), package(None))
    torch.testing.assert_close(lpips_distance(f0, f1, w), package(w).detach())
    assert torch.equal(lpips_distance(f0, f0), torch.zeros(3))


def test_perceptual_distance_on_a_trained_network(feature_net):
    net = load_feature_net(feature_net)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    metric = PerceptualDistance(net).train()  # stays in eval mode
    assert not metric.net.training and len(metric.layers) == 2  # the small_cnn's two convolutions
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(metric(x, x), torch.zeros(4))
    d = metric(x, (x + 0.1 * torch.randn_like(x)).clamp(0, 1))
    assert (d > 0).all() and d.shape == (4,)


# --------------------------------------------------------------------------- the relaxed attack

class LinearToy(nn.Module):
    """A 1x1 convolution (no bias) then a linear layer: the layer gradients have closed forms."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(2, 3, 1, bias=False)
        self.fc = nn.Linear(3 * 2 * 2, 4)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


def test_relaxed_step_is_the_normalised_gradient_of_each_layer():
    net = LinearToy()
    x = 0.4 + 0.2 * torch.rand(5, 2, 2, 2)  # inside [0, 1]: the box does not bite at this radius
    y = torch.tensor([0, 1, 2, 3, 0])
    deltas = relaxed_perturbations(net, feature_modules(net), x, y, eps=0.01, steps=1, lo=0.0, hi=1.0)
    radii = layer_radii(0.01, [8, 12])
    assert radii == pytest.approx([0.01, 0.01 * 12 / 8 / 2])
    # closed form: dCE/dlogits = (softmax - onehot) / B; through fc to the features; through the 1x1 kernel K
    p = torch.softmax(net(x), 1) - F.one_hot(y, 4)
    g1 = (p @ net.fc.weight).view(5, 3, 2, 2)
    g0 = torch.einsum("oc,bohw->bchw", net.conv.weight[:, :, 0, 0], g1)
    for d, g, r in zip(deltas, (g0, g1), radii):
        expected = r * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        torch.testing.assert_close(d, expected, rtol=1e-5, atol=1e-7)
    # the perturbed forward's loss is higher; more steps stay in every ball
    clean = F.cross_entropy(net(x), y)
    with torch.no_grad():
        h = net.conv((x + deltas[0]).clamp(0, 1)) + deltas[1]
        assert F.cross_entropy(net.fc(h.flatten(1)), y) > clean
    many = relaxed_perturbations(net, feature_modules(net), x, y, eps=0.01, steps=4, lo=0.0, hi=1.0)
    for d, r in zip(many, radii):
        assert (d.flatten(1).norm(dim=1) <= r * (1 + 1e-5)).all()


def test_linearised_lpips_step_solves_the_quadratic_ball():
    """The first-order maximiser in {delta^T (M + r I) delta <= eps^2}, M half the Hessian of d at 0: exact
    with as many CG steps as dimensions (M here built densely by autograd)."""
    metric = PerceptualDistance(nn.Sequential(nn.Conv2d(1, 3, 1), nn.Conv2d(3, 2, 1)))
    x = torch.rand(2, 1, 2, 2)
    grad = torch.randn(2, 1, 2, 2)
    delta = linearised_lpips_step(metric, x, grad, eps=0.3, ridge=0.05, cg_steps=4)
    for b in range(2):
        H = torch.autograd.functional.hessian(lambda v: metric(x[b:b + 1], x[b:b + 1] + v.view(1, 1, 2, 2)).sum(),
                                              torch.zeros(4))
        A = 0.5 * H + 0.05 * torch.eye(4)
        u = torch.linalg.solve(A, grad[b].flatten())
        expected = 0.3 * u / (grad[b].flatten() @ u).sqrt()
        torch.testing.assert_close(delta[b].flatten(), expected, rtol=1e-3, atol=1e-5)
        assert (delta[b].flatten() @ A @ delta[b].flatten()).item() == pytest.approx(0.09, rel=1e-3)


# --------------------------------------------------------------------------- gaussian --sigma-dist

def test_sigma_dist_draws_per_sample_in_range_and_the_default_is_unchanged():
    seeds = iter([11, 12, 13])
    got = {}
    for dist in ("uniform:0.5", "fixed"):
        tr = rt.Trainer(tiny_cnn(0, width=4), method="gaussian", epochs=1, steps_per_epoch=1, sigma_dist=dist)
        tr.method.ctx.seed = lambda: next(seeds)
        tr.method.ctx.natural_step = lambda xn, y, dist=dist: got.setdefault(dist, xn)
        tr.method.step(torch.full((6, 1, 8, 8), 0.5), torch.zeros(6, dtype=torch.long))
    x = torch.full((6, 1, 8, 8), 0.5)
    sigma = torch.rand(6, generator=torch.Generator().manual_seed(11), dtype=torch.float64).float() * 0.5
    unit = ops.gaussian_noise(torch.zeros_like(x), 1, 1.0, seed=12)
    torch.testing.assert_close(got["uniform:0.5"], x + sigma.view(-1, 1, 1, 1) * unit)
    assert (sigma >= 0).all() and (sigma <= 0.5).all() and len(set(sigma.tolist())) == 6
    assert torch.equal(got["fixed"], ops.gaussian_noise(x, 1, 0.25, seed=13))
    assert parse_sigma_dist("uniform:0.5") == 0.5 and parse_sigma_dist("fixed") is None


@pytest.mark.parametrize("spec", ["uniform", "uniform:", "uniform:-1", "uniform:0", "uniform:inf", "gauss:0.5",
                                  "uniform:abc", ""])
def test_bad_sigma_dist_is_refused(spec):
    with pytest.raises(ValueError, match="sigma_dist"):
        rt.Trainer(tiny_cnn(0, width=4), method="gaussian", epochs=1, steps_per_epoch=1, sigma_dist=spec)


def test_rlat_net_errors(tmp_path):
    with pytest.raises(ValueError, match="rlat_net: no feature-network file"):
        rt.Trainer(tiny_cnn(0, width=4), method="rlat", epochs=1, steps_per_epoch=1, rlat_net=str(tmp_path / "no.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_text("not a model")
    with pytest.raises(ValueError, match="rlat_net: cannot load"):
        rt.Trainer(tiny_cnn(0, width=4), method="rlat", epochs=1, steps_per_epoch=1, rlat_net=str(bad))
    with pytest.raises(ValueError, match="rlat_net"):
        rt.Trainer(tiny_cnn(0, width=4), method="rlat", epochs=1, steps_per_epoch=1, rlat_net="")


def test_lpips_features_stay_conv2d_on_a_video_net():
    # feature_taps taps Conv3d (sat on video models); LPIPS keeps Conv2d: a clear error, not [B, T] distances
    video = get_model("video_cnn", input_size=8, frames=2)
    assert feature_taps(video) and all(not isinstance(m, nn.Conv2d) for m in feature_taps(video))
    with pytest.raises(ValueError, match="no Conv2d whose features LPIPS"):
        PerceptualDistance(video)
    five = [torch.rand(2, 3, 2, 4, 4)]
    with pytest.raises(ValueError, match=r"feats0/feats1 layer 0: LPIPS compares \[B, C, H, W\]"):
        lpips_distance(five, five)


def test_cli_flags_parse():
    from robustops.cli import build_parser

    args = build_parser("train").parse_args(["train", "--method", "gaussian", "--sigma-dist", "uniform:0.5", "--rlat-net",
                                             "f.pt", "--rlat-eps", "0.1"])
    assert (args.sigma_dist, args.rlat_net, args.rlat_eps) == ("uniform:0.5", "f.pt", 0.1)


# --------------------------------------------------------------------------- exact resume

@pytest.mark.parametrize("method,extra", [("gaussian", {"sigma_dist": "uniform:0.5"}), ("rlat", {"rlat_steps": 2}),
                                          ("rlat", "net")])
def test_resume_matches_uninterrupted(digits, tmp_path, feature_net, method, extra):
    train_ds, test_ds = digits
    sub = Subset(train_ds, list(range(96)))
    val = DataLoader(Subset(test_ds, list(range(32))), batch_size=32)
    hp = dict(epochs=2, seed=3, progress=False, verbose=False)
    hp.update({"rlat_net": feature_net, "rlat_cg": 3} if extra == "net" else extra)
    ref, res, crash = resume_matches_uninterrupted(method, sub, val, tmp_path, hp, crash_after=lambda n: n + 1,
                                                   width=4, weights_only=False)
    assert crash["epoch"] == 1 and res.epochs_run == ref.epochs_run == 2
    if method == "gaussian":
        assert crash["sigma_dist"] == "uniform:0.5"
