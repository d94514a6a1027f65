"""Video inputs [B, T, C, H, W]: attacks, training, smoothing, the moving-digits set, VideoCNN and its
checkpoints, the video layout (channels last = memory [B, T, H, W, C]) and the clear refusals."""
import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import robustops as ro
from robustops import attacks, data, models, ops, smoothing
from robustops.attacks import engine
from robustops.models import video


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Conv3d on a handful of videos: a second thread only spins (30x slower on a loaded machine)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def clip():
    ds, _ = data.get_dataset("moving_digits", "test")
    x, y = ds.tensors
    return x[:6].clone(), y[:6].clone()


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return models.get_model("video_cnn").eval()


class Frames(nn.Module):
    """The video model on the flattened-frames view [B, T*C, H, W]."""

    def __init__(self, m, T, C):
        super().__init__()
        self.m, self.T, self.C = m, T, C

    def forward(self, z):
        return self.m(z.reshape(z.shape[0], self.T, self.C, *z.shape[2:]))


def _flat(x):
    return x.reshape(x.shape[0], -1, *x.shape[3:])


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.0)])
def test_pgd_on_5d_equals_the_flattened_frames_view(clip, net, norm, eps):
    x, y = clip
    a = attacks.PGD(net, eps=eps, steps=3, norm=norm, seed=3)(x, y)
    b = attacks.PGD(Frames(net, 8, 1), eps=eps, steps=3, norm=norm, seed=3)(_flat(x), y)
    torch.testing.assert_close(_flat(a), b, rtol=0, atol=0)
    d = (a - x).flatten(1)
    bound = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert bool((bound <= eps + 1e-5).all())


@pytest.mark.parametrize("cls,kw", [(attacks.APGD, {"steps": 4}), (attacks.APGDT, {"steps": 2, "n_target_classes": 2}),
                                    (attacks.FAB, {"steps": 2})])
def test_apgd_and_fab_on_5d_equal_the_flattened_frames_view(clip, net, cls, kw):
    x, y = clip
    a = cls(net, eps=0.1, seed=1, **kw)(x, y)
    b = cls(Frames(net, 8, 1), eps=0.1, seed=1, **kw)(_flat(x), y)
    torch.testing.assert_close(_flat(a), b, rtol=0, atol=0)


