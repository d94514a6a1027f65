"""`robustops robustify` end to end, in process: the rows, the images, the summary and the table; an
interrupted run resumed to the same result; the bad flags name themselves."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import robustops.preemptive as rrob
from robustops.cli import main
from robustops.data import load_digits
from robustops.models import get_model

ARGS = ["robustify", "--model", "small_cnn", "--n", "24", "--eps-adv", "0.1", "--steps", "3", "--inner-steps", "2",
        "--batch-size", "8", "--suites", "pgd", "--attack-steps", "3", "--no-progress"]
# the smoothed run: --norm left out (l2, the smoothed variant's norm), the iterate kept and CERTIFY's settings given
SMOOTHED = ["--sigma", "0.25", "--n-certify", "50", "--keep", "best", "--noise-samples", "4", "--n0", "20",
            "--alpha", "0.01"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A SmallCNN state dict after 10 Adam steps on the digits (the command's plumbing is under test, not
    the model)."""
    torch.manual_seed(0)
    net = get_model("small_cnn")
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x, y = load_digits("train").tensors
    for k in range(10):
        opt.zero_grad()
        F.cross_entropy(net(x[64 * k:64 * k + 64]), y[64 * k:64 * k + 64]).backward()
        opt.step()
    path = tmp_path_factory.mktemp("robustify") / "w.pt"
    torch.save(net.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def full_run(weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "r.tsv"
    assert main(ARGS + ["--weights", weights] + SMOOTHED + ["-o", str(out)]) == 0
    return out


def test_writes_rows_images_and_summary(full_run, capsys):
    out = full_run
    lines = out.read_text().splitlines()
    assert lines[0].split("\t")[:3] == ["idx", "label", "protected"] and len(lines) == 25
    arrays = np.load(str(out) + ".npz")
    x, x_pre = arrays["x"], arrays["x_pre"]
    assert x.shape == x_pre.shape == (24, 1, 8, 8)
    assert np.sqrt(((x_pre - x) ** 2).reshape(24, -1).sum(1)).max() <= 0.1 + 1e-5
    assert x_pre.min() >= 0 and x_pre.max() <= 1
    summary = json.loads(open(str(out) + ".json").read())
    for key in ("original", "robustified"):
        assert {"clean_acc", "pgd_acc", "acr", "certified_acc_at_eps"} <= set(summary[key])
    assert summary["eps_pre"] == 0.1 and summary["n"] == 24 and summary["norm"] == "l2"
    assert summary["robustified"]["certified_acc_at_eps"] <= summary["robustified"]["certified_acc"]
    rows = [ln.split("\t") for ln in lines[1:]]
    dist = np.sqrt(((x_pre - x) ** 2).reshape(24, -1).sum(1))
    np.testing.assert_allclose([float(r[-1]) for r in rows], dist, rtol=1e-4, atol=1e-6)
    assert not (out.parent / "r.tsv.images").exists()


def test_resume_after_a_kill_gives_the_same_result(full_run, weights, tmp_path, monkeypatch):
    out = tmp_path / "r.tsv"
    real = rrob.robustify

    def dies_on_the_third_batch(*a, offset=0, **kw):
        if offset >= 16:
            raise KeyboardInterrupt
        return real(*a, offset=offset, **kw)

    args = ARGS + ["--weights", weights] + SMOOTHED + ["-o", str(out)]
    monkeypatch.setattr(rrob, "robustify", dies_on_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    assert len(list((tmp_path / "r.tsv.images").iterdir())) == 2
    calls = []
    monkeypatch.setattr(rrob, "robustify", lambda *a, **kw: calls.append(kw["offset"]) or real(*a, **kw))
    assert main(args + ["--resume"]) == 0
    assert calls == [16]
    assert out.read_text() == full_run.read_text()
    np.testing.assert_array_equal(np.load(str(out) + ".npz")["x_pre"], np.load(str(full_run) + ".npz")["x_pre"])


@pytest.mark.parametrize("flags, message", [
    (["--eps-adv", "0"], "--eps-adv"),
    (["--eps-pre", "-1"], "--eps-pre"),
    (["--steps", "0"], "--steps"),
    (["--suites", "pgd,bogus"], "--suites"),
    (["--sigma", "-0.5"], "--sigma"),
    (["--sigma", "0.25", "--norm", "linf"], "--norm linf: --sigma"),
    (["--alpha", "1"], "--alpha"),
    (["--resume"], "--resume"),
])
def test_bad_flags_name_themselves(weights, flags, message, capsys):
    assert main(ARGS + ["--weights", weights] + flags) == 2
    assert message in capsys.readouterr().err
