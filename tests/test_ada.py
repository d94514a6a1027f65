"""AdversarialAugment (method ``ada``) and its corruption networks: nu = 0 gives the network's output, every
per-example per-layer perturbation stays in its relative ball, the ascent raises a fixed classifier's loss,
exact resume, the autoencoder's training through the CLI, and the errors; with AugMix (ada_augmix): the
default off is the plain method, the views and the JS term, exact resume, bad settings."""
import csv
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import CrashingLoader, Interrupt, needs, one_thread, resume_matches_uninterrupted, tiny_cnn  # noqa: F401 (one_thread: autouse)
from torch.utils.data import DataLoader, Subset

from robustops import _rng
from robustops import perturbation as P
from robustops import train as rt
from robustops.cli import main
from robustops.data import load_digits
from robustops.train import augmix as am
from robustops.train.methods.ada import WeightPerturbation, ada_examples


@pytest.fixture(scope="module")
def digits():
    return load_digits("train"), load_digits("test")


@pytest.fixture(scope="module")
def ae_path(tmp_path_factory, digits):
    """A corruption network trained briefly on the digits through the CLI (--kind autoencoder)."""
    out = str(tmp_path_factory.mktemp("ae"))
    assert main(["perturbation", "train", "--kind", "autoencoder", "--out", out, "--epochs", "2", "--width", "8",
                 "--no-progress", "--threads", "1"]) == 0
    return os.path.join(out, "model.pt")


@pytest.fixture(scope="module")
def batch(digits):
    x, y = digits[1].tensors
    return x[:16], y[:16]


def _fixed_loss():
    torch.manual_seed(1)
    clf = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    return lambda xc, y: F.cross_entropy(clf(xc), y, reduction="sum")


def test_autoencoder_cli_writes_a_corruption_network(ae_path):
    run = os.path.dirname(ae_path)
    with open(os.path.join(run, "log.csv")) as fh:
        rows = list(csv.DictReader(fh))
    assert [r["epoch"] for r in rows] == ["1", "2"] and float(rows[1]["recon_mse"]) < float(rows[0]["recon_mse"])
    net = P.corruption_network(ae_path)
    assert isinstance(net, P.CorruptionAE) and not any(p.requires_grad for p in net.parameters())
    # resuming the finished run trains nothing and succeeds
    assert main(["perturbation", "train", "--kind", "autoencoder", "--out", run, "--epochs", "2", "--width", "8",
                 "--no-progress", "--threads", "1", "--resume"]) == 0


def test_nu_zero_gives_the_network_output(ae_path, batch):
    x, y = batch
    net = P.corruption_network(ae_path)
    out = ada_examples(WeightPerturbation(net, 0.0), _fixed_loss(), x, y, 3, 0.5, seed=0)
    assert torch.equal(out, net(x).clamp(0, 1))
    # the batched per-example path with a zero delta is the same network
    pert = WeightPerturbation(net, 0.1)
    zero = {n: torch.zeros(x.shape[0], *pert.params[n].shape) for n in pert.names}
    torch.testing.assert_close(pert.outputs(zero, x), net(x), atol=1e-6, rtol=0)


def test_perturbations_stay_in_their_relative_balls(ae_path, batch):
    x, y = batch
    net = P.corruption_network(ae_path)
    pert = WeightPerturbation(net, 0.3)
    assert set(pert.names) == {n for n, _ in net.named_parameters()}
    _, delta = ada_examples(pert, _fixed_loss(), x, y, 4, 0.5, seed=3, return_delta=True)
    for n, norms in pert.norms(delta).items():
        radius = 0.3 * torch.linalg.vector_norm(dict(net.named_parameters())[n].double()).item()
        assert norms.shape == (x.shape[0],)
        assert (norms <= radius * (1 + 1e-5)).all(), n
        assert norms.max() >= radius * 0.99, n  # the ascent reaches the sphere (the projection is active)
    # per example: different examples get different perturbations
    d = delta["enc1.weight"]
    assert not torch.equal(d[0], d[1])


