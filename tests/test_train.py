"""robustops.train: the training methods on the digits data, exact resume, DDP, argument errors, CLI."""
import csv
import json
import math
import os

import pytest
import torch
import torch.nn as nn
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

EPS = 0.2  # L-inf budget on the [0, 1] digits


@pytest.fixture(scope="module")
def digits():
    return load_digits("train"), load_digits("test")


def loader(ds, bs=64, shuffle=True, n=None):
    if n is not None:
        ds = Subset(ds, list(range(n)))
    return DataLoader(ds, batch_size=bs, shuffle=shuffle)


def pgd_accuracy(model, ds, eps=EPS, steps=10):
    """Robust accuracy with an independent plain-PyTorch PGD (the reference op), eval mode."""
    model.eval()
    x, y = ds.tensors
    g = torch.Generator().manual_seed(123)
    x_adv = (x + (torch.rand(x.shape, generator=g) * 2 - 1) * eps).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = nn.functional.cross_entropy(model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = ro.reference.pgd_step(x_adv.detach(), x, grad, eps, 2.5 * eps / steps)
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
        robust = (model(x_adv).argmax(1) == y).float().mean().item()
    model.train()
    return clean, robust


# --------------------------------------------------------------------------- robustness

def test_adversarial_training_beats_natural(digits):
    train_ds, test_ds = digits
    common = dict(eps=EPS, seed=0, progress=False, verbose=False)
    acc = {}
    runs = {"natural": dict(epochs=6, lr=0.1), "pgd": dict(epochs=8, steps=3, lr=0.1),
            "fgsm": dict(epochs=8, lr=0.1), "free": dict(epochs=16, m=4, lr=0.05)}
    for method, kw in runs.items():
        model = tiny_cnn()
        torch.manual_seed(1)
        res = rt.fit(model, loader(train_ds, bs=32), method, **common, **kw)
        assert res.epochs_run == (4 if method == "free" else kw["epochs"])
        acc[method] = pgd_accuracy(model, test_ds)
    print({k: (round(c, 3), round(r, 3)) for k, (c, r) in acc.items()})
    nat_clean, nat_rob = acc["natural"]
    assert nat_clean > 0.9
    assert acc["pgd"][1] > nat_rob + 0.35, acc
    assert acc["fgsm"][1] > nat_rob + 0.3, acc
    assert acc["free"][1] > nat_rob + 0.3, acc
    for method in ("pgd", "fgsm", "free"):
        assert acc[method][0] > 0.85, acc


@pytest.mark.parametrize("method,kw", [
    ("trades", dict(steps=2, beta=3.0)),
    ("gaussian", dict(sigma=0.25)),
    ("pgd", dict(norm="l2", eps=1.0, steps=2)),
    ("pgd", dict(amp="bf16", channels_last=True, steps=2)),
    ("fgsm", dict(fgsm_init="previous", amp="fp16")),
    ("fgsm", dict(fgsm_init="zero", optimizer="adam", schedule="multistep")),
    ("free", dict(m=2, channels_last=True, schedule="cosine")),
    ("natural", dict(mean=[0.3], std=[0.4], schedule="constant", nesterov=True)),
])
def test_methods_and_options_train(digits, method, kw):
    train_ds, test_ds = digits
    model = tiny_cnn(bn=True)
    kw = {"eps": EPS, **kw}
    res = rt.fit(model, loader(train_ds, n=256), method, epochs=2, val_loader=loader(test_ds, 128, False, n=128),
                 seed=0, progress=False, verbose=False, **kw)
    assert len(res.history) == (1 if method == "free" else 2)
    row = res.history[-1]
    assert math.isfinite(row["train_loss"]) and 0 <= row["train_acc"] <= 1
    assert 0 <= row["clean_acc"] <= 1 and 0 <= row["robust_acc"] <= 1
    if method == "gaussian":
        assert 0 <= row["noise_acc"] <= 1
        assert res.select == "noise_acc"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_trades_with_beta_zero_follows_the_natural_trajectory(digits):
    """beta = 0 leaves TRADES's loss CE(f(x), y): the same weights after every epoch as natural
    training from the same start and data order (the inner KL maximisation runs but adds nothing)."""
    train_ds, _ = digits
    kw = dict(epochs=1, seed=4, lr=0.05, schedule="constant", progress=False, verbose=False)
    nat, tra = tiny_cnn(seed=2), tiny_cnn(seed=2)
    torch.manual_seed(0)
    for epoch in range(3):
        rn = rt.fit(nat, loader(train_ds, bs=32, n=256, shuffle=False), "natural", **kw)
        rtr = rt.fit(tra, loader(train_ds, bs=32, n=256, shuffle=False), "trades", beta=0.0, eps=EPS, steps=2, **kw)
        assert rn.history[0]["train_loss"] == rtr.history[0]["train_loss"], epoch
        for (k, a), b in zip(nat.state_dict().items(), tra.state_dict().values()):
            assert torch.equal(a, b), (epoch, k)
    # and beta > 0 does change it
    rt.fit(tra, loader(train_ds, bs=32, n=256, shuffle=False), "trades", beta=6.0, eps=EPS, steps=2, **kw)
    rt.fit(nat, loader(train_ds, bs=32, n=256, shuffle=False), "natural", **kw)
    assert not all(torch.equal(a, b) for a, b in zip(nat.state_dict().values(), tra.state_dict().values()))


def noisy_accuracy(model, ds, sigma, draws=4):
    """Accuracy on x + sigma * N(0, I) (plain torch noise, fixed generator), averaged over draws."""
    model.eval()
    x, y = ds.tensors
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        accs = [(model(x + sigma * torch.randn(x.shape, generator=g)).argmax(1) == y).float().mean().item()
                for _ in range(draws)]
    model.train()
    return sum(accs) / draws


def test_gaussian_training_beats_natural_under_noise(digits):
    train_ds, test_ds = digits
    sigma = 0.5
    acc = {}
    for method in ("natural", "gaussian"):
        model = tiny_cnn(seed=3)
        torch.manual_seed(1)
        rt.fit(model, loader(train_ds, bs=32), method, epochs=6, lr=0.1, sigma=sigma, seed=0, progress=False,
               verbose=False)
        acc[method] = noisy_accuracy(model, test_ds, sigma)
    print(acc)
    # measured: natural 0.65, gaussian 0.75 (torch 2.14, CPU); noise-free training cannot close the gap
    assert acc["gaussian"] > acc["natural"] + 0.05, acc
    assert acc["gaussian"] > 0.7, acc


def test_registry_drives_config_and_cli():
    """Every registered method's hyperparameters reach FitConfig and the CLI; unknown names are
    refused; a method registered later is accepted everywhere without other changes."""
    from robustops.cli import build_parser

    assert rt.METHODS[:6] == ("natural", "pgd", "free", "fgsm", "trades", "gaussian")
    c = rt.FitConfig.make("trades", beta=2.0, m=3).resolved()
    assert c.beta == 2.0 and c.params == {"beta": 2.0}  # free's m is ignored for trades
    with pytest.raises(ValueError, match="unknown training argument"):
        rt.FitConfig.make("pgd", betta=1.0)

    class Doubled(rt.Method):
        name = "test_doubled_ce"
        help = "natural training on a doubled loss (test only)"
        hyper = (rt.Hyper("scale", 2.0, "loss scale", minimum=0.0),)

        def step(self, x, y):
            ctx = self.ctx

            def closure(net):
                logits = net(x)
                return self.cfg.scale * nn.functional.cross_entropy(logits, y), logits

            loss, logits = ctx.update(closure)
            return ctx.stats(loss, logits, y)

    rt.register(Doubled)
    try:
        assert "test_doubled_ce" in rt.METHODS
        args = build_parser().parse_args(["train", "--method", "test_doubled_ce", "--scale", "3"])
        assert args.scale == 3.0
        res = rt.fit(tiny_cnn(), loader(load_digits("train"), n=64), "test_doubled_ce", epochs=1, scale=3.0,
                     progress=False, verbose=False)
        assert res.config.scale == 3.0 and res.history[0]["train_loss"] > 3.0
        with pytest.raises(ValueError, match=r"^scale \(loss scale\) must be"):
            rt.FitConfig.make("test_doubled_ce", scale=-1.0).resolved()
    finally:
        rt.registry.unregister("test_doubled_ce")


def test_free_counts_passes_like_natural(digits):
    """free with epochs=E, m replays: ceil(E/m) data passes, m optimizer steps per minibatch,
    i.e. the same number of forward/backward passes as E natural epochs."""
    train_ds, _ = digits
    ld = loader(train_ds, n=128, bs=32)
    model = tiny_cnn()
    res = rt.fit(model, ld, "free", epochs=4, m=2, seed=0, progress=False, verbose=False)
    assert res.epochs_run == 2 and res.history[-1]["equiv_epochs"] == 4
    tr = rt.Trainer(tiny_cnn(), method="free", epochs=4, m=2, steps_per_epoch=len(ld))
    assert tr.total_steps == 4 * len(ld)


def test_lr_schedules():
    f = rt.LRFactor("cyclic", 100, [])
    vals = [f(i) for i in range(100)]
    assert max(vals) == pytest.approx(1.0) and vals.index(max(vals)) == 39 and vals[-1] == pytest.approx(0.0)
    f = rt.LRFactor("multistep", 100, [0.5, 0.75])
    assert (f(0), f(49), f(50), f(75)) == (1.0, 1.0, pytest.approx(0.1), pytest.approx(0.01))


# --------------------------------------------------------------------------- checkpoints / resume

@pytest.mark.parametrize("method,kw", [("free", dict(m=2)), ("pgd", dict(steps=2, patience=5)),
                                       ("fgsm", dict(fgsm_init="previous"))])
def test_resume_matches_uninterrupted(digits, tmp_path, method, kw):
    train_ds, test_ds = digits
    sub = Subset(train_ds, list(range(192)))
    val = loader(test_ds, 96, False, n=96)
    epochs = 8 if method == "free" else 4  # 4 data passes each
    hp = dict(epochs=epochs, eps=EPS, seed=3, progress=False, verbose=False, **kw)

    torch.manual_seed(0)
    full = tiny_cnn(seed=5, bn=True)
    ref = rt.fit(full, DataLoader(sub, batch_size=32, shuffle=True), method, val_loader=val,
                 out_dir=str(tmp_path / "full"), **hp)

    run = str(tmp_path / "run")
    torch.manual_seed(0)
    model = tiny_cnn(seed=5, bn=True)
    ld = DataLoader(sub, batch_size=32, shuffle=True)
    with pytest.raises(Interrupt):  # dies in the middle of the third pass
        rt.fit(model, CrashingLoader(ld, after=2 * len(ld) + 3), method, val_loader=val, out_dir=run, **hp)
    ck = torch.load(os.path.join(run, "last.pt"), weights_only=False)
    assert ck["epoch"] == 2  # both finished epochs are on disk
    with open(os.path.join(run, "log.csv")) as fh:
        assert [r["epoch"] for r in csv.DictReader(fh)] == ["1", "2"]

    torch.manual_seed(999)  # a fresh process: the global RNG is whatever it is
    model2 = tiny_cnn(seed=77, bn=True)
    res = rt.fit(model2, DataLoader(sub, batch_size=32, shuffle=True), method, val_loader=val, out_dir=run,
                 resume=True, **hp)
    assert res.epochs_run == ref.epochs_run == 4
    sd1, sd2 = full.state_dict(), model2.state_dict()
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), k
    strip = lambda h: [{k: v for k, v in r.items() if "time" not in k} for r in h]  # noqa: E731
    assert str(strip(res.history)) == str(strip(ref.history))
    assert res.best_epoch == ref.best_epoch
    with open(os.path.join(run, "log.csv")) as fh:
        assert [r["epoch"] for r in csv.DictReader(fh)] == ["1", "2", "3", "4"]
    # resuming a finished run trains nothing more
    again = rt.fit(tiny_cnn(bn=True), DataLoader(sub, batch_size=32), method, val_loader=val, out_dir=run,
                   resume=True, **hp)
    assert again.epochs_run == 4