def test_l2_step_norm_runs_over_all_non_batch_dims():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 4, 2, 5, 5, generator=g)
    xa = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    grad = torch.randn(x.shape, generator=g)
    eps, alpha = 0.5, 0.3
    # plain torch: a normalised step, then the projection on the L2 ball of the whole sample
    gn = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1, 1)
    d = xa + alpha * grad / gn - x
    dn = d.flatten(1).norm(dim=1).view(-1, 1, 1, 1, 1)
    ref = (x + d * torch.clamp(eps / dn, max=1.0)).clamp(0, 1)
    out = ops.pgd_step_(xa.clone(), x, grad, eps, alpha, "l2")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_video_channels_last_layout_and_same_attack(clip, net):
    x, y = clip
    x = x.repeat(1, 1, 3, 1, 1) * 0.5  # 3 channels: the layout differs from contiguous
    m = models.get_model("video_cnn", in_channels=3)
    torch.manual_seed(1)
    m.eval()
    xc = video.to_channels_last(x)
    assert video.is_channels_last(xc) and not video.is_channels_last(x)
    assert xc.permute(0, 1, 3, 4, 2).is_contiguous()  # memory [B, T, H, W, C]
    assert xc.transpose(1, 2).is_contiguous(memory_format=torch.channels_last_3d)
    a = attacks.PGD(m, eps=0.1, steps=3, seed=2)(x, y)
    mc = video.model_to_channels_last(models.get_model("video_cnn", in_channels=3))
    mc.load_state_dict(m.state_dict())
    mc.eval()
    assert mc.features[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    b = attacks.PGD(mc, eps=0.1, steps=3, seed=2)(xc, y)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    assert engine.layout(xc) == engine.VIDEO_CHANNELS_LAST and engine.layout(x) is torch.contiguous_format
    early = attacks.PGD(mc, eps=0.1, steps=3, seed=2, early_stop=True)(xc, y)  # compaction keeps the layout
    assert video.is_channels_last(early) and video.is_channels_last(b)
    r = ops.random_init(xc, 0.1, seed=5)
    torch.testing.assert_close(r, ops.random_init(x, 0.1, seed=5), rtol=0, atol=0)  # drawn by logical index


@pytest.mark.parametrize("method,channels_last", [("natural", False), ("pgd", False), ("pgd", True), ("fgsm", False),
                                                  ("free", True), ("trades", False)])
def test_a_training_step_on_videos(clip, method, channels_last):
    x, y = clip
    torch.manual_seed(0)
    m = models.get_model("video_cnn")
    before = [p.detach().clone() for p in m.parameters()]
    res = ro.train.fit(m, DataLoader(TensorDataset(x, y), batch_size=6), method, epochs=1, eps=0.1, steps=2,
                       progress=False, verbose=False, channels_last=channels_last, threads=1, seed=0,
                       schedule="constant", lr=0.01)
    assert res.epochs_run == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert all(bool(torch.isfinite(p).all()) for p in m.parameters())
    if channels_last:
        assert m.features[0].weight.is_contiguous(memory_format=torch.channels_last_3d)


def test_smoothing_certify_and_predict_on_videos(clip, net):
    x, _ = clip
    x = x[:2]
    kw = dict(n0=20, n=100, alpha=0.01, batch_size=64)
    res = smoothing.Smooth(net, 10, 0.25).certify(x, seed=4, **kw)
    flat = smoothing.Smooth(Frames(net, 8, 1), 10, 0.25).certify(_flat(x), seed=4, **kw)
    assert torch.equal(res.prediction, flat.prediction)  # the noise is drawn by each element's index
    torch.testing.assert_close(res.radius, flat.radius)
    pred = smoothing.Smooth(net, 10, 0.25).predict(x, n=50, alpha=0.01, batch_size=64, seed=4)
    assert pred.shape == (2,)


def test_moving_digits_are_deterministic_and_labelled():
    ds, info = data.get_dataset("moving_digits", "test")
    assert info["input_shape"] == (8, 1, 16, 16) and info["num_classes"] == 10
    x, y = ds.tensors
    x2, y2 = data.load_moving_digits("test").tensors
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.equal(y, data.load_digits("test").tensors[1])  # label = the digit's
    assert not torch.equal(data.load_moving_digits("test", seed=1).tensors[0], x)
    digits = data.load_digits("test").tensors[0]
    idx = np.random.default_rng(0).permutation(1797)[-360:]
    for i in (0, 7, 123):
        path = data.moving_digit_path(0, int(idx[i]))
        assert (np.abs(np.diff(path, axis=0)) <= 1).all() and len(np.unique(path, axis=0)) > 1  # it moves
        for t, (r, c) in enumerate(path):
            frame = x[i, t, 0]
            assert torch.equal(frame[r:r + 8, c:c + 8], digits[i, 0])
            assert float(frame.sum()) == pytest.approx(float(digits[i].sum()))  # nothing else on the canvas
    assert float(x.min()) >= 0 and float(x.max()) <= 1


def test_video_cnn_checkpoint_round_trip(tmp_path, clip):
    x, _ = clip
    m = models.get_model("video_cnn", mean=[0.1], std=[0.3])
    assert isinstance(m[0], models.Normalize) and m[0].channel_dim == 2
    path = models.save_checkpoint(str(tmp_path / "v.pt"), m, "video_cnn", {"mean": [0.1], "std": [0.3]})
    back = models.load_model(path)
    m.eval(), back.eval()
    torch.testing.assert_close(back(x), m(x), rtol=0, atol=0)


def test_normalize_takes_video_channels_at_dim_2():
    x = torch.rand(2, 4, 3, 5, 5)
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.25, 0.2]
    out = models.Normalize(mean, std, channel_dim=2)(x)
    ref = (x - torch.tensor(mean).view(1, 1, 3, 1, 1)) / torch.tensor(std).view(1, 1, 3, 1, 1)
    torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match=r"channel_dim=2"):
        models.Normalize(mean, std)(x)  # channels at dim 1 (4 frames here): refused, never broadcast
    with pytest.raises(ValueError, match=r"\[B, T, 3, H, W\]"):
        models.Normalize(mean, std, channel_dim=2)(torch.rand(2, 4, 1, 5, 5))
    with pytest.raises(ValueError, match="channel_dim"):
        models.Normalize(mean, std, channel_dim=0)


