"""InfoAT (methods/infoat.py) and its mutual-information estimator (train/mutual_info.py): the InfoNCE
estimate on a joint Gaussian against the analytic I(X; Z), the weights' normalisation, InfoAT with its
re-weighting off equal to its base method bit for bit, exact resume, errors, and the command line."""
import json
import os

import pytest
import torch
from helpers import (  # noqa: F401 (one_thread: an autouse fixture)
    free_port,
    gloo_group,
    one_thread,
    rank_loader,
    resume_matches_uninterrupted,
    tiny_cnn,
)
from torch.utils.data import DataLoader, Subset

from robustops import train as rt
from robustops.cli import main
from robustops.data import load_digits
from robustops.train.methods.infoat import info_weights
from robustops.train.mutual_info import MIEstimator, gaussian_mi, infonce_per_sample, latent_module

HP = dict(epochs=2, eps=0.1, steps=2, seed=3, progress=False, verbose=False)


@pytest.fixture(scope="module")
def digits():
    return Subset(load_digits("train"), list(range(128))), load_digits("test")


def test_infonce_recovers_gaussian_mi():
    """rho = 0.8 in 2 dimensions: I = -log(1 - 0.64) = 1.022 nats; 300 critic steps on batches of 256,
    then the mean estimate over 20 fresh batches within 0.12 nats (InfoNCE's bias at log 256 = 5.5 nats
    is small here; measured 1.017)."""
    rho, d = 0.8, 2
    g = torch.Generator().manual_seed(0)

    def draw(n=256):
        x = torch.randn(n, d, generator=g)
        return x, rho * x + (1 - rho ** 2) ** 0.5 * torch.randn(n, d, generator=g)

    est = MIEstimator(lr=3e-3, width=32, dim=16, seed=1)
    for _ in range(300):
        est.update(*draw())
    value = sum(est.estimate(*draw()).mean().item() for _ in range(20)) / 20
    assert value == pytest.approx(gaussian_mi(rho, d), abs=0.12)
    # on independent pairs the bound invents no information (it is about 0 or below)
    x, _ = draw()
    assert est.estimate(x, draw()[1]).mean().item() < 0.1


def test_infonce_per_sample_closed_form():
    s = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    expect = torch.tensor([2 - torch.logsumexp(torch.tensor([2.0, 0.0]), 0).item(), 1 - (1 + 0.6931471805599453)])
    torch.testing.assert_close(infonce_per_sample(s), expect + 0.6931471805599453)


def test_weights_normalise_as_defined():
    mi = torch.tensor([0.1, 2.0, -0.5, 1.0])
    w = info_weights(mi, tau=0.5, mix=1.0)
    assert w.sum().item() == pytest.approx(4.0, rel=1e-6)
    assert torch.equal(w.argsort(), mi.argsort())  # the high-MI examples weigh most
    torch.testing.assert_close(w, 4 * torch.softmax(mi / 0.5, 0))
    half = info_weights(mi, tau=0.5, mix=0.5)
    torch.testing.assert_close(half, 0.5 + 0.5 * w)
    assert torch.equal(info_weights(mi, tau=1.0, mix=0.0), torch.ones(4))
    assert info_weights(mi, tau=1e6, mix=1.0).sub(1).abs().max() < 1e-5  # large tau: uniform


def _fit(ds, method, **kw):
    torch.manual_seed(0)
    model = tiny_cnn(seed=5, bn=True, width=8)
    res = rt.fit(model, DataLoader(ds, batch_size=32, shuffle=True), method, **{**HP, **kw})
    return model, res


@pytest.mark.parametrize("base", ["pgd", "trades"])
def test_mix_zero_is_the_base_method_bit_for_bit(digits, base):
    ref, _ = _fit(digits[0], base)
    got, _ = _fit(digits[0], "infoat", info_base=base, info_mix=0.0)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, got.state_dict()[k]), k
    other, _ = _fit(digits[0], "infoat", info_base=base, info_mix=1.0)
    assert any(not torch.equal(v, other.state_dict()[k]) for k, v in ref.state_dict().items())


