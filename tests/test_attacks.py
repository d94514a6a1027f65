"""robustops.attacks: PGD / FGSM against an independent plain-PyTorch PGD, constraints, restarts,
early exit, targeted attacks, input validation, robust_accuracy and the `robustops attack` CLI."""
import copy
import csv
import io
import os
import subprocess
import sys
import warnings
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import assert_in_ball, in_background, train_digits_model

import robustops as ro
from robustops import attacks as A
from robustops.attacks.graph import GraphRunner
from robustops.data import load_digits
from robustops.models import Normalize, SmallCNN, save_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_EVAL = 160


@pytest.fixture(scope="module")
def model():
    return train_digits_model(epochs=5, seed=0)


@pytest.fixture(scope="module")
def data():
    x, y = load_digits("test").tensors
    return x[:N_EVAL], y[:N_EVAL]


# ------------------------------------------------------------------- independent reference PGD

def plain_pgd(model, x, y, eps, alpha, steps, norm, random_start=False, generator=None, iterates=None,
              reduction="mean"):
    """Textbook PGD in plain PyTorch (no robustops code): from the clean input, or from a uniform
    draw in the eps-ball. iterates: a list that receives every iterate (start included)."""
    x = x.detach()
    xa = x.clone()
    if random_start:
        if norm == "linf":
            xa = x + eps * (2 * torch.rand(x.shape, generator=generator) - 1)
        else:
            z = torch.randn(x.shape, generator=generator).flatten(1)
            r = torch.rand(x.shape[0], generator=generator) ** (1.0 / z.shape[1])
            xa = x + (eps * r[:, None] * z / z.norm(dim=1, keepdim=True)).view_as(x)
        xa = xa.clamp(0, 1)
    for _ in range(steps):
        if iterates is not None:
            iterates.append(xa.detach().clone())
        xa.requires_grad_(True)
        loss = F.cross_entropy(model(xa), y, reduction=reduction)
        (g,) = torch.autograd.grad(loss, xa)
        with torch.no_grad():
            if norm == "linf":
                xa = xa + alpha * g.sign()
                xa = torch.min(torch.max(xa, x - eps), x + eps)
            else:
                gn = g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
                d = xa + alpha * g / gn - x
                dn = d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
                xa = x + d * torch.clamp(eps / dn, max=1.0)
            xa = xa.clamp(0, 1)
        xa = xa.detach()
    if iterates is not None:
        iterates.append(xa.clone())
    return xa


def acc(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def robust_rate(model, x, y, res):
    """Robust accuracy from an AttackResult: clean correct and never fooled."""
    with torch.no_grad():
        clean_ok = model(x).argmax(1) == y
    return (clean_ok & ~res.success).float().mean().item()


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.8)])
def test_at_least_as_strong_as_plain_pgd(model, data, norm, eps):
    x, y = data
    alpha, steps = 2.5 * eps / 10, 10
    ref_acc = acc(model, plain_pgd(model, x, y, eps, alpha, steps, norm), y)
    assert ref_acc < acc(model, x, y) - 0.1  # the reference attack does something
    # Same start, same steps: the fused step follows the same trajectory. From every iterate of the
    # reference (with the attack's summed objective), one engine step lands on the next iterate.
    atk = A.PGD(model, eps=eps, alpha=alpha, steps=steps, norm=norm, random_start=False)
    traj = []
    plain_pgd(model, x, y, eps, alpha, steps, norm, iterates=traj, reduction="sum")
    for k in range(steps):
        xa = traj[k].clone()
        g, _, _ = atk.engine.gradient(xa, (y, None))
        atk.engine.step_(xa, x, g, eps, alpha)
        torch.testing.assert_close(xa, traj[k + 1], atol=2e-6, rtol=0, msg=f"step {k + 1}")
    assert acc(model, atk(x, y), y) <= ref_acc + 1e-9
    # Evaluation mode: a success at any step counts, so it is at least as strong again.
    atk = A.PGD(model, eps=eps, alpha=alpha, steps=steps, norm=norm, random_start=False, early_stop=True)
    assert robust_rate(model, x, y, atk.perturb(x, y)) <= ref_acc + 1e-9
    # With random starts: robustops with 3 restarts vs the reference's single random start.
    ref_rs = acc(model, plain_pgd(model, x, y, eps, alpha, steps, norm, True, torch.Generator().manual_seed(0)), y)
    atk = A.PGD(model, eps=eps, alpha=alpha, steps=steps, norm=norm, restarts=3, early_stop=True, seed=1)
    assert robust_rate(model, x, y, atk.perturb(x, y)) <= ref_rs + 1e-9


