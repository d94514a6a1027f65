"""The internal Wasserstein distance (exact OT against scipy's assignment, zero, symmetry, the Sinkhorn and
sliced solvers against exact), the IWD attack (never over budget, in the box, effective on a digits model),
exact resume of fit(method="iwd"), `evaluate --threat iwd` end to end, and errors that name the argument."""
from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import one_thread, resume_matches_uninterrupted, train_digits_model  # noqa: F401 (autouse)
from torch.utils.data import DataLoader, Subset

from robustops import train as rt
from robustops.attacks import IWDAttack, internal_wasserstein
from robustops.attacks.iwd import project_iwd
from robustops.attacks.wasserstein import IWD, patch_cost, patch_sets
from robustops.data import load_digits

pytest.importorskip("ot")
linear_sum_assignment = pytest.importorskip("scipy.optimize").linear_sum_assignment


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits("test").tensors
    return x[:48], y[:48]


@pytest.fixture(scope="module")
def natural():
    return train_digits_model(epochs=3)


def _assignment_cost(x, x2, patch, stride):
    """The optimal assignment's mean cost between the two patch sets (scipy), in float64, per sample."""
    u, v = patch_sets(x.double(), patch, stride).double(), patch_sets(x2.double(), patch, stride).double()
    out = []
    for ub, vb in zip(u, v):
        c = ((ub[:, None, :] - vb[None, :, :]) ** 2).mean(-1).numpy()
        r, k = linear_sum_assignment(c)
        out.append(c[r, k].mean())
    return torch.tensor(out)


@pytest.mark.parametrize("shape,patch,stride", [((3, 1, 6, 6), 2, 2), ((2, 3, 5, 5), 3, 1)])
def test_exact_equals_the_optimal_assignment(shape, patch, stride):
    g = torch.Generator().manual_seed(1)
    x, x2 = torch.rand(shape, generator=g), torch.rand(shape, generator=g)
    d = internal_wasserstein(x, x2, patch=patch, stride=stride, method="exact")
    torch.testing.assert_close(d.double() ** 2, _assignment_cost(x, x2, patch, stride), rtol=1e-5, atol=1e-7)


def test_zero_for_identical_images_symmetric_and_differentiable():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 1, 8, 8, generator=g)
    x2 = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    for method in ("exact", "sinkhorn", "sliced"):  # Sinkhorn: the divergence, its entropic bias removed
        xa = x.clone().requires_grad_(True)
        d = internal_wasserstein(x, xa, method=method)
        d.sum().backward()
        assert torch.equal(d.detach(), torch.zeros(3)) and torch.isfinite(xa.grad).all(), method
    # Sinkhorn's plans meet one marginal exactly and the other to its convergence: symmetric to 1e-3
    for method, tol in (("exact", 1e-5), ("sinkhorn", 1e-3), ("sliced", 1e-5)):
        torch.testing.assert_close(internal_wasserstein(x, x2, method=method),
                                   internal_wasserstein(x2, x, method=method), rtol=tol, atol=1e-6)
    xa = x2.clone().requires_grad_(True)
    internal_wasserstein(x, xa).sum().backward()
    assert xa.grad.abs().sum() > 0


