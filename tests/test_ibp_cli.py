"""`robustops certify --method ibp`: per-input IBP radii in the certify TSV (the rows equal
robustops.bounds.certified_radius), resumable like randomized smoothing, with its own settings,
checks and summary; `robustops plot` refuses to mix L2 and L-inf radii. Commands run in subprocesses."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from helpers import assert_one_line_error, ok, run_concurrently, train_digits_model
from robustops import bounds
from robustops.data import load_digits
from robustops.models import save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IBP = ["--method", "ibp", "--eps-max", "0.05", "--tol", "1e-3", "--skip", "6", "--no-progress"]


def _env():
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")


def robustops(*args):
    return subprocess.run([sys.executable, "-m", "robustops"] + [str(a) for a in args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)


def robustops_concurrently(*argss):
    """`python -m robustops ARGS` for each ARGS (independent runs, other outputs), all at once."""
    return run_concurrently([[sys.executable, "-m", "robustops", *args] for args in argss], timeout=300, cwd=ROOT,
                            env=_env())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ibp_cli")
    model = train_digits_model(epochs=3, seed=0)
    return {"plain": save_checkpoint(str(d / "m.pt"), model, "small_cnn", {}),
            "trained": save_checkpoint(str(d / "t.pt"), model, "small_cnn", {}, method="ibp", eps=0.03, norm="linf"),
            "model": model}


def rows(path):
    with open(path) as fh:
        return [line.split("\t")[:5] for line in fh.read().splitlines()[1:]]


def test_rows_are_the_bounds_modules_radii(ckpt, tmp_path):
    out = tmp_path / "ibp.tsv"
    p = ok(robustops("certify", "--checkpoint", ckpt["plain"], "-o", out, "--plot", tmp_path / "c.png", *IBP))
    assert "IBP, eps-max 0.05" in p.stdout and "ACR (L-inf)" in p.stdout
    x, y = load_digits("test").tensors
    idx = list(range(0, 360, 6))
    res = bounds.certified_radius(ckpt["model"], x[idx], eps_max=0.05, tol=1e-3)
    got = rows(out)
    assert [int(r[0]) for r in got] == idx
    assert [int(r[2]) for r in got] == res.prediction.tolist()
    assert [float(r[3]) for r in got] == pytest.approx(res.radius.tolist(), abs=1e-6)
    assert [int(r[4]) for r in got] == (res.prediction == y[idx]).int().tolist()
    summary = json.loads(open(str(out) + ".json").read())
    assert summary["settings"]["method"] == "ibp" and summary["summary"]["norm"] == "linf"
    assert summary["summary"]["acr"] == pytest.approx(
        float((res.radius * (res.prediction == y[idx])).mean()), abs=1e-5)
    assert os.path.getsize(tmp_path / "c.png") > 0 and os.path.getsize(tmp_path / "c.pdf") > 0


def test_resume_keeps_finished_rows_and_checks_the_settings(ckpt, tmp_path):
    full, part = tmp_path / "full.tsv", tmp_path / "part.tsv"
    for p in robustops_concurrently(("certify", "--checkpoint", ckpt["plain"], "-o", full, *IBP),
                                    ("certify", "--checkpoint", ckpt["plain"], "-o", part, "--max-samples", "100",
                                     *IBP)):
        ok(p)
    assert len(rows(part)) == len(range(0, 100, 6))
    p = ok(robustops("certify", "--checkpoint", ckpt["plain"], "-o", part, "--resume", *IBP))
    assert f"(60 inputs, {60 - len(range(0, 100, 6))} to go)" in p.stdout
    assert rows(part) == rows(full)
    # the two refused resumes, at once: the second on a copy of the finished result (one run per output)
    part2 = tmp_path / "part2.tsv"
    part2.write_bytes(part.read_bytes())
    (tmp_path / "part2.tsv.json").write_bytes((tmp_path / "part.tsv.json").read_bytes())
    tol, method = robustops_concurrently(("certify", "--checkpoint", ckpt["plain"], "-o", part, "--resume",
                                          *IBP[:-3], "--tol", "1e-2", "--skip", "6"),
                                         ("certify", "--checkpoint", ckpt["plain"], "-o", part2, "--resume",
                                          "--sigma", "0.25", "--skip", "6"))
    line = assert_one_line_error(tol, "--resume", "--tol")
    assert "0.001" in line
    assert_one_line_error(method, "--resume", "--method ibp")
    assert rows(part) == rows(full) and rows(part2) == rows(full)


def test_eps_max_from_the_checkpoint_and_argument_checks(ckpt, tmp_path):
    p = ok(robustops("certify", "--checkpoint", ckpt["trained"], "--method", "ibp", "--max-samples", "12", "-o",
                     tmp_path / "a.tsv", "--no-progress"))
    assert "eps-max 0.03" in p.stdout
    outs = [tmp_path / f"b{i}.tsv" for i in range(3)]
    eps_max, sigma, tol = robustops_concurrently(
        ("certify", "--checkpoint", ckpt["plain"], "--method", "ibp", "-o", outs[0]),
        ("certify", "--checkpoint", ckpt["plain"], "-o", outs[1], *IBP, "--sigma", "0.25"),
        ("certify", "--checkpoint", ckpt["plain"], "-o", outs[2], "--method", "ibp", "--eps-max", "0.01", "--tol",
         "0.5"))
    assert_one_line_error(eps_max, "--eps-max is required")
    assert_one_line_error(sigma, "--sigma", "randomized-smoothing")
    assert_one_line_error(tol, "--tol")
    assert not any(out.exists() for out in outs)


def test_an_unsupported_layer_is_named_before_any_output(tmp_path):
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))
    path = tmp_path / "tanh.pt"
    torch.jit.save(torch.jit.script(net), str(path))
    out = tmp_path / "t.tsv"
    line = assert_one_line_error(robustops("certify", "--checkpoint", path, "-o", out, *IBP), "--method ibp")
    assert "no rule for" in line
    assert not out.exists() and not (tmp_path / "t.tsv.json").exists()


def test_plot_refuses_to_mix_l2_and_linf_radii(ckpt, tmp_path):
    a, b = tmp_path / "ibp.tsv", tmp_path / "rs.tsv"
    for p in robustops_concurrently(("certify", "--checkpoint", ckpt["plain"], "-o", a, *IBP, "--max-samples", "30"),
                                    ("certify", "--checkpoint", ckpt["plain"], "-o", b, "--sigma", "0.25", "--n0", "8",
                                     "--n", "40", "--max-samples", "30", "--skip", "6", "--no-progress")):
        ok(p)
    mix, p = robustops_concurrently(("plot", a, b, "-o", tmp_path / "mix.png"), ("plot", a, "-o", tmp_path / "one.png"))
    assert_one_line_error(mix, "L2", "L-inf")
    ok(p)
    assert "ibp (IBP)" in p.stdout