# ---------------------------------------------------------------------------------- constraints

@pytest.mark.parametrize("mode", ["plain", "restarts", "early_stop", "record"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_constraints_hold_for_every_sample(model, data, norm, mode):
    x, y = data
    x, y = x[:64], y[:64]
    g = torch.Generator().manual_seed(0)
    eps = (torch.rand(64, generator=g) * (0.2 if norm == "linf" else 1.5))
    eps[:4] = 0.0
    kw = {"plain": {}, "restarts": {"restarts": 3}, "early_stop": {"early_stop": True},
          "record": {"record_steps": True}}[mode]
    atk = A.PGD(model, eps=eps, steps=7, norm=norm, seed=3, **kw)
    xa = atk(x, y)
    assert_in_ball(xa, x, eps, norm)  # eps = 0 (the first 4) leaves the sample unchanged


def test_constraints_bf16_autocast_and_half_images(model, data):
    x, y = data
    x, y = x[:32], y[:32]
    atk = A.PGD(model, eps=0.1, steps=3, dtype=torch.bfloat16, seed=0)
    xa = atk(x, y)
    assert ((xa - x).abs().amax() <= 0.1 + 1e-6) and xa.min() >= 0 and xa.max() <= 1
    xh = x.to(torch.bfloat16)
    m16 = train_digits_model(epochs=5, seed=0).to(torch.bfloat16)
    xa16 = A.PGD(m16, eps=0.1, steps=3, seed=0)(xh, y)
    assert xa16.dtype == torch.bfloat16
    assert float((xa16.float() - xh.float()).abs().amax()) <= 0.1 + 2 ** -8  # within bf16 rounding near 1


def test_per_sample_alpha_and_call_time_eps(model, data):
    x, y = data
    x, y = x[:16], y[:16]
    atk = A.PGD(model, eps=0.3, steps=2, random_start=False)
    eps = torch.full((16,), 0.05)
    alpha = torch.zeros(16)
    alpha[8:] = 0.05
    xa = atk.perturb(x, y, eps=eps, alpha=alpha).x_adv
    assert torch.equal(xa[:8], x[:8])  # alpha = 0: no move
    assert float((xa[8:] - x[8:]).abs().amax()) == pytest.approx(0.05, abs=1e-6)


# ------------------------------------------------------------------------- restarts, early exit

@pytest.mark.parametrize("norm,eps", [("linf", 0.08), ("l2", 0.6)])
def test_restarts_never_weaken(model, data, norm, eps):
    x, y = data
    one = A.PGD(model, eps=eps, steps=5, norm=norm, seed=7).perturb(x, y)
    three = A.PGD(model, eps=eps, steps=5, norm=norm, seed=7, restarts=3).perturb(x, y)
    assert bool((three.success | ~one.success).all())  # every sample fooled by 1 restart stays fooled
    assert int(three.success.sum()) >= int(one.success.sum())
    assert three.restart.max() <= 2
    # Where neither fools, the kept loss is the highest one.
    neither = ~one.success & ~three.success
    assert bool((three.loss[neither] >= one.loss[neither] - 1e-6).all())
    # Early-exit restarts: the same successes (first restart that fools).
    es = A.PGD(model, eps=eps, steps=5, norm=norm, seed=7, restarts=3, early_stop=True).perturb(x, y)
    rec = A.PGD(model, eps=eps, steps=5, norm=norm, seed=7, restarts=3, record_steps=True).perturb(x, y)
    assert torch.equal(es.success, rec.success)


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.8)])
def test_early_exit_equals_full_attack_with_step_recording(model, data, norm, eps):
    x, y = data
    full = A.PGD(model, eps=eps, steps=10, norm=norm, seed=5, record_steps=True).perturb(x, y)
    early = A.PGD(model, eps=eps, steps=10, norm=norm, seed=5, early_stop=True).perturb(x, y)
    assert torch.equal(full.success, early.success)
    assert torch.equal(full.success_step, early.success_step)
    torch.testing.assert_close(early.x_adv, full.x_adv, atol=1e-6, rtol=0)
    # The returned iterate of a fooled sample does fool the model.
    with torch.no_grad():
        pred = model(early.x_adv).argmax(1)
    assert bool((pred[early.success] != y[early.success]).all())
    # Any-step success is at least the final-iterate success of the same run.
    final = A.PGD(model, eps=eps, steps=10, norm=norm, seed=5).perturb(x, y)
    assert bool((full.success | ~final.success).all())


