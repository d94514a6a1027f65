"""DALE and DALE-PD training (methods/dale.py): the dual variable, the clean-loss margin on digits, the
per-epoch log, exact resume and DDP, one dale_pd batch step against a plain transcription of advbench's,
the paper's variant (unsigned Gaussian chain, per-epoch dual step)."""
import argparse
import csv
import os

import pytest
import torch
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

from robustops import train as rt
from robustops.data import load_digits
from robustops.train.fit import log_columns
from robustops.train.methods.dale import LangevinStep, log1m_softmax


@pytest.fixture(scope="module")
def digits():
    return load_digits("train"), load_digits("test")


def tiny_cnn(seed=0, bn=False):
    return _tiny_cnn(seed, bn, width=8)


def test_log1m_softmax_is_stable():
    z = torch.randn(6, 10)
    y = torch.randint(0, 10, (6,))
    expected = torch.log1p(-torch.softmax(z.double(), 1)[torch.arange(6), y])
    torch.testing.assert_close(log1m_softmax(z, y).double(), expected, rtol=1e-5, atol=1e-6)
    z = torch.zeros(2, 3)
    z[:, 0] = 200.0  # softmax_0 rounds to 1: the direct formula gives -inf
    out = log1m_softmax(z.requires_grad_(True), torch.zeros(2, dtype=torch.long))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(z.grad).all()
    assert out[0].item() == pytest.approx(-200.0 + torch.log(torch.tensor(2.0)).item(), abs=1e-4)


def test_dual_variable_rises_above_the_margin_and_falls_to_zero_below():
    tr = rt.Trainer(tiny_cnn(), method="dale_pd", epochs=1, eps=0.1, nu=0.5, margin=0.3, dual_lr=0.1,
                    steps_per_epoch=4)
    m = tr.method
    assert m.nu.dtype == torch.float32 and m.nu.device == tr.device and m.nu.dim() == 0
    m.dual_step(torch.tensor(0.8))
    assert m.nu.item() == pytest.approx(0.55)
    m.dual_step(torch.tensor(0.3))  # on the margin: unchanged
    assert m.nu.item() == pytest.approx(0.55)
    values = []
    for _ in range(30):
        m.dual_step(torch.tensor(0.1))  # 0.02 below the margin each time
        values.append(m.nu.item())
    assert all(b < a for a, b in zip(values[:27], values[1:28]))
    assert values[-1] == 0.0  # projected on nu >= 0, and stays there
    # a training step of an untrained model: its clean loss (about ln 10) is above the margin, so nu rises
    x, y = load_digits("train").tensors
    before = m.nu.item()
    tr.train_step(x[:16], y[:16])
    assert m.nu.item() > before
    # dale keeps nu fixed
    tr = rt.Trainer(tiny_cnn(), method="dale", epochs=1, eps=0.1, nu=0.2, steps_per_epoch=4)
    tr.train_step(x[:16], y[:16])
    assert tr.method.nu.item() == pytest.approx(0.2)


def test_digits_dale_pd_keeps_clean_loss_near_the_margin(digits, tmp_path):
    """Seeded: the dual variable grows while the clean loss is above the margin rho = 0.4, and the clean loss
    then settles near rho (training for the robust loss alone leaves it at about 0.55 on this run)."""
    ld = DataLoader(Subset(digits[0], list(range(384))), batch_size=32, shuffle=True)
    res = rt.fit(tiny_cnn(seed=1), ld, "dale_pd", epochs=10, eps=0.2, steps=3, optimizer="adam", lr=3e-3,
                 schedule="constant", seed=0, margin=0.4, dual_lr=0.01, nu=1.0, progress=False, verbose=False,
                 out_dir=str(tmp_path))
    h = res.history
    nu = [r["nu"] for r in h]
    clean = [r["clean_loss"] for r in h]
    for k in range(1, len(h)):
        if clean[k] > 0.45:  # clearly above the margin for the whole epoch: nu went up
            assert nu[k] > nu[k - 1]
    assert clean[0] > 1.0 and nu[0] > 1.0
    late = clean[-3:]
    assert all(0.6 * 0.4 <= c <= 1.3 * 0.4 for c in late), clean
    with open(tmp_path / "log.csv") as fh:
        header = next(csv.reader(fh))
    assert tuple(header) == log_columns(res.config) and {"nu", "clean_loss"} <= set(header)
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ck["rank_states"][0]["method"]["nu"].item() == pytest.approx(nu[-1])


