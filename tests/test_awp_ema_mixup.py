"""The training options: adversarial weight perturbation (awp), weight averaging (ema), mixup / IAT."""
import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import (  # noqa: F401 (one_thread: an autouse fixture)
    CrashingLoader,
    Interrupt,
    free_port,
    gloo_group,
    one_thread,
    rank_loader,
    tiny_cnn,
)
from torch.utils.data import DataLoader, Subset

import robustops as ro
from robustops import train as rt
from robustops.data import load_digits
from robustops.train.ema import ema_decay

EPS = 0.2


@pytest.fixture(scope="module")
def digits():
    return load_digits("train"), load_digits("test")


def loader(ds, n, bs=32, shuffle=False):
    return DataLoader(Subset(ds, list(range(n))), batch_size=bs, shuffle=shuffle)


def run(model, ds, method, n=128, **kw):
    torch.manual_seed(0)
    hp = dict(epochs=2, eps=EPS, steps=2, lr=0.05, seed=1, progress=False, verbose=False, schedule="constant")
    hp.update(kw)
    return rt.fit(model, loader(ds, n, shuffle=True), method, **hp)


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# --------------------------------------------------------------------------- AWP

@pytest.mark.parametrize("method", ["pgd", "trades"])
def test_awp_gamma_zero_follows_the_plain_trajectory(digits, method):
    """gamma = 0 runs the whole machinery (ascent gradient, save, v = 0, restore, buffers put back) and
    must leave the trajectory bit for bit that of the plain method; gamma > 0 changes it."""
    plain, zero, awp = tiny_cnn(seed=2, bn=True), tiny_cnn(seed=2, bn=True), tiny_cnn(seed=2, bn=True)
    r1 = run(plain, digits[0], method)
    r2 = run(zero, digits[0], method, awp=0.0)
    assert [r["train_loss"] for r in r1.history] == [r["train_loss"] for r in r2.history]
    for (k, a), b in zip(plain.state_dict().items(), zero.state_dict().values()):
        assert torch.equal(a, b), k  # BatchNorm's running statistics included
    run(awp, digits[0], method, awp=0.01)
    assert not same_weights(plain, awp)


