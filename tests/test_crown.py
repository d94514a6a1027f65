"""CROWN / CROWN-IBP (robustops.crown) against an independent float64 reference written with dense matrices
(auto_LiRPA 0.7.1 is not installable here: only 0.2 / 0.3 are on the registry), soundness by sampling,
the best-of bound and radius, the digits PGD model's radii, the CLI and the errors."""
import json
import math

import pytest
import torch
import torch.nn as nn

from robustops import bounds, crown
from robustops import models as M
from robustops.models import Normalize

from helpers import one_thread, resume_matches_uninterrupted, tiny_cnn, train_pgd_digits_model  # noqa: F401 (one_thread: an autouse fixture)

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


def _equals_reference(ref_class, net, method):
    """crown.margin_bounds on the batch == the reference's, input by input (1e-6 relative); returns them."""
    model, x, y, eps = net
    ref = ref_class(model, tuple(x.shape[1:]))
    got = crown.margin_bounds(model, x, y, eps, method=method)
    want = torch.stack([ref.margins(x[b], int(y[b]), float(eps[b]), method) for b in range(x.shape[0])])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    return got


@pytest.mark.parametrize("method", ["crown", "crown-ibp"])
def test_bounds_equal_the_dense_reference(net, method):
    got = _equals_reference(Reference, net, method)
    assert (got.gather(1, net[2].view(-1, 1)) == 0).all()


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

    # the PGD model is the one test_autoattack and test_evaluate_cli train (cached per process); full CROWN
    # is quadratic in depth: 4 inputs on the coarse grid {0, 1/32, 1/16} (2 bound passes per bound)
    model = train_pgd_digits_model(epochs=6, eps=0.2)
    x, y = load_digits("test").tensors
    x, y = x[:4], y[:4]
    radii = {b: bounds.certified_radius(model, x, y, eps_max=1 / 16, tol=1 / 32, bound=b).radius.mean().item()
             for b in ("ibp", "crown-ibp", "crown")}
    print("mean certified radius on 4 digits (PGD model):", json.dumps(radii))
    # measured (torch 2.14, CPU): ibp 0, crown-ibp 0, crown 0.0234 (3 of 4 inputs at 1/32)
    assert radii["crown"] > radii["ibp"] and radii["crown-ibp"] >= radii["ibp"]


def test_unsupported_layer_and_bad_arguments():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.rand(2, 1, 2, 2), torch.tensor([0, 1])
    with pytest.raises(bounds.UnsupportedLayerError, match=r"Tanh \(at model.2\)"):
        crown.margin_bounds(model, x, y, 0.1)
    with pytest.raises(ValueError, match="method must be one of"):
        crown.margin_bounds(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), x, y, 0.1, method="alpha")
    bn = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).train()
    with pytest.raises(ValueError, match='bn must be "clean" for CROWN'):
        crown.margin_bounds(bn, x, y, 0.1, bn="centre")
    for bound in ("crown", "crown-ibp", "best"):  # the radius search passes its bn rule to every verifier
        with pytest.raises(ValueError, match='bn must be "clean" for CROWN'):
            bounds.certified_radius(bn, x, y, eps_max=0.1, mode="train", bn="centre", bound=bound)
    with pytest.raises(ValueError, match="bn must be one of"):
        crown.margin_bounds(bn, x, y, 0.1, bn="running")
    with pytest.raises(ValueError, match="bound must be one of"):
        bounds.certified_radius(model, x, eps_max=0.1, bound="nope")
    big = nn.Sequential(nn.Flatten(), nn.Linear(4, 20001), nn.ReLU(), nn.Linear(20001, 2))
    with pytest.raises(ValueError, match="crown-ibp"):
        crown.margin_bounds(big, x, y, 0.1)