def test_early_stopping_keeps_best(digits, tmp_path):
    train_ds, test_ds = digits
    val = loader(test_ds, 64, False, n=64)
    # select="last": every validation is an improvement, never stops
    res = rt.fit(tiny_cnn(), loader(train_ds, n=128), "natural", epochs=3, val_loader=val, val_eps=0, patience=1,
                 progress=False, verbose=False, seed=0, select="last")
    assert not res.stopped_early and res.best_epoch == 3
    # lr 1e-9: nothing changes, epoch 1 stays best and training stops after `patience` more epochs
    res = rt.fit(tiny_cnn(), loader(train_ds, n=128), "natural", epochs=10, schedule="constant",
                 val_loader=val, val_eps=0, patience=2, out_dir=str(tmp_path), progress=False, verbose=False,
                 seed=0, lr=1e-9, optimizer="adam")
    assert res.stopped_early and res.best_epoch == 1 and res.epochs_run == 3
    best = torch.load(tmp_path / "best.pt", weights_only=False)
    assert best["epoch"] == 1 and set(best) >= {"model", "model_kwargs", "state_dict", "method", "eps"}
    # robust overfitting: the model handed back holds the best epoch's weights, not the last
    model = tiny_cnn()
    res = rt.fit(model, loader(train_ds, n=256), "pgd", epochs=4, steps=2, eps=EPS, schedule="constant", lr=0.05,
                 val_loader=val, progress=False, verbose=False, seed=0, out_dir=str(tmp_path / "r"))
    best = torch.load(tmp_path / "r" / "best.pt", weights_only=False)
    assert best["epoch"] == res.best_epoch
    assert res.best_metric == max(r["robust_acc"] for r in res.history)
    for k, v in model.state_dict().items():
        assert torch.equal(v, best["state_dict"][k])