def test_awp_weights_restored_before_the_optimizer_step_and_gradient_at_perturbed_weights(digits):
    """The optimizer sees the unperturbed weights (exactly) and the gradient of the loss at
    w + v, v_l = gamma ||w_l|| g_l / ||g_l|| for the weights with >= 2 dimensions (g at w)."""
    gamma = 0.05
    x, y = digits[0].tensors
    x, y = x[:32], y[:32]
    model = tiny_cnn(seed=4)
    tr = rt.Trainer(model, method="pgd", awp=gamma, eps=EPS, lr=0.1, momentum=0.0, weight_decay=0.0,
                    schedule="constant", seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = {}

    def pre_step(opt, args, kwargs):
        seen["weights"] = {k: v.clone() for k, v in model.state_dict().items()}
        seen["grads"] = [p.grad.clone() for p in model.parameters()]

    handle = tr.optimizer.register_step_pre_hook(pre_step)
    try:
        tr.natural_step(x, y)  # the update on given inputs (pgd's last part), with AWP
    finally:
        handle.remove()
    for k, v in before.items():
        assert torch.equal(seen["weights"][k], v), k
    # the reference: the same by hand
    ref = tiny_cnn(seed=4)
    params = list(ref.parameters())
    g = torch.autograd.grad(F.cross_entropy(ref(x), y), params)
    with torch.no_grad():
        for p, gp in zip(params, g):
            if p.dim() > 1:
                p.add_(gamma * p.norm() * gp / gp.norm())
    g2 = torch.autograd.grad(F.cross_entropy(ref(x), y), params)
    for got, want in zip(seen["grads"], g2):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # and the step applied that gradient to the unperturbed weights
    for v, p0, gp in zip(model.parameters(), before.values(), g2):
        torch.testing.assert_close(v.detach(), p0 - 0.1 * gp, rtol=1e-5, atol=1e-7)


def test_awp_digits_run_trains(digits):
    train_ds, test_ds = digits
    model = tiny_cnn(seed=3)
    torch.manual_seed(1)
    res = rt.fit(model, DataLoader(train_ds, batch_size=32, shuffle=True), "pgd", epochs=6, eps=EPS, steps=3, lr=0.1,
                 awp=5e-3, seed=0, progress=False, verbose=False, val_loader=loader(test_ds, 256, bs=256),
                 restore_best=False)
    assert res.config.label == "PGD-3 AT + AWP (gamma=0.005)"
    # measured (torch 2.14, CPU): clean 0.89, PGD-10 0.36 after 6 epochs (plain PGD-AT: 0.95, 0.54; AWP
    # regularises, and starts slower)
    last = res.history[-1]
    assert last["clean_acc"] > 0.7 and last["robust_acc"] > 0.25, last
    assert all(torch.isfinite(p).all() for p in model.parameters())


# --------------------------------------------------------------------------- EMA

def test_ema_decay_zero_is_no_average(digits):
    val = loader(digits[1], 64, bs=64)
    a, b = tiny_cnn(seed=2, bn=True), tiny_cnn(seed=2, bn=True)
    r1 = run(a, digits[0], "pgd", val_loader=val)
    r2 = run(b, digits[0], "pgd", val_loader=val, ema=0.0)
    assert same_weights(a, b)
    strip = lambda h: [{k: v for k, v in r.items() if "time" not in k} for r in h]  # noqa: E731
    assert str(strip(r1.history)) == str(strip(r2.history))


def test_ema_equals_the_hand_computed_average(digits):
    decay = 0.9
    x, y = digits[0].tensors
    model = tiny_cnn(seed=5, bn=True)
    tr = rt.Trainer(model, method="natural", ema=decay, lr=0.1, schedule="constant", seed=0)
    avg = {k: v.clone().double() for k, v in model.state_dict().items()}
    for t in range(5):
        tr.train_step(x[32 * t:32 * (t + 1)], y[32 * t:32 * (t + 1)])
        d = min(decay, (1 + t) / (10 + t))
        assert d == ema_decay(decay, t)
        for k, v in model.state_dict().items():
            avg[k] = d * avg[k] + (1 - d) * v.double() if v.is_floating_point() else v.clone().double()
    assert tr.ema.updates == 5
    for k, v in tr.ema.avg.items():
        torch.testing.assert_close(v.double(), avg[k], rtol=1e-6, atol=1e-7, msg=k)
    # applied() swaps the average in and back, exactly
    live = {k: v.clone() for k, v in model.state_dict().items()}
    averaged = tr.ema.averaged_state_dict()
    with tr.ema.applied():
        for k, v in model.state_dict().items():
            assert torch.equal(v, averaged[k]), k
    for k, v in model.state_dict().items():
        assert torch.equal(v, live[k]), k
    assert all(torch.equal(v, averaged[k]) for k, v in tr.ema.avg.items())


def test_ema_validation_selection_and_returned_model_are_the_average(digits, tmp_path):
    train_ds, test_ds = digits
    val = loader(test_ds, 128, bs=64)
    model = tiny_cnn(seed=6, bn=True)
    res = run(model, train_ds, "natural", n=256, epochs=3, ema=0.5, val_loader=val, val_eps=0, restore_best=False,
              out_dir=str(tmp_path))
    # the returned model holds the average; a plain evaluation of it gives the logged validation metrics
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ck["state_dict"][k]), k
    assert not all(torch.equal(ck["state_dict"][k], v) for k, v in ck["train_state_dict"].items()
                   if v.is_floating_point())
    ev = rt.Trainer(model, method="natural", val_eps=0, seed=0).evaluate(val)
    assert ev["clean_acc"] == res.history[-1]["clean_acc"]
    assert ev["val_loss"] == pytest.approx(res.history[-1]["val_loss"], rel=1e-12)
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["epoch"] == res.best_epoch


# --------------------------------------------------------------------------- mixup

class HalfAdversarial(rt.Method):
    """The 50 % clean / 50 % adversarial loss: IAT with no mixing (test only)."""
    name = "test_half_adversarial"
    help = "(CE(x) + CE(x_adv)) / 2 (test only)"

    def step(self, x, y):
        c, ctx = self.cfg, self.ctx
        x_adv = ctx.attack(x, y, c.eps, c.alpha, c.steps, c.norm, c.random_start)

        def closure(net):
            lc, la = net(x, x_adv)
            return 0.5 * (F.cross_entropy(lc, y) + F.cross_entropy(la, y)), la

        loss, logits = ctx.update(closure)
        return ctx.stats(loss, logits, y)


@pytest.mark.parametrize("method,ref", [("natural", "natural"), ("pgd", "test_half_adversarial")])
def test_mixup_alpha_to_zero_is_no_mixing(digits, method, ref):
    """alpha -> 0 draws lam in {0, 1}, folded to 1: the unmixed batch. natural: natural training; pgd
    (IAT): the 50/50 clean / adversarial loss. alpha = 1 changes the trajectory."""
    rt.register(HalfAdversarial)
    try:
        a, b, c = tiny_cnn(seed=2, bn=True), tiny_cnn(seed=2, bn=True), tiny_cnn(seed=2, bn=True)
        r1 = run(a, digits[0], ref)
        r2 = run(b, digits[0], method, mixup=1e-8)
        assert [r["train_loss"] for r in r1.history] == [r["train_loss"] for r in r2.history]
        for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(v, w), k
        run(c, digits[0], method, mixup=1.0)
        assert not same_weights(a, c)
    finally:
        rt.registry.unregister(HalfAdversarial.name)


