"""J-SIGR (issue 28): the random-projection Jacobian norm against the exact one, the selective input-gradient
term in closed form, the method's exact resume and autocast, transfer evaluation (library and CLI)."""
import json
import os

import pytest
import torch
from helpers import one_thread, resume_matches_uninterrupted, tiny_cnn  # noqa: F401
from torch.utils.data import DataLoader, Subset

import robustops as ro
from robustops import train as rt
from robustops.cli import main
from robustops.data import load_digits
from robustops.train.jacobian import jacobian_frobenius
from robustops.train.methods.jsigr import selection_mask, selective_penalty


@pytest.fixture(scope="module")
def digits():
    return load_digits("train"), load_digits("test")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A J-SIGR and a natural checkpoint trained one epoch through `robustops train`."""
    out = tmp_path_factory.mktemp("jsigr")
    common = ["--data", "digits", "--epochs", "1", "--batch-size", "256", "--steps", "2", "--test-steps", "0",
              "--val-size", "64", "--no-progress"]
    assert main(["train", "--method", "jsigr", "-o", str(out / "j"), "--jsigr-lambda-j", "0.05", "--jsigr-lambda-s",
                 "2", "--jsigr-keep", "0.3", "--jsigr-projections", "2", "--jsigr-adv", "0.5"] + common) == 0
    assert main(["train", "--method", "natural", "-o", str(out / "n")] + common) == 0
    return out


# ------------------------------------------------------------------------------ the Jacobian norm

def test_jacobian_norm_matches_the_exact_one_within_its_standard_error():
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10))
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    est = jacobian_frobenius(net, x, 100, generator=torch.Generator().manual_seed(1))
    jac = torch.stack([torch.autograd.functional.jacobian(lambda xi: net(xi[None])[0], xi) for xi in x])
    exact = jac.flatten(1).pow(2).sum(1)
    assert est.draws.shape == (100, 4) and torch.all(est.stderr > 0)
    assert torch.all((est.sq_norm - exact).abs() <= 4 * est.stderr), (est.sq_norm, exact, est.stderr)
    one = jacobian_frobenius(net, x, 1, generator=torch.Generator().manual_seed(1))
    assert torch.isnan(one.stderr).all() and torch.isfinite(one.sq_norm).all()


def test_jacobian_norm_of_a_linear_map_is_exact_in_expectation_and_differentiable():
    # f(x) = W x: ||J||_F^2 = ||W||_F^2 for every x; create_graph makes it a function of W
    lin = torch.nn.Linear(6, 3, bias=False)
    x = torch.rand(2, 6)
    est = jacobian_frobenius(lin, x, 400, generator=torch.Generator().manual_seed(0), create_graph=True)
    w2 = lin.weight.pow(2).sum().item()
    assert abs(est.sq_norm.mean().item() - w2) <= 4 * est.stderr.max().item()
    est.sq_norm.mean().backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()


def test_jacobian_norm_errors():
    net = torch.nn.Linear(4, 2)
    with pytest.raises(ValueError, match="projections"):
        jacobian_frobenius(net, torch.rand(2, 4), 0)
    with pytest.raises(ValueError, match="batch size"):
        jacobian_frobenius(lambda x: x.flatten()[None], torch.rand(2, 4))
    with pytest.raises(ValueError, match="outputs given"):
        x = torch.rand(2, 4)
        jacobian_frobenius(net, x, outputs=net(x))


# --------------------------------------------------------------------- the selective input-gradient term

def test_selective_term_is_zero_when_the_saliency_lies_in_the_kept_fraction():
    # a linear classifier that reads only k of D inputs: grad_x CE = W^T (p - e_y) is zero off those k,
    # so the term vanishes exactly when keep * D >= k, and otherwise equals the sum of the smallest squares
    D, k = 16, 4
    w = torch.zeros(3, D)
    w[:, :k] = torch.randn(3, k, generator=torch.Generator().manual_seed(0))
    x = torch.rand(5, D, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0, 1])
    (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(x @ w.T, y, reduction="sum"), x)
    assert selective_penalty(g, selection_mask(g, k / D)).item() == 0.0
    assert selective_penalty(g, selection_mask(g, 0.5)).item() == 0.0
    low = selective_penalty(g, selection_mask(g, 2 / D)).item()
    expect = g.abs().sort(dim=1).values[:, :D - 2].pow(2).sum(1).mean().item()
    assert low > 0 and abs(low - expect) < 1e-6
    assert torch.equal(selection_mask(g, 0.0), torch.ones_like(g))


# ------------------------------------------------------------------------------------- the method

def test_resume_matches_uninterrupted(digits, tmp_path):
    train_ds, test_ds = digits
    hp = dict(epochs=2, eps=0.1, steps=1, seed=3, progress=False, verbose=False, jsigr_projections=2)
    ref, res, crash = resume_matches_uninterrupted("jsigr", Subset(train_ds, list(range(64))),
                                                   DataLoader(Subset(test_ds, list(range(32))), batch_size=32),
                                                   tmp_path, hp, crash_after=lambda n: n + 1, width=4)
    assert crash["epoch"] == 1 and res.epochs_run == ref.epochs_run == 2


def test_autocast_runs_in_float32_and_lambdas_zero_is_plain_training(digits):
    train_ds, _ = digits
    sub = DataLoader(Subset(train_ds, list(range(64))), batch_size=32)
    kw = dict(epochs=1, eps=0.1, steps=1, seed=0, progress=False, verbose=False, lr=0.05)
    res = rt.fit(tiny_cnn(seed=2, width=4), sub, "jsigr", amp="bf16", **kw)
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in res.history)
    a, b = tiny_cnn(seed=2, width=4), tiny_cnn(seed=2, width=4)
    rt.fit(a, sub, "jsigr", jsigr_lambda_j=0.0, jsigr_lambda_s=0.0, **kw)
    rt.fit(b, sub, "natural", **{k: v for k, v in kw.items() if k not in ("eps", "steps")})
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(va, vb, atol=1e-6), k


def test_bad_hyperparameters_are_refused(digits):
    sub = DataLoader(Subset(digits[0], list(range(8))), batch_size=8)
    for kw, name in ((dict(jsigr_keep=1.0), "jsigr_keep"), (dict(jsigr_projections=0), "jsigr_projections"),
                     (dict(jsigr_lambda_j=-1.0), "jsigr_lambda_j"), (dict(jsigr_adv=2.0), "jsigr_adv")):
        with pytest.raises(ValueError, match=name):
            rt.fit(tiny_cnn(width=4), sub, "jsigr", epochs=1, progress=False, verbose=False, **kw)


# ------------------------------------------------------------------------------ transfer evaluation

def test_transfer_from_the_model_itself_equals_the_white_box_attack(digits):
    _, test_ds = digits
    net = tiny_cnn(seed=4, width=4).eval()
    xs = torch.stack([test_ds[i][0] for i in range(48)])
    ys = torch.tensor([int(test_ds[i][1]) for i in range(48)])
    opts = dict(suite="pgd", eps=0.1, steps=3, seed=1, progress=False, batch_size=16)
    white = ro.evaluate(net, (xs, ys), **opts)
    same = ro.evaluate(net, (xs, ys), transfer_from=net, **opts)
    assert same["transfer"] and not white["transfer"]
    assert same["robust_correct"] == white["robust_correct"] and same["clean_correct"] == white["clean_correct"]
    assert torch.equal(same["samples"]["robust_correct"], white["samples"]["robust_correct"])
    other = ro.evaluate(net, (xs, ys), transfer_from=tiny_cnn(seed=9, width=4).eval(), **opts)
    assert other["clean_correct"] == white["clean_correct"] and other["robust_correct"] >= white["robust_correct"]
    with pytest.raises(TypeError, match="source"):
        ro.attacks.Transfer(net, net)


def test_cli_train_and_evaluate_transfer(runs, tmp_path):
    with open(runs / "j" / "summary.json") as fh:
        s = json.load(fh)
    assert s["method"] == "jsigr"
    assert {k: s["config"]["params"][k] for k in ("jsigr_lambda_j", "jsigr_lambda_s", "jsigr_keep",
                                                   "jsigr_projections", "jsigr_adv")} == \
        {"jsigr_lambda_j": 0.05, "jsigr_lambda_s": 2.0, "jsigr_keep": 0.3, "jsigr_projections": 2, "jsigr_adv": 0.5}
    out = str(tmp_path / "tr.tsv")
    base = ["evaluate", "--checkpoint", str(runs / "j" / "best.pt"), "--suite", "pgd", "--eps", "0.2", "--steps", "3",
            "--n", "40", "--no-progress"]
    assert main(base + ["--transfer-from", str(runs / "n" / "best.pt"), "-o", out]) == 0
    with open(out + ".json") as fh:
        rec = json.load(fh)
    assert rec["transfer_from"] == os.path.abspath(runs / "n" / "best.pt") and rec["n"] == 40
    assert 0.0 <= rec["robust_acc"] <= rec["clean_acc"]
    with open(out) as fh:
        assert len(fh.read().strip().splitlines()) == 41


def test_cli_transfer_errors(runs, tmp_path, capsys):
    base = ["evaluate", "--checkpoint", str(runs / "j" / "best.pt"), "--eps", "0.2", "--n", "8", "--no-progress"]
    for extra, words in ((["--suite", "pgd", "--transfer-from", str(tmp_path / "missing.pt")], ("--transfer-from",)),
                         (["--suite", "corruptions", "--transfer-from", str(runs / "n" / "best.pt")],
                          ("--transfer-from", "corruptions"))):
        assert main(base + extra) != 0
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and all(w in lines[0] for w in words), lines


def test_saliency_picture_helpers(tmp_path):
    from robustops.plotting import plot_image_grid
    from robustops.train.jacobian import input_saliency

    net = tiny_cnn(seed=3, width=4).eval()
    x, y = torch.rand(2, 1, 8, 8), torch.tensor([1, 2])
    s = input_saliency(net, x, y)
    assert s.shape == (2, 8, 8) and torch.allclose(s.flatten(1).amax(1), torch.ones(2)) and (s >= 0).all()
    paths = plot_image_grid(str(tmp_path / "g.png"), {"digit": x[:, 0], "saliency": s}, "t", {"saliency": "magma"})
    assert all(os.path.getsize(p) > 0 for p in paths)


def test_transfer_of_fab_keeps_its_examples_within_eps(digits):
    _, test_ds = digits
    net = tiny_cnn(seed=4, width=4).eval()
    xs = torch.stack([test_ds[i][0] for i in range(16)])
    ys = torch.tensor([int(test_ds[i][1]) for i in range(16)])
    res = ro.evaluate(net, (xs, ys), suite="fab", eps=0.05, steps=3, progress=False, n_target_classes=2,
                      transfer_from=tiny_cnn(seed=9, width=4).eval())
    assert float(res["samples"]["linf"].max()) <= 0.05 + 1e-6


def test_no_perturbation_used_skips_the_attack_with_the_same_result(digits, monkeypatch):
    from robustops.train.context import MethodContext
    from robustops.train.methods.jsigr import JSIGR

    sub = DataLoader(Subset(digits[0], list(range(64))), batch_size=32)
    kw = dict(epochs=1, eps=0.1, steps=1, seed=0, progress=False, verbose=False, lr=0.05, jsigr_lambda_s=0.0)
    calls = []
    attack = MethodContext.attack
    monkeypatch.setattr(MethodContext, "attack", lambda self, *a, **k: calls.append(1) or attack(self, *a, **k))
    a, b = tiny_cnn(seed=2, width=4), tiny_cnn(seed=2, width=4)
    rt.fit(a, sub, "jsigr", **kw)
    assert not calls
    monkeypatch.setattr(JSIGR, "uses_perturbation", lambda self: True)  # the full step, x' computed and unused
    rt.fit(b, sub, "jsigr", **kw)
    assert len(calls) == 2
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
