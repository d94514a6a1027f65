"""Common-corruption evaluation: the ECE on closed-form toys, the mCE on toy numbers, accuracy per
severity equal to a direct loop (whatever the batching), an interrupted run resumed to the rows of an
uninterrupted one (the function and `robustops evaluate --suite corruptions`), the command end to end
(rows, JSON, Markdown, heat map, mCE against a result and a checkpoint), robustops.evaluate's dispatch,
and one-line errors for bad flag combinations."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import without_kornia

import robustops as ro
from robustops.cli import evaluate_corruptions, main
from robustops.corruptions import ALL, BENCHMARK, FAMILIES, available, corrupt
from robustops.corruptions import evaluation as ev
from robustops.data import load_digits
from robustops.models import SmallCNN, save_checkpoint

N = 32  # digits used: a few batches, fast


@pytest.fixture(scope="module")
def model():
    """A seeded, untrained SmallCNN: what is tested is the bookkeeping, which needs no accuracy (and training
    would cost seconds on a shared CPU)."""
    torch.manual_seed(0)
    return SmallCNN().eval()


@pytest.fixture(scope="module")
def digits():
    return load_digits("test")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, model):
    d = tmp_path_factory.mktemp("corruptions")
    return save_checkpoint(str(d / "m.pt"), model, "small_cnn", {}, method="natural")


def test_ece_closed_form():
    conf = torch.tensor([0.95, 0.95, 0.55, 0.55, 0.25], dtype=torch.float64)
    ok = torch.tensor([1, 0, 1, 1, 0])
    # bins (14/15, 1], (8/15, 9/15], (3/15, 4/15]: 2/5 |0.5 - 0.95| + 2/5 |1 - 0.55| + 1/5 |0 - 0.25|
    assert ev.expected_calibration_error(conf, ok) == pytest.approx(0.41, abs=1e-12)
    # confidence 0.8 everywhere and 80 % right: perfectly calibrated
    assert ev.expected_calibration_error(torch.full((10,), 0.8, dtype=torch.float64), torch.arange(10) < 8) \
        == pytest.approx(0, abs=1e-12)
    # a bin's right edge belongs to it (Guo et al.'s ((m-1)/M, m/M]): 1.0 in the last bin, 0.5 in bin 7
    bins = ev.calibration_bins(torch.tensor([1.0, 0.5]), torch.tensor([True, False]))
    assert bins[0, 14] == 1 and bins[0, 7] == 1 and bins[0].sum() == 2
    # bins of batches add up to the bins of the whole
    whole = ev.calibration_bins(conf, ok)
    assert torch.equal(ev.calibration_bins(conf[:2], ok[:2]) + ev.calibration_bins(conf[2:], ok[2:]), whole)
    with pytest.raises(ValueError, match="same shape"):
        ev.expected_calibration_error(conf, ok[:3])


def _result(clean, acc):
    return {"clean_acc": clean, "accuracy": acc, "mean_corruptions": list(acc)}


def test_mce_on_toy_numbers():
    res = _result(0.9, {"a": {1: 0.8, 2: 0.6}, "b": {1: 0.7, 2: 0.7}})
    base = _result(0.8, {"a": {1: 0.6, 2: 0.4}, "b": {1: 0.5, 2: 0.3}})
    out = ev.mce(res, base)
    # CE_a = (0.2 + 0.4) / (0.4 + 0.6), CE_b = (0.3 + 0.3) / (0.5 + 0.7)
    assert out["ce"]["a"] == pytest.approx(0.6) and out["ce"]["b"] == pytest.approx(0.5)
    assert out["mce"] == pytest.approx(0.55)
    # relative: sum_s (E - E_clean): a (0.1 + 0.3) / (0.2 + 0.4), b (0.2 + 0.2) / (0.3 + 0.5)
    assert out["relative_ce"]["a"] == pytest.approx(2 / 3) and out["relative_ce"]["b"] == pytest.approx(0.5)
    assert out["relative_mce"] == pytest.approx((2 / 3 + 0.5) / 2)
    assert ev.mce(res, res)["mce"] == pytest.approx(1.0)
    # a baseline without error on a corruption: its CE is undefined and left out of the mean
    perfect = _result(1.0, {"a": {1: 1.0, 2: 1.0}, "b": {1: 0.5, 2: 0.3}})
    out = ev.mce(res, perfect)
    assert out["ce"]["a"] is None and out["undefined_ce"] == ["a"] and out["mce"] == pytest.approx(0.5)
    # JSON keys (severities as strings) are read the same
    assert ev.mce(json.loads(json.dumps(res)), json.loads(json.dumps(base)))["mce"] == pytest.approx(0.55)
    with pytest.raises(ValueError, match="b/2"):
        ev.mce(res, _result(0.8, {"a": {1: 0.6, 2: 0.4}, "b": {1: 0.5}}))


def test_mce_lists_what_each_mean_leaves_out():
    res = _result(0.9, {"a": {1: 0.8, 2: 0.6}, "b": {1: 0.7, 2: 0.7}})
    # the baseline's errors on a (0.4, 0.4) are below its clean error 0.5: a has a CE (0.6 / 0.8) but no
    # relative CE (denominator -0.2); b: CE 0.6 / 1.6, relative CE (0.2 + 0.2) / (0.2 + 0.4)
    base = _result(0.5, {"a": {1: 0.6, 2: 0.6}, "b": {1: 0.3, 2: 0.1}})
    out = ev.mce(res, base)
    assert out["undefined_ce"] == [] and out["undefined_relative"] == ["a"]
    assert out["mce"] == pytest.approx((0.75 + 0.375) / 2) and out["relative_mce"] == pytest.approx(2 / 3)
    record = {"split": "test", "n": 4, "clean_acc": 0.9, "clean_ece": 0.0, "mean_corruption_acc": 0.7,
              "corruption_ece": 0.0, "mean_over": "run", "per_family": {}, "severities": [1, 2], "corruptions": [],
              "baseline": {"file": "/x/base.pt", **out}}
    line = next(v for v in evaluate_corruptions.markdown(record, {"name": "toy"}).splitlines() if "mCE" in v)
    assert line == "mCE 56.2%, relative mCE 66.7% (undefined for a: left out of this mean) against base.pt."


def _direct(model, x, y, name, s, seed=0):
    with torch.no_grad():
        return int((model(corrupt(x, name, s, seed=seed, indices=range(len(x)))).argmax(1) == y).sum()) / len(y)


def test_accuracy_per_severity_is_a_direct_loop(model, digits):
    x, y = digits.tensors[0][:N], digits.tensors[1][:N]
    res = ev.corruption_accuracy(model, (x, y), "gaussian_noise", severities=(1, 4), batch_size=10, seed=3)
    for s in (1, 4):
        assert res["accuracy"]["gaussian_noise"][s] == _direct(model, x, y, "gaussian_noise", s, seed=3)
    with torch.no_grad():
        assert res["clean_acc"] == int((model(x).argmax(1) == y).sum()) / N
    # the rows do not depend on the batching
    again = ev.corruption_accuracy(model, (x, y), "gaussian_noise", severities=(1, 4), batch_size=N, seed=3)
    assert [(r["correct"], r["n"]) for r in again["rows"]] == [(r["correct"], r["n"]) for r in res["rows"]]
    # the model's float32 arithmetic differs a little with the batch size, its confidences with it
    assert [r["ece"] for r in again["rows"]] == pytest.approx([r["ece"] for r in res["rows"]], abs=1e-6)
    assert res["mean_corruption_acc"] == pytest.approx(np.mean([res["accuracy"]["gaussian_noise"][s] for s in (1, 4)]))
    assert res["mean_over"] == "run" and res["per_family"] == {"noise": res["mean_corruption_acc"]}


def test_every_available_corruption_is_a_direct_loop(model, digits):
    x, y = digits.tensors[0][:15], digits.tensors[1][:15]
    names = without_kornia(available())     # all of them where kornia is installed
    res = ev.corruption_accuracy(model, (x, y), names, severities=(3,), batch_size=4)
    for c in names:
        assert res["accuracy"][c][3] == _direct(model, x, y, c, 3), c
    assert res["mean_over"] == ("benchmark" if all(c in names for c in BENCHMARK) else "run")
    over = res["mean_corruptions"]
    assert res["mean_corruption_acc"] == pytest.approx(np.mean([res["accuracy"][c][3] for c in over]))
    fams = {f: [c for c in over if c in members] for f, members in FAMILIES.items()}
    assert res["per_family"] == pytest.approx({f: np.mean([res["accuracy"][c][3] for c in cs])
                                               for f, cs in fams.items() if cs})


def test_resume_after_an_interruption_gives_the_same_rows(model, digits):
    kw = dict(severities=(1, 2, 3), n=N, batch_size=16)
    full = ev.corruption_accuracy(model, digits, "gaussian_noise", **kw)
    kept, calls = [], []

    def stop_after_two(row):
        kept.append(row)
        if len(kept) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ev.corruption_accuracy(model, digits, "gaussian_noise", on_row=stop_after_two, **kw)
    resumed = ev.corruption_accuracy(model, digits, "gaussian_noise", done=kept, on_row=calls.append, **kw)
    assert len(calls) == 2  # clean + 3 severities, 2 of them kept
    assert resumed["rows"] == full["rows"] and resumed["mean_corruption_acc"] == full["mean_corruption_acc"]


def test_robustops_evaluate_dispatches(model, digits):
    res = ro.evaluate(model, digits, suite="corruptions", corruptions="gaussian_noise", severities=(2,), n=N,
                      batch_size=32)
    assert res["suite"] == "corruptions" and set(res["accuracy"]) == {"gaussian_noise"} and res["n"] == N
    with pytest.raises(ValueError, match="eps=0.1"):
        ro.evaluate(model, digits, suite="corruptions", eps=0.1)


def _cli(*args):
    return main(["evaluate", "--suite", "corruptions", "--no-progress", "--device", "cpu", "--n", str(N),
                 "--batch-size", "16", *[str(a) for a in args]])


def _no_heatmap(monkeypatch):
    # drawing the picture is most of a tiny run's time: drawn once, in test_cli_end_to_end's first run
    monkeypatch.setattr(ev, "plot_heatmap", lambda result, path, title=None: [path])


def test_cli_end_to_end(ckpt, model, digits, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cc.tsv"
    assert _cli("--checkpoint", ckpt, "--corruptions", "gaussian_noise", "--severities", "1,5", "-o", out) == 0
    printed = capsys.readouterr().out
    assert "mean_corruption_acc" in printed and "per family: noise" in printed
    lines = out.read_text().splitlines()
    assert lines[0].split("\t") == list(ev.ROW_FIELDS) and len(lines) == 4
    s = json.loads((tmp_path / "cc.tsv.json").read_text())
    assert s["suite"] == "corruptions" and s["severities"] == [1, 5] and s["corruptions"] == ["gaussian_noise"]
    x, y = digits.tensors[0][:N], digits.tensors[1][:N]
    assert s["accuracy"]["gaussian_noise"]["5"] == pytest.approx(_direct(model, x, y, "gaussian_noise", 5))
    assert "| gaussian_noise |" in (tmp_path / "cc.tsv.md").read_text()
    assert (tmp_path / "cc.tsv.png").stat().st_size > 0 and s["heatmap"] == str(tmp_path / "cc.tsv.png")
    _no_heatmap(monkeypatch)
    # mCE against a finished result (the same model: 1) and against a checkpoint evaluated here
    assert _cli("--checkpoint", ckpt, "--corruptions", "gaussian_noise", "--severities", "1,5", "--baseline",
                tmp_path / "cc.tsv.json", "-o", tmp_path / "b.tsv") == 0
    assert json.loads((tmp_path / "b.tsv.json").read_text())["baseline"]["mce"] == pytest.approx(1.0)
    assert _cli("--checkpoint", ckpt, "--corruptions", "gaussian_noise", "--severities", "1,5", "--baseline",
                ckpt) == 0
    assert "mCE 1.0000" in capsys.readouterr().out
    # an existing result: refused without --resume / --force; --force replaces it
    assert _cli("--checkpoint", ckpt, "--corruptions", "gaussian_noise", "--severities", "1,5", "-o", out) == 2
    assert "--resume continues it" in capsys.readouterr().err
    assert _cli("--checkpoint", ckpt, "--corruptions", "gaussian_noise", "--severities", "1", "-o", out,
                "--force") == 0
    assert len(out.read_text().splitlines()) == 3


def test_cli_resume_equals_uninterrupted(ckpt, tmp_path, monkeypatch):
    args = ["--checkpoint", ckpt, "--corruptions", "gaussian_noise", "--severities", "1,2,3"]
    _no_heatmap(monkeypatch)
    real, calls = ev.evaluate_row, []

    def crash_on_third(*a, **k):
        calls.append(a[2])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    assert _cli(*args, "-o", tmp_path / "full.tsv") == 0
    monkeypatch.setattr(ev, "evaluate_row", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        _cli(*args, "-o", tmp_path / "cut.tsv")
    monkeypatch.setattr(ev, "evaluate_row", real)
    assert _cli(*args, "-o", tmp_path / "cut.tsv", "--resume") == 0
    assert (tmp_path / "cut.tsv").read_text() == (tmp_path / "full.tsv").read_text()
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("full.tsv.json", "cut.tsv.json"))
    assert a["rows"] == b["rows"] and a["mean_corruption_acc"] == b["mean_corruption_acc"]
    # another setting is refused on --resume
    assert _cli("--checkpoint", ckpt, "--corruptions", "gaussian_noise", "--severities", "1,2", "-o",
                tmp_path / "cut.tsv", "--resume") == 2


def test_cli_baseline_checkpoint_rows_resume(ckpt, tmp_path, monkeypatch, capsys):
    args = ["--checkpoint", ckpt, "--corruptions", "gaussian_noise", "--severities", "1", "--baseline", ckpt]
    _no_heatmap(monkeypatch)
    real, calls = ev.evaluate_row, []

    def crash_on_fourth(*a, **k):  # the model's 2 rows, then the baseline's clean row, then its gaussian_noise
        calls.append(a[2])
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    assert _cli(*args, "-o", tmp_path / "full.tsv") == 0
    assert "robustops evaluate: 4/4 rows (100%)" in capsys.readouterr().out
    monkeypatch.setattr(ev, "evaluate_row", crash_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        _cli(*args, "-o", tmp_path / "cut.tsv")
    monkeypatch.setattr(ev, "evaluate_row", real)
    assert calls == ["clean", "gaussian_noise", "clean", "gaussian_noise"]
    assert _cli(*args, "-o", tmp_path / "cut.tsv", "--resume") == 0
    assert "1/1 rows" in capsys.readouterr().out  # only the baseline's last row was left
    lines = (tmp_path / "full.tsv").read_text().splitlines()
    assert (tmp_path / "cut.tsv").read_text().splitlines() == lines
    # the baseline's rows: keys BASELINE_KEYS + the model's, the same figures (the same checkpoint)
    keys = [int(v.split("\t")[0]) for v in lines[1:]]
    base = evaluate_corruptions.BASELINE_KEYS
    assert keys == [0, ev.row_key("gaussian_noise", 1), base, base + ev.row_key("gaussian_noise", 1)]
    assert [v.split("\t")[1:] for v in lines[1:3]] == [v.split("\t")[1:] for v in lines[3:]]
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("full.tsv.json", "cut.tsv.json"))
    assert a["baseline"] == b["baseline"] and a["baseline"]["mce"] == pytest.approx(1.0) and len(a["rows"]) == 2
    # its rows belong to this baseline: resuming without it is refused
    assert _cli(*args[:-2], "-o", tmp_path / "cut.tsv", "--resume") == 2
    assert "--baseline-checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("flags, words", [
    (["--eps", "0.1"], ["--eps", "not an attack"]),
    (["--steps", "5", "--norm", "l2"], ["--norm", "--steps"]),
    (["--version", "plus"], ["--version"]),
    (["--severities", "0,7"], ["--severities", "1..5"]),
    (["--severities", "2,2"], ["--severities", "distinct"]),
    (["--corruptions", "rain"], ["--corruptions", "'rain'"]),
    (["--clean-data", "digits"], ["--clean-data", "cifar10c"]),
    (["--data", "cifar10c:/nonexistent"], ["--clean-data"]),
    (["--resume"], ["--resume", "--out"]),
    (["--baseline", "nonexistent.pt", "--corruptions", "gaussian_noise"], ["--baseline", "no such file"]),
    (["--baseline", "CKPT.md", "--corruptions", "gaussian_noise"], ["--baseline", "nor a checkpoint"]),
    (["--data", "moving_digits", "--corruptions", "gaussian_noise"], ["--suite corruptions", "images"]),
])
def test_cli_bad_flags(ckpt, capsys, flags, words):
    with open(ckpt + ".md", "w") as fh:  # a file that is neither JSON nor a checkpoint
        fh.write("# not a model\n")
    assert _cli("--checkpoint", ckpt, *[ckpt + ".md" if f == "CKPT.md" else f for f in flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(w in err for w in words), err


def test_cli_corruption_flags_need_the_suite(ckpt, capsys):
    assert main(["evaluate", "--checkpoint", ckpt, "--severities", "1", "--device", "cpu"]) == 2
    assert "only with --suite corruptions" in capsys.readouterr().err


def test_cli_refuses_corruptions_not_implemented(ckpt, capsys):
    missing = [c for c in ALL if c not in available()]
    if not missing:
        pytest.skip("every corruption is implemented")
    assert _cli("--checkpoint", ckpt, "--corruptions", missing[0]) == 2
    assert "not implemented" in capsys.readouterr().err


def test_cli_reads_cifar10c(tmp_path, capsys):
    pytest.importorskip("robustops.corruptions.cifar10c")
    g = torch.Generator().manual_seed(0)
    n = 20
    clean = torch.randint(0, 256, (n, 32, 32, 3), generator=g, dtype=torch.uint8).numpy()
    labels = torch.randint(0, 10, (n,), generator=g).numpy()
    np.savez(tmp_path / "clean.npz", x=clean, y=labels)
    root = tmp_path / "CIFAR-10-C"
    root.mkdir()
    np.save(root / "labels.npy", np.tile(labels, 5))
    np.save(root / "gaussian_noise.npy", np.concatenate([clean] * 5))  # "corrupted" = clean: same accuracy
    torch.manual_seed(0)
    ck = save_checkpoint(str(tmp_path / "c.pt"), SmallCNN(in_channels=3, input_size=32), "small_cnn",
                         {"in_channels": 3, "input_size": 32}, method="natural")
    assert main(["evaluate", "--suite", "corruptions", "--checkpoint", ck, "--data", f"cifar10c:{root}",
                 "--clean-data", str(tmp_path / "clean.npz"), "--corruptions", "gaussian_noise", "--no-progress",
                 "--device", "cpu", "-o", str(tmp_path / "r.tsv")]) == 0
    s = json.loads((tmp_path / "r.tsv.json").read_text())
    assert all(math.isclose(s["accuracy"]["gaussian_noise"][str(k)], s["clean_acc"]) for k in range(1, 6))
