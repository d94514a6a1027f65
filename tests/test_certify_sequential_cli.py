"""`robustops certify --sequential` end to end on the embedded digits: the 8-column TSV against the
Smooth methods it runs (certify_radius / certify_radii / certify_sequential), the summary, resuming,
torchrun sharding, errors."""
import json
import os
import shutil
import time

import numpy as np
import pytest

from helpers import ROOT, digits_checkpoint, torchrun_certify, one_thread, subprocess_env, train_digits_model  # noqa: F401 (one_thread: a fixture)
from helpers import run_certify as run
from robustops import smoothing as sm
from robustops.smoothing import sequential as seq
from robustops.cli import certify as certify_cli
from robustops.cli.certifiers import results_file
from robustops.data import load_digits

N0, N, ALPHA, BATCH, SEED, SIGMA = 50, 2000, 0.01, 500, 3, 0.25
COMMON = ["--sigma", SIGMA, "--N0", N0, "--N", N, "--alpha", ALPHA, "--batch", BATCH, "--skip", "24", "--seed", SEED,
          "--no-progress"]
IDX = list(range(0, 360, 24))  # the digits test split has 360 inputs
GRID = ["--radii", "0.1,0.25", "--test", "betting"]
HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime\tsamples\tdecisions"




def table(path):
    """The rows of a --sequential TSV, split into fields."""
    with open(path) as fh:
        lines = fh.read().splitlines()
    assert lines[0] == HEADER
    return [line.split("\t") for line in lines[1:]]


def rows(path):
    """The rows without the time column."""
    return [tuple(f[:5] + f[6:]) for f in table(path)]


def summary(path):
    with open(str(path) + ".json") as fh:
        return json.load(fh)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return digits_checkpoint(tmp_path_factory.mktemp("seq"))


@pytest.fixture(scope="module")
def data():
    x, y = load_digits("test").tensors
    return x[IDX], y[IDX]


def reference(ckpt, tmp_path_factory, name, *extra):
    out = tmp_path_factory.mktemp(name) / f"{name}.tsv"
    t0 = time.perf_counter()
    assert run(["--checkpoint", ckpt[0], "-o", out, "--sequential"] + list(extra) + COMMON) == 0
    return out, time.perf_counter() - t0


@pytest.fixture(scope="module")
def radius_run(ckpt, tmp_path_factory):
    return reference(ckpt, tmp_path_factory, "radius", "--radius", "1/3")  # written exactly, not to 6 digits


@pytest.fixture(scope="module")
def grid_run(ckpt, tmp_path_factory):
    return reference(ckpt, tmp_path_factory, "grid", *GRID)


def smooth(ckpt):
    return sm.Smooth(ckpt[1], 10, SIGMA)


