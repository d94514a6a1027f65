"""The ``consistency`` (Jeong & Shin 2020) and ``macer`` (Zhai et al. 2020) training methods: their
losses against plain-PyTorch computations of the papers' formulas, the reduction of consistency to
Gaussian-noise training, exact resume, bf16 autocast + channels_last, and a small certified-radius
comparison with Gaussian-noise training on the embedded digits."""
import math
from statistics import NormalDist

import pytest
import torch
import torch.nn.functional as F
from helpers import one_thread, resume_matches_uninterrupted, tiny_cnn  # noqa: F401 (one_thread: an autouse fixture)
from torch.utils.data import DataLoader, Subset

from robustops import train as rt
from robustops.data import load_digits
from robustops.smoothing import Smooth
from robustops.train.trainer import Trainer


@pytest.fixture(scope="module")
def digits():
    return load_digits("train"), load_digits("test")


def _batch(ds, n=32):
    xs, ys = zip(*[ds[i] for i in range(n)])
    return torch.stack(xs), torch.as_tensor(ys)


def test_registered_with_sigma_and_noise_acc():
    for name in ("consistency", "macer"):
        cls = rt.registry.get(name)
        assert cls.select == "noise_acc"
        cfg = rt.FitConfig.make(name, sigma=0.5).resolved()
        assert cls.noise_sigma(cfg) == 0.5
    assert rt.FitConfig.make("macer").resolved().noise_copies == 16
    assert rt.FitConfig.make("consistency").resolved().noise_copies == 2


def test_consistency_m1_is_gaussian_training(digits):
    """m = 1, lambda = eta = 0: the same loss and the same update as Gaussian-noise training on the same noise."""
    x, y = _batch(digits[0])
    out = {}
    for method, extra in (("gaussian", {}),
                          ("consistency", dict(noise_copies=1, consistency_lambda=0.0, consistency_eta=0.0))):
        model = tiny_cnn(seed=4)
        tr = Trainer(model, method=method, sigma=0.5, seed=11, lr=0.1, **extra)
        loss, correct, n = tr.train_step(x, y)
        out[method] = (loss, correct, torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(out["gaussian"][0], out["consistency"][0])
    assert int(out["gaussian"][1]) == int(out["consistency"][1])
    assert torch.equal(out["gaussian"][2], out["consistency"][2])
    # and the regularizers change it
    model = tiny_cnn(seed=4)
    tr = Trainer(model, method="consistency", sigma=0.5, seed=11, lr=0.1, noise_copies=1)
    tr.train_step(x, y)
    assert not torch.equal(out["gaussian"][2], torch.cat([p.detach().flatten() for p in model.parameters()]))


@pytest.mark.parametrize("m,lam,eta", [(2, 10.0, 0.5), (4, 3.0, 0.0), (3, 0.0, 1.5)])
def test_consistency_loss_matches_plain_formula(m, lam, eta):
    torch.manual_seed(0)
    B, C = 6, 10
    logits = torch.randn(B * m, C) * 3
    y = torch.randint(0, C, (B,))
    tr = Trainer(tiny_cnn(), method="consistency", noise_copies=m, consistency_lambda=lam, consistency_eta=eta)
    loss, pbar = tr.method.loss(logits, y)
    # plain: loops over inputs and copies
    total = 0.0
    for b in range(B):
        ps = [F.softmax(logits[b * m + i].double(), 0) for i in range(m)]
        mean = sum(ps) / m
        ce = sum(-math.log(p[y[b]].item()) for p in ps) / m
        kl = sum((mean * (mean.log() - p.log())).sum().item() for p in ps) / m
        ent = -(mean * mean.log()).sum().item()
        total += ce + lam * kl + eta * ent
        assert torch.allclose(pbar[b].double(), mean, atol=1e-6)
    assert abs(loss.item() - total / B) < 1e-4 * max(1.0, abs(total / B)), (loss.item(), total / B)


def _plain_macer(logits, y, k, sigma, beta, gamma, lam):
    """MACER's loss by the formula, one input at a time, Phi^-1 from the standard library."""
    B = y.shape[0]
    ce = hinge = 0.0
    active = 0
    for b in range(B):
        z = logits[b * k:(b + 1) * k].double()
        g = F.softmax(z, 1).mean(0)
        ce += -math.log(g[y[b]].item())
        gb = F.softmax(beta * z, 1).mean(0)
        order = torch.argsort(gb, descending=True)
        if order[0].item() != y[b].item():
            continue
        xi = NormalDist().inv_cdf(gb[order[0]].item()) - NormalDist().inv_cdf(gb[order[1]].item())
        if xi <= gamma:
            hinge += sigma / 2 * (gamma - xi)
            active += 1
    return ce / B + lam * hinge / B, active


@pytest.mark.parametrize("k,sigma,beta,gamma,lam", [(16, 0.25, 16.0, 8.0, 12.0), (4, 0.5, 4.0, 2.0, 3.0)])
def test_macer_loss_matches_plain_formula(k, sigma, beta, gamma, lam):
    torch.manual_seed(1)
    B, C = 64, 10
    y = torch.randint(0, C, (B,))
    logits = torch.randn(B * k, C) * 0.3
    # make a share of the inputs confidently (and some less) right: the hinge is active on some, not on all
    boost = torch.rand(B).repeat_interleave(k) * 1.5
    logits[torch.arange(B * k), y.repeat_interleave(k)] += boost
    tr = Trainer(tiny_cnn(), method="macer", sigma=sigma, noise_copies=k, macer_beta=beta, macer_gamma=gamma,
                 macer_lambda=lam)
    loss, g = tr.method.loss(logits, y, lam)
    want, active = _plain_macer(logits, y, k, sigma, beta, gamma, lam)
    assert 0 < active < B, active
    assert abs(loss.item() - want) < 1e-4 * max(1.0, abs(want)), (loss.item(), want)
    # lambda = 0 (warm-up): the smoothed cross-entropy alone
    loss0, _ = tr.method.loss(logits, y, 0.0)
    want0, _ = _plain_macer(logits, y, k, sigma, beta, gamma, 0.0)
    assert abs(loss0.item() - want0) < 1e-5 * max(1.0, want0)
    # a gradient reaches the logits through the hinge
    lg = logits.clone().requires_grad_(True)
    (tr.method.loss(lg, y, lam)[0] - tr.method.loss(lg, y, 0.0)[0]).backward()
    assert lg.grad.abs().sum() > 0


def test_macer_radius_clamp_keeps_saturated_inputs_finite():
    from robustops.train.methods.macer import radius_hinge

    logits = torch.tensor([[50.0, 0.0, 0.0], [0.0, 50.0, 0.0]]).repeat_interleave(2, 0)
    h = radius_hinge(logits, torch.tensor([0, 1]), 2, 0.5, 16.0, 8.0)
    assert torch.isfinite(h).all() and (h == 0).all()  # xi clamps to 14.07 > gamma: no hinge, no NaN


def test_macer_warmup_from_the_step_count(digits):
    x, y = _batch(digits[0], 16)
    tr = Trainer(tiny_cnn(), method="macer", sigma=0.5, noise_copies=2, macer_warmup=2, steps_per_epoch=3,
                 epochs=4)
    seen = []
    for _ in range(8):
        seen.append(tr.method.epoch())
        tr.train_step(x, y)
    assert seen == [0, 0, 0, 1, 1, 1, 2, 2]


@pytest.mark.parametrize("method,hp", [("consistency", dict(noise_copies=2)),
                                       ("macer", dict(noise_copies=4, macer_warmup=1))])
def test_resume_matches_uninterrupted(digits, tmp_path, method, hp):
    train_ds, test_ds = digits
    sub = Subset(train_ds, list(range(128)))
    val = DataLoader(Subset(test_ds, list(range(64))), batch_size=64)
    hp = dict(epochs=3, sigma=0.5, seed=3, lr=0.05, progress=False, verbose=False, **hp)

    # dies in epoch 2: for macer, after its warm-up epoch
    ref, res, crash = resume_matches_uninterrupted(method, sub, val, tmp_path, hp, crash_after=lambda n: n + 2)
    assert ref.select == "noise_acc"
    assert all(0 <= row["noise_acc"] <= 1 for row in ref.history)
    assert crash["epoch"] == 1
    assert res.epochs_run == 3


@pytest.mark.parametrize("method", ["consistency", "macer"])
def test_bf16_channels_last(digits, method):
    sub = Subset(digits[0], list(range(64)))
    model = tiny_cnn(seed=2)
    res = rt.fit(model, DataLoader(sub, batch_size=32), method, epochs=1, sigma=0.5, noise_copies=2, amp="bf16",
                 channels_last=True, seed=0, progress=False, verbose=False)
    assert all(math.isfinite(row["train_loss"]) for row in res.history), res.history
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)


