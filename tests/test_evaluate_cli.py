"""`robustops evaluate`: a robustops checkpoint (its eps), any user model (--model module:factory, --weights
with a key prefix, --mean/--std), the per-input rows and the JSON / Markdown summaries, a resumed and a
torchrun-sharded run equal to one uninterrupted process, and one-line errors for bad input."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import (ROOT, assert_one_line_error, in_background, ok, subprocess_env, torchrun_command,
                     train_pgd_digits_model)

from robustops.models import save_checkpoint

#: Small budgets: every stage of the standard suite runs, in seconds.
FAST = ["--steps", "3", "--n-queries", "40", "--n-target-classes", "2", "--max-samples", "40", "--batch-size", "16",
        "--no-progress", "--device", "cpu"]

USER_MODULE = '''
from robustops.models import SmallCNN


def build():
    return SmallCNN()
'''


def robustops(*args, extra_path=None):
    env = subprocess_env()
    if extra_path:
        env["PYTHONPATH"] = str(extra_path) + os.pathsep + env["PYTHONPATH"]
    return subprocess.run([sys.executable, "-m", "robustops", "evaluate"] + [str(a) for a in args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("evaluate")
    model = train_pgd_digits_model(epochs=6, eps=0.2)
    ckpt = save_checkpoint(str(d / "pgd.pt"), model, "small_cnn", {}, method="pgd", eps=0.2, norm="linf")
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, d / "weights.pt")
    (d / "usermodels.py").write_text(USER_MODULE)
    return d, ckpt


@pytest.fixture(scope="module")
def full(files):
    """One uninterrupted single-process run (FAST) of the checkpoint: (its stdout, the rows' path)."""
    d, ckpt = files
    p = ok(robustops("--checkpoint", ckpt, *FAST, "-o", d / "ckpt.tsv"))
    return p.stdout, d / "ckpt.tsv"


def _rows(path):
    return list(csv.DictReader(open(path), delimiter="\t"))


def test_checkpoint_and_user_model_give_the_same_rows(files, full):
    d, ckpt = files
    stdout, _ = full
    assert "AutoAttack (standard)" in stdout and "eps=0.2 (from the checkpoint (pgd training))" in stdout
    assert "robust accuracy after each attack: APGD-CE" in stdout
    rows = _rows(d / "ckpt.tsv")
    assert [int(r["index"]) for r in rows] == list(range(40))
    s = json.loads((d / "ckpt.tsv.json").read_text())
    assert s["command"] == "evaluate" and s["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"] and s["n"] == 40
    assert s["robust_acc"] == sum(int(r["robust_correct"]) for r in rows) / 40 == s["stages"][-1]["robust_acc"]
    md = (d / "ckpt.tsv.md").read_text()
    assert "| APGD-CE |" in md and "| Square |" in md and "| clean |" in md
    p = ok(robustops("--model", "usermodels:build", "--weights", d / "weights.pt", "--weights-prefix", "module.",
                     "--eps", "0.2", *FAST, "-o", d / "user.tsv", extra_path=d))
    assert "from --eps" in p.stdout
    assert (d / "user.tsv").read_text() == (d / "ckpt.tsv").read_text()
    # the same points through the Python API
    import robustops as ro
    from robustops.data import load_digits

    x, y = load_digits("test").tensors
    model = train_pgd_digits_model(epochs=6, eps=0.2)
    res = ro.evaluate(model, (x[:40], y[:40]), eps=0.2, steps=3, n_queries=40, n_target_classes=2, batch_size=16,
                      progress=False)
    assert res["robust_acc"] == pytest.approx(s["robust_acc"])


def test_resumed_and_sharded_runs_equal_one_process(files, full):
    import shutil

    d, ckpt = files
    full = full[1]
    lines = full.read_text().splitlines()
    part = d / "part.tsv"
    part.write_text("\n".join(lines[:22]) + "\n")  # a run killed after 21 rows (mid-batch)
    shutil.copy(str(full) + ".json", str(part) + ".json")
    two = d / "two.tsv"
    with in_background(torchrun_command, "evaluate", ["--checkpoint", ckpt, *FAST, "-o", two]) as sharded:
        ok(robustops("--checkpoint", ckpt, *FAST, "-o", part, "--resume"))
        assert part.read_text() == full.read_text()
        p = robustops("--checkpoint", ckpt, *FAST[:-2], "--device", "cpu", "--steps", "4", "-o", part, "--resume")
        assert_one_line_error(p, "--resume", "steps")
    p = sharded.result()
    assert p.returncode == 0, p.stderr
    assert "2 ranks" in p.stdout and two.read_text() == full.read_text()


@pytest.mark.parametrize("args, words", [
    ([], ["--checkpoint", "--model"]),
    (["--model", "usermodels:nothing", "--eps", "0.1"], ["--model", "nothing"]),
    (["--model", "usermodels:build", "--weights", "missing.pt"], ["--weights", "no such file"]),
    (["--checkpoint", "CKPT", "--weights-prefix", "module."], ["--weights-prefix", "--weights"]),
    (["--checkpoint", "CKPT", "--mean", "0.5"], ["--mean", "--std"]),
    (["--checkpoint", "CKPT", "--suite", "pgd", "--version", "plus"], ["--version", "--suite pgd"]),
    (["--checkpoint", "CKPT", "--eps", "0"], ["--eps", "> 0"]),
    (["--checkpoint", "CKPT", "--n", "0"], ["--n", ">= 1"]),
])
def test_bad_input_is_one_line(files, args, words, monkeypatch, capsys):
    from robustops.cli import main

    d, ckpt = files
    monkeypatch.syspath_prepend(str(d))
    monkeypatch.chdir(d)
    assert main(["evaluate"] + [ckpt if a == "CKPT" else a for a in args] + ["--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(w in err for w in words), err


def test_weights_that_do_not_fit_are_named(files, monkeypatch, capsys):
    from robustops.cli import main

    d, _ = files
    monkeypatch.syspath_prepend(str(d))
    assert main(["evaluate", "--model", "usermodels:build", "--weights", str(d / "weights.pt"), "--eps", "0.1",
                 *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not fit" in err and "--weights-prefix" in err, err


@pytest.mark.parametrize("flags, attacks", [
    (["--suite", "square", "--n-queries", "20", "--mean", "0", "--std", "1", "--masking-threshold", "0.2"],
     ["square"]),
    (["--suite", "pgd", "--steps", "2", "--restarts", "2", "--amp", "bf16"], ["pgd"]),
    (["--suite", "autoattack", "--version", "rand", "--steps", "2"], ["apgd-ce", "apgd-dlr"]),
    (["--suite", "fab", "--steps", "2", "--norm", "l2", "--eps", "0.5"], ["fab-t"]),
    (["--suite", "apgd", "--steps", "2", "--n-target-classes", "2"], ["apgd-ce", "apgd-t"]),
])
def test_every_option_through_the_command(files, flags, attacks, tmp_path, capsys):
    """Each suite and option of `robustops evaluate` through its real parser, its settings recorded; --force
    replaces a finished result."""
    from robustops.cli import main

    _, ckpt = files
    out = tmp_path / "e.tsv"
    argv = ["evaluate", "--checkpoint", ckpt, "--max-samples", "16", "--no-progress", "-o", str(out)] + flags
    assert main(argv) == 0
    s = json.loads(open(str(out) + ".json").read())
    assert s["attacks"] == attacks and s["n"] == 16
    settings = s["settings"]
    for flag, value in zip(flags[::2], flags[1::2]):
        key = flag[2:].replace("-", "_")
        if key in settings and key not in ("eps", "mean", "std"):
            assert str(settings[key]) == value, key
    assert len(_rows(out)) == 16
    assert main(argv) == 2 and "--force" in capsys.readouterr().err
    assert main(argv + ["--force"]) == 0 and len(_rows(out)) == 16
