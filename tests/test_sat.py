"""Method sat (stylized max-margin AT, Naseer et al. 2022) and the feature taps it shares
(robustops.train.perceptual.feature_taps / modules_by_name)."""
import json
import os

import pytest
import torch
import torch.nn as nn
from helpers import one_thread, resume_matches_uninterrupted, tiny_cnn  # noqa: F401 (one_thread: autouse)
from torch.utils.data import DataLoader, Subset

from robustops import train as rt
from robustops.cli import main
from robustops.data import load_digits
from robustops.models import Normalize, get_model
from robustops.train.methods.sat import (choose_targets, content_loss, gram_matrix, max_margin_loss, parse_layers,
                                         style_loss)
from robustops.train.perceptual import CONV_TYPES, capture_features, feature_modules, feature_taps, modules_by_name


@pytest.fixture(scope="module")
def digits():
    return load_digits("train"), load_digits("test")


def test_taps_equal_a_manual_forward():
    net = tiny_cnn(seed=1, bn=True).eval()
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        h0 = net[0](x)
        h1 = net[3](net[2](net[1](h0)))
        with capture_features(feature_taps(net, ["0", "3"])) as by_name:
            net(x)
        with capture_features(feature_taps(net, [0, -1])) as by_depth:
            net(x)
    for got in (by_name, by_depth):
        assert len(got) == 2 and torch.equal(got[0], h0) and torch.equal(got[1], h1)


@pytest.mark.parametrize("name,shape", [("small_cnn", (2, 1, 8, 8)), ("resnet8", (2, 3, 8, 8)), ("cnn7", (2, 3, 8, 8)),
                                        ("preact_resnet18", (2, 3, 8, 8)), ("video_cnn", (2, 2, 1, 8, 8))])
def test_every_robustops_model_has_taps(name, shape):
    net = get_model(name, input_size=8, frames=2).eval()
    taps = feature_taps(net)
    assert taps == feature_modules(net, CONV_TYPES) and feature_taps(net, [-1]) == taps[-1:]
    with torch.no_grad(), capture_features(taps) as got:
        net(torch.rand(shape))
    assert len(got) >= len(taps) and all(f.shape[0] == 2 for f in got)


def test_tap_errors_name_the_layer():
    net = tiny_cnn()
    with pytest.raises(ValueError, match="'conv9' is not a submodule"):
        modules_by_name(net, ["0", "conv9"])
    wrapped = nn.Sequential(Normalize([0.5], [0.25]), net)  # a model as training runs it: user names still work
    assert modules_by_name(wrapped, ["3", "1.3"]) == [net[3], net[3]]
    with pytest.raises(ValueError, match="depth 5 is out of range"):
        feature_taps(net, [5])
    with pytest.raises(ValueError, match="non-empty list"):
        feature_taps(net, [])
    with pytest.raises(ValueError, match="sat_layers"):
        parse_layers("0,,1")
    assert parse_layers("all") is None and parse_layers("0,-1") == [0, -1] and parse_layers("a.0,b") == ["a.0", "b"]


def test_gram_style_and_content_closed_form():
    # a toy network: one 1x1 convolution with weights [1, 2] on a 1-channel 1x2 image
    conv = nn.Conv2d(1, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 2.0]).view(2, 1, 1, 1))
    a = conv(torch.tensor([[[[1.0, 3.0]]]]))  # channels [1, 3] and [2, 6]
    b = conv(torch.tensor([[[[0.0, 1.0]]]]))  # channels [0, 1] and [0, 2]
    ga = torch.tensor([[10.0, 20.0], [20.0, 40.0]]) / 2  # F F^T / (H W)
    gb = torch.tensor([[1.0, 2.0], [2.0, 4.0]]) / 2
    torch.testing.assert_close(gram_matrix(a)[0], ga)
    torch.testing.assert_close(style_loss([a], [gram_matrix(b)]), ((ga - gb) ** 2).mean().view(1))
    # content: mean of (1-0, 3-1, 2-0, 6-2)^2 = (1 + 4 + 4 + 16) / 4
    torch.testing.assert_close(content_loss([a], [b]), torch.tensor([25.0 / 4]))
    # two taps add; a [B, C] feature counts as [B, C, 1, 1]
    v = torch.tensor([[1.0, 2.0]])
    torch.testing.assert_close(gram_matrix(v)[0], torch.tensor([[1.0, 2.0], [2.0, 4.0]]))
    torch.testing.assert_close(content_loss([a, v], [b, v]), torch.tensor([25.0 / 4]))