def test_fixed_radius_matches_certify_radius(ckpt, data, radius_run, tmp_path):
    out, wall = radius_run
    t = table(out)
    assert all(len(f) == 8 for f in t)
    assert [int(f[0]) for f in t] == IDX
    label, pred = np.array([int(f[1]) for f in t]), np.array([int(f[2]) for f in t])
    radius, correct = np.array([float(f[3]) for f in t]), np.array([int(f[4]) for f in t])
    seconds, samples, dec = np.array([float(f[5]) for f in t]), np.array([int(f[6]) for f in t]), [f[7] for f in t]
    assert np.array_equal(label, data[1].numpy()) and np.array_equal(correct, pred == label)
    assert np.all((samples >= N0) & (samples <= N0 + N))
    assert all(len(d) == 1 and d in "cna" for d in dec)
    cert = np.array([d == "c" for d in dec])
    assert np.array_equal(pred == -1, ~cert)  # predict -1 exactly where the radius is not certified
    assert np.array_equal(radius, np.where(cert, 1 / 3, 0.0))
    # a run that shows something: every kind of decision, samples saved
    assert {"c", "n"} <= set(dec) and samples.mean() < N0 + N and len(set(samples)) > 2
    assert np.all(seconds >= 0) and 0 < seconds.sum() <= wall  # time since the previous row: sums to the run's
    res = smooth(ckpt).certify_radius(data[0], 1 / 3, ALPHA, BATCH, n0=N0, n_max=N, seed=SEED, indices=IDX)
    assert res.prediction.tolist() == pred.tolist()
    assert res.samples.tolist() == samples.tolist()
    assert ["".join({1: "c", 0: "n", -1: "a"}[int(c)] for c in d) for d in res.decisions] == dec
    assert res.radius.tolist() == radius.tolist()
    s = summary(out)["summary"]
    assert s["mode"] == "fixed-radius" and s["test"] == "cp" and s["beta"] == ALPHA  # cp: Smooth's default
    assert s["radii"] == [{"radius": 1 / 3, "certified_accuracy": pytest.approx(float((cert & (correct == 1)).mean())),
                           "certified": dec.count("c"), "not_certified": dec.count("n"), "abstained": dec.count("a")}]
    # --schedule geometric --growth 2 without --n0: the sequential default n0 (50), every stop at a look
    # n0 + n_min * 2^k (or n0 + N), the settings and the ratio against the n0 used; fixed CERTIFY keeps 100
    out, few = tmp_path / "geo.tsv", IDX[:5]
    no_n0 = [a for i, a in enumerate(COMMON) if a != "--N0" and (i == 0 or COMMON[i - 1] != "--N0")]
    assert run(["--checkpoint", ckpt[0], "-o", out, "--sequential", "--radius", "1/3", "--schedule", "geometric",
                "--growth", "2", "--max", "100"] + no_n0) == 0
    samples = [int(f[6]) for f in table(out)]
    assert set(samples) <= {seq.DEFAULT_N0 + int(n) for n in seq.look_schedule(50, N, 2.0)} and len(samples) == len(few)
    res = smooth(ckpt).certify_radius(data[0][:5], 1 / 3, ALPHA, BATCH, n_max=N, seed=SEED, indices=few,
                                      schedule="geometric", growth=2.0)
    assert res.samples.tolist() == samples
    s = summary(out)
    assert s["settings"]["growth"] == 2.0 and s["settings"]["schedule"] == "geometric" and s["settings"]["n0"] == 50
    s = s["summary"]
    assert s["growth"] == 2.0 and s["schedule"] == "geometric" and s["n0"] == seq.DEFAULT_N0 == 50
    assert s["sample_ratio"] == pytest.approx((50 + N) / np.mean(samples))
    fixed = tmp_path / "fixed.tsv"
    assert run(["--checkpoint", ckpt[0], "-o", fixed, "--max", "1"] + no_n0) == 0
    assert summary(fixed)["summary"]["n0"] == summary(fixed)["settings"]["n0"] == 100