def test_mixup_draws(digits):
    x, y = digits[0].tensors
    x, y = x[:16], y[:16]
    tr = rt.Trainer(tiny_cnn(), method="natural", mixup=1.0, seed=0)
    lams = []
    for _ in range(20):
        xm, ya, yb, lam = tr.mixup(x, y)
        assert 0.5 <= lam <= 1.0 and torch.equal(ya, y)
        perm = [int((y == v).nonzero()[0]) for v in yb]  # labels of a permutation of the batch
        assert sorted(yb.tolist()) == sorted(y.tolist()) and len(perm) == 16
        lams.append(lam)
    assert len(set(lams)) == 20
    tr2 = rt.Trainer(tiny_cnn(), method="natural", mixup=1.0, seed=0)
    assert [tr2.mixup(x, y)[3] for _ in range(20)] == lams  # seeded


def test_mixup_digits_run_trains(digits):
    train_ds, test_ds = digits
    model = tiny_cnn(seed=3)
    res = rt.fit(model, loader(train_ds, 512, shuffle=True), "natural", epochs=4, lr=0.1, mixup=1.0, seed=0,
                 progress=False, verbose=False, val_loader=loader(test_ds, 128, bs=128), val_eps=0)
    assert res.config.label == "natural + mixup (alpha=1)"
    assert res.history[-1]["clean_acc"] > 0.7, res.history


# --------------------------------------------------------------------------- all of them: resume, config, CLI