def test_targets_are_of_another_class():
    y = torch.tensor([0, 1, 1, 2, 0, 2, 2, 1])
    g = torch.Generator().manual_seed(0)
    idx, has = choose_targets(y, g)
    assert has.all() and (y[idx] != y).all()
    draws = torch.stack([choose_targets(y, g)[0] for _ in range(200)])
    assert len(set(draws[:, 0].tolist())) == 6  # uniform over the 6 samples of another class
    idx, has = choose_targets(torch.tensor([3, 3]), g)
    assert not has.any() and idx.tolist() == [0, 1]


def test_max_margin_step_pulls_source_and_pushes_target():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    x_adv, x_src, x_tgt = torch.rand(3, 6, 1, 4, 4).unbind(0)

    def dists():
        with torch.no_grad():
            za, zs, zt = net(x_adv), net(x_src), net(x_tgt)
        return (za - zs).pow(2).sum(1), (za - zt).pow(2).sum(1)

    d_src0, d_tgt0 = dists()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    loss = max_margin_loss(net(x_adv), net(x_src), net(x_tgt), margin=10.0)
    assert loss > 0
    loss.backward()
    opt.step()
    d_src1, d_tgt1 = dists()
    assert d_src1.mean() < d_src0.mean() and d_tgt1.mean() > d_tgt0.mean()
    # samples without a target contribute nothing
    z = torch.rand(2, 4)
    assert max_margin_loss(z, z + 1, z, 1.0, has=torch.tensor([False, False])) == 0


def test_step_forwards_the_adversarial_batch_last(digits):
    # batch norm's running statistics end on the adversarial batch (as TRADES): x, x_t, then x'
    x, y = digits[0].tensors
    x, y = x[:16], y[:16]
    model = tiny_cnn(seed=3, bn=True, width=8)
    seen = []
    model.register_forward_pre_hook(lambda m, i: seen.append(i[0].detach().clone()) if m.training else None)
    rt.Trainer(model, method="sat", eps=0.2, steps=2, seed=0).train_step(x, y)
    assert len(seen) == 3 and torch.equal(seen[0], x)
    assert not torch.equal(seen[2], x) and (seen[2] - x).abs().max() <= 0.2 + 1e-6


def test_sat_trains_and_rejects_bad_hypers(digits):
    sub = Subset(digits[0], list(range(64)))
    hp = dict(epochs=1, eps=0.2, steps=2, progress=False, verbose=False, seed=0)
    res = rt.fit(tiny_cnn(seed=3, width=8), DataLoader(sub, batch_size=32), "sat", sat_layers="0,-1", **hp)
    assert res.history[-1]["train_loss"] > 0
    with pytest.raises(ValueError, match="sat_margin"):
        rt.fit(tiny_cnn(width=8), DataLoader(sub, batch_size=32), "sat", sat_margin=-1.0, **hp)
    with pytest.raises(ValueError, match="sat_layers"):
        rt.fit(tiny_cnn(width=8), DataLoader(sub, batch_size=32), "sat", sat_layers="0,,", **hp)
    with pytest.raises(ValueError, match="'nope' is not a submodule"):
        rt.fit(tiny_cnn(width=8), DataLoader(sub, batch_size=32), "sat", sat_layers="nope", **hp)


def test_resume_matches_uninterrupted(digits, tmp_path):
    train_ds, test_ds = digits
    val = DataLoader(Subset(test_ds, list(range(32))), batch_size=32)
    hp = dict(epochs=2, eps=0.2, steps=2, seed=3, progress=False, verbose=False)
    ref, res, crash = resume_matches_uninterrupted("sat", Subset(train_ds, list(range(96))), val, tmp_path, hp,
                                                   crash_after=lambda n: n + 1, width=8, weights_only=False)
    assert crash["epoch"] == 1 and res.epochs_run == ref.epochs_run == 2
    untimed = [[(k, v) for k, v in sorted(r.items()) if "time" not in k] for r in (*ref.history, *res.history)]
    assert str(untimed[:2]) == str(untimed[2:])


def test_train_command_records_the_flags(tmp_path):
    """One real `robustops train --method sat` run: every sat flag lands in summary.json's params."""
    flags = {"sat_style": 0.5, "sat_content": 2.0, "sat_boundary": 0.25, "sat_mm": 0.1, "sat_margin": 3.0,
             "sat_layers": "0,1"}
    argv = [a for k, v in flags.items() for a in ("--" + k.replace("_", "-"), str(v))]
    out = str(tmp_path / "sat")
    assert main(["train", "--data", "digits", "--method", "sat", "--epochs", "1", "--batch-size", "2048", "--steps",
                 "1", "--test-steps", "0", "--val-size", "32", "-o", out, "--no-progress"] + argv) == 0
    summary = json.loads(open(os.path.join(out, "summary.json")).read())
    assert (summary["method"], summary["epochs_run"]) == ("sat", 1)
    assert {k: summary["config"]["params"][k] for k in flags} == flags