def test_robust_accuracy_early_exit_equals_full(model, data):
    x, y = data
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=50)
    full = A.robust_accuracy(model, loader, A.PGD(model, eps=0.1, steps=8, seed=2, record_steps=True),
                             progress=False)
    early = A.robust_accuracy(model, loader, A.PGD(model, eps=0.1, steps=8, seed=2, early_stop=True),
                              progress=False)
    assert full["n"] == early["n"] == N_EVAL
    assert full["clean_acc"] == early["clean_acc"]
    assert full["robust_acc"] == early["robust_acc"]
    assert torch.equal(full["samples"]["robust_correct"], early["samples"]["robust_correct"])
    assert 0 < early["robust_acc"] < early["clean_acc"]


def test_seed_reproducibility(model, data):
    x, y = data
    a = A.PGD(model, eps=0.1, steps=3, seed=11)(x, y)
    b = A.PGD(model, eps=0.1, steps=3, seed=11)(x, y)
    c = A.PGD(model, eps=0.1, steps=3, seed=12)(x, y)
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(4)
    d = A.PGD(model, eps=0.1, steps=3)(x, y)
    torch.manual_seed(4)
    e = A.PGD(model, eps=0.1, steps=3)(x, y)
    assert torch.equal(d, e)
    # Consecutive batches draw different starts (the sample offset advances).
    atk = A.PGD(model, eps=0.1, steps=1, alpha=0.0, seed=0)
    s1, s2 = atk(x[:8], y[:8]), atk(x[:8], y[:8])
    assert not torch.equal(s1, s2)


# ----------------------------------------------------------------------- targeted, losses, FGSM

def test_targeted_reaches_targets(model, data):
    x, y = data
    x, y = x[:64], y[:64]
    targets = (y + 1) % 10
    atk = A.PGD(model, eps=0.5, alpha=0.05, steps=20, targeted=True, seed=0)
    res = atk.perturb(x, y, targets)
    with torch.no_grad():
        pred = model(res.x_adv).argmax(1)
    assert bool((res.success == (pred == targets)).all())
    assert (pred == targets).float().mean().item() >= 0.95
    # target_fn, used by robust_accuracy
    atk = A.PGD(model, eps=0.5, alpha=0.05, steps=20, targeted=True, seed=0,
                target_fn=lambda x, y: (y + 1) % 10)
    r = A.robust_accuracy(model, [(x, y)], atk, progress=False)
    assert torch.equal(r["samples"]["target"], targets)
    assert r["robust_acc"] <= 0.05