def test_run_weights_multiply_in(digits):
    """The run's own per-sample weights (a coreset's, through Trainer.train_step) multiply InfoAT's: with
    info_mix 0 InfoAT on PGD takes the weighted PGD-AT step bit for bit."""
    x, y = digits[0].dataset.tensors
    x, y, w = x[:32], y[:32], torch.linspace(0.0, 2.0, 32)
    models = []
    for method, kw in (("pgd", {}), ("infoat", dict(info_base="pgd", info_mix=0.0))):
        model = tiny_cnn(seed=2)
        rt.Trainer(model, method=method, eps=0.1, steps=2, seed=0, **kw).train_step(x, y, weights=w)
        models.append(model.state_dict())
    for k, v in models[0].items():
        assert torch.equal(v, models[1][k]), k


def test_resume_matches_uninterrupted(digits, tmp_path):
    train_ds, test_ds = digits
    val = DataLoader(Subset(test_ds, list(range(64))), batch_size=64)
    hp = dict(HP, epochs=3, info_mix=1.0, info_lr=1e-2)
    ref, res, crash = resume_matches_uninterrupted("infoat", train_ds, val, tmp_path, hp, crash_after=lambda n: n + 2,
                                                   width=8, weights_only=False)
    assert crash["epoch"] == 1 and res.epochs_run == ref.epochs_run == 3
    strip = lambda h: [{k: v for k, v in r.items() if "time" not in k} for r in h]  # noqa: E731
    assert str(strip(res.history)) == str(strip(ref.history))


def _ddp_worker(rank, world, port, out):
    with gloo_group(rank, world, port):
        model = tiny_cnn(seed=11)
        rt.fit(model, rank_loader(Subset(load_digits("train"), list(range(128))), rank, world), "infoat",
               out_dir=out, **dict(HP, epochs=1, info_mix=1.0, info_lr=1e-2))
        torch.save(model.state_dict(), os.path.join(out, f"ddp{rank}.pt"))


def test_ddp_ranks_stay_in_sync(tmp_path):
    """Two gloo processes, each weighting its own half-batches: the models and the MI critics (gradients
    averaged over the ranks) stay equal on both ranks."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    m0, m1 = (torch.load(tmp_path / f"ddp{r}.pt") for r in (0, 1))
    for k, v in m0.items():
        assert torch.equal(v, m1[k]), k
    states = torch.load(tmp_path / "last.pt", weights_only=False)["rank_states"]
    c0, c1 = (st["method"]["estimator"] for st in states)
    assert c0["steps"] == c1["steps"] == 4
    for k, v in c0["critic"].items():
        assert torch.equal(v, c1["critic"][k]), k


def test_errors(digits):
    with pytest.raises(ValueError, match="info_mix"):
        _fit(digits[0], "infoat", info_mix=1.5)
    with pytest.raises(ValueError, match="info_tau"):
        _fit(digits[0], "infoat", info_tau=0.0)
    with pytest.raises(ValueError, match="info_base"):
        _fit(digits[0], "infoat", info_base="mart")
    with pytest.raises(ValueError, match="nn.Linear"):
        latent_module(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3)))
    with pytest.raises(ValueError, match="lr"):
        MIEstimator(lr=0.0)
    with pytest.raises(ValueError, match="scores"):
        infonce_per_sample(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="same number"):
        MIEstimator().update(torch.zeros(4, 2), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="rho"):
        gaussian_mi(1.0)


def test_train_command(tmp_path):
    out = str(tmp_path / "infoat")
    assert main(["train", "--data", "digits", "--method", "infoat", "--epochs", "1", "--batch-size", "256",
                 "--steps", "2", "--test-steps", "0", "--val-size", "64", "-o", out, "--no-progress",
                 "--info-base", "trades", "--info-mix", "0.3", "--info-tau", "2", "--info-lr", "0.002",
                 "--info-width", "16"]) == 0
    with open(os.path.join(out, "summary.json")) as fh:
        s = json.load(fh)
    assert s["method"] == "infoat" and s["epochs_run"] == 1
    expect = {"info_base": "trades", "info_mix": 0.3, "info_tau": 2.0, "info_lr": 0.002, "info_width": 16}
    for k, v in expect.items():
        assert s["config"]["params"][k] == v, k
