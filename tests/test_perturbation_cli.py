"""`robustops perturbation train|quality|show` end to end on a tiny digits run, and its argument errors."""
import json
import os

import numpy as np
import pytest

from robustops.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pert") / "run")
    rc = main(["perturbation", "train", "--out", out, "--epochs", "2", "--latent-dim", "4", "--width", "8",
               "--approx-steps", "5", "--no-progress", "--threads", "1"])
    assert rc == 0
    return out


def test_train_writes_checkpoint_and_summary(run_dir):
    for name in ("model.pt", "last.pt", "log.csv", "summary.json"):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    with open(os.path.join(run_dir, "summary.json")) as fh:
        s = json.load(fh)
    q = s["quality"]
    assert s["eps"] > 0 and s["percentile"] == 95.0 and s["held_out_pairs"] == 360
    for key in ("coverage", "recon_mse", "identity_mse", "approx_mse", "prior_mean_mse"):
        assert isinstance(q[key], float), key
    assert 0 <= q["coverage"] <= 1 and len(s["history"]) == 2
    with open(os.path.join(run_dir, "log.csv")) as fh:
        assert len(fh.read().strip().splitlines()) == 3  # header + 2 epochs


def test_quality_and_show(run_dir, tmp_path, capsys):
    ck = os.path.join(run_dir, "model.pt")
    out = str(tmp_path / "q.json")
    assert main(["perturbation", "quality", "--checkpoint", ck, "--approx-steps", "0", "-o", out,
                 "--threads", "1"]) == 0
    with open(out) as fh:
        q = json.load(fh)["quality"]
    with open(os.path.join(run_dir, "summary.json")) as fh:
        assert q["coverage"] == pytest.approx(json.load(fh)["quality"]["coverage"])  # same held-out pairs, same eps
    png = str(tmp_path / "grid.png")
    assert main(["perturbation", "show", "--checkpoint", ck, "-o", png, "--inputs", "2", "--samples", "2",
                 "--threads", "1"]) == 0
    assert os.path.getsize(png) > 1000 and os.path.isfile(str(tmp_path / "grid.pdf"))


def test_npz_pairs_train(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((40, 1, 8, 8)).astype(np.float32)
    path = str(tmp_path / "pairs.npz")
    np.savez(path, x=x, x_perturbed=np.clip(x + 0.1, 0, 1))
    out = str(tmp_path / "npzrun")
    assert main(["perturbation", "train", "--data", f"npz:{path}", "--out", out, "--epochs", "1", "--width", "8",
                 "--approx-steps", "0", "--no-progress", "--threads", "1", "--batch-size", "16"]) == 0
    with open(os.path.join(out, "summary.json")) as fh:
        assert json.load(fh)["held_out_pairs"] == 4


def test_errors(run_dir, tmp_path, capsys):
    assert main(["perturbation", "train", "--out", run_dir, "--epochs", "2", "--no-progress"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["perturbation", "train", "--out", str(tmp_path / "x"), "--data", "cifar"]) == 2
    assert 'expected "digits" or npz:PATH' in capsys.readouterr().err
    bad = str(tmp_path / "bad.npz")
    np.savez(bad, x=np.zeros((4, 8, 8), np.float32))
    assert main(["perturbation", "train", "--out", str(tmp_path / "y"), "--data", f"npz:{bad}"]) == 2
    assert "no array 'x_perturbed'" in capsys.readouterr().err
    assert main(["perturbation", "train", "--out", str(tmp_path / "z"), "--epochs", "0"]) == 2
    assert "--epochs must be >= 1" in capsys.readouterr().err
    assert main(["perturbation", "quality", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "--checkpoint: no perturbation-model checkpoint" in capsys.readouterr().err
    ck = os.path.join(run_dir, "model.pt")
    assert main(["perturbation", "show", "--checkpoint", ck, "-o", str(tmp_path / "g.png"), "--eps-list", "-1"]) == 2
    assert "--eps-list entries must be >= 0" in capsys.readouterr().err
    rgb = str(tmp_path / "rgb.npz")
    np.savez(rgb, x=np.zeros((4, 3, 8, 8), np.float32), x_perturbed=np.zeros((4, 3, 8, 8), np.float32))
    assert main(["perturbation", "quality", "--checkpoint", ck, "--data", f"npz:{rgb}"]) == 2
    assert "does not accept --data inputs of shape [3, 8, 8]" in capsys.readouterr().err


def _train_args(out, *extra):
    return ["perturbation", "train", "--out", out, "--epochs", "2", "--latent-dim", "4", "--width", "8",
            "--approx-steps", "5", "--no-progress", "--threads", "1", *extra]


def test_resume_refuses_other_pair_settings_naming_the_flag(run_dir, capsys):
    """run_dir made fresh pairs of every family; a resume that makes its pairs otherwise is refused before
    anything is written (the checkpoint stores the pair settings under the flags' names)."""
    before = os.path.getmtime(os.path.join(run_dir, "last.pt"))
    for extra, flag in ((["--fixed-pairs"], "--fixed-pairs"), (["--crop-flip", "1"], "--crop-flip"),
                        (["--family", "rotation"], "--family"), (["--linf-eps", "0.1"], "--linf-eps")):
        assert main(_train_args(run_dir, "--resume", *extra)) == 2, flag
        err = capsys.readouterr().err
        assert "resume: the checkpoint was trained with different settings" in err and f"{flag}=" in err, err
    assert os.path.getmtime(os.path.join(run_dir, "last.pt")) == before
    assert main(_train_args(run_dir, "--resume")) == 0  # the same settings: resumes (nothing left to run)


def test_family_trains_on_the_named_families_and_bad_names_are_refused(tmp_path, capsys):
    out = str(tmp_path / "fam")
    assert main(_train_args(out, "--epochs", "1", "--family", "rotation,linf", "--linf-eps", "0.1")) == 0
    with open(os.path.join(out, "summary.json")) as fh:
        s = json.load(fh)
    assert s["settings"]["family"] == "rotation,linf" and s["settings"]["linf_eps"] == 0.1
    capsys.readouterr()
    for extra, msg in ((["--family", "rotation,blur"], "--family must be one or more distinct names of all, rotation"),
                       (["--family", "linf,linf"], "--family must be one or more distinct names"),
                       (["--linf-eps", "1.5"], "--linf-eps must be a number in [0, 1]")):
        assert main(_train_args(str(tmp_path / "bad"), *extra)) == 2
        assert msg in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "bad")
    path = tmp_path / "p.npz"
    np.savez(path, x=np.zeros((8, 1, 8, 8), np.float32), x_perturbed=np.zeros((8, 1, 8, 8), np.float32))
    assert main(_train_args(str(tmp_path / "npz"), "--data", f"npz:{path}", "--family", "rotation")) == 2
    assert "--family / --linf-eps choose the digits' perturbations" in capsys.readouterr().err