@pytest.mark.parametrize("method", ["crown", "crown-ibp", "best"])
def test_cli_certify_method_crown_writes_rows(tmp_path, method):
    from robustops.cli import main
    from robustops.models import get_model, save_checkpoint

    torch.manual_seed(0)
    ckpt = save_checkpoint(str(tmp_path / "m.pt"), get_model("small_cnn", 10, 1, 8), "small_cnn",
                           {"num_classes": 10, "in_channels": 1, "input_size": 8}, eps=0.05, norm="linf")
    out = tmp_path / "r.tsv"
    assert main(["certify", "--checkpoint", ckpt, "--method", method, "--tol", "0.01", "--skip", "60",
                 "-o", str(out), "--no-progress"]) == 0
    rows = out.read_text().splitlines()
    assert rows[0].split("\t")[:4] == ["idx", "label", "predict", "radius"] and len(rows) > 1
    import json

    assert json.load(open(str(out) + ".json"))["settings"]["method"] == method


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
    with pytest.raises(ValueError, match='bn must be "clean" for CROWN'):
        tr = rt.Trainer(bn, method="crown_ibp", epochs=1, eps=0.2, warmup=0.0, ramp=0.5, bn="centre", beta_end=1.0,
                        steps_per_epoch=2)
        for _ in range(2):  # the first step is at eps 0 (no bound pass)
            tr.train_step(x, y)


# ------------------------------------------------ residual networks: a DAG reference, one input at a time

class DagReference:
    """The network as a DAG of dense pieces (input, affine (W, b), relu, add), written from the models'
    forward()s; CROWN's backward pass accumulates each node's coefficients over its consumers in reverse
    topological order (the implementation recurses over a tree instead)."""

    def __init__(self, model, shape):
        self.nodes, self.shapes = [("input", None, ())], [tuple(shape)]
        self.out = self.build(model, 0)

    def push(self, kind, data, srcs, shape):
        self.nodes.append((kind, data, srcs))
        self.shapes.append(tuple(shape))
        return len(self.nodes) - 1

    def affine(self, fn, src):
        with torch.no_grad():
            shape = fn(torch.zeros(1, *self.shapes[src], dtype=torch.float64)).shape[1:]
        return self.push("affine", _dense(fn, self.shapes[src]), (src,), shape)

    def relu(self, src):
        return self.push("relu", None, (src,), self.shapes[src])

    def add(self, a, b):
        return self.push("add", None, (a, b), self.shapes[a])

    def build(self, m, src):
        if isinstance(m, nn.Sequential):
            for child in m:
                src = self.build(child, src)
            return src
        if isinstance(m, nn.ReLU):
            return self.relu(src)
        if isinstance(m, M.PreActBlock):
            out = self.relu(self.affine(m.bn1, src))
            skip = self.affine(m.shortcut, out) if m.shortcut is not None else src
            out = self.affine(m.conv2, self.relu(self.affine(m.bn2, self.affine(m.conv1, out))))
            return self.add(out, skip)
        if isinstance(m, (M.BasicBlock, M.CohenBasicBlock)):
            out = self.relu(self.affine(m.bn1, self.affine(m.conv1, src)))
            out = self.affine(m.bn2, self.affine(m.conv2, out))
            if isinstance(m, M.CohenBasicBlock):
                skip = src if m.downsample is None else self.build(m.downsample, src)
            elif m.stride != 1 or m.pad:
                skip = self.affine(lambda t: nn.functional.pad(t[:, :, ::m.stride, ::m.stride],
                                                               (0, 0, 0, 0, m.pad // 2, m.pad - m.pad // 2)), src)
            else:
                skip = src
            return self.relu(self.add(out, skip))
        return self.affine(m, src)

    def ibp(self, xl, xu, upto):
        bnds = [(xl, xu)]
        for kind, data, srcs in self.nodes[1:upto + 1]:
            if kind == "affine":
                (l, u), (W, b) = bnds[srcs[0]], data
                c, r = W @ ((l + u) / 2) + b, W.abs() @ ((u - l) / 2)
                bnds.append((c - r, c + r))
            elif kind == "relu":
                bnds.append(tuple(t.clamp(min=0) for t in bnds[srcs[0]]))
            else:
                (l1, u1), (l2, u2) = bnds[srcs[0]], bnds[srcs[1]]
                c = (l1 + u1) / 2 + (l2 + u2) / 2
                r = (u1 - l1) / 2 + (u2 - l2) / 2
                bnds.append((c - r, c + r))
        return bnds

    def lower(self, node, lam, relax, xl, xu):
        pending, const = {node: lam}, torch.zeros(lam.shape[0], dtype=torch.float64)

        def give(i, coef):
            pending[i] = pending[i] + coef if i in pending else coef
        for i in range(node, 0, -1):
            if i not in pending:
                continue
            L, (kind, data, srcs) = pending.pop(i), self.nodes[i]
            if kind == "affine":
                const = const + L @ data[1]
                give(srcs[0], L @ data[0])
            elif kind == "relu":
                lo_s, up_s, up_c = relax[i]
                const = const + L.clamp(max=0) @ up_c
                give(srcs[0], L.clamp(min=0) * lo_s + L.clamp(max=0) * up_s)
            else:
                give(srcs[0], L)
                give(srcs[1], L)
        L = pending[0]
        return const + L.clamp(min=0) @ xl + L.clamp(max=0) @ xu

    def margins(self, x, y, eps, method, lo=0.0, hi=1.0):
        xl, xu = (x - eps).clamp(lo, hi).reshape(-1), (x + eps).clamp(lo, hi).reshape(-1)
        ibp, relax = self.ibp(xl, xu, len(self.nodes) - 1), {}
        for i, (kind, _, srcs) in enumerate(self.nodes):
            if kind != "relu":
                continue
            l, u = ibp[srcs[0]]
            if method == "crown":
                eye = torch.eye(l.numel(), dtype=torch.float64)
                l = torch.max(l, self.lower(srcs[0], eye, relax, xl, xu))
                u = torch.min(u, -self.lower(srcs[0], -eye, relax, xl, xu))
                u = torch.max(l, u)
            uns = (l < 0) & (u > 0)
            s = torch.where(uns, u / torch.where(uns, u - l, torch.ones_like(u)), (l >= 0).double())
            a = torch.where(uns, (u >= -l).double(), (l >= 0).double())
            relax[i] = (a, s, torch.where(uns, -s * l, torch.zeros_like(l)))
        k = self.shapes[self.out][0]
        spec = torch.eye(k, dtype=torch.float64)[y] - torch.eye(k, dtype=torch.float64)
        return self.lower(self.out, spec, relax, xl, xu)


def _randomise_bn(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) * 0.6 - 0.3)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return model


RES_NETS = {
    "preact": lambda: nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), M.PreActBlock(2, 2), M.PreActBlock(2, 3, 2),
                                    nn.BatchNorm2d(3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                    nn.Linear(3, 4)),
    "basic": lambda: nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(), M.BasicBlock(2, 2),
                                   M.BasicBlock(2, 4, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4)),
    "cohen": lambda: nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(),
                                   M.CohenBasicBlock(2, 2), M.CohenBasicBlock(2, 3, 2), nn.AvgPool2d(2), nn.Flatten(),
                                   nn.Linear(3, 4)),
}