def test_sinkhorn_and_sliced_approach_exact():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(4, 1, 8, 8, generator=g)
    x2 = (x + 0.15 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    exact = internal_wasserstein(x, x2, method="exact")
    # the Sinkhorn divergence at blur 0.003 of the largest cost: within 0.5 % of exact
    sk = internal_wasserstein(x, x2, method="sinkhorn", blur=0.003)
    assert ((sk - exact) / exact).abs().max() < 5e-3
    # one value per patch (d = 1): every projection is the identity up to sign, so sliced is exact
    e1 = internal_wasserstein(x, x2, patch=1, method="exact")
    torch.testing.assert_close(internal_wasserstein(x, x2, patch=1, method="sliced", projections=4), e1,
                               rtol=1e-4, atol=1e-6)


def test_attack_never_exceeds_a_per_sample_budget_and_stays_in_the_box(digits, natural):
    x, y = digits
    eps = torch.linspace(0.02, 0.4, x.shape[0])
    for method, steps in (("exact", 3), ("sliced", 2)):
        res = IWDAttack(natural, eps, steps=steps, method=method, seed=0).perturb(x, y)
        d = internal_wasserstein(x, res.x_adv, method=method)
        assert (d <= eps).all() and torch.equal(d, res.distance), method
        assert res.x_adv.min() >= 0.0 and res.x_adv.max() <= 1.0
    for e in (eps[:12], 0.01):  # 0.01: below the plain entropic cost of identical images (~0.02 on digits)
        res = IWDAttack(natural, e, steps=1, method="sinkhorn", seed=0).perturb(x[:12], y[:12])
        d = internal_wasserstein(x[:12], res.x_adv, method="sinkhorn")
        assert (d <= e).all() and torch.equal(d, res.distance) and (res.x_adv != x[:12]).any()
    clip = (0.1, 0.9)
    xc = x.clamp(*clip)
    res = IWDAttack(natural, 0.3, steps=2, clip=clip, seed=0).perturb(xc, y)
    assert res.x_adv.min() >= 0.1 and res.x_adv.max() <= 0.9 and (res.distance <= 0.3).all()


def test_masked_projection_and_training_examples_match_the_synced_path(digits, natural):
    # the device path (all rows searched, torch.where; no host sync) gives the rows of the selecting one
    x, y = digits
    z = (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5))).clamp(0, 1)
    z[:8] = x[:8] + 0.01 * (z[:8] - x[:8])  # feasible rows, left as they are
    eps = torch.linspace(0.05, 0.3, x.shape[0])
    for method in ("exact", "sliced"):
        dist = IWD(method=method)
        ref = project_iwd(x, z, eps, dist)
        assert torch.equal(project_iwd(x, z, eps, dist, masked=True), ref) and torch.equal(ref[:8], z[:8]), method
    # training's call (IWDAttack.examples: no input checks) is perturb(..., evaluate=False) at that seed
    atk = IWDAttack(natural, 0.2, steps=2, method="sliced", seed=7)
    torch.testing.assert_close(atk.examples(x, y, 7), atk.perturb(x, y, offset=0, evaluate=False).x_adv, rtol=0,
                               atol=0)


def test_attack_lowers_accuracy_of_a_digits_model(digits, natural):
    x, y = digits
    clean = (natural(x).argmax(1) == y).float().mean().item()
    res = IWDAttack(natural, 0.2, steps=5, seed=0).perturb(x, y)
    robust = ((natural(res.x_adv).argmax(1) == y) & ~res.success).float().mean().item()
    assert clean > 0.8 and robust < clean / 2
    assert ((natural(res.x_adv).argmax(1) != y) == res.success).all()


def test_resume_matches_uninterrupted(tmp_path):
    train_ds, test_ds = load_digits("train"), load_digits("test")
    val = DataLoader(Subset(test_ds, list(range(32))), batch_size=32)
    hp = dict(epochs=2, eps=0.1, steps=1, seed=4, iwd_eps=0.15, progress=False, verbose=False, val_steps=1)
    ref, res, crash = resume_matches_uninterrupted("iwd", Subset(train_ds, list(range(64))), val, tmp_path, hp,
                                                   crash_after=lambda n: n + 1, width=4, weights_only=False)
    assert crash["epoch"] == 1 and res.epochs_run == ref.epochs_run == 2


