"""CROWN / CROWN-IBP (robustops.crown) against an independent float64 reference written with dense matrices
(auto_LiRPA 0.7.1 is not installable here: only 0.2 / 0.3 are on the registry), soundness by sampling,
the best-of bound and radius, the digits PGD model's radii, the CLI and the errors."""
import json
import math

import pytest
import torch
import torch.nn as nn

from robustops import bounds, crown
from robustops.models import Normalize

from helpers import train_pgd_digits_model

# ------------------------------------------------------------------ the reference: dense matrices


def _leaves(model):
    if isinstance(model, nn.Sequential):
        return [m for child in model for m in _leaves(child)]
    return [model]


def _dense(m, shape):
    """(W, b) of an affine layer: its images of 0 and of the identity basis."""
    n = math.prod(shape)
    with torch.no_grad():
        f0 = m(torch.zeros(1, *shape, dtype=torch.float64)).reshape(-1)
        basis = m(torch.eye(n, dtype=torch.float64).reshape(n, *shape)).reshape(n, -1)
    return (basis - f0).T, f0


def _members(m, shape):
    """P[o, i] = 1 where input i lies in output o's pooling window (the pool of the basis vectors)."""
    n = math.prod(shape)
    with torch.no_grad():
        return (m(torch.eye(n, dtype=torch.float64).reshape(n, *shape)).reshape(n, -1).T > 0.5).double()


def _pool_bounds(P, l, u):
    big = torch.full_like(P, -math.inf)
    return torch.where(P > 0, l, big).amax(1), torch.where(P > 0, u, big).amax(1)


class Reference:
    """One input at a time; every layer a dense matrix, a ReLU's relaxation a diagonal, a max pool's a
    selection matrix."""

    def __init__(self, model, shape):
        self.layers = []
        for m in _leaves(model):
            if isinstance(m, nn.ReLU):
                self.layers.append(("relu", None, shape))
                continue
            if isinstance(m, nn.MaxPool2d):
                self.layers.append(("pool", _members(m, shape), shape))
            else:
                self.layers.append(("affine", _dense(m, shape), shape))
            with torch.no_grad():
                shape = tuple(m(torch.zeros(1, *shape, dtype=torch.float64)).shape[1:])

    def relaxation(self, kind, data, l, u):
        if kind == "relu":
            uns = (l < 0) & (u > 0)
            s = torch.where(uns, u / torch.where(uns, u - l, torch.ones_like(u)), (l >= 0).double())
            a = torch.where(uns, (u >= -l).double(), (l >= 0).double())
            return torch.diag(a), torch.diag(s), torch.where(uns, -s * l, torch.zeros_like(l))
        P = data
        lo_sel = torch.zeros_like(P)
        cand = torch.where(P > 0, l, torch.full_like(P, -math.inf))
        lo_sel[torch.arange(P.shape[0]), cand.argmax(1)] = 1.0
        l_star = (lo_sel * l).sum(1)
        others = torch.where((P > 0) & (lo_sel == 0), u, torch.full_like(P, -math.inf)).amax(1)
        tight = l_star >= others
        up_sel = lo_sel * tight.double().unsqueeze(1)
        return lo_sel, up_sel, torch.where(tight, torch.zeros_like(l_star), _pool_bounds(P, l, u)[1])

    def lower(self, upto, lam, relax, xl, xu):
        const = torch.zeros(lam.shape[0], dtype=torch.float64)
        for i in range(upto - 1, -1, -1):
            kind, data, _ = self.layers[i]
            if kind == "affine":
                const = const + lam @ data[1]
                lam = lam @ data[0]
            else:
                lo_m, up_m, up_c = relax[i]
                pos, neg = lam.clamp(min=0), lam.clamp(max=0)
                const = const + neg @ up_c
                lam = pos @ lo_m + neg @ up_m
        return const + lam.clamp(min=0) @ xl + lam.clamp(max=0) @ xu

    def ibp(self, upto, xl, xu):
        for kind, data, _ in self.layers[:upto]:
            if kind == "affine":
                W, b = data
                c, r = W @ ((xl + xu) / 2) + b, W.abs() @ ((xu - xl) / 2)
                xl, xu = c - r, c + r
            elif kind == "relu":
                xl, xu = xl.clamp(min=0), xu.clamp(min=0)
            else:
                xl, xu = _pool_bounds(data, xl, xu)
        return xl, xu

    def margins(self, x, y, eps, method, lo=0.0, hi=1.0):
        xl, xu = (x - eps).clamp(lo, hi).reshape(-1), (x + eps).clamp(lo, hi).reshape(-1)
        relax, prev = {}, None
        for i, (kind, data, shape) in enumerate(self.layers):
            if kind == "affine":
                continue
            if method == "crown-ibp":
                l, u = self.ibp(i, xl, xu)
            elif i > 0 and self.layers[i - 1][0] != "affine":
                l, u = prev[0].clamp(min=0), prev[1].clamp(min=0)  # only ReLU -> pool here
            else:
                n = math.prod(shape)
                eye = torch.eye(n, dtype=torch.float64)
                l, u = self.lower(i, eye, relax, xl, xu), -self.lower(i, -eye, relax, xl, xu)
                il, iu = self.ibp(i, xl, xu)
                l, u = torch.max(l, il), torch.min(u, iu)
            relax[i], prev = self.relaxation(kind, data, l, u), (l, u)
        k = self.layers[-1][1][0].shape[0]
        spec = torch.eye(k, dtype=torch.float64)[y] - torch.eye(k, dtype=torch.float64)
        return self.lower(len(self.layers), spec, relax, xl, xu)


