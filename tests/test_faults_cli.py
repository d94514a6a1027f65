"""Issue 22, the command line's part, through the real CLI (subprocesses): the class count comes from the
model, never from the data; --force replaces a result only once the new one is done; two `attack -o` on
one file; options torchrun accepts; plain progress lines; the certify summary's radii; no lock files
left; split-invariant attacks."""
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import ROOT, assert_one_line_error, digits_checkpoint, run_concurrently, subprocess_env, wait_for
from robustops.data import load_digits

SMOOTH = ["--sigma", "0.25", "--n", "40", "--alpha", "0.01", "--batch-size", "200", "--no-progress"]
#: each evaluating command, as (its arguments, the column of the label in its TSV)
COMMANDS = {
    "certify": ["certify", "--n0", "8"] + SMOOTH,
    "predict": ["predict"] + SMOOTH,
    "ibp": ["certify", "--method", "ibp", "--eps-max", "0.05", "--tol", "0.01", "--no-progress"],
    "attack": ["attack", "--eps", "0.05", "--steps", "2", "--no-progress"],
}


def robustops(*args):
    """`python -m robustops ARGS` in a subprocess, output captured."""
    argv = [sys.executable, "-m", "robustops"] + [str(a) for a in args]
    return subprocess.run(argv, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)


def digest(path):
    """The file's bytes (None when it does not exist)."""
    return open(path, "rb").read() if os.path.exists(path) else None


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return digits_checkpoint(tmp_path_factory.mktemp("faults_cli"))[0]


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


@pytest.fixture(scope="module")
def short_runs(ckpt, short_data, tmp_path_factory):
    """Every evaluating command on every file of short_data, each in a directory of its own, all run at once
    (independent processes): {(command, data): (CompletedProcess, directory)}."""
    cases = [(command, data) for command in COMMANDS for data in ("l08", "one", "l12")]
    dirs = [tmp_path_factory.mktemp(f"{command}_{data}") for command, data in cases]
    argvs = [[sys.executable, "-m", "robustops", *COMMANDS[command], "--checkpoint", ckpt, "--data",
              short_data / f"{data}.npz", "--out" if command == "attack" else "-o", d / "out.tsv"]
             for (command, data), d in zip(cases, dirs)]
    done = run_concurrently(argvs, timeout=300, cwd=ROOT, env=subprocess_env())
    return {case: (p, d) for case, p, d in zip(cases, done, dirs)}


