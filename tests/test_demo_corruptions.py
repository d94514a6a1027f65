"""`robustops demo --section corruptions` at a tiny budget: the digits-C table, the target lines computed
from the printed figures, results.json and the severity picture; its flags refused when wrong."""
from __future__ import annotations

import json

import pytest

from helpers import needs, one_thread  # noqa: F401 (an autouse fixture)


@needs("kornia")     # the 15 corruptions, blurs included
def test_demo_section_corruptions(tmp_path, capsys):
    from robustops.cli import main

    out = tmp_path / "demo"
    rc = main(["demo", "--section", "corruptions", "--out", str(out), "--epochs", "1", "--val-size", "64",
               "--corruption-rows", "natural,rlat", "--corruption-max", "90", "--no-progress", "--jobs", "1"])
    assert rc == 0
    text = capsys.readouterr().out
    for label in ("digits-C: the 90 test digits under the 15 CIFAR-10-C corruptions", "| row | clean | mean corr.",
                  "target rlat: mean corruption accuracy above natural",
                  ):
        assert label in text, label
    res = json.loads((out / "corruptions" / "results.json").read_text())
    rows = {r["method"]: r for r in res["rows"]}
    assert list(rows) == ["natural", "rlat"]
    for r in rows.values():
        c = r["corruptions"]
        assert c["mean_over"] == "benchmark" and len(c["accuracy"]) == 15
        mean = sum(a for per in c["accuracy"].values() for a in per.values()) / 75
        assert r["mca"] == pytest.approx(mean) and 0.0 <= c["corruption_ece"] <= 1.0
    met = rows["rlat"]["mca"] > rows["natural"]["mca"]
    assert ("above natural: met" in text) == met  # the verdict follows the figures
    assert (out / "corruptions" / "severity.png").exists()


def _row(mca, clean, noise=None):
    acc = {c: {s: a for s, a in zip(range(1, 6), noise)} for c in ("gaussian_noise", "shot_noise", "impulse_noise")} \
        if noise else {}
    return {"mca": mca, "clean_acc": clean, "corruptions": {"accuracy": acc}}


def test_demo_corruptions_targets():
    from robustops.cli.demo_corruptions import targets

    by = {"natural": _row(0.80, 0.99), "pgd+small": _row(0.82, 0.97), "ada": _row(0.85, 0.975),
          "augrmix": _row(0.81, 0.99), "rlat": _row(0.90, 0.95),
          "gaussian": _row(0.8, 0.99, [0.9, 0.8, 0.7, 0.6, 0.5]), "gaussian+uniform": _row(0.8, 0.99, [0.95] * 5)}
    lines = targets(by)
    assert lines[0].startswith("target ada: mean corruption accuracy above natural, pgd+small: met (85.0% vs 80.0%, "
                               "82.0%); clean within 2 points of natural: met")
    assert "target augrmix: mean corruption accuracy above natural, pgd+small: MISSED" in lines[1]
    assert lines[2].endswith("clean within 2 points of natural: MISSED")
    assert lines[3].endswith("s1 90.0% / 95.0%, s2 80.0% / 95.0%, s3 70.0% / 95.0%, s4 60.0% / 95.0%, s5 50.0% / 95.0%")


@pytest.mark.parametrize("flags, msg", [
    (["--corruption-rows", "natural,bogus"], "--corruption-rows must be"),
    (["--corruption-sigma", "0"], "--corruption-sigma must be in (0, 1)"),
    (["--corruption-eps", "1.5"], "--corruption-eps must be in (0, 1)"),
    (["--corruption-ae-epochs", "0"], "--corruption-ae-epochs must be >= 1"),
    (["--corruption-max", "0"], "--corruption-max must be >= 1"),
    (["--corruption-rlat-eps", "0"], "--corruption-rlat-eps must be a finite number > 0"),
])
def test_demo_corruptions_flags(tmp_path, capsys, flags, msg):
    from robustops.cli import main

    assert main(["demo", "--section", "corruptions", "--out", str(tmp_path), *flags]) == 2
    assert msg in capsys.readouterr().err


@needs("kornia")
def test_demo_corruptions_ada_and_uniform_rows(tmp_path, capsys):
    """The ada row (its CorruptionAE trained in the demo) with every section flag given (digits-C on the first
    60 test digits); without a natural row the clean target is n/a; the uniform-sigma row's spec is filled
    from --corruption-sigma."""
    from robustops.cli import main

    out = tmp_path / "demo"
    rc = main(["demo", "--section", "corruptions", "--out", str(out), "--epochs", "1", "--val-size", "64",
               "--corruption-rows", "ada,pgd+small", "--corruption-ae-epochs", "1", "--corruption-max", "60",
               "--corruption-sigma", "0.1", "--corruption-eps", "0.03", "--corruption-rlat-eps", "0.02",
               "--ada-steps", "1", "--steps", "1", "--no-progress", "--jobs", "1"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "digits-C: the 60 test digits" in text and "PGD-20 (eps 0.03)" in text
    assert "target ada: mean corruption accuracy above pgd+small:" in text
    assert "clean within 2 points of natural: n/a (no natural row)" in text
    res = json.loads((out / "corruptions" / "results.json").read_text())
    assert (res["sigma"], res["eps"], res["rlat_eps"]) == (0.1, 0.03, 0.02)
    assert all(r["corruptions"]["n"] == 60 for r in res["rows"])
    import argparse

    from robustops.cli.demo_corruptions import row_options

    ns = argparse.Namespace(corruption_sigma=0.1, corruption_eps=0.03, corruption_rlat_eps=0.02)
    assert row_options(ns, "gaussian+uniform") == ("gaussian", {"sigma": 0.1, "sigma_dist": "uniform:0.1"})
