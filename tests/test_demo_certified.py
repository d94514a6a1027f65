"""`robustops demo --section certified` at tiny budgets: the table (a row per model and bound), best never
below IBP on any model, the CSV written row by row, results.json and the picture; bad flags refused."""
from __future__ import annotations

import csv
import json

import pytest
from helpers import one_thread  # noqa: F401 (an autouse fixture)

from robustops.cli import main

BOUNDS = ("ibp", "crown-ibp", "crown", "best")


@pytest.fixture(scope="module")
def section(tmp_path_factory):
    import contextlib
    import io

    out = tmp_path_factory.mktemp("democert") / "demo"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        # a naturally trained model at a small eps: IBP proves little, CROWN (and so best) more
        rc = main(["demo", "--section", "certified", "--out", str(out), "--epochs", "2", "--val-size", "0",
                   "--cert-methods", "natural", "--cert-n", "8", "--eps", "0.02", "--cert-tol", "0.005",
                   "--attack-steps", "1", "--no-progress", "--jobs", "1"])
    return rc, buf.getvalue(), out / "certified"


def test_demo_section_certified_table_and_files(section):
    rc, text, out = section
    assert rc == 0
    assert "certified training on digits (8 test images, L-inf eps 0.02, 2 epochs" in text
    header = next(line for line in text.splitlines() if line.startswith("| model"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "model", "bound", "clean acc", "certified acc at eps=0.02", "ACR capped at eps (share of eps)",
        "ACR (radii <= 0.04)", "time"]
    body = [line for line in text.splitlines() if line.startswith("| natural")]
    assert [line.split("|")[2].strip() for line in body] == list(BOUNDS)
    res = json.loads((out / "results.json").read_text())
    assert res["n"] == 8 and res["eps"] == 0.02 and len(res["results"]) == 4 and res["table"][0] == header
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["method"], r["bound"]) for r in rows] == [("natural", b) for b in BOUNDS]
    for m in {r["method"] for r in res["results"]}:
        by = {r["bound"]: r for r in res["results"] if r["method"] == m}
        assert len({r["clean_acc"] for r in by.values()}) == 1  # the same inputs and model for every bound
        for key in ("cert_acc_eps", "acr_capped_share", "acr_2eps"):
            assert by["best"][key] >= by["ibp"][key] - 1e-12, (m, key)
            assert 0.0 <= by["ibp"][key] <= (0.04 if key == "acr_2eps" else 1.0)
    natural = {r["bound"]: r for r in res["results"]}
    assert natural["best"]["acr_2eps"] > natural["ibp"]["acr_2eps"]  # CROWN's gain on a natural model
    for f in ("certified_accuracy.png", "certified_accuracy.pdf"):
        assert (out / f).stat().st_size > 0


def test_demo_section_certified_refuses_bad_flags(capsys):
    assert main(["demo", "--section", "certified", "--cert-methods", "ibp,nope", "--no-progress"]) == 2
    assert "--cert-methods must be a comma-separated list" in capsys.readouterr().err
    assert main(["demo", "--section", "certified", "--cert-n", "0", "--no-progress"]) == 2
    assert "cert" in capsys.readouterr().err
    assert main(["demo", "--jobs", "0", "--no-progress"]) == 2
    assert "--jobs" in capsys.readouterr().err