# --------------------------------------------------------------------------- distributed

def _ddp_worker(rank, world, port, method, out):
    with gloo_group(rank, world, port):
        train_ds = Subset(load_digits("train"), list(range(256)))
        test_ds = Subset(load_digits("test"), list(range(64)))
        val = DataLoader(ro.data.shard(test_ds, rank, world), batch_size=32)
        model = tiny_cnn(seed=11)
        res = rt.fit(model, rank_loader(train_ds, rank, world), method, epochs=2, eps=EPS, steps=2, random_start=False,
                     lr=0.05, val_loader=val, val_eps=0, progress=False, verbose=False, seed=0,
                     out_dir=os.path.join(out, "ckpt"))
        if rank == 0:
            torch.save({"state_dict": model.state_dict(), "history": res.history}, os.path.join(out, "ddp.pt"))


@pytest.mark.parametrize("method", ["pgd"])
def test_ddp_two_gloo_processes_match_single(digits, tmp_path, method):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, free_port(), method, str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "ddp.pt", weights_only=False)

    train_ds = Subset(digits[0], list(range(256)))
    model = tiny_cnn(seed=11)
    res = rt.fit(model, DataLoader(train_ds, batch_size=32, shuffle=False), method, epochs=2, eps=EPS, steps=2,
                 random_start=False, lr=0.05, val_loader=DataLoader(Subset(digits[1], list(range(64))), batch_size=32),
                 val_eps=0, progress=False, verbose=False, seed=0)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(got["state_dict"][k], v, rtol=1e-4, atol=1e-4)
    for a, b in zip(got["history"], res.history):
        assert a["clean_acc"] == pytest.approx(b["clean_acc"], abs=1 / 64 + 1e-9)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
    ck = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=False)
    assert len(ck["rank_states"]) == 2