def test_dlr_and_custom_losses(model, data):
    x, y = data
    base = acc(model, x, y)
    for loss in ("dlr", lambda logits, yy: F.cross_entropy(logits, yy, reduction="none"),
                 lambda logits, yy: F.cross_entropy(logits, yy)):
        res = A.PGD(model, eps=0.15, steps=10, loss=loss, seed=0, restarts=2).perturb(x, y)
        assert robust_rate(model, x, y, res) < base - 0.3
    d = A.dlr_loss(torch.tensor([[3.0, 1.0, 0.0, -1.0]]), torch.tensor([0]))
    assert d.item() == pytest.approx(-(3 - 1) / (3 - 0))


def test_fgsm_is_one_sign_step(model, data):
    x, y = data
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xr), y, reduction="sum"), xr)
    expected = (x + 0.1 * g.sign()).clamp(0, 1)
    torch.testing.assert_close(A.FGSM(model, eps=0.1)(x, y), expected, atol=1e-6, rtol=0)
    rs = A.FGSM(model, eps=0.1, random_start=True, seed=0)
    assert rs.alpha == pytest.approx(0.125) and float((rs(x, y) - x).abs().amax()) <= 0.1 + 1e-6
    with pytest.raises(ValueError, match="one step"):
        A.FGSM(model, eps=0.1, steps=3)


# ------------------------------------------------------------------- normalization, model state

def test_normalization_inside_or_outside(data):
    x, y = data
    x, y = x[:32], y[:32]
    torch.manual_seed(0)
    net = SmallCNN().eval()
    mean, std = (0.3,), (0.4,)
    inside = nn.Sequential(Normalize(mean, std), net)
    a = A.PGD(inside, eps=0.1, steps=4, seed=0)(x, y)
    b = A.PGD(net, eps=0.1, steps=4, seed=0, mean=mean, std=std)(x, y)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_model_mode_and_parameter_flags_restored(data):
    x, y = data
    x, y = x[:16], y[:16]
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(256, 10))
    net.train()
    seen = []
    net.register_forward_pre_hook(
        lambda m, inp: seen.append((m.training, any(p.requires_grad for p in m.parameters()))))
    running = net[1].running_mean.clone()
    A.PGD(net, eps=0.1, steps=2, seed=0)(x, y)
    assert net.training and all(p.requires_grad and p.grad is None for p in net.parameters())
    assert seen and all(not training and not rg for training, rg in seen)
    assert torch.equal(net[1].running_mean, running)  # eval-mode attack: statistics untouched
    seen.clear()
    net.eval()
    A.PGD(net, eps=0.1, steps=2, seed=0, train_mode=True)(x, y)
    assert not net.training and all(training for training, _ in seen)
    assert not torch.equal(net[1].running_mean, running)  # train-mode attack, as fast AT does


def test_graph_on_cpu_warns_and_runs_eager(model, data):
    x, y = data
    x, y = x[:16], y[:16]
    eager = A.PGD(model, eps=0.1, steps=3, seed=0)(x, y)
    with pytest.warns(UserWarning, match="needs CUDA"):
        g = A.PGD(model, eps=0.1, steps=3, seed=0, graph=True)(x, y)
    assert torch.equal(eager, g)


# ----------------------------------------------------------------------------------- bad inputs

