"""Training against a learned perturbation set (methods learned, learned_aug) on the digits, with small
hand-made perturbation models: robustness in the set improves over natural training (measured by an
independent plain-PyTorch latent PGD), exact resume, mixed precision / channels_last, configuration
errors, and `robustops train --method learned`."""
import csv
import os

import pytest
import torch
import torch.nn as nn
from helpers import one_thread, resume_matches_uninterrupted, tiny_cnn  # noqa: F401 (one_thread: an autouse fixture)
from torch.utils.data import DataLoader, Subset

from robustops import train as rt
from robustops.data import load_digits


class LinearSet(nn.Module):
    """A perturbation model with the protocol: prior N(0, I), decoder g(z, x) = x + A z with D fixed random
    pixel directions of norm `scale` (so ||u|| <= eps moves the image by at most eps * scale * sqrt(D)...
    along a D-dimensional subspace)."""

    def __init__(self, D=8, scale=2.0, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        A = torch.randn(64, D, generator=g)
        self.A = nn.Parameter(scale * A / A.norm(dim=0, keepdim=True))  # a parameter: training must not move it
        self.latent_dim = D

    def prior(self, x):
        z = torch.zeros(x.shape[0], self.latent_dim, device=x.device)
        return z, z

    def decode(self, z, x):
        return x + (z.to(self.A.dtype) @ self.A.t()).view_as(x).to(x.dtype)


@pytest.fixture(scope="module")
def digits():
    return load_digits("train"), load_digits("test")


def latent_pgd_accuracy(model, pm, ds, eps, steps=20):
    """Accuracy under an independent latent PGD (plain PyTorch: normalized-gradient L2 steps on u, projection
    on the eps-ball, best of a zero start and two random starts), eval mode."""
    model.eval()
    x, y = ds.tensors
    D = pm.latent_dim
    correct = torch.ones(len(y), dtype=torch.bool)
    g = torch.Generator().manual_seed(7)
    for start in range(3):
        u = torch.zeros(len(y), D)
        if start:
            d = torch.randn(len(y), D, generator=g)
            u = eps * d / d.norm(dim=1, keepdim=True) * torch.rand(len(y), 1, generator=g)
        for _ in range(steps):
            u.requires_grad_(True)
            loss = nn.functional.cross_entropy(model(pm.decode(u, x).clamp(0, 1)), y)
            (grad,) = torch.autograd.grad(loss, u)
            with torch.no_grad():
                u = u + (2.5 * eps / steps) * grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-12)
                u = u * (eps / u.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
        with torch.no_grad():
            correct &= model(pm.decode(u, x).clamp(0, 1)).argmax(1) == y
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return clean, correct.float().mean().item()


def test_learned_training_beats_natural_in_the_set(digits):
    train_ds, test_ds = digits
    pm = LinearSet()
    A0 = pm.A.detach().clone()
    eps = 1.0
    acc = {}
    for method, kw in {"natural": {}, "learned": dict(steps=3), "learned_aug": {}}.items():
        model = tiny_cnn()
        torch.manual_seed(1)
        res = rt.fit(model, DataLoader(train_ds, batch_size=32, shuffle=True), method, epochs=6, lr=0.1, eps=eps,
                     seed=0, progress=False, verbose=False, perturbation_model=pm, **kw)
        assert res.epochs_run == 6
        acc[method] = latent_pgd_accuracy(model, pm, test_ds, eps)
    assert torch.equal(pm.A.detach(), A0)  # the perturbation model is frozen
    (nat_clean, nat_set), (adv_clean, adv_set), (aug_clean, aug_set) = acc["natural"], acc["learned"], \
        acc["learned_aug"]
    assert nat_clean > 0.95 and adv_clean > 0.9 and aug_clean > 0.9
    assert nat_set < 0.7, acc          # the set does fool a naturally trained model
    assert adv_set > nat_set + 0.2, acc
    assert adv_set > aug_set, acc      # the worst member teaches more than a random one


def test_learned_method_uses_the_latent_attack(digits):
    """One step of `learned` trains on members of the set at the attack's worst offset: with eps = 0 it is
    exactly natural training; with eps > 0 the model moves differently."""
    train_ds, _ = digits
    sub = Subset(train_ds, list(range(64)))
    pm = LinearSet()
    out = {}
    for method, eps in (("natural", 0.5), ("learned", 0.0), ("learned", 0.5)):
        model = tiny_cnn(seed=3)
        torch.manual_seed(0)
        rt.fit(model, DataLoader(sub, batch_size=32, shuffle=False), method, epochs=1, lr=0.05, eps=eps, steps=2,
               seed=0, progress=False, verbose=False, perturbation_model=pm)
        out[(method, eps)] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.equal(out[("natural", 0.5)], out[("learned", 0.0)])
    assert not torch.allclose(out[("natural", 0.5)], out[("learned", 0.5)])


@pytest.mark.parametrize("method", ["learned", "learned_aug"])
def test_resume_matches_uninterrupted(digits, tmp_path, method):
    train_ds, test_ds = digits
    sub = Subset(train_ds, list(range(128)))
    val = DataLoader(Subset(test_ds, list(range(64))), batch_size=64)
    hp = dict(epochs=3, eps=1.0, steps=2, seed=3, progress=False, verbose=False, perturbation_model=LinearSet())

    ref, res, crash = resume_matches_uninterrupted(method, sub, val, tmp_path, hp, crash_after=lambda n: n + 2)
    assert ref.select == "set_acc"  # validation measures the latent attack and selects by it
    assert all(0 <= row["set_acc"] <= 1 for row in ref.history)
    # the checkpoint holds plain data: it loads with weights_only, the model recorded by a description
    assert crash["epoch"] == 1 and crash["config"]["perturbation_model"] == "<LinearSet object>"
    assert res.epochs_run == 3
    run = str(tmp_path / "run")
    with open(os.path.join(run, "log.csv")) as fh:
        rows = list(csv.DictReader(fh))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"] and all(r["set_acc"] != "" for r in rows)


@pytest.mark.parametrize("amp", [None, "bf16"])
def test_amp_and_channels_last(digits, amp):
    train_ds, test_ds = digits
    sub = Subset(train_ds, list(range(96)))
    model = tiny_cnn(seed=1)
    res = rt.fit(model, DataLoader(sub, batch_size=32, shuffle=True), "learned", epochs=1, eps=1.0, steps=2,
                 amp=amp, channels_last=True, seed=0, progress=False, verbose=False, perturbation_model=LinearSet(),
                 val_loader=DataLoader(Subset(test_ds, list(range(64))), batch_size=64))
    row = res.last
    assert torch.isfinite(torch.tensor(row["train_loss"])) and 0 <= row["clean_acc"] <= 1


class WrongShape(LinearSet):
    def decode(self, z, x):
        return super().decode(z, x).flatten(1)


class WrongPrior(LinearSet):
    def prior(self, x):
        z = torch.zeros(x.shape[0], self.latent_dim + 1)
        return z, z


def test_configuration_errors_are_clear(digits, tmp_path):
    train_ds, _ = digits
    ld = DataLoader(Subset(train_ds, list(range(32))), batch_size=32)
    kw = dict(epochs=1, progress=False, verbose=False)
    with pytest.raises(ValueError, match="perturbation_model is required for method 'learned'"):
        rt.fit(tiny_cnn(), ld, "learned", **kw)
    with pytest.raises(ValueError, match="perturbation_model is required for method 'learned_aug'"):
        rt.FitConfig.make("learned_aug").resolved()
    with pytest.raises(ValueError, match="perturbation_model: no perturbation-model checkpoint at"):
        rt.fit(tiny_cnn(), ld, "learned", perturbation_model=str(tmp_path / "missing.pt"), **kw)

    class NoDecode(nn.Module):
        latent_dim = 2

        def prior(self, x):
            return x, x
    with pytest.raises(ValueError, match="lacks decode"):
        rt.fit(tiny_cnn(), ld, "learned", perturbation_model=NoDecode(), **kw)
    with pytest.raises(ValueError, match="must be an nn.Module with the perturbation-model protocol"):
        rt.fit(tiny_cnn(), ld, "learned", perturbation_model=3, **kw)
    with pytest.raises(ValueError, match=r"perturbation_model does not fit the training data .*x's shape"):
        rt.fit(tiny_cnn(), ld, "learned", perturbation_model=WrongShape(), **kw)
    with pytest.raises(ValueError, match=r"perturbation_model does not fit the training data .*latent_dim"):
        rt.fit(tiny_cnn(), ld, "learned_aug", perturbation_model=WrongPrior(), **kw)


def test_train_cli_learned(tmp_path, capsys):
    import json

    from robustops.cli import main
    from robustops.perturbation import CVAE, save_perturbation_model

    torch.manual_seed(0)
    cvae = CVAE(in_channels=1, input_size=8, latent_dim=4, width=8)
    cvae.eps = 0.75
    pm = save_perturbation_model(str(tmp_path / "cvae.pt"), cvae)
    out = str(tmp_path / "run")
    common = ["--data", "digits", "--epochs", "1", "--steps", "2", "--test-steps", "3", "--val-size", "64",
              "--seed", "0", "--no-progress", "-o", out]
    assert main(["train", "--method", "learned", "--perturbation-model", pm] + common) == 0
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["eps"] == 0.75  # the perturbation checkpoint's eps
    assert summary["config"]["perturbation_model"] == os.path.abspath(pm)
    assert 0 <= summary["test"]["set_acc"] <= summary["test"]["clean_acc"] + 1e-9
    assert "learned-set PGD-3 acc" in capsys.readouterr().out
    assert main(["train", "--method", "learned", "--perturbation-model", pm, "--resume"] + common) == 0

    assert main(["train", "--method", "learned"] + common + ["--force"]) == 2
    assert "needs --perturbation-model" in capsys.readouterr().err
    assert main(["train", "--method", "pgd", "--perturbation-model", pm] + common + ["--force"]) == 2
    assert "--perturbation-model is a setting of the methods learned, learned_aug" in capsys.readouterr().err


def test_validation_counts_measure_the_set(digits):
    """The method's validation hook counts the samples the latent attack does not fool: all of them at eps 0
    for a model that classifies them right, fewer under attack for a naturally trained model."""
    train_ds, test_ds = digits
    model = tiny_cnn()
    torch.manual_seed(1)
    rt.fit(model, DataLoader(train_ds, batch_size=32, shuffle=True), "natural", epochs=4, lr=0.1, seed=0,
           progress=False, verbose=False)
    x, y = test_ds.tensors
    tr = rt.Trainer(model, method="learned", eps=1.0, perturbation_model=LinearSet(), seed=0)
    model.eval()
    clean = int((model(x).argmax(1) == y).sum())
    assert int(tr.method.validation_counts(x, y)["set_acc"]) < clean - 0.2 * len(y)
    tr0 = rt.Trainer(model, method="learned", eps=0.0, perturbation_model=LinearSet(), seed=0)
    assert int(tr0.method.validation_counts(x, y)["set_acc"]) == clean


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["learned", "learned_aug"])
def test_learned_training_on_cuda(digits, method):
    train_ds, test_ds = digits
    model = tiny_cnn()
    res = rt.fit(model, DataLoader(Subset(train_ds, list(range(256))), batch_size=64, shuffle=True), method,
                 epochs=2, eps=1.0, steps=3, amp="bf16", channels_last=True, seed=0, device="cuda", progress=False,
                 verbose=False, perturbation_model=LinearSet(),
                 val_loader=DataLoader(Subset(test_ds, list(range(128))), batch_size=64))
    assert next(model.parameters()).is_cuda and res.epochs_run == 2
    assert 0 <= res.last["clean_acc"] <= 1


