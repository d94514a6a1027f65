"""The bound benchmark's floors (benchmarks/bench_bounds.py ``dense_floors``) against the multiply-adds
counted by hand for the digits SmallCNN, and the tightness script's table on made-up rows (no training,
no certification: both under a second)."""
import os

import pytest
import torch

from robustops.models import SmallCNN

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture
def benchmarks_path(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)


def test_dense_floors_of_the_digits_net(benchmarks_path):
    import bench_bounds

    floors = bench_bounds.dense_floors(SmallCNN(1, 10, 8).eval(), torch.rand(2, 1, 8, 8))
    conv1, conv2, fc1, fc2 = 64 * 16 * 9, 64 * 32 * 16 * 9, 512 * 128, 128 * 10
    fwd = conv1 + conv2 + fc1 + fc2
    crown_ibp = 2 + 9 * (conv1 + conv2 + fc1) / fwd
    # relu1 needs no batch-dependent product; relu2 (2048 inputs) carries 2 x 2048 rows back through conv1;
    # the max pool follows relu2 (interval image); relu3 (128 inputs) carries 256 rows through conv1, conv2
    crown = crown_ibp + (2 * 2048 * conv1 + 2 * 128 * (conv1 + conv2)) / fwd
    assert floors["forward_macs"] == fwd
    assert floors["ibp"] == 2.0
    assert floors["crown-ibp"] == pytest.approx(crown_ibp)
    assert floors["crown"] == pytest.approx(crown)


def test_tightness_table_marks_the_targets(benchmarks_path, capsys):
    import bound_tightness

    rows = [dict(model="pgd", bound=b, clean_acc=0.9, mean_radius=r, ratio_vs_ibp=q, certified_frac=0.5, seconds=0.1)
            for b, r, q in (("ibp", 0.01, 1.0), ("crown-ibp", 0.02, 2.0), ("crown", 0.06, 6.0))]
    bound_tightness.print_table(rows)
    out = capsys.readouterr().out.splitlines()
    assert ">=2.5x NOT met" in out[3] and "3.10x" in out[3]
    assert ">=5x met" in out[4] and "7.80x" in out[4]


def test_certified_tradeoff_runs_end_to_end(benchmarks_path, capsys):
    """The trade-off study at a tiny size (one epoch on 48 images): both methods train with the reference
    settings, select by acceps on the held-out images and report capped ACR as a share of eps."""
    import certified_tradeoff

    rows = certified_tradeoff.main(["--no-csv", "--epochs", "1", "--train-size", "48", "--val-size", "16",
                                    "--test-size", "16", "--kappas", "0.5", "--seeds", "0", "--batch", "16"])
    assert [r["method"] for r in rows] == ["fastibp", "acert"]
    for r in rows:
        assert r["settings"] == "reference" and r["best_epoch"] == 1
        assert 0.0 <= float(r["acr_share"]) <= 1.0 and 0.0 <= float(r["cert_acc_eps"]) <= float(r["clean_acc"])
    assert "ACR/eps" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        certified_tradeoff.main(["--no-csv", "--methods", "ibp"])