@pytest.fixture(scope="module", params=sorted(RES_NETS))
def resnet(request):
    torch.manual_seed(11)
    model = _randomise_bn(RES_NETS[request.param]().double().eval(), 12)
    g = torch.Generator().manual_seed(13)
    x = torch.rand(3, 1, 4, 4, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y, torch.tensor([0.005, 0.02, 0.08], dtype=torch.float64)


@pytest.mark.parametrize("method", ["crown", "crown-ibp"])
def test_residual_bounds_equal_the_dag_reference_and_are_sound(resnet, method):
    model, x, y, eps = resnet
    got = _equals_reference(DagReference, resnet, method)
    g = torch.Generator().manual_seed(14)
    for b in range(x.shape[0]):
        pts = (x[b] + (torch.rand(2000, *x.shape[1:], generator=g, dtype=torch.float64) * 2 - 1) * eps[b]).clamp(0, 1)
        with torch.no_grad():
            z = model(pts)
        assert (z[:, int(y[b])].unsqueeze(1) - z >= got[b] - 1e-9).all(), (method, b)
    best = crown.margin_bounds(model, x, y, eps, method="best")
    assert (best >= bounds.margin_bounds(model, x, y, eps)).all() and (best >= got - 1e-12).all()


@pytest.mark.parametrize("name", ["preact18", "cifar8", "cohen8"])
def test_full_residual_models_at_eps_zero_equal_the_clean_margins(name):
    torch.manual_seed(0)
    model, side = {"preact18": (lambda: M.PreActResNet18(3, 1), 4), "cifar8": (lambda: M.cifar_resnet(8, 3, 1), 8),
                   "cohen8": (lambda: M.cohen_cifar_resnet(8, 3, 1), 32)}[name]
    model = _randomise_bn(model().double().eval(), 1)
    x = torch.rand(2, 1, side, side, dtype=torch.float64)
    with torch.no_grad():
        z = model(x)
    y = z.argmax(1)
    got = crown.margin_bounds(model, x, y, 0.0, method="crown-ibp")
    torch.testing.assert_close(got, z.gather(1, y.view(-1, 1)) - z, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------ BatchNorm in training mode

def _train_bn_nets():
    torch.manual_seed(21)
    flat = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(48, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 4))
    return {"flat": flat.double().train(), "cohen": _randomise_bn(RES_NETS["cohen"]().double(), 22).train()}


def _batch_stats(model, x):
    """The mean / biased variance each BatchNorm sees in the training-mode forward (forward pre-hooks)."""
    stats, hooks = {}, []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            def hook(mod, inp):
                t = inp[0]
                dims = [0] + list(range(2, t.dim()))
                stats[mod] = (t.mean(dims), t.var(dims, unbiased=False))
            hooks.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        z = model(x)
    for h in hooks:
        h.remove()
    return z, stats


@pytest.mark.parametrize("name", ["flat", "cohen"])
def test_training_mode_batchnorm_is_the_affine_map_of_the_clean_batch(name):
    import copy

    model = _train_bn_nets()[name]
    x = torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(23), dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    z, stats = _batch_stats(copy.deepcopy(model), x)
    y = z.argmax(1)
    fixed = copy.deepcopy(model).eval()  # running statistics := the clean batch's
    with torch.no_grad():
        for (mean, var), f in zip(stats.values(), [f for f in fixed.modules()
                                                   if isinstance(f, nn.modules.batchnorm._BatchNorm)]):
            f.running_mean.copy_(mean)
            f.running_var.copy_(var)
    for method in ("crown", "crown-ibp"):
        at0 = crown.margin_bounds(model, x, y, 0.0, method=method)
        torch.testing.assert_close(at0, z.gather(1, y.view(-1, 1)) - z, rtol=1e-6, atol=1e-9)
        eps = torch.linspace(0.01, 0.05, 6, dtype=torch.float64)
        torch.testing.assert_close(crown.margin_bounds(model, x, y, eps, method=method),
                                   crown.margin_bounds(fixed, x, y, eps, method=method), rtol=1e-9, atol=1e-12)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # no running-statistic update
    params = list(model.parameters())
    loss = crown.margin_bounds(model, x.float().double(), y, 0.02, method="crown-ibp").sum()
    grads = torch.autograd.grad(loss, params)
    assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads[1:3])