def test_resume_with_awp_ema_mixup_matches_uninterrupted(digits, tmp_path):
    train_ds, test_ds = digits
    sub = Subset(train_ds, list(range(160)))
    val = loader(test_ds, 64, bs=64)
    hp = dict(epochs=3, eps=EPS, steps=2, seed=3, progress=False, verbose=False, awp=0.01, ema=0.9, mixup=1.0)
    torch.manual_seed(0)
    full = tiny_cnn(seed=5, bn=True)
    ref = rt.fit(full, DataLoader(sub, batch_size=32, shuffle=True), "pgd", val_loader=val,
                 out_dir=str(tmp_path / "full"), **hp)
    out = str(tmp_path / "run")
    torch.manual_seed(0)
    ld = DataLoader(sub, batch_size=32, shuffle=True)
    with pytest.raises(Interrupt):
        rt.fit(tiny_cnn(seed=5, bn=True), CrashingLoader(ld, after=len(ld) + 2), "pgd", val_loader=val, out_dir=out,
               **hp)
    ck = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert ck["epoch"] == 1 and ck["ema"]["updates"] == len(ld) and "mix_gen" in ck["rank_states"][0]
    torch.manual_seed(999)
    model2 = tiny_cnn(seed=77, bn=True)
    res = rt.fit(model2, DataLoader(sub, batch_size=32, shuffle=True), "pgd", val_loader=val, out_dir=out,
                 resume=True, **hp)
    for (k, a), b in zip(full.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k
    strip = lambda h: [{k: v for k, v in r.items() if "time" not in k} for r in h]  # noqa: E731
    assert str(strip(res.history)) == str(strip(ref.history))
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    for k in a["train_state_dict"]:
        assert torch.equal(a["train_state_dict"][k], b["train_state_dict"][k]), k
    # a resumed run must keep the options
    with pytest.raises(ValueError, match="awp=0.01 \\(now 0.02\\)"):
        rt.fit(tiny_cnn(seed=5, bn=True), ld, "pgd", val_loader=val, out_dir=out, resume=True,
               **{**hp, "awp": 0.02})


@pytest.mark.parametrize("kw,name", [
    (dict(method="natural", awp=5e-3), "awp"),
    (dict(method="free", awp=5e-3), "awp"),
    (dict(method="trades", mixup=1.0), "mixup"),
    (dict(method="fgsm", mixup=1.0), "mixup"),
    (dict(method="pgd", awp=-1.0), "awp"),
    (dict(method="pgd", ema=1.0), "ema"),
    (dict(method="pgd", ema="0.9"), "ema"),
    (dict(method="natural", mixup=0.0), "mixup"),
])
def test_options_refused_where_they_do_not_apply(kw, name):
    with pytest.raises(ValueError) as e:
        rt.FitConfig.make(**kw).resolved()
    assert str(e.value).startswith(name), str(e.value)


def test_labels():
    c = rt.FitConfig.make("pgd", steps=7, awp=5e-3, ema=0.999, mixup=1.0).resolved()
    assert c.label == "PGD-7 AT + AWP (gamma=0.005) + IAT (alpha=1) + EMA (0.999)"
    assert rt.FitConfig.make("trades", awp=5e-3).resolved().label == "TRADES (PGD-7) + AWP (gamma=0.005)"
    assert rt.FitConfig.make("free", ema=0.99).resolved().label == "free AT (m=8) + EMA (0.99)"
    assert rt.FitConfig.make("pgd").resolved().label == "PGD-7 AT"


def test_cli_train_with_options(tmp_path, capsys):
    from robustops.cli import build_parser, main

    args = build_parser().parse_args(["train", "--method", "pgd", "--awp", "5e-3", "--ema", "0.999", "--mixup", "1"])
    assert (args.awp, args.ema, args.mixup) == (5e-3, 0.999, 1.0)
    out = tmp_path / "run"
    assert main(["train", "--method", "pgd", "--awp", "5e-3", "--ema", "0.9", "--mixup", "1", "--epochs", "1",
                 "--steps", "2", "--eps", "0.2", "--out", str(out), "--no-progress", "--test-steps", "2",
                 "--batch-size", "128", "--val-size", "64"]) == 0
    with open(out / "summary.json") as fh:
        s = json.load(fh)
    assert s["label"] == "PGD-2 AT + AWP (gamma=0.005) + IAT (alpha=1) + EMA (0.9)"
    assert s["config"]["awp"] == 5e-3 and s["config"]["ema"] == 0.9 and s["config"]["mixup"] == 1.0
    capsys.readouterr()
    assert main(["train", "--method", "natural", "--awp", "5e-3", "--out", str(tmp_path / "r2")]) == 2
    assert "awp (adversarial weight perturbation) is an option of the methods pgd, trades" in capsys.readouterr().err


# --------------------------------------------------------------------------- distributed

OPTION_RUNS = {"awp": dict(method="pgd", awp=0.01), "ema": dict(method="pgd", ema=0.9),
               "trades_awp": dict(method="trades", awp=0.01)}


def _ddp_worker(rank, world, port, which, out):
    with gloo_group(rank, world, port):
        train_ds = Subset(load_digits("train"), list(range(256)))
        test_ds = Subset(load_digits("test"), list(range(64)))
        val = DataLoader(ro.data.shard(test_ds, rank, world), batch_size=32)
        model = tiny_cnn(seed=11)
        kw = dict(OPTION_RUNS[which])
        res = rt.fit(model, rank_loader(train_ds, rank, world), kw.pop("method"), epochs=2, eps=EPS, steps=2,
                     random_start=False, lr=0.05, val_loader=val, val_eps=0, progress=False, verbose=False, seed=0,
                     out_dir=os.path.join(out, "ckpt"), **kw)
        if rank == 0:
            torch.save({"state_dict": model.state_dict(), "history": res.history}, os.path.join(out, "ddp.pt"))


@pytest.mark.parametrize("which", ["awp", "ema"])
def test_ddp_two_gloo_processes_match_single_with_options(digits, tmp_path, which):
    """Two processes on halves of each batch = one process on the whole batch: AWP's ascent gradient is
    averaged over the processes, the weight average follows identical weights."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, free_port(), which, str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "ddp.pt", weights_only=False)
    kw = dict(OPTION_RUNS[which])
    model = tiny_cnn(seed=11)
    res = rt.fit(model, DataLoader(Subset(digits[0], list(range(256))), batch_size=32, shuffle=False),
                 kw.pop("method"), epochs=2, eps=EPS, steps=2, random_start=False, lr=0.05,
                 val_loader=DataLoader(Subset(digits[1], list(range(64))), batch_size=32), val_eps=0,
                 progress=False, verbose=False, seed=0, **kw)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(got["state_dict"][k], v, rtol=1e-4, atol=1e-4)
    for a, b in zip(got["history"], res.history):
        assert a["clean_acc"] == pytest.approx(b["clean_acc"], abs=1 / 64 + 1e-9)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)


def test_awp_without_the_ascent_all_reduce_would_differ():
    """(documentation of the choice) the ascent gradient of half a batch is not that of the whole batch."""
    x, y = load_digits("train").tensors
    x, y = x[:32], y[:32]
    net = tiny_cnn(seed=11)
    w = [p for p in net.parameters() if p.dim() > 1]
    full = torch.autograd.grad(nn.functional.cross_entropy(net(x), y), w)
    half = torch.autograd.grad(nn.functional.cross_entropy(net(x[:16]), y[:16]), w)
    assert not all(torch.allclose(a / a.norm(), b / b.norm(), atol=1e-3) for a, b in zip(full, half))
