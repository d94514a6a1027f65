"""Certified training (issue 12): the ``ibp`` (Gowal et al. 2018) and ``acert`` (Nurlanov et al. 2023)
methods of the training registry. Their schedules, their losses against hand-written interval
arithmetic, training on the digits, cert_acc validation and selection, exact resume, DDP, AMP and
channels_last, argument errors, and the command line."""
import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import (  # noqa: F401 (one_thread: an autouse fixture)
    free_port,
    gloo_group,
    one_thread,
    rank_loader,
    resume_matches_uninterrupted,
)
from helpers import tiny_cnn as _tiny_cnn
from torch.utils.data import DataLoader, Subset

from robustops import bounds
from robustops import train as rt
from robustops.data import load_digits
from robustops.models import SmallCNN
from robustops.train.fit import LOG_COLUMNS, log_columns
from robustops.train.methods.ibp import progress, ramp_fraction

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def digits():
    return load_digits("train"), load_digits("test")


def tiny_cnn(seed=0, bn=False):
    return _tiny_cnn(seed, bn, width=8)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def naive_margins(net, x, y, eps, lo, hi):
    """Lower bounds of z_y - z_j of a Linear-ReLU-Linear net over the box, by plain interval arithmetic
    in lower/upper form (positive and negative weights apart), the last layer folded into z_y - z_j."""
    lin1, _, lin2 = net
    e = eps if not torch.is_tensor(eps) else eps.double().view(-1, 1)
    lower, upper = (x.double() - e).clamp(lo, hi), (x.double() + e).clamp(lo, hi)
    w, b = lin1.weight.double(), lin1.bias.double()
    h_lo = lower @ w.clamp(min=0).T + upper @ w.clamp(max=0).T + b
    h_hi = upper @ w.clamp(min=0).T + lower @ w.clamp(max=0).T + b
    h_lo, h_hi = h_lo.relu(), h_hi.relu()
    w2, b2 = lin2.weight.double(), lin2.bias.double()
    d = w2[y][:, None, :] - w2[None, :, :]                    # [B, K, H]: rows W_y - W_j
    bd = b2[y][:, None] - b2[None, :]
    return (d.clamp(min=0) * h_lo[:, None, :]).sum(-1) + (d.clamp(max=0) * h_hi[:, None, :]).sum(-1) + bd


# --------------------------------------------------------------------------- schedules

def test_ramp_fraction_linear_and_smooth():
    # linear (Gowal et al.): 0 through the warm-up, then linear over the ramp, then 1
    assert ramp_fraction(0.0, 0.1, 0.5) == 0.0 and ramp_fraction(0.1, 0.1, 0.5) == 0.0
    assert ramp_fraction(0.35, 0.1, 0.5) == pytest.approx(0.5)
    assert ramp_fraction(0.6, 0.1, 0.5) == 1.0 and ramp_fraction(1.0, 0.1, 0.5) == 1.0
    assert ramp_fraction(0.09, 0.1, 0.0) == 0.0 and ramp_fraction(0.1, 0.1, 0.0) == 1.0  # no ramp: a step
    # smooth (Shi et al. 2021): c u^4 up to u = 1/4, then linear to 1; value and slope continuous there
    c = 1.0 / (4 * 0.25 ** 3 * 0.75 + 0.25 ** 4)
    s = lambda u: ramp_fraction(u, 0.0, 1.0, "smooth")  # noqa: E731
    assert s(0.0) == 0.0 and s(1.0) == pytest.approx(1.0)
    assert s(0.2) == pytest.approx(c * 0.2 ** 4)
    assert s(0.25) == pytest.approx(c / 256)
    h = 1e-6
    left, right = (s(0.25) - s(0.25 - h)) / h, (s(0.25 + h) - s(0.25)) / h
    assert left == pytest.approx(right, rel=1e-4) and right == pytest.approx((1 - c / 256) / 0.75, rel=1e-6)
    grid = [s(i / 200) for i in range(201)]
    assert all(a < b for a, b in zip(grid[1:], grid[2:])) and grid[0] == 0.0
    assert s(0.5) < 0.5  # slower than linear early on
    with pytest.raises(ValueError, match="eps_schedule"):
        ramp_fraction(0.5, 0.0, 1.0, "cubic")