def _mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(),
                         nn.Linear(10, 4)).double().eval()


def _convnet(pool):
    torch.manual_seed(2)
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.3, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    side = 2 if pool.stride == 2 else 4
    return nn.Sequential(Normalize(0.4, 0.3), nn.Conv2d(1, 3, 3, stride=2, padding=1), bn, nn.ReLU(),
                         nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), pool, nn.Flatten(),
                         nn.Sequential(nn.Linear(4 * side * side, 8), nn.ReLU(), nn.Dropout(0.5)),
                         nn.Linear(8, 5)).double().eval()


NETS = {"mlp": (_mlp, (1, 2, 3)),
        "conv_pool2": (lambda: _convnet(nn.MaxPool2d(2)), (1, 8, 8)),
        "conv_pool3_overlap": (lambda: _convnet(nn.MaxPool2d(3, stride=1, padding=1)), (1, 8, 8))}


@pytest.fixture(scope="module", params=sorted(NETS))
def net(request):
    make, shape = NETS[request.param]
    model = make()
    g = torch.Generator().manual_seed(3)
    x = torch.rand(4, *shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    eps = torch.tensor([0.01, 0.03, 0.06, 0.15], dtype=torch.float64)
    return model, x, y, eps


@pytest.mark.parametrize("method", ["crown", "crown-ibp"])
def test_bounds_equal_the_dense_reference(net, method):
    model, x, y, eps = net
    ref = Reference(model, tuple(x.shape[1:]))
    got = crown.margin_bounds(model, x, y, eps, method=method)
    want = torch.stack([ref.margins(x[b], int(y[b]), float(eps[b]), method) for b in range(x.shape[0])])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    assert (got.gather(1, y.view(-1, 1)) == 0).all()


@pytest.mark.parametrize("method", ["crown", "crown-ibp", "best"])
def test_bounds_are_sound_on_samples_and_corners(net, method):
    model, x, y, eps = net
    m = crown.margin_bounds(model, x, y, eps, method=method).detach()
    g = torch.Generator().manual_seed(4)
    for b in range(x.shape[0]):
        pts = x[b] + (torch.rand(2000, *x.shape[1:], generator=g, dtype=torch.float64) * 2 - 1) * eps[b]
        if x[0].numel() <= 8:  # every corner of the box
            signs = torch.cartesian_prod(*[torch.tensor([-1.0, 1.0], dtype=torch.float64)] * x[0].numel())
            pts = torch.cat([pts, x[b] + signs.reshape(-1, *x.shape[1:]) * eps[b]])
        with torch.no_grad():
            z = model(pts.clamp(0, 1))
        margins = z[:, int(y[b])].unsqueeze(1) - z
        assert (margins >= m[b] - 1e-9).all(), (method, b)


def test_best_is_at_least_ibp_and_crown(net):
    model, x, y, eps = net
    best = crown.margin_bounds(model, x, y, eps, method="best")
    assert (best >= bounds.margin_bounds(model, x, y, eps)).all()
    assert (best >= crown.margin_bounds(model, x, y, eps, method="crown")).all()


def test_best_radius_is_at_least_ibps_on_every_input(net):
    model, x, y, _ = net
    ibp = bounds.certified_radius(model, x, eps_max=0.5, tol=1 / 64)
    best = bounds.certified_radius(model, x, eps_max=0.5, tol=1 / 64, bound="best")
    assert (best.radius >= ibp.radius).all()
    # every returned radius is verified (bisection never returns an unproven radius)
    pos = best.radius > 0
    if pos.any():
        assert crown.verified(model, x[pos], best.prediction[pos], best.radius[pos].to(x.dtype), method="best").all()


def test_pgd_digits_model_crown_radius_beats_ibp():
    from robustops.data import load_digits

    model = train_pgd_digits_model(epochs=6, eps=0.2)
    x, y = load_digits("test").tensors
    x, y = x[:8], y[:8]  # full CROWN is quadratic in depth: a few inputs, a coarse grid (the model is cached)
    radii = {b: bounds.certified_radius(model, x, y, eps_max=0.2, tol=1 / 64, bound=b).radius.mean().item()
             for b in ("ibp", "crown-ibp", "crown")}
    print("mean certified radius on 8 digits (PGD model):", json.dumps(radii))
    assert radii["crown"] > radii["ibp"] and radii["crown-ibp"] >= radii["ibp"]


def test_unsupported_layer_and_bad_arguments():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.rand(2, 1, 2, 2), torch.tensor([0, 1])
    with pytest.raises(bounds.UnsupportedLayerError, match=r"Tanh \(at model.2\)"):
        crown.margin_bounds(model, x, y, 0.1)
    with pytest.raises(ValueError, match="method must be one of"):
        crown.margin_bounds(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), x, y, 0.1, method="alpha")
    bn = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).train()
    with pytest.raises(bounds.UnsupportedLayerError, match="training mode"):
        crown.margin_bounds(bn, x, y, 0.1)
    with pytest.raises(ValueError, match="bound must be one of"):
        bounds.certified_radius(model, x, eps_max=0.1, bound="nope")
    big = nn.Sequential(nn.Flatten(), nn.Linear(4, 20001), nn.ReLU(), nn.Linear(20001, 2))
    with pytest.raises(ValueError, match="crown-ibp"):
        crown.margin_bounds(big, x, y, 0.1)


