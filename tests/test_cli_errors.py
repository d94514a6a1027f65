"""The command line refuses what it should, in one line, before it touches anything: every case runs
the real command in a subprocess and checks a non-zero exit, exactly one line on stderr, and that
the previous output is intact. Also: two runs on one output, resumed runs with other settings,
corrupt checkpoints, data that cannot be trained on."""
import hashlib
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from helpers import assert_one_line_error, run_concurrently, train_digits_model, wait_for
from robustops.models import save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    return e


def robustops(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "robustops"] + [str(a) for a in args], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=timeout)


def robustops_concurrently(*argss, timeout=120):
    """`python -m robustops ARGS` for each ARGS (independent runs on different outputs), all at once."""
    return run_concurrently([[sys.executable, "-m", "robustops", *args] for args in argss], timeout=timeout,
                            cwd=ROOT, env=env())


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest() if os.path.exists(path) else None


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_errors")
    return save_checkpoint(str(d / "digits.pt"), train_digits_model(epochs=2, seed=0), "small_cnn", {})


CERT = ["--sigma", "0.25", "--N0", "8", "--N", "40", "--alpha", "0.01", "--batch", "200", "--skip", "60",
        "--no-progress"]


BAD_NUMBERS = [
    (["attack", "--eps", "-1"], ["--eps", ">= 0"]),
    (["attack", "--step-size", "-0.1"], ["--step-size", ">= 0"]),
    (["attack", "--alpha", "0.1"], ["--alpha", "use --step-size"]),
    (["attack", "--eps", "8/0"], ["--eps", "8/0"]),
    (["certify", "--sigma", "inf"], ["--sigma", "finite"]),
]


@pytest.fixture(scope="module")
def bad_number_runs(ckpt, tmp_path_factory):
    """Every case of BAD_NUMBERS on a previous output of its own, all run at once (independent processes):
    {args: (CompletedProcess, the output, its digest before)}."""
    cases = []
    for args, _ in BAD_NUMBERS:
        out = tmp_path_factory.mktemp("bad_number") / "previous.tsv"
        out.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\t0.5\t1\t0.1\n")
        flag = "--out" if args[0] == "attack" else "-o"
        extra = ["--N0", "8", "--N", "40"] if args[0] == "certify" else []
        cases.append((out, digest(out), (*args, "--checkpoint", ckpt, flag, out, *extra, "--no-progress")))
    done = robustops_concurrently(*(argv for _, _, argv in cases))
    return {tuple(args): (p, out, before) for (args, _), p, (out, before, _) in zip(BAD_NUMBERS, done, cases)}


@pytest.mark.parametrize("args,words", BAD_NUMBERS)
def test_bad_numbers_are_one_line_and_leave_the_output(bad_number_runs, args, words):
    p, out, before = bad_number_runs[tuple(args)]
    assert_one_line_error(p, *words)
    assert digest(out) == before


def test_unwritable_outputs_are_refused_before_any_work(ckpt, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = tmp_path / "c.tsv"
    attack, certify = robustops_concurrently(
        ("attack", "--checkpoint", ckpt, "--out", blocker / "sub" / "r.tsv", "--steps", "200", "--no-progress"),
        ("certify", "--checkpoint", ckpt, "-o", out, "--plot", blocker / "p.png", *CERT))
    assert_one_line_error(attack, "--out", "cannot write")
    assert_one_line_error(certify, "--plot")
    assert not out.exists()


def test_corrupt_checkpoints_are_refused(ckpt, tmp_path):
    bad = tmp_path / "flipped.pt"
    data = bytearray(open(ckpt, "rb").read())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])  # 64 bytes inside the weights
    bad.write_bytes(bytes(data))
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"not a checkpoint at all")
    attack, train = robustops_concurrently(
        ("attack", "--checkpoint", bad, "--steps", "1", "--max", "8", "--no-progress"),
        ("train", "--method", "natural", "--epochs", "1", "--out", run, "--resume", "--no-progress"))
    assert_one_line_error(attack, "corrupt")
    assert_one_line_error(train, "resume", "last.pt")


def _npz(path, x, y):
    np.savez(path, x_train=x, y_train=y, x_test=x, y_test=y)
    return path


BAD_DATA = [
    ("empty", ["no samples"]),
    ("range_255", ["[0, 1]", "255"]),
    ("float_labels", ["integer class labels"]),
    ("negative_label", ["labels must lie in"]),
    ("one_class", ["at least 2 classes"]),
    ("nan_pixel", ["NaN"]),
]