def test_schedules_at_given_progress_follow_the_step_counter():
    tr = rt.Trainer(mlp(), method="ibp", epochs=2, eps=0.2, kappa=0.4, warmup=0.1, ramp=0.5, eps_scale=1.5,
                    steps_per_epoch=10)
    assert tr.total_steps == 20
    m = tr.method
    assert m.schedule(0.05) == (0.0, 1.0)                           # warm-up: eps 0, kappa 1
    eps, kappa = m.schedule(0.35)                                    # half-way up the ramp
    assert eps == pytest.approx(0.5 * 1.5 * 0.2) and kappa == pytest.approx(1 - 0.5 * 0.6)
    assert m.schedule(0.6) == (pytest.approx(0.3), pytest.approx(0.4))  # eps_scale * eps, kappa final
    assert m.schedule(1.0) == (pytest.approx(0.3), pytest.approx(0.4))
    a = rt.Trainer(mlp(), method="acert", epochs=2, eps=0.2, warmup=0.1, ramp=0.5, steps_per_epoch=10).method
    assert a.cfg.eps_schedule == "smooth" and a.cfg.kappa == 0.0 and a.cfg.eps_scale == pytest.approx(1.1)
    assert a.eps_max(0.05) == 0.0 and a.eps_max(0.7) == pytest.approx(0.22)
    assert a.eps_max(0.35) == pytest.approx(0.22 * ramp_fraction(0.5, 0.0, 1.0, "smooth"))

    # progress = optimizer steps done / all, restored with the scheduler on resume
    x, y = torch.rand(8, 4), torch.randint(0, 3, (8,))
    for _ in range(7):
        tr.train_step(x, y)
    assert progress(tr) == pytest.approx(7 / 20)
    tr2 = rt.Trainer(mlp(seed=1), method="ibp", epochs=2, eps=0.2, kappa=0.4, warmup=0.1, ramp=0.5,
                     eps_scale=1.5, steps_per_epoch=10)
    assert progress(tr2) == 0.0
    tr2.load_state_dict(tr.state_dict())
    assert progress(tr2) == progress(tr) and tr2.method.schedule(progress(tr2)) == m.schedule(progress(tr))


# --------------------------------------------------------------------------- the losses

def test_ibp_loss_is_gowals_hybrid_loss():
    """The step's loss is kappa_t CE(z, y) + (1 - kappa_t) CE(z_hat, y) with z_hat from naive interval
    arithmetic and the last layer elided, at the scheduled eps_t / kappa_t."""
    torch.manual_seed(0)
    x, y = torch.rand(16, 4), torch.randint(0, 3, (16,))
    net = mlp(seed=3)
    tr = rt.Trainer(net, method="ibp", epochs=1, eps=0.1, kappa=0.2, warmup=0.2, ramp=0.4, eps_scale=1.0,
                    steps_per_epoch=10)
    tr.scheduler.last_epoch = 4                                     # progress 0.4: half-way up the ramp
    eps_t, kappa_t = 0.05, 0.6
    assert tr.method.schedule(progress(tr)) == (pytest.approx(eps_t), pytest.approx(kappa_t))
    with torch.no_grad():
        z = net(x).double()
        worst = -naive_margins(net, x, y, eps_t, 0.0, 1.0)
        want = kappa_t * F.cross_entropy(z, y) + (1 - kappa_t) * F.cross_entropy(worst, y)
        assert worst.gather(1, y.view(-1, 1)).abs().max() == 0 and (worst.max(1).values > 0).any()
    loss_sum, _, n = tr.train_step(x, y)
    assert loss_sum.item() / n == pytest.approx(want.item(), rel=1e-5)
    # in the warm-up the loss is the clean cross-entropy
    tr.scheduler.last_epoch = 1
    with torch.no_grad():
        want = F.cross_entropy(net(x), y)
    loss_sum, _, n = tr.train_step(x, y)
    assert loss_sum.item() / n == pytest.approx(want.item(), rel=1e-5)


def _linear_example():
    """A linear 3-class model z = W x on 2-D inputs, where IBP is exact: the margin of class y over j at
    radius e is (w_y - w_j) . x - e |w_y - w_j|_1, so each certified radius is known in closed form."""
    net = nn.Sequential(nn.Linear(2, 3))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
        net[0].bias.zero_()
    x = torch.tensor([[0.5, 0.3], [1.0, 0.2], [0.2, 0.6], [0.1, 0.5]])
    y = torch.tensor([0, 0, 0, 1])
    # radii: min over j of margin / |w_y - w_j|_1: (0.2 / 2, 1.3 / 3), (0.8 / 2, 2.2 / 3), misclassified,
    # (0.4 / 2, 1.1 / 3)
    exact = torch.tensor([0.1, 0.4, 0.0, 0.2])
    return net, x, y, exact


def _exact_margins(net, x, y, e):
    w = net[0].weight.double()
    d = w[y][:, None, :] - w[None, :, :]
    return (d * x.double()[:, None, :]).sum(-1) - e.double().view(-1, 1) * d.abs().sum(-1)