def test_cli_certify_method_crown_writes_rows(tmp_path):
    from robustops.cli import main
    from robustops.models import get_model, save_checkpoint

    torch.manual_seed(0)
    ckpt = save_checkpoint(str(tmp_path / "m.pt"), get_model("small_cnn", 10, 1, 8), "small_cnn",
                           {"num_classes": 10, "in_channels": 1, "input_size": 8}, eps=0.05, norm="linf")
    out = tmp_path / "r.tsv"
    assert main(["certify", "--checkpoint", ckpt, "--method", "crown", "--tol", "0.01", "--skip", "60",
                 "-o", str(out), "--no-progress"]) == 0
    rows = out.read_text().splitlines()
    assert rows[0].split("\t")[:4] == ["idx", "label", "predict", "radius"] and len(rows) > 1


def test_crown_ibp_training_schedule_loss_and_steps():
    from robustops import train as rt

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    tr = rt.Trainer(net, method="crown_ibp", epochs=2, eps=0.2, warmup=0.1, ramp=0.5, steps_per_epoch=10)
    m = tr.method
    assert m.schedule_values(0.05) == (0.0, 1.0, 1.0)                  # warm-up: clean loss, beta 1
    eps, kappa, beta = m.schedule_values(0.35)                           # half-way up the ramp
    assert (eps, kappa, beta) == (pytest.approx(0.5 * 1.1 * 0.2), pytest.approx(0.75), pytest.approx(0.5))
    assert m.schedule_values(1.0)[2] == 0.0
    x, y = torch.rand(8, 4), torch.randint(0, 3, (8,))
    want = 0.5 * crown.margin_bounds(net, x, y, eps, method="crown-ibp") + 0.5 * bounds.margin_bounds(net, x, y, eps)
    torch.testing.assert_close(m.margins(x, y, eps, beta, 3), want)
    before = [p.detach().clone() for p in net.parameters()]
    for _ in range(8):  # through the warm-up into the ramp: both bound passes run and back-propagate
        tr.train_step(x, y)
    assert all(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert all(torch.isfinite(p).all() for p in net.parameters())
    bn = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    with pytest.raises(bounds.UnsupportedLayerError, match="BatchNorm1d in training mode"):
        rt.Trainer(bn, method="crown_ibp", epochs=1, eps=0.2, steps_per_epoch=2).train_step(x, y)