def test_ascent_raises_the_loss_of_a_fixed_classifier(ae_path, batch):
    x, y = batch
    net = P.corruption_network(ae_path)
    loss = _fixed_loss()
    pert = WeightPerturbation(net, 0.3)
    with torch.no_grad():
        base = loss(net(x).clamp(0, 1), y).item()
        rand = loss(ada_examples(pert, loss, x, y, 0, 0.5, seed=5), y).item()  # a random delta in the ball
        adv = loss(ada_examples(pert, loss, x, y, 5, 0.5, seed=5), y).item()
    assert adv > rand and adv > base, (adv, rand, base)


def test_cvae_used_deterministically():
    torch.manual_seed(0)
    cvae = P.CVAE(1, 8, latent_dim=4, width=8)
    nn.init.normal_(cvae.decoder_net.out.weight, std=0.1)  # an untrained decoder is the identity map
    net = P.corruption_network(cvae)
    assert isinstance(net, P.PriorMeanDecoder)
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        mu, _ = cvae.prior(x)
        torch.testing.assert_close(net(x), cvae.decode(mu, x))
    pert = WeightPerturbation(net, 0.2)
    assert pert.names and not any(n.startswith("cvae.encoder_net.") for n in pert.names)
    out = ada_examples(pert, _fixed_loss(), x, torch.zeros(3, dtype=torch.long), 1, 0.5, seed=0)
    assert out.shape == x.shape and not torch.equal(out, net(x).clamp(0, 1))


def test_resume_matches_uninterrupted(digits, ae_path, tmp_path):
    train_ds, test_ds = digits
    sub = Subset(train_ds, list(range(96)))
    val = DataLoader(Subset(test_ds, list(range(32))), batch_size=32)
    hp = dict(epochs=2, seed=3, progress=False, verbose=False, perturbation_model=ae_path, ada_steps=2)
    full = tiny_cnn(seed=5, bn=True)
    ref = rt.fit(full, DataLoader(sub, batch_size=32, shuffle=True), "ada", val_loader=val,
                 out_dir=str(tmp_path / "full"), **hp)
    assert "ada_acc" in ref.history[-1]
    run = str(tmp_path / "run")
    torch.manual_seed(0)
    ld = DataLoader(sub, batch_size=32, shuffle=True)
    with pytest.raises(Interrupt):  # dies in the middle of the second epoch
        rt.fit(tiny_cnn(seed=5, bn=True), CrashingLoader(ld, after=len(ld) + 1), "ada", val_loader=val, out_dir=run,
               **hp)
    torch.manual_seed(999)
    model2 = tiny_cnn(seed=77, bn=True)
    res = rt.fit(model2, DataLoader(sub, batch_size=32, shuffle=True), "ada", val_loader=val, out_dir=run,
                 resume=True, **hp)
    assert res.epochs_run == ref.epochs_run == 2
    sd1, sd2 = full.state_dict(), model2.state_dict()
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), k


def test_errors(digits, ae_path, tmp_path, capsys):
    ld = DataLoader(Subset(digits[0], list(range(32))), batch_size=32)
    kw = dict(epochs=1, progress=False, verbose=False)
    with pytest.raises(ValueError, match="perturbation_model is required for method 'ada'"):
        rt.fit(tiny_cnn(), ld, "ada", **kw)
    other = str(tmp_path / "classifier.pt")
    torch.save({"state_dict": tiny_cnn().state_dict()}, other)
    with pytest.raises(ValueError, match="perturbation_model: not a corruption network"):
        rt.fit(tiny_cnn(), ld, "ada", perturbation_model=other, **kw)
    with pytest.raises(ValueError, match="perturbation_model: no corruption-network checkpoint"):
        rt.fit(tiny_cnn(), ld, "ada", perturbation_model=str(tmp_path / "missing.pt"), **kw)
    with pytest.raises(ValueError, match="ada_nu"):
        rt.fit(tiny_cnn(), ld, "ada", perturbation_model=ae_path, ada_nu=-0.1, **kw)
    with pytest.raises(ValueError, match="ada_clean"):
        rt.fit(tiny_cnn(), ld, "ada", perturbation_model=ae_path, ada_clean=1.5, **kw)
    with pytest.raises(ValueError, match="perturbation_model must be an image-to-image nn.Module"):
        rt.fit(tiny_cnn(), ld, "ada", perturbation_model=3, **kw)
    # a module works as well as a path
    res = rt.fit(tiny_cnn(), ld, "ada", perturbation_model=P.CorruptionAE(1, 4), ada_steps=1, **kw)
    assert res.epochs_run == 1
    assert main(["train", "--method", "ada", "-o", str(tmp_path / "r"), "--epochs", "1"]) == 2
    assert "--method ada needs --perturbation-model" in capsys.readouterr().err
    assert main(["train", "--method", "ada", "-o", str(tmp_path / "r2"), "--epochs", "1",
                 "--perturbation-model", other]) == 2
    assert "not a corruption network" in capsys.readouterr().err