def test_acert_radii_and_loss_follow_the_paper():
    """eps_i = the largest radius <= eps_max at which IBP proves the label (0 when misclassified, eps_max
    when proven there), found to the grid of the tolerance; loss = kappa CE(z, y) + (1 - kappa) mean_i
    CE(z_hat(x_i, eps_i), y_i)."""
    net, x, y, exact = _linear_example()
    eps_max = 0.25  # a multiple of the grid step below: a sample proven at eps_max gets exactly eps_max
    tr = rt.Trainer(net, method="acert", epochs=1, eps=eps_max, eps_scale=1.0, warmup=0.0, ramp=0.0, kappa=0.3,
                    radius_tol=0.01, lo=-10.0, hi=10.0, steps_per_epoch=4)
    assert tr.method.eps_max(progress(tr)) == eps_max
    h = 2.0 ** math.floor(math.log2(0.01 * eps_max))                # certified_radius's grid step
    r = tr.method.radii(x, y, eps_max)
    assert r.dtype == torch.float32 and not r.requires_grad
    want = exact.clamp(max=eps_max)
    assert r[1] == eps_max and r[2] == 0.0
    for i in (0, 3):
        assert want[i] - h <= r[i] <= want[i]
        m_at, m_above = _exact_margins(net, x[i:i + 1], y[i:i + 1], r[i:i + 1]), \
            _exact_margins(net, x[i:i + 1], y[i:i + 1], r[i:i + 1] + h)
        others = torch.arange(3) != y[i]
        assert (m_at[0, others] > 0).all() and (m_above[0, others] <= 0).any()  # the largest proven grid radius
    with torch.no_grad():
        worst = -_exact_margins(net, x, y, r)
        want_loss = 0.3 * F.cross_entropy(net(x).double(), y) + 0.7 * F.cross_entropy(worst, y)
        # the misclassified sample's robust term is its clean cross-entropy (radius 0)
        assert F.cross_entropy(worst[2:3], y[2:3]).item() == pytest.approx(
            F.cross_entropy(net(x[2:3]), y[2:3]).item(), rel=1e-6)
    loss_sum, _, n = tr.train_step(x, y)
    assert loss_sum.item() / n == pytest.approx(want_loss.item(), rel=1e-5)


def test_acert_loss_on_a_relu_net_matches_naive_interval_arithmetic():
    torch.manual_seed(1)
    x, y = torch.rand(32, 4), torch.randint(0, 3, (32,))
    net = mlp(seed=5)
    tr = rt.Trainer(net, method="acert", epochs=1, eps=0.3, eps_scale=1.0, warmup=0.0, ramp=0.0, kappa=0.0,
                    steps_per_epoch=4)
    r = tr.method.radii(x, y, 0.3)
    with torch.no_grad():
        wrong = net(x).argmax(1) != y
        assert (r[wrong] == 0).all() and (r[~wrong] > 0).any()
        m = naive_margins(net, x, y, r, 0.0, 1.0)
        m.scatter_(1, y.view(-1, 1), float("inf"))
        assert (m[~wrong].min(1).values > 0).all()                  # every radius is proven
        m_up = naive_margins(net, x, y, (r + 0.3 * 0.01).clamp(max=0.3), 0.0, 1.0)
        m_up.scatter_(1, y.view(-1, 1), float("inf"))
        inside = ~wrong & (r < 0.3 - 0.3 * 0.01)
        assert inside.any()
        assert (m_up[inside].min(1).values <= 0).all()              # and one tolerance more is not
        want = F.cross_entropy(-naive_margins(net, x, y, r, 0.0, 1.0), y)  # kappa = 0
    loss_sum, _, n = tr.train_step(x, y)
    assert loss_sum.item() / n == pytest.approx(want.item(), rel=1e-5)


# --------------------------------------------------------------------------- training on the digits

@pytest.fixture(scope="module")
def trained(digits):
    """natural, ibp and acert SmallCNNs, the same seed, data, optimiser and epochs (eps 0.05)."""
    train_ds, _ = digits
    out = {}
    for method in ("natural", "ibp", "acert"):
        torch.manual_seed(0)
        model = SmallCNN()
        rt.fit(model, DataLoader(train_ds, batch_size=64, shuffle=True), method, epochs=6, eps=0.05, seed=0,
               optimizer="adam", lr=2e-3, progress=False, verbose=False)
        out[method] = model.eval()
    return out