def _bad_data(case):
    rng = np.random.default_rng(0)
    x = rng.random((40, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 3, 40)
    if case == "empty":
        x, y = x[:0], y[:0]
    elif case == "range_255":
        x = x * 255
    elif case == "float_labels":
        y = y + 0.5
    elif case == "negative_label":
        y[3] = -1
    elif case == "one_class":
        y = np.zeros_like(y)
    elif case == "nan_pixel":
        x[5, 0, 2, 2] = np.nan
    return x, y


@pytest.fixture(scope="module")
def bad_data_runs(tmp_path_factory):
    """`train` on every case of BAD_DATA, each in a directory of its own, all run at once (independent
    processes): {case: (CompletedProcess, the directory)}."""
    dirs = {case: tmp_path_factory.mktemp(case) for case, _ in BAD_DATA}
    paths = {case: _npz(d / f"{case}.npz", *_bad_data(case)) for case, d in dirs.items()}
    done = robustops_concurrently(*(("train", "--data", paths[case], "--epochs", "1", "--out", dirs[case] / "run",
                                     "--no-progress") for case, _ in BAD_DATA))
    return {case: (p, dirs[case]) for (case, _), p in zip(BAD_DATA, done)}


@pytest.mark.parametrize("case,words", BAD_DATA)
def test_data_that_cannot_be_trained_on(bad_data_runs, case, words):
    p, tmp_path = bad_data_runs[case]
    assert_one_line_error(p, "--data", *words)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_model_that_cannot_take_the_data(ckpt, tmp_path):
    x = np.random.default_rng(0).random((20, 3, 32, 32)).astype(np.float32)
    path = _npz(tmp_path / "rgb.npz", x, np.arange(20) % 10)
    p = robustops("attack", "--checkpoint", ckpt, "--data", path, "--no-progress")
    assert_one_line_error(p, "--checkpoint", "does not accept", "[3, 32, 32]")


def test_certify_resume_refuses_other_settings_and_failed_reruns_keep_the_result(ckpt, tmp_path):
    out = tmp_path / "cert.tsv"
    assert robustops("certify", "--checkpoint", ckpt, "-o", out, *CERT).returncode == 0
    before = digest(out)
    other = [a if a != "0.25" else "0.5" for a in CERT]
    # the three refused reruns at once, each on its own copy of the result (one run per output and lock)
    copies = [out] + [tmp_path / f"cert{i}.tsv" for i in (2, 3)]
    for c in copies[1:]:
        c.write_bytes(out.read_bytes())
        (tmp_path / (c.name + ".json")).write_bytes((tmp_path / "cert.tsv.json").read_bytes())
    resume, data, neither = robustops_concurrently(
        ("certify", "--checkpoint", ckpt, "-o", copies[0], "--resume", *other),
        ("certify", "--checkpoint", ckpt, "-o", copies[1], "--data", tmp_path / "missing.npz", *CERT),
        ("certify", "--checkpoint", ckpt, "-o", copies[2], *CERT))  # neither --resume nor --force
    assert_one_line_error(resume, "--resume", "--sigma 0.25", "0.5")
    assert_one_line_error(data, "--data")
    assert_one_line_error(neither, "--force")
    assert [digest(c) for c in copies] == [before] * 3
    assert robustops("certify", "--checkpoint", ckpt, "-o", out, "--resume", *CERT).returncode == 0
    assert digest(out) == before


def test_a_second_run_on_the_same_output_fails_at_once(ckpt, tmp_path):
    out = tmp_path / "busy.tsv"
    slow = ["--sigma", "0.25", "--N0", "16", "--N", "20000", "--alpha", "0.01", "--batch", "500", "--no-progress"]
    run = tmp_path / "trainrun"
    # the first certify and the first train (other outputs) run side by side; each second run meets its own
    firsts = []
    try:
        firsts.append(subprocess.Popen([sys.executable, "-m", "robustops", "certify", "--checkpoint", ckpt, "-o",
                                        str(out)] + slow, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE, text=True))
        firsts.append(subprocess.Popen([sys.executable, "-m", "robustops", "train", "--method", "pgd", "--epochs",
                                        "50", "--out", str(run), "--no-progress"], cwd=ROOT, env=env(),
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        wait_for(str(out) + ".rank0.part", firsts[0])
        # the first train holds its lock from its start (it would write log.csv only after a PGD epoch); the
        # second run needs seconds to import torch before it reaches the lock, so the first one has it by then
        wait_for(str(run / ".lock"), firsts[1])
        t0 = time.time()
        certify, train = robustops_concurrently(("certify", "--checkpoint", ckpt, "-o", out, "--resume", *slow),
                                                ("train", "--method", "pgd", "--epochs", "50", "--out", run,
                                                 "--no-progress"))
        assert_one_line_error(certify, "in use by another robustops run")
        assert time.time() - t0 < 60
        assert_one_line_error(train, "--out", "in use by another robustops run")
    finally:
        for first in firsts:
            first.kill()
            first.wait()


def test_random_init_offset_past_63_bits_is_a_clear_error():
    import robustops as ro

    with pytest.raises(ValueError, match=r"offset must be an int in \[0, 2\^63\)"):
        ro.random_init(torch.rand(2, 3), 0.1, offset=2 ** 63)


def test_a_new_run_in_a_used_out_is_refused_or_starts_clean(tmp_path):
    """A fresh run in a directory holding a run used to leave that run's best.pt beside the new
    last.pt (with --val-size 0 the new run writes none)."""
    out = tmp_path / "run"
    common = ["--method", "natural", "--epochs", "1", "--test-steps", "0", "--out", out, "--no-progress"]
    assert robustops("train", *common).returncode == 0
    assert (out / "best.pt").exists()
    before = digest(out / "last.pt")
    p = robustops("train", *common, "--val-size", "0")
    assert_one_line_error(p, "--out", "--resume", "--force")
    assert digest(out / "last.pt") == before
    assert robustops("train", *common, "--val-size", "0", "--force").returncode == 0
    assert (out / "last.pt").exists() and not (out / "best.pt").exists()