# --------------------------------------------------------------------------- errors

@pytest.mark.parametrize("kw,name", [
    (dict(method="adversarial"), "method"),
    (dict(method="pgd", eps=-0.1), "eps"),
    (dict(method="free", m=0), "m "),
    (dict(method="pgd", steps=0), "steps"),
    (dict(method="pgd", norm="l1"), "norm"),
    (dict(method="natural", optimizer="lbfgs"), "optimizer"),
    (dict(method="natural", schedule="step"), "schedule"),
    (dict(method="natural", amp="fp8"), "amp"),
    (dict(method="gaussian", sigma=-1.0), "sigma"),
    (dict(method="trades", beta=-1.0), "beta"),
    (dict(method="natural", epochs=0), "epochs"),
])
def test_bad_arguments_name_the_argument(digits, kw, name):
    with pytest.raises(ValueError) as e:
        rt.fit(tiny_cnn(), loader(digits[0], n=64), progress=False, **kw)
    assert str(e.value).startswith(name.strip()), str(e.value)


def test_cli_errors(capsys, tmp_path):
    from robustops.cli import main

    assert main(["train", "--data", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "--data" in err and "missing.npz" in err and "does not exist" in err
    assert main(["train", "--data", "cifar10:" + str(tmp_path / "nodir"), "--out", str(tmp_path / "r")]) == 2
    assert "--data" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse's choices: the parser's one-line error
        main(["train", "--method", "madry", "--out", str(tmp_path / "r")])
    assert e.value.code == 2
    assert "--method" in capsys.readouterr().err
    assert main(["train", "--eps", "-1", "--out", str(tmp_path / "r")]) == 2
    assert "eps must be" in capsys.readouterr().err
    assert main(["train", "--method", "free", "-m", "0", "--out", str(tmp_path / "r")]) == 2
    assert "m (free-AT replays" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--eps", "abc"])
    assert "8/255" in capsys.readouterr().err


def test_cli_train_digits(tmp_path, capsys):
    from robustops.cli import main

    out = tmp_path / "run"
    rc = main(["train", "--method", "fgsm", "--epochs", "2", "--eps", "0.2", "--out", str(out), "--no-progress",
               "--test-steps", "5", "--batch-size", "64"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "test: clean acc" in text
    assert (out / "last.pt").exists() and (out / "best.pt").exists() and (out / "log.csv").exists()
    from robustops import models

    m = models.load_model(str(out / "best.pt"))
    assert isinstance(m, nn.Module)
    # --resume on a finished run continues nothing and succeeds
    assert main(["train", "--method", "fgsm", "--epochs", "2", "--eps", "0.2", "--out", str(out), "--no-progress",
                 "--test-steps", "0", "--batch-size", "64", "--resume"]) == 0


def test_cli_demo_quick(tmp_path, capsys):
    from robustops.cli import main

    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--epochs", "1", "--n0", "10", "--n", "50", "--certify-max", "20",
               "--attack-steps", "3", "--aa-steps", "3", "--aa-fab-steps", "2", "--aa-queries", "20", "--no-progress", "--val-size", "64",
               "--cvae-epochs", "2", "--learned-steps", "2", "--set-attack-steps", "3", "--latent-n", "50",
               "--latent-certify-max", "10", "--proxy-n", "64", "--sequential-images", "6", "--jobs", "2",
               "--sequential-n-max", "2000", "--sequential-radius", "0.2", "--corruption-max", "40"])
    assert rc == 0
    text = capsys.readouterr().out
    # the learned-perturbation-set section: the set's quality, three models, the picture, the JSON rows
    for label in ("learned perturbation set (CVAE, 2 epochs", "coverage", "learned-set augmentation (eps=",
                  "learned-set AT (eps=", "adversarial-set acc (latent PGD-3)", "latent ACR (sigma=",
                  "certified acc at r=eps=", "sigma sized so that n samples can certify r=eps"):
        assert label in text
    for f in ("perturbation_sets.png", "perturbation_sets.pdf", "cvae/model.pt", "learned/last.pt"):
        assert (out / f).exists(), f
    with open(out / "results.json") as fh:
        learned = json.load(fh)["learned_perturbation_sets"]
    assert learned[0]["eps"] > 0 and 0 <= learned[0]["quality"]["coverage"] <= 1
    assert [r["method"] for r in learned[1:]] == ["natural", "learned_aug", "learned"]
    for r in learned[1:]:
        assert 0 <= r["set_acc"] <= 1 and 0 <= r["random_acc"] <= 1 and r["latent_acr"] >= 0
        assert 0 <= r["latent_cert_at_eps"] <= 1
    for label in ("natural", "PGD-7 AT", "free AT (m=4)", "FGSM-SDI AT", "PGD-7 AT + CRAIG coreset (0.5)",
                  "Gaussian noise (sigma=0.25)", "IBP (kappa=0.5)",
                  "ACERT (kappa=0)", "DALE-PD", "PGD-7 AT + AWP (gamma=0.005)", "PGD-7 AT + EMA (0.999)",
                  "PGD-7 AT + proxy data (50%)", "robust discrimination", "consistency (sigma=0.25, m=2",
                  "MACER (sigma=0.25, k=8, lambda=1", "warm-up 10", "ACR", "IBP ACR (L-inf", "train time",
                  "sequential certification of the smoothed Gaussian noise (sigma=0.25) model at r=0.2 (6 images",
                  "fewer than fixed n=2,000 CERTIFY's 2,010"):
        assert label in text
    for f in ("results.md", "results.csv", "certified_accuracy.png", "certify_gaussian.tsv",
              "pgd/last.pt", "pgd/log.csv", "gaussian/best.pt"):
        assert (out / f).exists(), f
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["method"] for r in rows] == ["natural", "pgd", "free", "fgsm_sdi", "pgd+coreset", "gaussian",
                                           "consistency", "macer", "ibp", "acert", "dale_pd", "pgd+awp", "pgd+ema",
                                           "pgd+proxy"]
    for r in rows:  # every model has an IBP-certified L-inf ACR, within [0, eps]
        assert 0 <= float(r["ibp_acr"]) <= 0.2
    assert (out / "ibp_certified_accuracy.png").exists() and (out / "ibp_certified_accuracy.pdf").exists()
    assert "IBP-certified accuracy of the ACERT" in text
    assert rows[5]["acr"] != "" and rows[6]["acr"] != "" and rows[7]["acr"] != "" and rows[0]["acr"] == ""
    assert "AutoAttack acc (APGD 3, FAB 2, Square 20)" in text
    for r in rows:  # AutoAttack (standard) at 3 iterations and 20 queries: never more robust than clean
        assert 0 <= float(r["autoattack_acc"]) <= float(r["clean_acc"])
    with open(out / "certify_gaussian.tsv") as fh:
        assert fh.readline().split() == ["idx", "label", "predict", "radius", "correct", "time"]
    assert main(["demo", "--methods", "natural,bogus", "--out", str(out)]) == 2
    assert "--methods" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["natural", "pgd", "free", "fgsm", "trades", "gaussian"])
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cuda_training_bf16_channels_last(digits, method, amp):
    train_ds, test_ds = digits
    model = tiny_cnn(bn=True).cuda()
    res = rt.fit(model, loader(train_ds, n=256), method, epochs=2, m=2, steps=2, eps=EPS, amp=amp,
                 channels_last=True, val_loader=loader(test_ds, 128, False, n=128), seed=0, progress=False,
                 verbose=False)
    row = res.history[-1]
    assert math.isfinite(row["train_loss"]) and 0 <= row["clean_acc"] <= 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert next(model.parameters()).is_cuda