def test_grid_mode_decisions_summary_and_plot(ckpt, data, grid_run, tmp_path, capsys):
    out = tmp_path / "grid.tsv"
    png = tmp_path / "grid.png"
    assert run(["--checkpoint", ckpt[0], "-o", out, "--sequential", "--plot", png] + GRID + COMMON) == 0
    printed = capsys.readouterr().out
    assert rows(out) == rows(grid_run[0])
    assert png.read_bytes()[:4] == b"\x89PNG"
    t = table(out)
    pred, radius = np.array([int(f[2]) for f in t]), np.array([float(f[3]) for f in t])
    correct, samples, dec = np.array([int(f[4]) for f in t], dtype=bool), np.array([int(f[6]) for f in t]), \
        [f[7] for f in t]
    assert all(len(d) == 2 and set(d) <= set("cna") for d in dec)
    assert any(d[0] != d[1] for d in dec) and any(d == "cc" for d in dec)  # the two radii are decided apart
    largest = [max([r for r, c in zip((0.1, 0.25), d) if c == "c"], default=0.0) for d in dec]
    assert radius.tolist() == largest
    assert np.array_equal(pred == -1, np.array(["c" not in d for d in dec]))
    res = smooth(ckpt).certify_radii(data[0], [0.1, 0.25], ALPHA, BATCH, test="betting", n0=N0, n_max=N, seed=SEED,
                                     indices=IDX)
    assert res.samples.tolist() == samples.tolist() and res.prediction.tolist() == pred.tolist()
    s = summary(out)["summary"]
    assert s["mode"] == "grid" and s["test"] == "betting" and s["inputs"] == 15
    assert s["n0"] == N0 and s["n_max"] == N and s["alpha"] == ALPHA and s["beta"] == ALPHA
    assert s["mean_samples"] == pytest.approx(samples.mean())
    assert s["fixed_samples"] == N0 + N and s["sample_ratio"] == pytest.approx((N0 + N) / samples.mean())
    for j, (r, entry) in enumerate(zip((0.1, 0.25), s["radii"])):
        letters = [d[j] for d in dec]
        cert = np.array([c == "c" for c in letters])
        assert entry == {"radius": r, "certified_accuracy": pytest.approx(float((cert & correct).mean())),
                         "certified": letters.count("c"), "not_certified": letters.count("n"),
                         "abstained": letters.count("a")}
        assert f"r={r:g}: certified accuracy {entry['certified_accuracy']:.3f}" in printed
    assert s["plot"] == os.path.abspath(png)


def test_full_radius_mode_matches_certify_sequential(ckpt, data, tmp_path):
    out = tmp_path / "full.tsv"
    assert run(["--checkpoint", ckpt[0], "-o", out, "--sequential", "--precision", "0.1", "--beta", "0.05",
                "--max-active", "3"] + COMMON) == 0
    t = table(out)
    radius, correct = np.array([float(f[3]) for f in t]), np.array([int(f[4]) for f in t], dtype=bool)
    samples = [int(f[6]) for f in t]
    assert [f[7] for f in t] == ["-"] * len(IDX)
    res = smooth(ckpt).certify_sequential(data[0], ALPHA, BATCH, precision=0.1, n0=N0, n_max=N, seed=SEED,
                                          indices=IDX, beta=0.05)
    assert res.test == "cp"
    assert radius == pytest.approx(res.radius.numpy(), rel=1e-5, abs=1e-6)
    assert res.samples.tolist() == samples and res.prediction.tolist() == [int(f[2]) for f in t]
    assert radius.max() > 0.3 and len(set(samples)) > 2
    s = summary(out)
    assert s["settings"]["precision"] == 0.1 and s["settings"]["test"] == "cp" and s["settings"]["beta"] == 0.05
    s = s["summary"]
    assert s["mode"] == "full-radius" and s["test"] == "cp" and s["precision"] == 0.1
    assert s["acr"] == pytest.approx(sm.acr(radius, correct))
    assert s["certified_accuracy"]["0.25"] == pytest.approx(sm.certified_accuracy(radius, correct, 0.25))
    assert s["mean_samples"] == pytest.approx(np.mean(samples))


