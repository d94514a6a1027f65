"""DALE and DALE-PD training (methods/dale.py): the dual variable, the clean-loss margin on digits, the
per-epoch log, exact resume and DDP."""
import argparse
import csv
import os

import pytest
import torch
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
from robustops.train.methods.dale import log1m_softmax


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


@pytest.mark.parametrize("kw,name", [
    (dict(method="dale", norm="l2"), "norm"),
    (dict(method="dale_pd", amp="fp16"), "amp"),
    (dict(method="dale_pd", langevin_form="cauchy"), "langevin_form"),
    (dict(method="dale", langevin_objective="kl"), "langevin_objective"),
    (dict(method="dale_pd", margin=-1.0), "margin"),
    (dict(method="dale_pd", dual_lr=-1.0), "dual_lr"),
    (dict(method="dale", nu=-0.5), "nu"),
    (dict(method="dale", langevin_noise=-0.5), "langevin_noise"),
])
def test_bad_arguments_name_the_argument(kw, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        rt.Trainer(tiny_cnn(), epochs=1, eps=0.05, **kw)


def test_cli_flags_come_from_the_registry():
    from robustops.cli.train import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    a = p.parse_args(["--method", "dale_pd", "--nu", "0.5", "--margin", "0.2", "--dual-lr", "0.01",
                      "--langevin-noise", "0.003", "--langevin-form", "gaussian", "--langevin-objective", "ce"])
    assert (a.nu, a.margin, a.dual_lr, a.langevin_noise, a.langevin_form, a.langevin_objective) == \
        (0.5, 0.2, 0.01, 0.003, "gaussian", "ce")


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_and_channels_last(digits, amp):
    kw = dict(langevin_form="gaussian") if amp == "fp16" else {}
    ld = DataLoader(Subset(digits[0], list(range(64))), batch_size=32)
    res = rt.fit(tiny_cnn(bn=True), ld, "dale_pd", epochs=1, eps=0.1, steps=2, amp=amp, channels_last=True, seed=0,
                 progress=False, verbose=False, **kw)
    r = res.history[-1]
    assert torch.isfinite(torch.tensor([r["train_loss"], r["nu"], r["clean_loss"]])).all()


# --------------------------------------------------------------------------- resume, DDP

@pytest.mark.parametrize("method", ["dale_pd"])
def test_resume_matches_uninterrupted(digits, tmp_path, method):
    train_ds, test_ds = digits
    sub = Subset(train_ds, list(range(128)))
    val = DataLoader(Subset(test_ds, list(range(64))), batch_size=64)
    hp = dict(epochs=3, eps=0.1, steps=2, seed=3, margin=0.5, dual_lr=0.05, langevin_noise=0.01, progress=False,
              verbose=False)
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
