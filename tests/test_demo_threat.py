"""`robustops demo --section threat-models` at a tiny budget (the IWD and JSTM columns' attacks at 1 step, 93
training digits): the table's columns, the robustification table, the target lines judged on the figures,
results.json and the picture; the ijsat target on toy figures."""
from __future__ import annotations

import json

from helpers import one_thread  # noqa: F401 (an autouse fixture)


def test_demo_section_threat_models(tmp_path, capsys, monkeypatch):
    from robustops.cli import demo_threat, main

    monkeypatch.setattr(demo_threat, "ATTACK_STEPS", 1)  # the IWD and JSTM columns' steps (20 in the demo)
    out = tmp_path / "demo"
    rc = main(["demo", "--section", "threat-models", "--out", str(out), "--epochs", "1", "--val-size", "1280",
               "--steps", "1", "--threat-rows", "pgd,iwd", "--threat-flow-epochs", "1", "--robustify-max", "8",
               "--corruption-max", "24", "--aa-steps", "0", "--attack-steps", "2", "--threat-iwd-eps", "0.15",
               "--threat-eps-z", "0.05", "--eps-pre", "0.1", "--eps-adv", "0.15", "--no-progress", "--jobs", "1"])
    assert rc == 0
    text = capsys.readouterr().out
    assert ("| row | clean | PGD-2 (L-inf 0.2) | AutoAttack | IWD attack (0.15) | JSTM (eps_z 0.05, eps 0.2) | "
            "digits-C mean | train s |") in text
    assert "preemptive robustification of 8 test digits for the PGD-7 AT model (eps_pre 0.1" in text
    res = json.loads((out / "threat-models" / "results.json").read_text())
    rows = {r["method"]: r for r in res["rows"]}
    assert list(rows) == ["pgd", "iwd"] and (res["iwd_eps"], res["eps_z"], res["flow_epochs"]) == (0.15, 0.05, 1)
    for r in rows.values():  # a robust point is also right clean; AutoAttack skipped (--aa-steps 0)
        assert 0.0 <= r["iwd_acc"] <= r["clean_acc"] and 0.0 <= r["jstm_acc"] <= r["clean_acc"]
        assert r["aa_acc"] is None and r["mca"] is not None
    rob = res["robustification"]
    assert (rob["n"], rob["eps_pre"], rob["eps_adv"]) == (8, 0.1, 0.15)
    met = rows["iwd"]["iwd_acc"] > rows["pgd"]["iwd_acc"]  # the verdicts follow the figures
    assert f"target iwd: IWD-attack accuracy above PGD-7 AT: {'met' if met else 'MISSED'}" in text
    o, p = 1.0 - rob["original"]["pgd_acc"], 1.0 - rob["robustified"]["pgd_acc"]
    assert f"fewer PGD-20 errors than the originals: {'met' if 2 * p <= o else 'MISSED'}" in text
    assert res["table"] == [ln for ln in res["table"] if ln in text]
    assert all(str(out / "threat-models" / f"adversaries.{ext}") in res["pictures"] for ext in ("png", "pdf"))
    assert (out / "threat-models" / "adversaries.png").stat().st_size > 0


def test_demo_threat_ijsat_target():
    from robustops.cli.demo_threat import targets

    by = {"pgd": {"clean_acc": 0.90, "robust_acc": 0.60, "aa_acc": 0.50, "mca": 0.70},
          "ijsat": {"clean_acc": 0.92, "robust_acc": 0.55, "aa_acc": 0.48, "mca": 0.72}}
    assert targets(by) == ["target ijsat: clean above PGD-7 AT: met (92.0% vs 90.0%); digits-C above: met (72.0% vs "
                           "70.0%); AutoAttack within 3 points: met (48.0% vs 50.0%)"]
    by["ijsat"].update(aa_acc=None, mca=0.69)
    by["pgd"]["aa_acc"] = None
    assert targets(by)[0].endswith("digits-C above: MISSED (69.0% vs 70.0%); PGD-20 within 3 points: MISSED "
                                   "(55.0% vs 60.0%)")