def test_clear_errors_where_videos_are_refused(clip, net):
    x, y = clip
    with pytest.raises(ValueError, match=r"videos \[B, T, C, H, W\] are not supported"):
        attacks.Square(net, eps=0.1, n_queries=5)(x, y)
    # AutoAttack refuses before its first stage (not at Square, after the APGD and FAB stages); apgd runs
    with pytest.raises(ValueError, match=r"includes Square.*use suite 'apgd'"):
        ro.evaluate(net, (x[:4], y[:4]), eps=0.05, steps=1, fab_steps=1, progress=False)
    assert 0 <= ro.evaluate(net, (x[:4], y[:4]), suite="apgd", eps=0.05, steps=1, progress=False)["robust_acc"] <= 1
    with pytest.raises(ValueError, match=r"VideoCNN: expected inputs \[B, T, C, H, W\]"):
        net(x[:, 0])
    with pytest.raises(ValueError, match=r"video batch Tensor\[B, T, C, H, W\]"):
        video.to_channels_last(x[:, 0])
    with pytest.raises(ValueError, match="input_size"):
        video.VideoCNN(input_size=2)


def test_cli_data_model_and_demo_rows():
    from robustops.cli import common, demo_video
    from robustops.cli import train as cli_train

    ds, info = common.load_data("moving_digits", "test")
    assert cli_train.default_model(info) == "video_cnn"
    m, kw = cli_train.build_model("video_cnn", info)
    assert kw == {"num_classes": 10, "in_channels": 1, "input_size": 16, "frames": 8}
    assert m(ds.tensors[0][:2]).shape == (2, 10)
    for method, extra in demo_video.ROWS.values():  # every row's settings are fit's, checked
        cfg = ro.train.FitConfig.make(method, **extra).resolved()
        assert (cfg.budget_schedule or "constant") == extra.get("budget_schedule", "constant")


class Layouts(nn.Module):
    """A video model that records whether each input it sees is in the video channels-last layout."""

    def __init__(self, m):
        super().__init__()
        self.m, self.seen = m, []

    def forward(self, x):
        self.seen.append(video.is_channels_last(x))
        return self.m(x)


@pytest.mark.parametrize("method", ["pgd", "trades"])
def test_channels_last_training_step_on_3_channel_videos_keeps_the_layout(clip, method):
    """C = 3 (the layout differs from contiguous): every forward of the step (the attack's, from a uniform
    or a Gaussian start, and the update's) sees the video channels-last layout, and the step's weights
    equal the contiguous run's."""
    x, y = clip
    x = x.repeat(1, 1, 3, 1, 1) * 0.5
    out = {}
    for cl in (False, True):
        torch.manual_seed(0)
        m = Layouts(models.get_model("video_cnn", in_channels=3))
        ro.train.fit(m, DataLoader(TensorDataset(x, y), batch_size=6), method, epochs=1, eps=0.1, steps=2,
                     progress=False, verbose=False, channels_last=cl, threads=1, seed=0, schedule="constant", lr=0.01)
        assert len(m.seen) >= 3 and all(s == cl for s in m.seen), (cl, m.seen)
        out[cl] = m.m.state_dict()
    for k, v in out[False].items():
        torch.testing.assert_close(out[True][k], v, rtol=0, atol=1e-5)


def test_demo_section_video_through_the_command_line(tmp_path, capsys):
    import csv
    import json

    from robustops.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--section", "video", "--out", str(out), "--video-rows", "natural,pgd+curriculum",
                 "--video-epochs", "1", "--video-eps", "0.05", "--video-steps", "1", "--video-apgd-steps", "1",
                 "--val-size", "0", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "L-inf eps 0.05 (PGD-AT 1 steps)" in text and "pgd+curriculum" in text
    with open(out / "video" / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["row"] for r in rows] == ["natural", "pgd+curriculum"]
    for r in rows:  # an attack counts only inputs classified right: never above clean accuracy
        assert 0 <= float(r["pgd20_acc"]) <= float(r["clean_acc"]) and 0 <= float(r["apgd_acc"]) <= float(r["clean_acc"])
    with open(out / "video" / "results.json") as fh:
        assert json.load(fh)["epochs"] == 1
    assert main(["demo", "--section", "video", "--video-rows", "pgd,nope", "--no-progress"]) == 2
    assert "--video-rows must be" in capsys.readouterr().err