def test_resume_after_max_and_after_truncation(ckpt, grid_run, tmp_path, capsys):
    grid = ["--sequential"] + GRID
    ref = rows(grid_run[0])
    out = str(tmp_path / "part.tsv")
    assert run(["--checkpoint", ckpt[0], "-o", out, "--max", "150"] + grid + COMMON) == 0
    done = len(range(0, 150, 24))
    assert rows(out) == ref[:done]
    capsys.readouterr()
    assert run(["--checkpoint", ckpt[0], "-o", out, "--resume"] + grid + COMMON) == 0
    assert f"({len(IDX)} inputs, {len(IDX) - done} to go)" in capsys.readouterr().out
    assert rows(out) == ref
    # A killed run: the part file holds complete rows (completion order) and a row cut short.
    data = open(grid_run[0], "rb").read().split(b"\n")
    out = str(tmp_path / "killed.tsv")
    shutil.copy(str(grid_run[0]) + ".json", out + ".json")
    with open(results_file(out, "sequential").part_path(0), "wb") as fh:
        fh.write(b"\n".join([data[0]] + data[9:2:-1]) + b"\n" + data[2][:-3])
    assert run(["--checkpoint", ckpt[0], "-o", out, "--resume"] + grid + COMMON) == 0
    assert f", {len(IDX) - 7} to go)" in capsys.readouterr().out
    assert rows(out) == ref and not results_file(out, "sequential").part_files()
    # The merged TSV cut in the middle of a row (no settings file: resumed unchecked).
    out = str(tmp_path / "cut.tsv")
    with open(out, "wb") as fh:
        fh.write(b"\n".join(data[:5]) + b"\n" + data[5][:len(data[5]) - 2])
    assert run(["--checkpoint", ckpt[0], "-o", out, "--resume"] + grid + COMMON) == 0
    assert rows(out) == ref