def test_bad_inputs_raise_clear_errors(model, data):
    x, y = data
    x, y = x[:8], y[:8]
    atk = A.PGD(model, eps=0.1, steps=2)
    with pytest.raises(ValueError, match=r"labels must be a Tensor\[B\] with B = 8"):
        atk(x, y[:7])
    with pytest.raises(TypeError, match="labels must be an integer"):
        atk(x, y.float())
    with pytest.raises(ValueError, match=r"eps must be a finite float >= 0, got -0.1"):
        A.PGD(model, eps=-0.1)
    with pytest.raises(ValueError, match=r"eps must be finite and >= 0 for every sample"):
        atk.perturb(x, y, eps=torch.tensor([0.1] * 7 + [-0.1]))
    with pytest.raises(ValueError, match=r"eps must be a float or a Tensor\[B\] with B = 8"):
        atk.perturb(x, y, eps=torch.full((5,), 0.1))
    with pytest.raises(ValueError, match="alpha must be"):
        A.PGD(model, eps=0.1, alpha=-1.0)
    with pytest.raises(ValueError, match=r"steps must be an int >= 1, got 0"):
        A.PGD(model, eps=0.1, steps=0)
    with pytest.raises(ValueError, match=r"restarts must be an int >= 1"):
        A.PGD(model, eps=0.1, restarts=0)
    with pytest.raises(ValueError, match=r"images must lie in clip=\(0.0, 1.0\)"):
        atk(x * 2 - 0.5, y)
    with pytest.raises(TypeError, match="images must be float32"):
        atk((x * 255).to(torch.uint8), y)
    with pytest.raises(ValueError, match="norm must be"):
        A.PGD(model, eps=0.1, norm="l1")
    with pytest.raises(ValueError, match="loss must be"):
        A.PGD(model, eps=0.1, loss="hinge")
    with pytest.raises(ValueError, match="clip must be"):
        A.PGD(model, eps=0.1, clip=(1.0, 0.0))
    with pytest.raises(ValueError, match="needs targets"):
        A.PGD(model, eps=0.1, targeted=True)(x, y)
    with pytest.raises(ValueError, match=r"targets must be a Tensor\[B\]"):
        A.PGD(model, eps=0.1, targeted=True)(x, y, y[:3])
    with pytest.raises(ValueError, match="untargeted"):
        atk(x, y, y)
    with pytest.raises(ValueError, match="dtype"):
        A.PGD(model, eps=0.1, dtype="int8")


# ------------------------------------------------------------------------------ robust_accuracy

def test_robust_accuracy_results_and_tsv(model, data, tmp_path):
    x, y = data
    from robustops.data import IndexedDataset
    ds = IndexedDataset(torch.utils.data.TensorDataset(x, y))
    loader = torch.utils.data.DataLoader(ds, batch_size=64)
    atk = A.PGD(model, eps=0.1, steps=5, seed=0)
    r = A.robust_accuracy(model, loader, atk, progress=True)
    for k in ("clean_acc", "robust_acc", "n", "clean_correct", "robust_correct", "samples"):
        assert k in r
    s = r["samples"]
    assert r["n"] == N_EVAL and torch.equal(s["index"], torch.arange(N_EVAL))
    assert r["clean_acc"] == pytest.approx(acc(model, x, y))
    assert r["robust_acc"] == pytest.approx(s["robust_correct"].float().mean().item())
    assert bool((s["linf"] <= 0.1 + 1e-6).all())
    from robustops.cli.attack import save_results

    path = save_results(str(tmp_path / "r.tsv"), s)
    rows = list(csv.DictReader(open(path), delimiter="\t"))
    assert len(rows) == N_EVAL and rows[0].keys() >= {"index", "label", "clean_pred", "adv_pred", "robust_correct"}
    assert sum(int(row["robust_correct"]) for row in rows) == r["robust_correct"]
    r2 = A.robust_accuracy(model, loader, A.PGD(model, eps=0.1, steps=5, seed=0), progress=False, max_samples=70)
    assert r2["n"] == 70


# ------------------------------------------------------------------------------------------ CLI

@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt") / "digits.pt")
    save_checkpoint(path, model, "small_cnn", {"num_classes": 10, "in_channels": 1, "input_size": 8})
    return path


def _read_tsv(path):
    with open(path) as f:
        return list(csv.DictReader(f, delimiter="\t"))


def run_attack_cli(argv):
    """`robustops attack ARGV` in this process: returns (exit code, stdout, stderr)."""
    from robustops.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(["attack"] + list(argv))
    return rc, out.getvalue(), err.getvalue()