def _acr(model, test_ds, sigma, n_images=100):
    x, y = _batch(test_ds, n_images)
    model.eval()
    res = Smooth(model, 10, sigma).certify(x, 50, 500, 0.001, 1000, seed=0)
    return float(((res.prediction == y).double() * res.radius).mean()), float((res.prediction == y).double().mean())


def test_digits_acr_gaussian_consistency_macer(digits):
    """Equal epochs at sigma 0.5 on the digits: each method's smoothed model certifies a positive ACR.
    The ACRs are printed (the comparison is reported, not asserted: one seed, 100 images, n = 500).

    MACER runs with its radius term deferred for 2 of the 6 epochs and lambda = 1: with the paper's
    lambda = 12 at this learning rate (0.1, the paper uses 0.01 on a ResNet-110) the hinge's first
    steps blow the training loss up and the tiny CNN collapses to near-chance accuracy (measured: ACR
    0.09-0.14 at 8-13% accuracy)."""
    train_ds, test_ds = digits
    sigma = 0.5
    out = {}
    for method, hp in (("gaussian", {}), ("consistency", {}), ("macer", dict(macer_warmup=2, macer_lambda=1.0))):
        model = tiny_cnn(seed=3)
        torch.manual_seed(1)
        rt.fit(model, DataLoader(train_ds, batch_size=32, shuffle=True), method, epochs=6, lr=0.1, sigma=sigma,
               seed=0, progress=False, verbose=False, **hp)
        out[method] = _acr(model, test_ds, sigma)
    print({m: f"ACR {a:.3f}, certified acc@0 {c:.2f}" for m, (a, c) in out.items()})
    for method, (acr, acc) in out.items():
        assert math.isfinite(acr) and acr > 0.1 and acc > 0.5, (method, out)
