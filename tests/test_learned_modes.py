"""The training modes of the learned-set methods beside the defaults (Wong and Kolter 2021's reference
code): learned's max(clean, adversarial) loss against an independent per-sample maximum, learned_aug's
prior draws, learned_noise's latent Gaussian noise and the latent_sigma its checkpoints record (and
certify --threat learned reads), and exact resume for each mode."""
import math
import json
import os

import pytest
import torch
import torch.nn as nn
from helpers import one_thread, resume_matches_uninterrupted, tiny_cnn  # noqa: F401 (one_thread: an autouse fixture)
from test_learned_training import LinearSet
from torch.utils.data import DataLoader, Subset

from robustops import train as rt
from robustops.data import load_digits
from robustops.train.methods.learned import max_set_loss


@pytest.fixture(scope="module")
def digits():
    return load_digits("train"), load_digits("test")


class RecordingSet(LinearSet):
    """LinearSet that records every latent code decoded without gradient (the sampled members)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.codes = []

    def decode(self, z, x):
        if not z.requires_grad:
            self.codes.append(z.detach().clone())
        return super().decode(z, x)


def independent_max_loss(clean, adv, y, w):
    """Per sample max of the two cross-entropies in float64, written out (log-sum-exp minus the label's
    logit), then the weighted mean."""
    total = weight = 0.0
    for i in range(len(y)):
        ces = []
        for row in (clean[i].double(), adv[i].double()):
            m = row.max()
            ces.append(float(m + torch.log(torch.exp(row - m).sum()) - row[y[i]]))
        total += float(w[i]) * max(ces)
        weight += float(w[i])
    return total / weight


def test_max_set_loss_is_the_per_sample_maximum():
    g = torch.Generator().manual_seed(0)
    clean, adv = torch.randn(12, 5, generator=g) * 3, torch.randn(12, 5, generator=g) * 3
    y = torch.randint(0, 5, (12,), generator=g)
    w = torch.rand(12, generator=g) + 0.1
    ones = torch.ones(12)
    for weights, ref_w in ((None, ones), (w, w)):
        got = max_set_loss(clean, adv, y, weights)
        assert math.isclose(float(got), independent_max_loss(clean, adv, y, ref_w), rel_tol=1e-5)
    # neither the clean nor the adversarial loss alone: some samples take each
    per_c = nn.functional.cross_entropy(clean, y, reduction="none")
    per_a = nn.functional.cross_entropy(adv, y, reduction="none")
    assert (per_c > per_a).any() and (per_a > per_c).any()
    assert float(max_set_loss(clean, adv, y)) > max(float(per_c.mean()), float(per_a.mean()))


def test_learned_trains_on_the_max_loss(digits):
    """The first step's logged loss is max_set_loss at the initial weights (the decoder shifts every image by
    a constant, so the worst member is known whatever the attack does), and adv differs from max."""
    train_ds, _ = digits
    sub = Subset(train_ds, list(range(32)))
    x, y = train_ds.tensors[0][:32], train_ds.tensors[1][:32]

    class Shift(LinearSet):
        def decode(self, z, x):
            return x + 0.3 + 0.0 * z.sum()  # members independent of u: x' = clamp(x + 0.3)

    x_adv = (x + 0.3).clamp(0, 1)
    losses = {}
    for set_loss in ("max", "adv"):
        model = tiny_cnn(seed=3)
        with torch.no_grad():
            expected = {"max": max_set_loss(model(x), model(x_adv), y),
                        "adv": nn.functional.cross_entropy(model(x_adv), y)}[set_loss]
        res = rt.fit(model, DataLoader(sub, batch_size=32), "learned", epochs=1, lr=0.05, eps=0.5, steps=1,
                     seed=0, progress=False, verbose=False, perturbation_model=Shift(), set_loss=set_loss)
        losses[set_loss] = res.history[0]["train_loss"]
        assert math.isclose(losses[set_loss], float(expected), rel_tol=1e-5), (set_loss, losses, float(expected))
    assert losses["max"] > losses["adv"]


@pytest.mark.parametrize("method,hp", [("learned_aug", {"draw": "ball"}), ("learned_aug", {"draw": "prior"}),
                                       ("learned_noise", {"sigma": 0.5})])
def test_sampled_members_follow_their_law(digits, method, hp):
    """The latent offsets of the sampled members (prior N(0, I): z = u): in the eps-ball for draw=ball,
    N(0, I) for draw=prior, N(0, sigma^2 I) for learned_noise (per-coordinate std within 15%)."""
    train_ds, _ = digits
    pm = RecordingSet(D=8)
    rt.fit(tiny_cnn(seed=1), DataLoader(Subset(train_ds, list(range(256))), batch_size=64), method, epochs=1,
           lr=0.05, eps=0.2, seed=0, progress=False, verbose=False, perturbation_model=pm, **hp)
    u = torch.cat(pm.codes[1:])  # codes[0]: the fit check's zero code
    assert u.shape == (256, 8)
    if hp.get("draw") == "ball":
        assert u.norm(dim=1).max() <= 0.2 + 1e-6
    else:
        s = hp.get("sigma", 1.0)
        assert abs(u.std().item() / s - 1) < 0.15 and abs(u.mean().item()) < 0.15 * s
        assert u.norm(dim=1).max() > 0.2  # unbounded


def test_prior_draws_are_latent_noise_at_sigma_one(digits):
    """learned_aug --draw prior and learned_noise --sigma 1 draw the same u ~ N(0, I) from the same seeds:
    the same weights (they differ only in validation and selection)."""
    train_ds, _ = digits
    weights = []
    for method, hp in (("learned_aug", {"draw": "prior"}), ("learned_noise", {"sigma": 1.0})):
        model = tiny_cnn(seed=2)
        rt.fit(model, DataLoader(Subset(train_ds, list(range(64))), batch_size=32), method, epochs=1, lr=0.05,
               eps=0.5, seed=0, progress=False, verbose=False, perturbation_model=LinearSet(), **hp)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_learned_noise_records_latent_sigma_for_certify(digits, tmp_path, capsys):
    from robustops.cli import main
    from robustops.cli.common import checkpoint_meta
    from robustops.models import get_model, save_checkpoint
    from robustops.perturbation import CVAE, save_perturbation_model

    train_ds, test_ds = digits
    run = str(tmp_path / "run")
    res = rt.fit(tiny_cnn(), DataLoader(Subset(train_ds, list(range(64))), batch_size=32), "learned_noise",
                 epochs=1, eps=1.0, steps=1, sigma=0.7, seed=0, progress=False, verbose=False,
                 perturbation_model=LinearSet(), out_dir=run,
                 val_loader=DataLoader(Subset(test_ds, list(range(32))), batch_size=32))
    assert res.select == "latent_noise_acc" and 0 <= res.history[0]["latent_noise_acc"] <= 1
    meta = checkpoint_meta(os.path.join(run, "last.pt"), None)
    assert meta["latent_sigma"] == 0.7 and meta["sigma"] is None  # the pixel noise level is not this one
    # certify --threat learned takes the latent sigma from the checkpoint when --sigma is not given
    ckpt = save_checkpoint(str(tmp_path / "c.pt"), get_model("small_cnn"), "small_cnn", {}, latent_sigma=0.7)
    torch.manual_seed(0)
    pm = save_perturbation_model(str(tmp_path / "cvae.pt"), CVAE(in_channels=1, input_size=8, latent_dim=4, width=8),
                                 eps=1.0)
    args = ["certify", "--checkpoint", ckpt, "--perturbation-model", pm, "--threat", "learned", "--N0", "8", "--N",
            "16", "--skip", "180", "--batch", "64", "--no-progress", "-o", str(tmp_path / "c.tsv")]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "sigma 0.7" in text and "the checkpoint's latent_sigma" in text and "sized from eps" not in text
    summary = json.load(open(str(tmp_path / "c.tsv") + ".json"))["summary"]
    assert summary["sigma_source"] == "checkpoint" and summary["sigma_sized"] is False


@pytest.mark.parametrize("method,hp", [("learned", {"set_loss": "adv"}), ("learned_aug", {"draw": "prior"}),
                                       ("learned_noise", {"sigma": 0.5})])
def test_resume_matches_uninterrupted(digits, tmp_path, method, hp):
    train_ds, test_ds = digits
    sub = Subset(train_ds, list(range(96)))
    val = DataLoader(Subset(test_ds, list(range(32))), batch_size=32)
    hp = dict(epochs=2, eps=1.0, steps=1, seed=3, progress=False, verbose=False, perturbation_model=LinearSet(), **hp)
    ref, res, crash = resume_matches_uninterrupted(method, sub, val, tmp_path, hp, crash_after=lambda n: n + 1,
                                                   width=8)
    assert crash["epoch"] == 1 and res.epochs_run == 2