def _advbench_dale_pd_step(model, x, y, *, eps, step_size, n_steps, nu, lr, margin, eta):
    """A plain transcription of advbench's Gaussian_DALE_PD.step (arobey1/advbench, commit 8ad6d34:
    attacks.LMC_Gaussian_Linf with its noise coefficient and start noise at 0, then the primal SGD step and
    PrimalDualOptimizer.step), written from reading it. Returns nu after the dual update."""
    model.eval()
    adv = x.clone()
    for _ in range(n_steps):
        adv.requires_grad_(True)
        p = torch.softmax(model(adv), dim=1)[torch.arange(len(y)), y]
        g, = torch.autograd.grad(torch.log(1 - p).mean(), [adv])
        adv = adv.detach() + step_size * torch.sign(g)
        adv = torch.clamp(torch.min(torch.max(adv, x - eps), x + eps), 0.0, 1.0)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    opt.zero_grad()
    clean = F.cross_entropy(model(x), y)
    robust = F.cross_entropy(model(adv), y)
    (robust + nu * clean).backward()
    opt.step()
    v = nu + eta * (clean.detach() - margin)
    return v if v > 0 else torch.tensor(0.0)


def test_one_dale_pd_batch_step_equals_advbench_transcription():
    """Noise 0, start at x, Gaussian (sign) form, plain SGD: the parameters after the step and nu after the
    dual update equal advbench's (non-saturated logits: log(1 - p_y) and the stable form agree there)."""
    x, y = load_digits("train").tensors
    x, y = x[:24], y[:24]
    hp = dict(eps=0.1, alpha=0.03, steps=3, nu=0.7, margin=0.2, dual_lr=0.05, lr=0.1)
    ref = tiny_cnn(seed=4)
    with torch.no_grad():
        p = torch.softmax(ref.eval()(x), 1).max(1).values
    assert p.max() < 0.99  # non-saturated
    nu_ref = _advbench_dale_pd_step(ref, x, y, eps=hp["eps"], step_size=hp["alpha"], n_steps=hp["steps"], nu=hp["nu"],
                                    lr=hp["lr"], margin=hp["margin"], eta=hp["dual_lr"])
    model = tiny_cnn(seed=4)
    tr = rt.Trainer(model, method="dale_pd", epochs=1, steps_per_epoch=1, langevin_form="gaussian", langevin_noise=0.0,
                    random_start=False, optimizer="sgd", momentum=0.0, weight_decay=0.0, schedule="constant", **hp)
    tr.train_step(x, y)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    assert tr.method.nu.item() == pytest.approx(float(nu_ref), rel=1e-6)