@pytest.mark.parametrize("data", ["l08", "one"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_labels_short_of_the_last_class(short_runs, command, data):
    p, tmp_path = short_runs[command, data]
    out = tmp_path / "out.tsv"
    assert p.returncode == 0, p.stderr
    lines = out.read_text().splitlines()
    assert len(lines) == 1 + (24 if data == "l08" else 1)
    assert _leftovers(tmp_path, "out.tsv") == []  # no part, lock or temporary files


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_label_past_the_models_classes_is_one_line(short_runs, command):
    p, tmp_path = short_runs[command, "l12"]
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
        wait_for(str(out) + ".new.rank0.part", slow)
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


# ---------------------------------------------------------------------------------------- attack -o

ATTACK = ["attack", "--eps", "0.1", "--steps", "4", "--seed", "3", "--early-stop", "--no-progress"]


def test_two_attack_runs_on_one_file_do_not_both_succeed(ckpt, tmp_path):
    out = tmp_path / "a.tsv"
    slow = ["--attack", "apgd-ce", "--steps", "400"]
    first = robustops_popen(*ATTACK, *slow, "--checkpoint", ckpt, "--out", out, "--batch-size", "8")
    try:
        wait_for(str(out) + ".rank0.part", first)
        p = robustops(*ATTACK, "--checkpoint", ckpt, "--out", out, "--force")
        assert_one_line_error(p, "--out", "in use by another robustops run")
        assert first.poll() is None
    finally:
        first.kill()
        first.wait()


def test_attack_resumes_a_killed_run_to_the_same_rows(ckpt, tmp_path):
    ref, out = tmp_path / "ref.tsv", tmp_path / "killed.tsv"
    common = [*ATTACK, "--attack", "apgd-ce", "--steps", "30", "--checkpoint", ckpt, "--max-samples", "120",
              "--batch-size", "8"]
    reference = robustops_popen(*common, "--out", ref)  # beside the run that is killed (another output)
    first = robustops_popen(*common, "--out", out)
    try:
        part = str(out) + ".rank0.part"
        wait_for(part, first)
        end = time.time() + 120
        while time.time() < end and len(open(part).read().splitlines()) < 20 and first.poll() is None:
            time.sleep(0.05)
    finally:
        first.kill()
        first.wait()
    assert not out.exists()
    p = robustops(*common, "--out", out)  # neither --resume nor --force
    assert_one_line_error(p, "--resume", "--force")
    p = robustops(*common, "--out", out, "--resume", "--steps", "31")
    assert_one_line_error(p, "--resume", "--steps")
    p = robustops(*common, "--out", out, "--resume", "--batch-size", "32")
    assert p.returncode == 0, p.stderr
    assert reference.wait(timeout=300) == 0, reference.stderr.read()
    assert _outcomes(out) == _outcomes(ref)
    assert _leftovers(tmp_path, "killed.tsv") == []


def _outcomes(path):
    """The rows without their linf / l2 columns: the figures of a batched model can differ in the last
    digits where the batches differ (the attack of each input is the same: its random start depends only
    on the seed and its index)."""
    return [line.split("\t")[:9] + line.split("\t")[11:] for line in path.read_text().splitlines()]


def _torchrun(*args, nproc=2):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    return subprocess.run([torchrun, "--standalone", "--nproc_per_node", str(nproc), "-m", "robustops"]
                          + [str(a) for a in args], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("attack", [["--attack", "pgd", "--restarts", "2"],
                                    ["--attack", "apgd-t", "--n-target-classes", "2"]])
def test_torchrun_attack_gives_the_rows_of_one_process(ckpt, tmp_path, attack):
    """Other processes and batch sizes, the same rows (--suite excepted: its later attacks draw the random
    starts of a batch's survivors from the first survivor's index, see robust_accuracy)."""
    one, two = tmp_path / "one.tsv", tmp_path / "two.tsv"
    common = [*ATTACK, *attack, "--steps", "4", "--checkpoint", ckpt, "--max-samples", "50", "--device", "cpu"]
    single = robustops_popen(*common, "--out", one, "--batch-size", "16")  # beside the torchrun run
    try:
        p = _torchrun(*common, "--out", two, "--batch-size", "7")
    finally:
        assert single.wait(timeout=300) == 0, single.stderr.read()
    assert p.returncode == 0, p.stderr
    assert _outcomes(two) == _outcomes(one)
    assert "2 ranks" in p.stdout


# ------------------------------------------------------------------------------------------ torchrun

def _accepted_by_torchrun(option: str) -> bool:
    """Whether torchrun's own parser lets option through to the script (it rejects a prefix of several of
    its options as ambiguous, even after the script's name)."""
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    parser.error = lambda message: (_ for _ in ()).throw(ValueError(message))
    try:
        parser._parse_optional(option)
    except ValueError:
        return False
    return True


def test_every_option_has_a_spelling_torchrun_accepts():
    import argparse

    from robustops.cli import build_parser

    sub = next(a for a in build_parser("*")._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for command, parser in sub.choices.items():
        spellings = {}
        for action in parser._actions:
            spellings.setdefault(action.dest, []).extend(action.option_strings)
        missing += [f"{command} {'/'.join(opts)}" for dest, opts in spellings.items()
                    if opts and not any(_accepted_by_torchrun(o) for o in opts)]
    assert not missing
    assert not _accepted_by_torchrun("--n") and _accepted_by_torchrun("--num-samples")


def _readme_torchrun_lines():
    with open(os.path.join(ROOT, "README.md")) as fh:
        return [line.strip() for line in fh if line.startswith("torchrun --standalone")]


def test_the_readmes_torchrun_lines_run(tmp_path):
    """Each torchrun line of the README, at small sizes, in a fresh directory."""
    lines = _readme_torchrun_lines()
    assert [line.split()[6] for line in lines] == ["train", "attack", "certify", "predict"]
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    small = {r"--epochs \d+": "--epochs 1", r"--num-samples \d+": "--num-samples 40", r"--max-samples \d+": ""}
    argvs = []
    for line in lines:
        for pattern, repl in small.items():
            line = re.sub(pattern, repl, line)
        argv = [torchrun] + line.split()[1:] + ["--device", "cpu", "--no-progress"]
        if argv[6] != "train":
            argv += ["--max-samples", "24"]
        argvs.append((line, argv))
    # train first; attack, certify and predict only read its checkpoint: they run at the same time
    line, argv = argvs[0]
    p = subprocess.run(argv, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, line + "\n" + p.stderr[-3000:]
    procs = [(line, subprocess.Popen(argv, cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)) for line, argv in argvs[1:]]
    for line, proc in procs:
        _, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, line + "\n" + err[-3000:]
    for name in ("ddp-attack.tsv", "ddp-cert.tsv", "ddp-predict.tsv"):
        assert len((tmp_path / name).read_text().splitlines()) == 25


# ------------------------------------------------------------------------------------ smaller things

def test_certify_off_a_terminal_says_progress_lists_certifiable_radii_and_leaves_no_lock(ckpt, tmp_path):
    out = tmp_path / "c.tsv"
    p = robustops(*COMMANDS["certify"], "--checkpoint", ckpt, "-o", out, "--max-samples", "40", "--inputs-per-call", "4")
    assert p.returncode == 0, p.stderr
    progress = [ln for ln in p.stdout.splitlines() if re.match(r"robustops certify: \d+/40 inputs", ln)]
    assert len(progress) >= 5 and progress[-1].startswith("robustops certify: 40/40 inputs (100%)")
    table = next(ln for ln in p.stdout.splitlines() if ln.startswith("certified accuracy:"))
    # n = 40 at alpha 0.01 certifies at most 0.25 * Phi^-1(0.01 ** (1/40)) = 0.308 < 0.5
    assert "r=0.25:" in table and "r=0.5" not in table and "no radius past 0.308" in table
    assert sorted(os.listdir(tmp_path)) == ["c.tsv", "c.tsv.json"]


def test_no_lock_file_is_left_by_train_or_attack(ckpt, tmp_path):
    attack = robustops_popen(*ATTACK, "--checkpoint", ckpt, "--max-samples", "20", "--out", tmp_path / "a.tsv")
    try:
        p = robustops("train", "--method", "natural", "--epochs", "1", "--test-steps", "0", "--out",
                      tmp_path / "run", "--no-progress")
    finally:
        assert attack.wait(timeout=300) == 0, attack.stderr.read()
    assert p.returncode == 0, p.stderr
    assert not (tmp_path / "run" / ".lock").exists()
    assert _leftovers(tmp_path, "a.tsv") == []


def test_a_stray_label_in_training_data_is_named(tmp_path):
    x, y = load_digits("train").tensors
    y = y.clone()
    y[5] = 12
    np.savez(tmp_path / "d.npz", x_train=x.numpy(), y_train=y.numpy())
    p = robustops("train", "--data", tmp_path / "d.npz", "--method", "natural", "--epochs", "1", "--test-steps", "0",
                  "--out", tmp_path / "run", "--no-progress")
    assert p.returncode == 0, p.stderr
    assert "13 classes" in p.stderr and "classes 10, 11 have no training sample" in p.stderr


def test_every_command_that_writes_takes_dash_o():
    """-o names the output of every command that writes one (perturbation train too: its run directory)."""
    from robustops.cli import build_parser

    for argv in (["perturbation", "train"], ["train"], ["attack", "--checkpoint", "c"], ["certify", "--checkpoint", "c"],
                 ["predict", "--checkpoint", "c"], ["generate"], ["demo"]):
        args = build_parser(argv[0]).parse_args(argv + ["-o", "somewhere"])
        assert args.out == "somewhere", argv
