"""`robustops demo --section autoattack` at tiny budgets: the natural and PGD-7 AT models' stage tables,
the masked-gradient model caught by the masking check, the picture and results.json."""
from __future__ import annotations

import json

from helpers import one_thread  # noqa: F401 (an autouse fixture)


def test_demo_section_autoattack(tmp_path, capsys):
    from robustops.cli import main

    out = tmp_path / "demo"
    rc = main(["demo", "--section", "autoattack", "--out", str(out), "--epochs", "2", "--val-size", "64",
               "--aa-steps", "3", "--aa-fab-steps", "2", "--aa-queries", "200", "--no-progress",
               "--jobs", "1"])  # the rows in this process (the quick demo test runs them in a pool)
    assert rc == 0
    text = capsys.readouterr().out
    for label in ("AutoAttack (standard) on the natural model: APGD-CE-3 + APGD-T-3 + FAB-T-2 + Square-200q",
                  "AutoAttack (standard) on the PGD-7 AT model", "(masked gradients) model", "| Square |",
                  "warning: Square broke"):
        assert label in text, label
    assert text.count("masking check: no warning") == 2  # the natural and PGD models: no warning
    res = json.loads((out / "autoattack" / "results.json").read_text())
    assert res["budget"] == {"steps": 3, "fab_steps": 2, "queries": 200}
    natural, pgd, masked = res["models"]
    assert masked["warnings"] and not natural["warnings"] and not pgd["warnings"]
    assert masked["stages"][-1]["robust_acc"] < 0.5 * masked["stages"][-2]["robust_acc"]
    assert (out / "autoattack" / "stages.png").exists() and (out / "autoattack" / "stages.pdf").exists()