def test_certified_training_certifies_the_digits(digits, trained):
    _, test_ds = digits
    x, y = test_ds.tensors
    acc, cert = {}, {}
    for method, model in trained.items():
        with torch.no_grad():
            acc[method] = (model(x).argmax(1) == y).float().mean().item()
        cert[method] = bounds.verified(model, x, y, 0.02).float().mean().item()
    # measured (torch 2.14, CPU): clean 0.958 / 0.792 / 0.911, IBP-certified at 0.02: 0 / 0.631 / 0.656
    assert cert["natural"] < 0.05, cert
    assert cert["ibp"] > 0.45 and cert["acert"] > 0.45, cert
    assert acc["natural"] > 0.9 and acc["ibp"] > 0.6 and acc["acert"] > 0.8, acc


def test_cert_acc_validation_and_selection(digits, trained, tmp_path):
    train_ds, test_ds = digits
    val = DataLoader(Subset(test_ds, list(range(128))), batch_size=64)
    x, y = next(iter(DataLoader(Subset(test_ds, list(range(128))), batch_size=128)))
    # cert_acc is the fraction IBP verifies at val_eps; PGD cannot break a certified sample
    model = trained["ibp"]
    m = rt.Trainer(model, method="ibp", eps=0.05, val_eps=0.02, seed=0).evaluate(val)
    assert m["cert_acc"] == pytest.approx(bounds.verified(model, x, y, 0.02).float().mean().item())
    assert m["clean_acc"] >= m["robust_acc"] >= m["cert_acc"] > 0.3
    assert "cert_acc" not in rt.Trainer(model, method="pgd", eps=0.05).evaluate(val)

    # certified methods select the best epoch by cert_acc and log it; the others log what they did
    sub = DataLoader(Subset(train_ds, list(range(128))), batch_size=32, shuffle=True)
    res = rt.fit(tiny_cnn(), sub, "ibp", epochs=10, eps=0.05, val_loader=val, patience=2, schedule="constant",
                 optimizer="adam", lr=1e-9, warmup=0.0, out_dir=str(tmp_path / "ibp"), seed=0, progress=False,
                 verbose=False)
    assert res.select == "cert_acc" and res.stopped_early and res.best_epoch == 1 and res.epochs_run == 3
    assert res.best_metric == res.history[0]["cert_acc"] and all("cert_acc" in r for r in res.history)
    with open(tmp_path / "ibp" / "log.csv") as fh:
        header = next(csv.reader(fh))
    assert tuple(header) == log_columns(res.config) and "cert_acc" in header
    res = rt.fit(tiny_cnn(), sub, "natural", epochs=1, val_loader=val, out_dir=str(tmp_path / "nat"), seed=0,
                 progress=False, verbose=False)
    assert "cert_acc" not in res.history[0]
    with open(tmp_path / "nat" / "log.csv") as fh:
        assert tuple(next(csv.reader(fh))) == LOG_COLUMNS