def test_cli_attack_end_to_end(checkpoint, tmp_path):
    out = tmp_path / "attack.tsv"
    rc, text, _ = run_attack_cli(["--checkpoint", checkpoint, "--eps", "0.1", "--steps", "5", "--max", "100",
                                  "--batch", "40", "--out", str(out), "--no-progress", "--early-stop", "--seed", "3"])
    assert rc == 0
    assert "clean_acc" in text and "robust_acc" in text
    rows = _read_tsv(out)
    assert [int(r["index"]) for r in rows] == list(range(100))
    robust = sum(int(r["robust_correct"]) for r in rows) / 100
    clean = sum(int(r["clean_correct"]) for r in rows) / 100
    assert f"robust_acc {robust:.4f}" in text and clean > 0.85 and robust < clean
    assert all(float(r["linf"]) <= 0.1 + 1e-6 for r in rows)
    # The same attack without early exit (final-iterate success) is no stronger.
    rc, text2, _ = run_attack_cli(["--checkpoint", checkpoint, "--eps", "0.1", "--steps", "5", "--max", "100",
                                   "--batch", "40", "--no-progress", "--seed", "3", "--eps", "1/10"])
    assert rc == 0
    assert float(text2.split("robust_acc ")[1].split()[0]) >= robust


def test_cli_attack_raw_state_dict_needs_model(model, tmp_path):
    raw = str(tmp_path / "raw.pt")
    torch.save(model.state_dict(), raw)
    rc, _, err = run_attack_cli(["--checkpoint", raw, "--max", "8", "--steps", "1", "--no-progress"])
    assert rc == 2 and "raw state dict" in err and "--model" in err
    rc, text, _ = run_attack_cli(["--checkpoint", raw, "--model", "small_cnn", "--max", "8", "--steps", "1",
                                  "--norm", "l2", "--eps", "0.5", "--no-progress"])
    assert rc == 0 and "n 8" in text
    rc, _, err = run_attack_cli(["--checkpoint", raw, "--model", "small_cnn", "--data", str(tmp_path / "nope"),
                                 "--no-progress"])
    assert rc == 2 and "does not exist" in err


def test_robustops_cli_dispatches_attack(checkpoint, tmp_path):
    from robustops.cli import main

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["attack", "--checkpoint", checkpoint, "--max", "20", "--steps", "2", "--no-progress"]) == 0
    assert "robust_acc" in buf.getvalue()


_TORCHRUN_SCRIPT = """
import sys
from robustops.cli import main
sys.exit(main(["attack"] + sys.argv[1:]))
"""


def test_cli_attack_torchrun_two_ranks(checkpoint, tmp_path):
    out = tmp_path / "dist.tsv"
    script = tmp_path / "attack_main.py"
    script.write_text(_TORCHRUN_SCRIPT)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           "--checkpoint", checkpoint, "--eps", "0.1", "--steps", "3", "--max-samples", "50",
           "--batch", "16", "--out", str(out), "--no-progress", "--device", "cpu"]
    with in_background(subprocess.run, cmd, cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=180) as two_ranks:
        # the single-process run (in this process) beside the torchrun one
        _, _, _ = run_attack_cli(["--checkpoint", checkpoint, "--eps", "0.1", "--steps", "3", "--max", "50",
                                  "--out", str(tmp_path / "single.tsv"), "--no-progress"])
    proc = two_ranks.result()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = _read_tsv(out)
    assert [int(r["index"]) for r in rows] == list(range(50))  # merged from both ranks, sorted
    assert "2 ranks" in proc.stdout and proc.stdout.count("clean_acc") == 1
    # Clean predictions do not depend on the sharding.
    single = _read_tsv(tmp_path / "single.tsv")
    assert [r["clean_pred"] for r in rows] == [r["clean_pred"] for r in single]


# ------------------------------------------------------------------------------------ CUDA graph

