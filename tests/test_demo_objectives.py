"""`robustops demo --section objectives` at a tiny budget: the table with the transfer column, the target
lines judged on the figures, results.json; the verdicts on toy figures; the flag errors."""
from __future__ import annotations

import json

import pytest

from helpers import one_thread  # noqa: F401 (an autouse fixture)


def test_demo_section_objectives(tmp_path, capsys):
    from robustops.cli import main

    out = tmp_path / "demo"
    rc = main(["demo", "--section", "objectives", "--out", str(out), "--epochs", "1", "--val-size", "64",
               "--steps", "1", "--objectives-rows", "pgd,jsigr", "--objectives-source", "natural",
               "--aa-steps", "2", "--aa-fab-steps", "1", "--aa-queries", "10", "--no-progress", "--jobs", "1"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| row | clean | PGD-20 (eps 0.2) | AutoAttack | transfer PGD-20 from natural |" in text
    res = json.loads((out / "objectives" / "results.json").read_text())
    rows = {r["method"]: r for r in res["rows"]}
    assert list(rows) == ["pgd", "jsigr"] and res["source"] == "natural"
    for r in rows.values():  # a point counts as robust only when it is also classified right clean
        assert 0.0 <= r["transfer_acc"] <= r["clean_acc"]
    best = max(r["transfer_acc"] for r in rows.values())
    assert ("best transfer accuracy of the table: met" in text) == (rows["jsigr"]["transfer_acc"] >= best)


def _row(label, clean, rob, aa, transfer):
    return {"label": label, "clean_acc": clean, "robust_acc": rob, "aa_acc": aa, "transfer_acc": transfer}


def test_demo_objectives_targets():
    from robustops.cli.demo_objectives import targets

    by = {"pgd": _row("PGD", 0.98, 0.66, 0.60, 0.87), "sat": _row("SAT", 0.975, 0.6, 0.61, 0.8),
          "infoat": _row("InfoAT", 0.96, 0.7, 0.62, 0.8), "jsigr": _row("J", 0.98, 0.4, 0.3, 0.9),
          "pgd+ood": _row("OOD", 0.99, 0.7, 0.59, 0.8)}
    lines = targets(by)
    assert lines[0] == ("target sat: AutoAttack >= PGD-7 AT: met (61.0% vs 60.0%); clean within 1 point: met "
                        "(97.5% vs 98.0%)")
    assert lines[1].endswith("clean within 1 point: MISSED (96.0% vs 98.0%)")
    assert lines[2].startswith("target jsigr: best transfer accuracy of the table: met (90.0%")
    assert lines[3].startswith("target OOD data: clean and AutoAttack above PGD-7 AT: MISSED")
    assert targets({"sat": by["sat"]}) == []  # nothing to compare with


def test_demo_objectives_flags(tmp_path, capsys):
    from robustops.cli import main

    assert main(["demo", "--section", "objectives", "--out", str(tmp_path), "--objectives-rows", "pgd,nope"]) == 2
    assert "--objectives-rows must be a comma-separated list of" in capsys.readouterr().err


def test_demo_objectives_ood_row_keeps_the_steps():
    """Half of every batch is OOD, so the row trains half the epochs: PGD-7 AT's number of steps."""
    import argparse

    from robustops.cli.demo_objectives import row_options

    method, opts = row_options(argparse.Namespace(epochs=30), "pgd+ood")
    assert method == "pgd" and opts == {"ood_data": "digits-ood", "ood_ratio": 0.5, "epochs": 15}
    assert row_options(argparse.Namespace(epochs=30), "sat") == ("sat", {})