@pytest.mark.parametrize("method,flags,expect", [
    ("learned", ["--set-loss", "adv"], {"set_loss": "adv"}),
    ("learned_aug", ["--draw", "prior"], {"draw": "prior"}),
    ("learned_noise", ["--sigma", "0.5"], {"sigma": 0.5}),
])
def test_train_cli_learned_modes(tmp_path, method, flags, expect):
    """The learned-set modes' own flags through `robustops train`: parsed, recorded, trained one epoch;
    learned_noise's sigma is the checkpoint's latent_sigma (the pixel sigma stays unset)."""
    import json

    from robustops.cli import main
    from robustops.cli.common import checkpoint_meta
    from robustops.perturbation import CVAE, save_perturbation_model

    torch.manual_seed(0)
    pm = save_perturbation_model(str(tmp_path / "cvae.pt"), CVAE(in_channels=1, input_size=8, latent_dim=4, width=8),
                                 eps=0.75)
    out = str(tmp_path / "run")
    assert main(["train", "--method", method, "--perturbation-model", pm, "--data", "digits", "--epochs", "1",
                 "--steps", "1", "--test-steps", "0", "--batch-size", "256", "--val-size", "64", "--seed", "0",
                 "--no-progress", "-o", out] + flags) == 0
    summary = json.load(open(os.path.join(out, "summary.json")))
    for k, v in expect.items():
        assert summary["config"]["params"][k] == v, k
    meta = checkpoint_meta(os.path.join(out, "last.pt"), None)
    assert meta.get("latent_sigma") == (0.5 if method == "learned_noise" else None) and meta["sigma"] is None