def test_evaluate_threat_iwd_cli(tmp_path, natural, capsys):
    from robustops.cli import main
    from robustops.models import save_checkpoint

    ckpt = save_checkpoint(str(tmp_path / "nat.pt"), natural, "small_cnn", {}, method="natural")
    out = tmp_path / "iwd.tsv"
    base = ["evaluate", "--checkpoint", ckpt, "--threat", "iwd", "--eps", "0.2", "--steps", "2", "--max-samples",
            "24", "--batch-size", "12", "--no-progress", "--device", "cpu"]
    assert main(base + ["-o", str(out)]) == 0
    assert "IWD attack: IWD-2 (3x3 patches, stride 1, auto OT), iwd eps=0.2 (from --eps)" in capsys.readouterr().out
    rows = [dict(zip(*(ln.split("\t") for ln in (lines[0], r)))) for lines in [out.read_text().splitlines()]
            for r in lines[1:]]
    assert len(rows) == 24 and all(float(r["distance"]) <= 0.2 for r in rows)
    s = json.loads(open(str(out) + ".json").read())
    assert s["suite"] == "iwd" and s["settings"]["iwd_patch"] == 3 and s["eps"] == 0.2
    assert s["robust_acc"] < s["clean_acc"]
    strided = str(tmp_path / "strided.tsv")
    assert main(base[:-7] + ["--max-samples", "6", "--no-progress", "--device", "cpu", "--iwd-stride", "2",
                             "--iwd-method", "sliced", "-o", strided]) == 0
    assert "IWD-2 (3x3 patches, stride 2, sliced OT)" in capsys.readouterr().out
    assert json.loads(open(strided + ".json").read())["settings"]["iwd_stride"] == 2
    assert main(base + ["--iwd-patch", "0"]) == 2 and "--iwd-patch must be an int >= 1" in capsys.readouterr().err
    assert main(base[:3] + ["--iwd-method", "sliced", "--device", "cpu"]) == 2
    assert "--iwd-method sets the IWD attack: add --threat iwd" in capsys.readouterr().err
    assert main(base + ["--norm", "l2"]) == 2 and "--norm: --threat iwd runs its own attack" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "bad.tsv")


def test_train_iwd_cli_with_its_flags(tmp_path):
    # a real `robustops train --method iwd` on 48 digits, every iwd flag given: the clean-weight branch and the
    # Lagrangian term of the attack run
    import numpy as np

    from robustops.cli import main

    x, y = load_digits("train").tensors
    data = tmp_path / "d.npz"
    np.savez(data, x_train=x[:48].numpy(), y_train=y[:48].numpy(), x_test=x[48:64].numpy(), y_test=y[48:64].numpy())
    out = tmp_path / "run"
    assert main(["train", "--method", "iwd", "--data", str(data), "--epochs", "1", "--batch-size", "24", "--steps",
                 "1", "--test-steps", "0", "--val-size", "0", "--no-progress", "-o", str(out), "--iwd-eps", "0.15",
                 "--iwd-patch", "2", "--iwd-stride", "2", "--iwd-method", "sliced", "--iwd-lam", "0.5",
                 "--iwd-clean-weight", "0.3"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["label"] == "IWD-AT (eps 0.15, 2x2, sliced)"
    assert s["config"]["params"] == dict(iwd_eps=0.15, iwd_patch=2, iwd_stride=2, iwd_method="sliced", iwd_lam=0.5,
                                         iwd_clean_weight=0.3)
    assert s["epochs_run"] == 1 and (out / "summary.json").exists()


def test_bad_arguments_name_themselves(natural):
    x = torch.rand(2, 1, 8, 8)
    for kw, word in [(dict(method="emd"), "method"), (dict(patch=0), "patch"), (dict(patch=9), "patch"),
                     (dict(p=0.5), r"p \("), (dict(blur=0.0), "blur"), (dict(projections=0), "projections")]:
        with pytest.raises(ValueError, match=word):
            internal_wasserstein(x, x, **kw)
    with pytest.raises(ValueError, match="same shape"):
        internal_wasserstein(x, x[:1])
    with pytest.raises(ValueError, match="eps"):
        IWDAttack(natural, -0.1)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        IWDAttack(natural, 0.1)(torch.rand(2, 64), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="iwd_eps"):
        rt.fit(train_digits_model(epochs=3), DataLoader(Subset(load_digits("train"), range(8)), batch_size=8), "iwd",
               iwd_eps=0.0, epochs=1, progress=False, verbose=False)