def test_train_mode_radius_of_a_batchnorm_model_is_proven_and_leaves_the_buffers():
    model = tiny_cnn(seed=3, bn=True, width=4).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    res = bounds.certified_radius(model, x, eps_max=0.05, tol=1 / 256, mode="train", bound="crown-ibp")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert model.training and (res.radius > 0).sum() >= 4  # measured: all 6 (IBP: 4), 0.012-0.027
    eps = res.radius.float().clamp(min=1e-12)  # the batch statistics are the whole batch's, as in the search
    proven = crown.verified(model, x, res.prediction, eps, method="crown-ibp")
    assert proven[res.radius > 0].all()


def test_crown_ibp_resume_is_exact(tmp_path):
    from torch.utils.data import DataLoader, Subset

    from robustops.data import load_digits

    sub = Subset(load_digits("train"), list(range(96)))
    val = DataLoader(Subset(load_digits("test"), list(range(32))), batch_size=32)
    hp = dict(epochs=2, eps=0.05, warmup=0.0, ramp=0.5, beta_end=0.5, seed=3, optimizer="adam", lr=5e-3,
              progress=False, verbose=False)
    # killed in the second epoch (inside the ramp: both bounds and the BatchNorm rule run), then resumed
    ref, res, crash = resume_matches_uninterrupted("crown_ibp", sub, val, tmp_path, hp, crash_after=lambda n: n + 1,
                                                   width=4, weights_only=False)
    assert crash["epoch"] == 1 and res.epochs_run == ref.epochs_run == 2