@pytest.mark.parametrize("kw,name", [
    (dict(method="ibp", kappa=1.5), "kappa"),
    (dict(method="acert", kappa=-0.1), "kappa"),
    (dict(method="ibp", warmup=-0.1), "warmup"),
    (dict(method="acert", ramp=2.0), "ramp"),
    (dict(method="ibp", eps_scale=0.0), "eps_scale"),
    (dict(method="acert", eps_schedule="cubic"), "eps_schedule"),
    (dict(method="acert", radius_tol=0.0), "radius_tol"),
    (dict(method="ibp", norm="l2"), "norm"),
    (dict(method="pgd", select="cert_acc"), "select"),
])
def test_bad_arguments_name_the_argument(kw, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        rt.Trainer(tiny_cnn(), epochs=1, eps=0.05, **kw)


@pytest.mark.parametrize("method", ["ibp", "acert"])
def test_unsupported_layer_fails_at_the_first_step(digits, method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.GELU(), nn.Linear(16, 10))
    tr = rt.Trainer(model, method=method, epochs=1, eps=0.05, warmup=0.5, steps_per_epoch=10)
    x, y = digits[0].tensors
    with pytest.raises(bounds.UnsupportedLayerError, match="GELU"):
        tr.train_step(x[:8], y[:8])  # in the warm-up, where no bound is needed yet


# --------------------------------------------------------------------------- resume, DDP, AMP

@pytest.mark.parametrize("method", ["ibp", "acert"])
def test_resume_matches_uninterrupted(digits, tmp_path, method):
    train_ds, test_ds = digits
    sub = Subset(train_ds, list(range(192)))
    val = DataLoader(Subset(test_ds, list(range(64))), batch_size=64)
    hp = dict(epochs=4, eps=0.05, warmup=0.0, ramp=0.6, seed=3, patience=5, progress=False, verbose=False)
    # dies in the middle of the third epoch, inside the eps ramp
    ref, res, crash = resume_matches_uninterrupted(method, sub, val, tmp_path, hp, crash_after=lambda n: 2 * n + 3,
                                                   width=8, weights_only=False)
    assert crash["epoch"] == 2
    assert res.epochs_run == ref.epochs_run == 4
    strip = lambda h: [{k: v for k, v in r.items() if "time" not in k} for r in h]  # noqa: E731
    assert str(strip(res.history)) == str(strip(ref.history)) and res.best_epoch == ref.best_epoch


def _ddp_worker(rank, world, port, method, out):
    with gloo_group(rank, world, port):
        train_ds = Subset(load_digits("train"), list(range(128)))
        model = tiny_cnn(seed=11)
        res = rt.fit(model, rank_loader(train_ds, rank, world), method, epochs=2, eps=0.05, warmup=0.0, ramp=0.5,
                     lr=0.05, seed=0, progress=False, verbose=False)
        if rank == 0:
            torch.save({"state_dict": model.state_dict(), "history": res.history}, os.path.join(out, "ddp.pt"))


@pytest.mark.parametrize("method", ["ibp", "acert"])
def test_ddp_two_gloo_processes_match_single(digits, tmp_path, method):
    """The bound pass calls the model's layers outside the DDP wrapper; its gradient is still all-reduced
    with the clean forward's: two processes on half-batches end where one process on whole batches does."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, free_port(), method, str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "ddp.pt", weights_only=False)
    model = tiny_cnn(seed=11)
    res = rt.fit(model, DataLoader(Subset(digits[0], list(range(128))), batch_size=32, shuffle=False), method,
                 epochs=2, eps=0.05, warmup=0.0, ramp=0.5, lr=0.05, seed=0, progress=False, verbose=False)
    moved = sum((v - p).abs().sum().item() for v, p in zip(model.state_dict().values(), tiny_cnn(seed=11).state_dict()
                                                         .values()))
    assert moved > 0
    for k, v in model.state_dict().items():
        torch.testing.assert_close(got["state_dict"][k], v, rtol=1e-4, atol=1e-5)
    for a, b in zip(got["history"], res.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)


@pytest.mark.parametrize("method", ["ibp", "acert"])
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_and_channels_last(digits, method, amp, device="cpu"):
    train_ds, test_ds = digits
    model = tiny_cnn(bn=True).to(device)
    res = rt.fit(model, DataLoader(Subset(train_ds, list(range(128))), batch_size=32, shuffle=True), method,
                 epochs=2, eps=0.05, warmup=0.0, ramp=0.5, amp=amp, channels_last=True, device=device,
                 val_loader=DataLoader(Subset(test_ds, list(range(64))), batch_size=64), seed=0, progress=False,
                 verbose=False)
    row = res.history[-1]
    assert math.isfinite(row["train_loss"]) and 0 <= row["cert_acc"] <= row["clean_acc"] <= 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["ibp", "acert"])
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cuda_amp_and_channels_last(digits, method, amp):
    test_amp_and_channels_last(digits, method, amp, device="cuda")


# --------------------------------------------------------------------------- the command line

def test_cli_trains_ibp_and_acert(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    for k in ("LOCAL_WORLD_SIZE", "CUDA_HOME"):
        env.pop(k, None)

    def start(*args):
        return subprocess.Popen([sys.executable, "-m", "robustops", "train", "--epochs", "1", "--eps", "0.05",
                                 "--batch-size", "64", "--test-steps", "0", "--no-progress", *map(str, args)],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    procs = {"ibp": start("--method", "ibp", "--out", tmp_path / "ibp"),
             "acert": start("--method", "acert", "--kappa", "0.25", "--out", tmp_path / "acert"),
             "l2": start("--method", "ibp", "--norm", "l2", "--out", tmp_path / "l2")}
    done = {k: (p, *p.communicate(timeout=300)) for k, p in procs.items()}
    for method in ("ibp", "acert"):
        p, out, err = done[method]
        assert p.returncode == 0, out + err
        assert "certified" in out  # the epoch line reports cert_acc
        with open(tmp_path / method / "log.csv") as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == 1 and 0 <= float(rows[0]["cert_acc"]) <= float(rows[0]["clean_acc"])
        with open(tmp_path / method / "summary.json") as fh:
            summary = json.load(fh)
        assert summary["select"] == "cert_acc" and summary["method"] == method
        assert summary["config"]["params"]["kappa"] == (0.25 if method == "acert" else 0.5)
    p, out, err = done["l2"]
    assert p.returncode == 2 and err.strip().count("\n") == 0 and 'norm must be "linf" for ibp' in err, err