@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["plain", "record", "early_stop", "restarts"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_graph_matches_eager(model, data, norm, mode):
    x, y = (t.cuda() for t in data)
    m = train_digits_model(epochs=5, seed=0).cuda()
    kw = {"plain": {}, "record": {"record_steps": True}, "early_stop": {"early_stop": True},
          "restarts": {"restarts": 2}}[mode]
    eps = 0.1 if norm == "linf" else 0.8
    eager = A.PGD(m, eps=eps, steps=6, norm=norm, seed=9, **kw).perturb(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: the graph was captured
        atk = A.PGD(m, eps=eps, steps=6, norm=norm, seed=9, graph=True, **kw)
        graph = atk.perturb(x, y)
    assert atk._graphs, "no graph was captured"
    assert torch.equal(eager.success, graph.success)
    torch.testing.assert_close(graph.x_adv, eager.x_adv, atol=1e-5, rtol=0)


@pytest.mark.cuda
def test_graph_changing_shapes_and_bf16(data):
    x, y = (t.cuda() for t in data)
    m = train_digits_model(epochs=5, seed=0).cuda()
    atk = A.PGD(m, eps=0.1, steps=4, seed=0, graph=True, dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for b in (64, 64, 32, 64, 7):  # full batches, a last partial batch, back again
            xa = atk(x[:b], y[:b])
            assert xa.shape == x[:b].shape
            assert float((xa - x[:b]).abs().amax()) <= 0.1 + 1e-6
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x.cpu(), y.cpu()), batch_size=50)
    r = A.robust_accuracy(m, loader, A.PGD(m, eps=0.1, steps=4, seed=0, graph=True, early_stop=True),
                          device="cuda", progress=False)
    e = A.robust_accuracy(m, loader, A.PGD(m, eps=0.1, steps=4, seed=0, early_stop=True), device="cuda",
                          progress=False)
    assert r["robust_acc"] == e["robust_acc"]


@pytest.mark.cuda
def test_graph_capture_failure_falls_back_with_warning(data):
    x, y = (t.cuda() for t in data)
    base = train_digits_model(epochs=5, seed=0).cuda()

    class Syncing(nn.Module):  # a host sync in forward cannot be captured
        def __init__(self):
            super().__init__()
            self.net = base

        def forward(self, z):
            if float(z.sum()) < -1:
                z = z * 0
            return self.net(z)

    m = Syncing().eval()
    device, stream = torch.cuda.current_device(), torch.cuda.current_stream()
    eager = A.PGD(m, eps=0.1, steps=3, seed=0)(x, y)
    with pytest.warns(UserWarning, match="capture failed"):
        g = A.PGD(m, eps=0.1, steps=3, seed=0, graph=True)(x, y)
    # torch.cuda.graph leaves its capture stream current when capture_end raises: the runner puts it back
    assert torch.cuda.current_device() == device and torch.cuda.current_stream() == stream
    torch.testing.assert_close(g, eager, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["plain", "record", "early_stop", "restarts"])
def test_graph_path_logic_with_simulated_replay(model, data, mode, monkeypatch):
    """The graph path's bookkeeping (static buffers, in-graph step recording, restarts, re-capture for
    new shapes) on CPU, with the capture replaced by calling the iteration directly: it must give the
    eager path's answer. The real capture is tested on CUDA above."""
    x, y = data

    class FakeGraph:
        def __init__(self, fn):
            self.replay = fn

    def fake_capture(self):
        self.iteration()  # one warm-up step that must not leak into the results
        self._restore([(b, b.detach().clone()) for b in self.module.buffers()], self.xa.clone())
        self.graph = FakeGraph(self.iteration)

    monkeypatch.setattr(GraphRunner, "capture", fake_capture)
    monkeypatch.setattr(A.PGD, "_use_graph", lambda self, x: self.graph)
    kw = {"plain": {}, "record": {"record_steps": True}, "early_stop": {"early_stop": True},
          "restarts": {"restarts": 2}}[mode]
    eps = torch.full((N_EVAL,), 0.1)
    eps[::3] = 0.05
    eager = A.PGD(model, eps=eps, steps=6, seed=9, **kw).perturb(x, y)
    atk = A.PGD(model, eps=eps, steps=6, seed=9, graph=True, **kw)
    graph = atk.perturb(x, y)
    assert len(atk._graphs.runners) == 1
    assert torch.equal(eager.success, graph.success)
    assert torch.equal(eager.success_step, graph.success_step)
    torch.testing.assert_close(graph.x_adv, eager.x_adv, atol=1e-6, rtol=0)
    # a second batch shape captures a second graph, the first is reused afterwards
    small = atk.perturb(x[:10], y[:10], eps=eps[:10], offset=0)
    again = atk.perturb(x, y, eps=eps, offset=0)
    assert len(atk._graphs.runners) == 2
    assert torch.equal(small.success, graph.success[:10]) and torch.equal(again.x_adv, graph.x_adv)


def test_nan_logits_are_no_misclassification_to_claim(data):
    """A model whose logits turn NaN away from the clean input: torch.argmax would name the NaN's
    class, which the attack used to count as a success; now there is no prediction (-1) and no
    success, and robust_accuracy does not count the sample as robust either."""
    x, y = data
    x, y = x[:32], y[:32]

    class NaNAway(nn.Module):
        def __init__(self, x0):
            super().__init__()
            self.register_buffer("x0", x0)

        def forward(self, z):
            out = torch.nn.functional.one_hot(y[:z.shape[0]], 10).float() * 5
            far = (z - self.x0[:z.shape[0]]).flatten(1).abs().amax(1) > 0.01
            return torch.where(far[:, None], torch.full_like(out, float("nan")), out)

    m = NaNAway(x)
    res = A.PGD(m, eps=0.1, steps=3, seed=0).perturb(x, y)
    assert not bool(res.success.any())
    assert bool((res.pred == -1).all())
    res = A.PGD(m, eps=0.1, steps=3, seed=0, early_stop=True).perturb(x, y)
    assert not bool(res.success.any())
    r = A.robust_accuracy(m, [(x, y)], A.PGD(m, eps=0.1, steps=3, seed=0), progress=False)
    assert r["clean_acc"] == 1.0 and r["robust_acc"] == 0.0
    assert bool((r["samples"]["adv_pred"] == -1).all()) and not bool(r["samples"]["success"].any())


# ------------------------------------------------------------- the README's compiled attack step

def test_a_whole_attack_step_compiles_with_fullgraph(model, data):
    """README's pattern: torch.func.grad for the input gradient, then pgd_step_, in one
    torch.compile(fullgraph=True) graph; the same iterates as the eager step. torch.autograd.grad
    breaks the graph (dynamo's default), and seed=None cannot be traced: its error says so."""
    x, y = data
    x, y = x[:32], y[:32]
    frozen = copy.deepcopy(model).requires_grad_(False)

    def step(x_adv, x, y):
        g = torch.func.grad(lambda z: F.cross_entropy(frozen(z), y, reduction="sum"))(x_adv)
        return ro.pgd_step_(x_adv, x, g, eps=0.1, alpha=0.025, norm="linf")

    compiled = torch.compile(step, fullgraph=True)
    start = ro.random_init(x, eps=0.1, norm="linf", seed=3)
    xa_eager, xa_comp = start.clone(), start.clone()
    for _ in range(4):
        step(xa_eager, x, y)
        compiled(xa_comp, x, y)
    torch.testing.assert_close(xa_comp, xa_eager, rtol=0, atol=1e-6)
    assert float((xa_eager - x).abs().amax()) <= 0.1 + 1e-6 and not torch.equal(xa_eager, start)
    with pytest.raises(Exception, match="seed=None draws a seed"):
        torch.compile(lambda t: ro.random_init(t, eps=0.1, norm="linf"), fullgraph=True)(x)