def test_resume_refuses_other_settings(ckpt, radius_run, tmp_path, capsys):
    out = str(tmp_path / "r.tsv")
    shutil.copy(str(radius_run[0]), out)
    shutil.copy(str(radius_run[0]) + ".json", out + ".json")
    before = open(out).read()
    base = ["--checkpoint", ckpt[0], "-o", out, "--resume"] + COMMON
    cases = [(["--sequential", "--radius", "0.5"], ["--radius 0.3333", "0.5"]),
             (["--sequential", "--radius", "1/3", "--test", "betting"], ["--test 'cp'", "'betting'"]),
             (["--sequential", "--radius", "1/3", "--n-min", "200"], ["--n-min 50"]),
             (["--sequential", "--radius", "1/3", "--schedule", "geometric"], ["--schedule 'threshold'"]),
             (["--sequential", "--radii", "1/3"], ["--radius", "--radii"]),
             ([], ["with --sequential"])]
    for extra, words in cases:
        assert run(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert "--resume" in err and all(w in err for w in words), (extra, err)
    assert open(out).read() == before
    assert run(base + ["--sequential", "--radius", "1/3"]) == 0  # the same settings: nothing to do
    assert open(out).read() == before
    # The other way round: a fixed-n certify TSV is not continued sequentially, with or without its settings.
    fixed = str(tmp_path / "fixed.tsv")
    assert run(["--checkpoint", ckpt[0], "-o", fixed, "--max", "50"] + COMMON) == 0
    assert run(["--checkpoint", ckpt[0], "-o", fixed, "--resume", "--sequential"] + COMMON) == 2
    assert "without --sequential" in capsys.readouterr().err
    os.remove(fixed + ".json")
    assert run(["--checkpoint", ckpt[0], "-o", fixed, "--resume", "--sequential"] + COMMON) == 2
    assert "not a robustops TSV of this kind" in capsys.readouterr().err


def test_rows_of_each_tsv_parse(tmp_path):
    parse = results_file("x.tsv", "sequential").parse_row
    assert parse("3\t1\t1\t0.25\t1\t0.01\t150\tcn") == 3
    assert parse("3\t1\t-1\t0.0\t0\t0.01\t150\t-") == 3
    assert results_file("x.tsv", "certify").parse_row("3\t1\t1\t0.25\t1\t0.01") == 3
    assert results_file("x.tsv", "predict").parse_row("3\t1\t1\t1\t0.01") == 3
    for bad in ("3\t1\t1\t0.25\t1\t0.01\t150\tcx", "3\t1\t1\t0.25\t1\t0.01\t150\t", "3\t1\t1\t0.25\t1\t0.01\tc\tcn",
                "3\t1\t1\t0.25\t1\t0.01\t150", "x\t1\t1\t0.25\t1\t0.01\t150\tc", "3\t1\t1\t0.25\t1\t0.01"):
        assert parse(bad) is None, bad
    headers = list(certify_cli.HEADERS.values())
    assert len(set(headers)) == 3 and HEADER in headers
    # In a --sequential TSV, a row of certify's 6 columns is no complete row: it and what follows are dropped.
    path = tmp_path / "mixed.tsv"
    good = "0\t1\t1\t0.25\t1\t0.01\t150\tcn\n"
    path.write_text(HEADER + "\n" + good + "12\t1\t1\t0.25\t1\t0.01\n" + good.replace("0", "24", 1))
    assert results_file(str(path), "sequential").read() == ({0: good[:-1]}, len(HEADER) + 1 + len(good))


@pytest.mark.parametrize("extra,words", [
    (["--radius", "0.25"], ["--radius", "--sequential"]),
    (["--precision", "0.1"], ["--precision", "--sequential"]),
    (["--test", "betting"], ["--test", "--sequential"]),
    (["--sequential", "--radius", "0.25", "--radii", "0.1,0.2"], ["--radius", "--radii"]),
    (["--sequential", "--radii", "a,b"], ["--radii", "'a,b'"]),
    (["--sequential", "--radii", "0.1,,0.2"], ["--radii"]),
    (["--sequential", "--radii=0.1,-0.2"], ["--radii", ">= 0"]),
    (["--sequential", "--radius", "-0.5"], ["--radius", ">= 0"]),
    (["--sequential", "--precision", "0"], ["--precision"]),
    (["--sequential", "--radius", "0.25", "--precision", "0.1"], ["--precision"]),
    (["--sequential", "--n-min", "4000"], ["--n-min", "--n"]),
    (["--sequential", "--n-min", "0"], ["--n-min"]),
    (["--sequential", "--growth", "1"], ["--growth", "> 1"]),
    (["--growth", "1.5"], ["--growth", "--sequential"]),
    (["--sequential", "--beta", "1"], ["--beta"]),
    (["--sequential", "--max-active", "0"], ["--max-active"]),
    (["--sequential", "--method", "ibp"], ["--sequential", "--method ibp"]),
    (["--sequential", "--threat", "learned"], ["--sequential", "--threat learned"]),
    (["--sequential", "--radius", "0.25", "--plot", "x.png"], ["--plot", "--radii"]),
])
def test_errors_name_the_argument(ckpt, tmp_path, capsys, extra, words):
    out = tmp_path / "e.tsv"
    assert run(["--checkpoint", ckpt[0], "-o", out] + COMMON + extra) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert not os.listdir(tmp_path)  # refused before any output


def test_torchrun_two_processes_match_one(ckpt, grid_run, tmp_path):
    out = tmp_path / "dist.tsv"
    p = torchrun_certify(["--checkpoint", ckpt[0], "-o", out, "--sequential"] + GRID + COMMON)
    assert p.returncode == 0, p.stdout + p.stderr
    assert rows(out) == rows(grid_run[0])
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".part")]
    assert "2 process(es)" in p.stdout
    assert summary(out)["summary"]["radii"] == summary(grid_run[0])["summary"]["radii"]


def test_help_states_the_api_defaults(capsys):
    """--help names the defaults of the sequential modes as robustops.smoothing.sequential defines them (the
    help cannot import them: `robustops --help` stays torch-free)."""
    from robustops.cli import main
    from robustops.smoothing.sequential import (DEFAULT_GROWTH, DEFAULT_N0, DEFAULT_N_MIN, DEFAULT_PRECISION,
                                                DEFAULT_SCHEDULE, DEFAULT_TEST)

    with pytest.raises(SystemExit):
        main(["certify", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in (f"(None: {DEFAULT_PRECISION:g})", f"None: {DEFAULT_TEST}, as in the Smooth methods",
                  f"first look (None: {DEFAULT_N_MIN})", f"> 1 (None: {DEFAULT_GROWTH:g})",
                  f"{DEFAULT_SCHEDULE} (None: per input", f"(None: 100; with --sequential {DEFAULT_N0},"):
        assert words in text, words
