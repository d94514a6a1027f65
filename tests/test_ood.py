"""OOD data in adversarial training (Lee et al. 2021, robustops.train.ood): ratio 0 is the base method bit
for bit, the uniform-label loss's closed-form minimum, the generated digits-OOD set, exact resume, the
`robustops train --ood-data` flags and the errors."""
import json
import math
import os

import numpy as np
import pytest
import torch
from helpers import one_thread, tiny_cnn  # noqa: F401 (one_thread: an autouse fixture)
from torch.utils.data import DataLoader, Subset

from robustops import train as rt
from robustops.cli import main
from robustops.data import load_digits
from robustops.ood import generated_ood, load_ood
from robustops.train import ood as oat
from robustops.train.trainer import Trainer


def soft_targets(y, ood, num_classes):
    """The oracle's targets [B, K]: one-hot(y) on the in-distribution rows, the uniform label on the OOD rows."""
    t = torch.nn.functional.one_hot(y, num_classes).float()
    return torch.where(ood.unsqueeze(1), torch.full_like(t, 1.0 / num_classes), t)


def soft_cross_entropy(logits, targets):
    """The oracle's per-row soft-target cross-entropy -sum_k t_k log softmax(z)_k [B]."""
    return -(targets * torch.log_softmax(logits.float(), dim=1)).sum(1)


HP = dict(epochs=2, eps=0.2, steps=2, lr=0.05, seed=3, progress=False, verbose=False)


@pytest.fixture(scope="module")
def train_set():
    return Subset(load_digits("train"), list(range(96)))


def _fit(train_set, method="pgd", **kw):
    torch.manual_seed(0)
    model = tiny_cnn(seed=5, width=8)
    loader = DataLoader(train_set, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(1))
    return model, rt.fit(model, loader, method, **{**HP, **kw})


@pytest.mark.parametrize("method", ["pgd", "trades"])
def test_ratio_zero_is_the_base_method_bit_for_bit(train_set, method):
    a, ra = _fit(train_set, method)
    b, rb = _fit(train_set, method, ood_data="digits-ood", ood_ratio=0.0, ood_weight=5.0)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert ra.last["train_loss"] == rb.last["train_loss"]


def test_ood_step_without_ood_rows_is_the_base_step(train_set):
    # a batch whose mask marks no row takes the base path: same weights after one step
    x, y = load_digits("train").tensors
    x, y = x[:16], y[:16]
    out = []
    for mask in (None, torch.zeros(16, dtype=torch.bool)):
        model = tiny_cnn(seed=2, width=8)
        tr = Trainer(model, method="pgd", eps=0.2, steps=2, seed=0, ood_ratio=0.5)
        tr.train_step(x, y, ood=mask)
        out.append(model.state_dict())
    for k in out[0]:
        assert torch.equal(out[0][k], out[1][k]), k


def test_uniform_label_loss_closed_form():
    K = 10
    z = torch.full((3, K), 1.7, requires_grad=True)
    loss = oat.uniform_label_loss(z, "sum")
    loss.backward()
    assert torch.allclose(oat.uniform_label_loss(z.detach(), "none"), torch.full((3,), math.log(K)), atol=1e-6)
    assert z.grad.abs().max() < 1e-7  # softmax(z) - u = 0 at equal logits
    w = torch.randn(64, K)
    assert (oat.uniform_label_loss(w, "none") >= math.log(K) - 1e-5).all()
    # = log K + KL(u || softmax), and the soft-target cross-entropy with the uniform target
    kl = (torch.full((64, K), 1 / K) * (torch.log(torch.tensor(1 / K)) - torch.log_softmax(w, 1))).sum(1)
    assert torch.allclose(oat.uniform_label_loss(w, "none"), math.log(K) + kl, atol=1e-5)
    ood = torch.arange(64) % 3 == 0
    y = torch.randint(0, K, (64,))
    t = soft_targets(y, ood, K)
    per = oat.marked_loss(w, oat.marked_labels(y, ood))
    assert torch.allclose(soft_cross_entropy(w, t), per, atol=1e-5)
    # the paper's E_in[CE] + lambda E_OOD[CE_u], as batch means
    want = per[~ood].mean() + 2.5 * per[ood].mean()
    assert torch.allclose(oat.batch_loss(per, ood, 2.5, int(ood.sum())), want, atol=1e-5)


def test_generated_ood_deterministic_in_range():
    a, b, c = generated_ood(200, 7), generated_ood(200, 7), generated_ood(200, 8)
    assert a.shape == (200, 1, 8, 8) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert len({tuple(np.round(im.numpy().ravel(), 4)) for im in a}) > 190  # varied images
    rgb = generated_ood(5, 0, (3, 32, 32))
    assert rgb.shape == (5, 3, 32, 32)
    assert load_ood("digits-ood:12", (1, 8, 8), 7).shape == (12, 1, 8, 8)
    assert torch.equal(load_ood("digits", (1, 8, 8)), load_digits("train").tensors[0])