def _ada_trainer(ae_path, **kw):
    return rt.Trainer(tiny_cnn(seed=2, width=4), method="ada", epochs=1, steps_per_epoch=1, seed=4,
                      perturbation_model=ae_path, ada_steps=1, **kw)


def test_augmix_off_is_plain_ada(ae_path, batch):
    """Default (ada_augmix 0): no generator, no state, the run's seed stream untouched at start, and the
    inputs are the clean / AdA minibatch of the plain method, bit for bit."""
    x, y = batch
    m = _ada_trainer(ae_path).method
    assert m.generator is None and m.state_dict() == {}
    nat = rt.Trainer(tiny_cnn(seed=2, width=4), method="natural", epochs=1, steps_per_epoch=1, seed=4).method
    seed = nat.ctx.seed()
    inputs = m.ada_inputs(x, y)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(_rng.derive_seed(seed, 0)))
    idx = perm[8:]
    expected = x.clone()
    expected[idx] = m.corrupt(x[idx], y[idx], _rng.derive_seed(seed, 1))
    assert inputs.shape == x.shape and torch.equal(inputs, expected)


@needs("kornia")
def test_augmix_views_and_js_term(ae_path, batch):
    """ada_augmix 2: the inputs are [x_a, AugMix(x_a), AugMix(x_a)] from the method's generator, and the loss
    on a fixed model is CE(f(x_a)) + 12 * js_consistency over the three views' logits."""
    x, y = batch
    m = _ada_trainer(ae_path, ada_augmix=2).method
    state = m.generator.get_state()
    inputs = m.ada_inputs(x, y)
    assert inputs.shape == (48, *x.shape[1:])
    g = torch.Generator()
    g.set_state(state)
    xa = inputs[:16]
    torch.testing.assert_close(inputs[16:], torch.cat([am.augmix(xa, g), am.augmix(xa, g)]), atol=0, rtol=0)
    clf = tiny_cnn(seed=9, width=4).eval()
    with torch.no_grad():
        logits = clf(inputs)
        views = [clf(v) for v in inputs.split(16)]
    expected = F.cross_entropy(views[0], y) + 12.0 * am.js_consistency(views)
    assert m.loss(logits, y).item() == pytest.approx(expected.item(), rel=1e-5)
    m0 = _ada_trainer(ae_path, ada_augmix=1, ada_js=0.0).method
    assert m0.loss(logits[:32], y).item() == pytest.approx(F.cross_entropy(views[0], y).item(), rel=1e-6)


@needs("kornia")
def test_resume_with_augmix_matches_uninterrupted(digits, ae_path, tmp_path):
    # no validation: the final weights are then the last epoch's (a selected best epoch 1 would hide epoch 2)
    hp = dict(epochs=2, seed=3, progress=False, verbose=False, perturbation_model=ae_path, ada_steps=1,
              ada_augmix=2)
    ref, res, crash = resume_matches_uninterrupted("ada", Subset(digits[0], list(range(64))), None, tmp_path, hp,
                                                   crash_after=lambda n: n + 1, width=4, weights_only=False)
    assert crash["epoch"] == 1 and res.epochs_run == ref.epochs_run == 2
    assert [r["train_loss"] for r in res.history] == [r["train_loss"] for r in ref.history]


@pytest.mark.parametrize("kw, word", [(dict(ada_augmix=-1), "ada_augmix"), (dict(ada_augmix=1.5), "ada_augmix"),
                                      (dict(ada_js=-1.0), "ada_js")])
def test_bad_augmix_settings_are_refused(ae_path, kw, word):
    with pytest.raises(ValueError, match=word):
        _ada_trainer(ae_path, **kw)
