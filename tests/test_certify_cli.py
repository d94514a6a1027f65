"""`robustops certify` end to end on the embedded digits: the TSV, resuming after an interruption,
checkpoint formats, torchrun sharding, errors."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from robustops import smoothing as sm
from robustops.cli.certifiers import results_file
from robustops.models import save_checkpoint, split_normalize

from helpers import ROOT, digits_checkpoint, torchrun_certify, subprocess_env
from helpers import run_certify as run

COMMON = ["--sigma", "0.25", "--N0", "16", "--N", "96", "--alpha", "0.01", "--batch", "300", "--skip", "12",
          "--seed", "3", "--no-progress"]
N_ROWS = len(range(0, 360, 12))  # the digits test split has 360 inputs




def rows(path):
    """The rows without the time column."""
    with open(path) as fh:
        lines = fh.read().splitlines()
    assert lines[0] == "idx\tlabel\tpredict\tradius\tcorrect\ttime"
    return [tuple(line.split("\t")[:5]) for line in lines[1:]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return digits_checkpoint(tmp_path_factory.mktemp("certify"))


@pytest.fixture(scope="module")
def reference_run(ckpt, tmp_path_factory):
    """An uninterrupted single-process run."""
    out = str(tmp_path_factory.mktemp("ref") / "ref.tsv")
    assert run(["--checkpoint", ckpt[0], "-o", out] + COMMON) == 0
    return out, rows(out)


def test_reference_run_is_sensible(reference_run):
    _, r = reference_run
    assert [int(x[0]) for x in r] == list(range(0, 360, 12))
    correct = np.array([int(x[4]) for x in r], dtype=bool)
    radius = np.array([float(x[3]) for x in r])
    pred, label = np.array([int(x[2]) for x in r]), np.array([int(x[1]) for x in r])
    assert np.array_equal(correct, pred == label)
    assert np.all(radius[pred == -1] == 0) and np.all(radius >= 0)
    assert correct.mean() >= 0.7
    assert radius.max() <= 0.25 * 2.33  # N = 96 at alpha 0.01 caps pA_lower at 0.01 ** (1/96)


def test_cli_subprocess_end_to_end(ckpt, reference_run, tmp_path):
    out, png = tmp_path / "run.tsv", tmp_path / "curve.png"
    p = subprocess.run([sys.executable, "-m", "robustops", "certify", "--checkpoint", ckpt[0], "-o", str(out),
                        "--plot", str(png)] + COMMON, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    assert rows(out) == reference_run[1]
    r = rows(out)
    radius = np.array([float(x[3]) for x in r])
    correct = np.array([int(x[4]) for x in r])
    assert f"ACR {sm.acr(radius, correct):.4f}" in p.stdout
    acc = sm.certified_accuracy(radius, correct, sm.STANDARD_RADII)
    assert f"r=0.25: {acc[1]:.3f}" in p.stdout
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_resume_after_max(ckpt, reference_run, tmp_path, capsys):
    out = str(tmp_path / "part.tsv")
    assert run(["--checkpoint", ckpt[0], "-o", out, "--max", "150"] + COMMON) == 0
    done = len(range(0, 150, 12))
    assert len(rows(out)) == done
    capsys.readouterr()
    assert run(["--checkpoint", ckpt[0], "-o", out, "--resume"] + COMMON) == 0
    assert f"({N_ROWS} inputs, {N_ROWS - done} to go)" in capsys.readouterr().out  # finished work is not redone
    assert rows(out) == reference_run[1]
    # Resuming a finished run certifies nothing and changes nothing.
    assert run(["--checkpoint", ckpt[0], "-o", out, "--resume"] + COMMON) == 0
    assert f"({N_ROWS} inputs, 0 to go)" in capsys.readouterr().out
    assert rows(out) == reference_run[1]


def test_resume_after_truncation(ckpt, reference_run, tmp_path):
    ref_bytes = open(reference_run[0], "rb").read()
    lines = ref_bytes.split(b"\n")
    header = len(lines[0]) + 1
    mid_row = header + sum(len(x) + 1 for x in lines[1:8]) + 5     # row 8 cut after 5 bytes
    at_boundary = header + sum(len(x) + 1 for x in lines[1:12])    # exactly 11 complete rows
    no_newline = at_boundary + len(lines[12])                      # row 12 complete but for its newline
    for cut in (mid_row, at_boundary, no_newline, header, header - 3, 0):
        out = str(tmp_path / f"cut{cut}.tsv")
        with open(out, "wb") as fh:
            fh.write(ref_bytes[:cut])
        assert run(["--checkpoint", ckpt[0], "-o", out, "--resume"] + COMMON) == 0, cut
        assert rows(out) == reference_run[1], cut


def test_an_existing_result_is_kept_unless_forced(ckpt, reference_run, tmp_path, capsys):
    out = str(tmp_path / "again.tsv")
    shutil.copy(reference_run[0], out)
    with open(out, "a") as fh:
        fh.write("999\t1\t1\t0.5\t1\t0.1\n")
    before = open(out).read()
    assert run(["--checkpoint", ckpt[0], "-o", out] + COMMON) == 2
    assert "--force" in capsys.readouterr().err and open(out).read() == before
    assert run(["--checkpoint", ckpt[0], "-o", out, "--force"] + COMMON) == 0
    assert rows(out) == reference_run[1]


def test_checkpoint_formats(ckpt, reference_run, tmp_path):
    model = ckpt[1]
    sd = str(tmp_path / "sd.pt")
    torch.save(model.state_dict(), sd)
    out = str(tmp_path / "sd.tsv")
    assert run(["--checkpoint", sd, "--model", "small_cnn", "-o", out] + COMMON) == 0
    assert rows(out) == reference_run[1]
    assert run(["--checkpoint", sd, "-o", out] + COMMON) == 2  # a raw state dict needs --model
    ts = str(tmp_path / "model.ts")
    torch.jit.script(model).save(ts)
    out = str(tmp_path / "ts.tsv")
    assert run(["--checkpoint", ts, "-o", out] + COMMON) == 0
    assert rows(out) == reference_run[1]
    ep = torch.export.export(model, (torch.rand(4, 1, 8, 8),),
                             dynamic_shapes={"x": {0: torch.export.Dim("batch", max=1 << 20)}})
    pt2 = str(tmp_path / "model.pt2")
    torch.export.save(ep, pt2)
    out = str(tmp_path / "pt2.tsv")
    assert run(["--checkpoint", pt2, "-o", out, "--max", "100"] + COMMON) == 0
    assert rows(out) == reference_run[1][:len(range(0, 100, 12))]


def test_npz_dataset(ckpt, reference_run, tmp_path):
    from robustops.data import load_digits

    x, y = load_digits("test").tensors
    path = str(tmp_path / "digits_test.npz")
    np.savez(path, x_test=x.numpy(), y_test=y.numpy())
    out = str(tmp_path / "npz.tsv")
    assert run(["--checkpoint", ckpt[0], "--data", path, "-o", out] + COMMON) == 0
    assert rows(out) == reference_run[1]


def test_normalize_layer_is_split_off():
    from robustops.models import get_model

    model = get_model("small_cnn", mean=[0.3], std=[0.4])
    body, mean, std = split_normalize(model)
    assert body is model[1] and mean == pytest.approx([0.3]) and std == pytest.approx([0.4])
    assert split_normalize(model[1]) == (model[1], None, None)


def test_training_metadata_sets_sigma_and_normalization(ckpt, reference_run, tmp_path):
    """A checkpoint of Gaussian-noise training (robustops train --method gaussian) carries its sigma,
    and the mean / std its model was trained behind; certify uses both."""
    path = save_checkpoint(str(tmp_path / "g.pt"), ckpt[1], "small_cnn", {}, method="gaussian", sigma=0.25,
                           mean=None, std=None)
    no_sigma = [a for a in COMMON if a not in ("--sigma", "0.25")]
    out = str(tmp_path / "g.tsv")
    assert run(["--checkpoint", path, "-o", out] + no_sigma) == 0
    assert rows(out) == reference_run[1]
    path = save_checkpoint(str(tmp_path / "gn.pt"), ckpt[1], "small_cnn", {}, method="gaussian", sigma=0.25,
                           mean=[0.5], std=[0.5])
    out_n = str(tmp_path / "gn.tsv")
    assert run(["--checkpoint", path, "-o", out_n, "--max", "100"] + no_sigma) == 0
    # The same as the model behind a Normalize layer (which certify also fuses into the noise).
    from robustops.models import get_model

    behind = get_model("small_cnn", mean=[0.5], std=[0.5])
    behind[1].load_state_dict(ckpt[1].state_dict())
    path = save_checkpoint(str(tmp_path / "behind.pt"), behind, "small_cnn", {"mean": [0.5], "std": [0.5]})
    out_b = str(tmp_path / "behind.tsv")
    assert run(["--checkpoint", path, "-o", out_b, "--max", "100"] + COMMON) == 0
    assert rows(out_n) == rows(out_b) and rows(out_n) != reference_run[1][:len(rows(out_n))]


def test_torchrun_two_processes_match_one(ckpt, reference_run, tmp_path):
    out = tmp_path / "dist.tsv"
    p = torchrun_certify(["--checkpoint", ckpt[0], "-o", out] + COMMON)
    assert p.returncode == 0, p.stdout + p.stderr
    assert rows(out) == reference_run[1]
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".part")]
    assert "2 process(es)" in p.stdout


def test_distributed_parts_are_merged_on_resume(ckpt, reference_run, tmp_path):
    """Part files left by a killed 2-process run (with partial last lines) are picked up by a
    single-process --resume: no row lost, none duplicated."""
    out = str(tmp_path / "killed.tsv")
    ref = open(reference_run[0]).read().splitlines()
    body = ref[1:]
    for rank in (0, 1):
        mine = body[rank::2][:6]
        with open(results_file(out, "certify").part_path(rank), "w") as fh:
            fh.write("\n".join([ref[0]] + mine) + "\n" + mine[-1][:7])
    assert run(["--checkpoint", ckpt[0], "-o", out, "--resume"] + COMMON) == 0
    assert rows(out) == reference_run[1]
    assert not results_file(out, "certify").part_files()


def test_errors_name_the_argument(ckpt, tmp_path, capsys):
    out = str(tmp_path / "e.tsv")
    cases = [(["--sigma", "0"], "--sigma"), (["--alpha", "1.5"], "--alpha"), (["--N", "0"], "--n"),
             (["--batch", "0"], "--batch-size"), (["--skip", "0"], "--skip"),
             (["--data", str(tmp_path / "none")], "--data")]
    for extra, name in cases:
        assert run(["--checkpoint", ckpt[0], "-o", out] + COMMON + extra) == 2, extra
        assert name in capsys.readouterr().err
    assert run(["--checkpoint", str(tmp_path / "missing.pt"), "-o", out] + COMMON) == 2
    assert "--checkpoint" in capsys.readouterr().err
    base = ["--checkpoint", ckpt[0], "-o", out] + COMMON
    base[base.index("--sigma"):base.index("--sigma") + 2] = []
    assert run(base) == 2  # a natural checkpoint does not say its sigma
    assert "--sigma" in capsys.readouterr().err
    with open(out, "w") as fh:
        fh.write("something else\n")
    assert run(["--checkpoint", ckpt[0], "-o", out, "--resume"] + COMMON) == 2
    assert "not a robustops TSV of this kind" in capsys.readouterr().err
    assert open(out).read() == "something else\n"


def test_resume_after_sigkill(ckpt, tmp_path):
    """A real interruption: the CLI is killed (SIGKILL, no clean-up) while it writes rows, then
    resumed; the file ends up with exactly the rows of an uninterrupted run."""
    import signal
    import time

    args = ["--sigma", "0.25", "--N0", "16", "--N", "1000", "--alpha", "0.01", "--batch", "400", "--skip", "6",
            "--seed", "5", "--no-progress"]
    out = tmp_path / "killed.tsv"
    part = tmp_path / "killed.tsv.rank0.part"  # rows go here as they are certified; the TSV comes at the end
    proc = subprocess.Popen([sys.executable, "-m", "robustops", "certify", "--checkpoint", ckpt[0], "-o", str(out)]
                            + args, cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        if part.exists() and part.read_text().count("\n") >= 4:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed: " + proc.stderr.read().decode()[-500:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(rows(part))
    assert 3 <= written < 60
    assert not out.exists()  # no incomplete result under the final name
    assert run(["--checkpoint", ckpt[0], "-o", str(out), "--resume"] + args) == 0
    ref = tmp_path / "uninterrupted.tsv"
    assert run(["--checkpoint", ckpt[0], "-o", str(ref)] + args) == 0
    assert rows(out) == rows(ref)
    assert [int(r[0]) for r in rows(out)] == list(range(0, 360, 6))