def test_ood_training_uses_ood_rows_and_resumes_exactly(train_set, tmp_path, monkeypatch):
    kw = dict(ood_data="digits-ood:64", ood_ratio=0.25, ood_weight=2.0, epochs=3)
    ref_model, ref = _fit(train_set, "pgd", out_dir=str(tmp_path / "full"), **kw)
    base, _ = _fit(train_set, "pgd", epochs=3)
    assert any(not torch.equal(v, base.state_dict()[k]) for k, v in ref_model.state_dict().items())
    assert ref.config.ood_ratio == 0.25 and "OOD" in ref.config.label
    # killed in the middle of the second epoch, resumed by a fresh start
    calls = {"n": 0}
    step = Trainer.train_step

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return step(self, *a, **k)

    monkeypatch.setattr(Trainer, "train_step", dying)
    with pytest.raises(KeyboardInterrupt):
        _fit(train_set, "pgd", out_dir=str(tmp_path / "run"), **kw)
    monkeypatch.setattr(Trainer, "train_step", step)
    torch.manual_seed(999)
    model = tiny_cnn(seed=77, width=8)
    loader = DataLoader(train_set, batch_size=32, shuffle=True)
    res = rt.fit(model, loader, "pgd", out_dir=str(tmp_path / "run"), resume=True, **{**HP, **kw})
    assert res.epochs_run == 3
    for k, v in ref_model.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    with pytest.raises(ValueError, match="ood_weight"):
        rt.fit(tiny_cnn(seed=1, width=8), loader, "pgd", out_dir=str(tmp_path / "run"), resume=True,
               **{**HP, **kw, "ood_weight": 1.0})
    with pytest.raises(ValueError, match="ood_data .*digits-ood:32.* differs .*digits-ood:64"):
        rt.fit(tiny_cnn(seed=1, width=8), loader, "pgd", out_dir=str(tmp_path / "run"), resume=True,
               **{**HP, **kw, "ood_data": "digits-ood:32"})


def test_resume_refuses_other_ood_tensor(train_set, tmp_path):
    imgs = generated_ood(40, seed=0)
    kw = dict(ood_ratio=0.25, epochs=1, steps=1, out_dir=str(tmp_path))
    _fit(train_set, ood_data=imgs, **kw)
    res = _fit(train_set, ood_data=imgs.clone(), resume=True, **kw)[1]  # the same images: resumed (done)
    assert res.epochs_run == 1
    other = imgs.clone()
    other[3, 0, 0, 0] = 1.0 - other[3, 0, 0, 0]
    for data in (other, imgs[:39]):
        with pytest.raises(ValueError, match="resume: ood_data .*'images': %d" % data.shape[0]):
            _fit(train_set, ood_data=data, resume=True, **kw)


def test_pgd_builds_its_ood_engine_once():
    x, y = load_digits("train").tensors
    tr = Trainer(tiny_cnn(seed=2, width=8), method="pgd", eps=0.2, steps=1, seed=0, ood_ratio=0.5)
    mask = torch.arange(16) % 2 == 0
    tr.train_step(x[:16], y[:16], ood=mask)
    engine = tr.method.ood_engine()
    tr.train_step(x[16:32], y[16:32], ood=mask)
    assert tr.method.ood_engine() is engine


def test_cli_ood_flags(tmp_path):
    out = str(tmp_path / "ood")
    assert main(["train", "--data", "digits", "--method", "trades", "--epochs", "1", "--batch-size", "128",
                 "--steps", "1", "--test-steps", "0", "--val-size", "64", "-o", out, "--no-progress",
                 "--ood-data", "digits-ood:300", "--ood-ratio", "0.25", "--ood-weight", "2"]) == 0
    with open(os.path.join(out, "summary.json")) as fh:
        s = json.load(fh)
    assert s["ood_data"] == {"spec": "digits-ood:300", "ratio": 0.25, "weight": 2.0, "images": 300}
    assert s["config"]["ood_ratio"] == 0.25 and s["config"]["ood_weight"] == 2.0


@pytest.mark.parametrize("flags, msg", [
    (["--method", "fgsm", "--ood-data", "digits-ood"], "ood_data .*pgd, trades.*not by 'fgsm'"),
    (["--ood-ratio", "0.3"], "--ood-ratio is a setting of --ood-data"),
    (["--ood-data", "digits-ood:x"], "--ood-data: .*digits-ood:N"),
    (["--ood-data", "digits-ood", "--ood-ratio", "1"], "ood-ratio"),
    (["--ood-data", "digits-ood", "--ood-weight", "-1"], "ood_weight"),
    (["--ood-data", "/no/such.npz"], "--ood-data"),
])
def test_cli_ood_errors(tmp_path, capsys, flags, msg):
    code = main(["train", "--data", "digits", "--epochs", "1", "-o", str(tmp_path / "e"), "--no-progress"] + flags)
    assert code == 2
    import re

    assert re.search(msg, capsys.readouterr().err), flags


def test_python_errors(train_set):
    with pytest.raises(ValueError, match="needs ood_data"):
        _fit(train_set, "pgd", ood_ratio=0.5)
    with pytest.raises(ValueError, match="not by 'natural'"):
        _fit(train_set, "natural", ood_data="digits-ood", ood_ratio=0.5)
    with pytest.raises(ValueError, match="mixup"):
        _fit(train_set, "pgd", ood_data="digits-ood", ood_ratio=0.5, mixup=1.0)
    with pytest.raises(ValueError, match="training data"):
        load_ood("digits", (3, 32, 32))
