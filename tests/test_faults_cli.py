"""Issue 22, the command line's part, through the real CLI (subprocesses): the class count comes from the
model, never from the data; --force replaces a result only once the new one is done; two `attack -o` on
one file; options torchrun accepts; plain progress lines; the certify summary's radii; no lock files
left; split-invariant attacks."""
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import ROOT, assert_one_line_error, subprocess_env, train_digits_model
from robustops.data import load_digits
from robustops.models import save_checkpoint

SMOOTH = ["--sigma", "0.25", "--n", "40", "--alpha", "0.01", "--batch-size", "200", "--no-progress"]
#: each evaluating command, as (its arguments, the column of the label in its TSV)
COMMANDS = {
    "certify": ["certify", "--n0", "8"] + SMOOTH,
    "predict": ["predict"] + SMOOTH,
    "ibp": ["certify", "--method", "ibp", "--eps-max", "0.05", "--tol", "0.01", "--no-progress"],
    "attack": ["attack", "--eps", "0.05", "--steps", "2", "--no-progress"],
}


def robustops(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "robustops"] + [str(a) for a in args], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest() if os.path.exists(path) else None


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults_cli")
    return save_checkpoint(str(d / "digits.pt"), train_digits_model(epochs=2, seed=0), "small_cnn", {})


@pytest.fixture(scope="module")
def short_data(tmp_path_factory):
    """Test files whose labels do not reach the model's last class: labels 0..8, and one sample."""
    d = tmp_path_factory.mktemp("short")
    x, y = load_digits("test").tensors
    keep = (y < 9).nonzero().squeeze(1)[:24]
    np.savez(d / "l08.npz", x=x[keep].numpy(), y=y[keep].numpy())
    one = (y == 3).nonzero()[0]
    np.savez(d / "one.npz", x=x[one].numpy(), y=y[one].numpy())
    bad = y[:24].clone()
    bad[5] = 12
    np.savez(d / "l12.npz", x=x[:24].numpy(), y=bad.numpy())
    return d


def _leftovers(directory, name):
    return sorted(p for p in os.listdir(directory) if p.startswith(name) and p != name and p != name + ".json")


@pytest.mark.parametrize("data", ["l08", "one"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_labels_short_of_the_last_class(ckpt, short_data, tmp_path, command, data):
    out = tmp_path / "out.tsv"
    flag = "--out" if command == "attack" else "-o"
    p = robustops(*COMMANDS[command], "--checkpoint", ckpt, "--data", short_data / f"{data}.npz", flag, out)
    assert p.returncode == 0, p.stderr
    lines = out.read_text().splitlines()
    assert len(lines) == 1 + (24 if data == "l08" else 1)
    assert _leftovers(tmp_path, "out.tsv") == []  # no part, lock or temporary files


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_label_past_the_models_classes_is_one_line(ckpt, short_data, tmp_path, command):
    out = tmp_path / "out.tsv"
    flag = "--out" if command == "attack" else "-o"
    p = robustops(*COMMANDS[command], "--checkpoint", ckpt, "--data", short_data / "l12.npz", flag, out)
    assert_one_line_error(p, "--data", "10 classes", "[0, 12]")
    assert os.listdir(tmp_path) == []


def test_force_replaces_the_result_only_when_the_new_one_is_done(ckpt, short_data, tmp_path):
    out = tmp_path / "cert.tsv"
    base = COMMANDS["certify"] + ["--checkpoint", ckpt, "-o", out, "--max-samples", "24"]
    assert robustops(*base).returncode == 0
    before, settings = digest(out), digest(str(out) + ".json")
    # a --force run that fails (a label past the model's classes) keeps the old result
    p = robustops(*base, "--force", "--data", short_data / "l12.npz")
    assert p.returncode == 2
    assert digest(out) == before and digest(str(out) + ".json") == settings
    # a --force run that is killed keeps it too
    slow = robustops_popen(*base[:-2], "--force", "--n", "20000")
    try:
        _wait_for(str(out) + ".new.rank0.part", slow)
    finally:
        slow.kill()
        slow.wait()
    assert digest(out) == before and digest(str(out) + ".json") == settings
    # a --force run that finishes replaces it, and clears what the killed one left
    p = robustops(*base, "--force", "--seed", "1")
    assert p.returncode == 0, p.stderr
    assert digest(out) != before
    assert _leftovers(tmp_path, "cert.tsv") == []


def robustops_popen(*args):
    return subprocess.Popen([sys.executable, "-m", "robustops"] + [str(a) for a in args], cwd=ROOT,
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(path, proc, deadline=120):
    end = time.time() + deadline
    while time.time() < end and proc.poll() is None:
        if os.path.exists(path):
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} never appeared: " + (proc.stderr.read() if proc.poll() is not None else ""))