def test_unsigned_langevin_step():
    """The paper's chain: delta + alpha * (per-sample gradient = B * the batch mean's) + c * xi, projected; its
    noise is sample b's alone (same draw in a batch of 2 and of 4) and fresh at every step."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 8, 8, generator=g)
    grad = torch.randn(4, 1, 8, 8, generator=g) * 0.05
    xa = (x + 0.02 * torch.randn(4, 1, 8, 8, generator=g)).clamp(0, 1)
    st = LangevinStep(0.0, "gaussian", "unsigned")
    st.reset(7)
    out = st(xa.clone(), x, grad, torch.tensor(0.1), torch.tensor(0.05), "linf", 0.0, 1.0)
    expect = torch.clamp(torch.clamp(xa + 0.05 * 4 * grad, x - 0.1, x + 0.1), 0, 1)
    torch.testing.assert_close(out, expect)
    eps = torch.tensor([0.1, 0.0, 0.2, 0.05])  # per-sample parameters
    st.reset(7)
    out = st(xa.clone(), x, grad, eps, 0.05, "linf", 0.0, 1.0)
    assert ((out - x).abs().flatten(1).max(1).values <= eps + 1e-6).all()
    noisy = LangevinStep(0.3, "gaussian", "unsigned")
    draws = []
    for b in (2, 4):
        noisy.reset(7)
        a = noisy(x[:b].clone(), x[:b], torch.zeros_like(x[:b]), 1.0, 0.0, "linf", -9.0, 9.0)
        draws.append((a - x[:b], noisy(a.clone(), x[:b], torch.zeros_like(x[:b]), 1.0, 0.0, "linf", -9.0, 9.0) - a))
    torch.testing.assert_close(draws[0][0], draws[1][0][:2])
    assert 0.2 < draws[1][0].std().item() < 0.4 and not torch.equal(draws[1][0], draws[1][1])


def test_per_epoch_dual_update_moves_nu_once_an_epoch():
    x, y = load_digits("train").tensors
    tr = rt.Trainer(tiny_cnn(), method="dale_pd", epochs=1, eps=0.1, steps=2, nu=0.0, margin=0.3, dual_lr=0.5,
                    dual_update="epoch", langevin_form="gaussian", langevin_gradient="unsigned", steps_per_epoch=2)
    m = tr.method
    assert "per-epoch dual" in tr.cfg.label and "unsigned" in tr.cfg.label
    cleans = []
    for k in (0, 16):
        tr.train_step(x[k:k + 16], y[k:k + 16])
        assert m.nu.item() == 0.0  # nothing moves within the epoch
        cleans.append(m._clean_sum.item())
    mean = cleans[-1] / 32
    row = m.log_values()
    assert row["clean_loss"] == pytest.approx(mean) and row["nu"] == pytest.approx(0.5 * (mean - 0.3), rel=1e-6)
    m.epoch_dual_step(-10.0)  # far below the margin: projected on nu >= 0
    assert m.nu.item() == 0.0


@pytest.mark.parametrize("kw,name", [
    (dict(method="dale", norm="l2"), "norm"),
    (dict(method="dale_pd", amp="fp16"), "amp"),
    (dict(method="dale_pd", langevin_form="cauchy"), "langevin_form"),
    (dict(method="dale", langevin_objective="kl"), "langevin_objective"),
    (dict(method="dale_pd", margin=-1.0), "margin"),
    (dict(method="dale_pd", dual_lr=-1.0), "dual_lr"),
    (dict(method="dale", nu=-0.5), "nu"),
    (dict(method="dale", langevin_noise=-0.5), "langevin_noise"),
    (dict(method="dale_pd", langevin_gradient="unsigned"), "langevin_gradient"),  # laplace: sign only
    (dict(method="dale", langevin_gradient="raw"), "langevin_gradient"),
    (dict(method="dale_pd", dual_update="step"), "dual_update"),
    (dict(method="dale_pd", amp="fp16", langevin_form="gaussian", langevin_gradient="unsigned"), "amp"),
])
def test_bad_arguments_name_the_argument(kw, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        rt.Trainer(tiny_cnn(), epochs=1, eps=0.05, **kw)


def test_cli_flags_come_from_the_registry():
    from robustops.cli.train import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    a = p.parse_args(["--method", "dale_pd", "--nu", "0.5", "--margin", "0.2", "--dual-lr", "0.01",
                      "--langevin-noise", "0.003", "--langevin-form", "gaussian", "--langevin-objective", "ce",
                      "--langevin-gradient", "unsigned", "--dual-update", "epoch"])
    assert (a.nu, a.margin, a.dual_lr, a.langevin_noise, a.langevin_form, a.langevin_objective, a.langevin_gradient,
            a.dual_update) == (0.5, 0.2, 0.01, 0.003, "gaussian", "ce", "unsigned", "epoch")


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_and_channels_last(digits, amp):
    kw = dict(langevin_form="gaussian") if amp == "fp16" else {}
    ld = DataLoader(Subset(digits[0], list(range(64))), batch_size=32)
    res = rt.fit(tiny_cnn(bn=True), ld, "dale_pd", epochs=1, eps=0.1, steps=2, amp=amp, channels_last=True, seed=0,
                 progress=False, verbose=False, **kw)
    r = res.history[-1]
    assert torch.isfinite(torch.tensor([r["train_loss"], r["nu"], r["clean_loss"]])).all()


# --------------------------------------------------------------------------- resume, DDP

@pytest.mark.parametrize("method,extra", [
    ("dale_pd", {}),
    # the paper's variant: unsigned Gaussian chain, nu from 0, one dual step per epoch
    ("dale_pd", dict(langevin_form="gaussian", langevin_gradient="unsigned", dual_update="epoch", nu=0.0, dual_lr=0.5,
                     alpha=0.02)),
])
def test_resume_matches_uninterrupted(digits, tmp_path, method, extra):
    train_ds, test_ds = digits
    sub = Subset(train_ds, list(range(128)))
    val = DataLoader(Subset(test_ds, list(range(64))), batch_size=64)
    hp = dict(epochs=3, eps=0.1, steps=2, seed=3, margin=0.5, dual_lr=0.05, langevin_noise=0.01, progress=False,
              verbose=False)
    hp.update(extra)
    # dies in the middle of the second epoch
    ref, res, crash = resume_matches_uninterrupted(method, sub, val, tmp_path, hp, crash_after=lambda n: n + 2,
                                                   width=8, weights_only=False)
    assert crash["epoch"] == 1
    assert res.epochs_run == ref.epochs_run == 3
    strip = lambda h: [{k: v for k, v in r.items() if "time" not in k} for r in h]  # noqa: E731
    assert str(strip(res.history)) == str(strip(ref.history))
    assert len({r["nu"] for r in res.history}) == 3


_DDP_KW = dict(epochs=2, eps=0.1, steps=2, random_start=False, langevin_noise=0.0, margin=0.3, dual_lr=0.1, lr=0.05,
               seed=0, progress=False, verbose=False)


def _ddp_worker(rank, world, port, method, out):
    with gloo_group(rank, world, port):
        train_ds = Subset(load_digits("train"), list(range(128)))
        model = tiny_cnn(seed=11)
        res = rt.fit(model, rank_loader(train_ds, rank, world), method, **_DDP_KW)
        torch.save({"state_dict": model.state_dict(), "history": res.history}, os.path.join(out, f"ddp{rank}.pt"))


@pytest.mark.parametrize("method", ["dale_pd"])
def test_ddp_two_gloo_processes_match_single(digits, tmp_path, method):
    """Noise-free chains from the clean input: two processes on half-batches end where one process on whole
    batches does, with the same dual variable on both ranks (the clean loss is averaged over them)."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, free_port(), method, str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"ddp{r}.pt", weights_only=False) for r in (0, 1)]
    model = tiny_cnn(seed=11)
    res = rt.fit(model, DataLoader(Subset(digits[0], list(range(128))), batch_size=32, shuffle=False), method,
                 **_DDP_KW)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(got[0]["state_dict"][k], v, rtol=1e-4, atol=1e-5)
    for a, a1, b in zip(got[0]["history"], got[1]["history"], res.history):
        assert a["nu"] == a1["nu"]
        assert a["nu"] == pytest.approx(b["nu"], rel=1e-4)
        assert a["clean_loss"] == pytest.approx(b["clean_loss"], rel=1e-4)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
