"""The training methods of issues 14 and 15 through the real command line: `robustops train` parses
their flags, trains one epoch on the digits, and writes the summary with the method's settings."""
import json
import os

import pytest
from helpers import has_module, needs, one_thread  # noqa: F401 (one_thread: an autouse fixture)

from robustops.cli import main

CASES = {
    "dale_pd": (["--nu", "0.5", "--margin", "0.2", "--dual-lr", "0.01", "--langevin-form", "gaussian"],
                {"nu": 0.5, "margin": 0.2, "dual_lr": 0.01, "langevin_form": "gaussian"}),
    "consistency": (["--noise-copies", "3", "--consistency-lambda", "5"],
                    {"noise_copies": 3, "consistency_lambda": 5.0}),
    "macer": (["--noise-copies", "4", "--macer-lambda", "1", "--macer-warmup", "0"],
              {"noise_copies": 4, "macer_lambda": 1.0, "macer_warmup": 0}),
    "smoothadv": (["--adv-eps", "0.25", "--adv-steps", "1", "--adv-warmup", "2"],
                  {"adv_eps": 0.25, "adv_steps": 1, "adv_warmup": 2}),
    "smoothmix": (["--mix-steps", "2", "--noise-copies", "2", "--mix-warmup", "2", "--mix-step", "1"],
                  {"mix_steps": 2, "noise_copies": 2, "mix_warmup": 2, "mix_step": 1}),
    # issue 24: FastIBP with the optimiser options and acceps selection, CROWN-IBP, ACERT's BN rule / radius mode
    "fastibp": (["--eps", "0.05", "--reg-lambda", "0.2", "--weight-init", "ibp", "--select", "acceps", "--grad-clip",
                 "5", "--schedule", "onecycle", "--reg-tol", "0.3", "--bn", "centre"],
                {"reg_lambda": 0.2, "weight_init": "ibp", "reg_tol": 0.3, "bn": "centre"}),
    "crown_ibp": (["--eps", "0.05", "--beta-start", "0.8", "--beta-end", "0.2"], {"beta_start": 0.8, "beta_end": 0.2}),
    "acert": (["--eps", "0.05", "--bn", "centre", "--radius-mode", "eval"], {"bn": "centre", "radius_mode": "eval"}),
}
#: Settings outside the method's own hyperparameters (the run's config), per case.
CONFIG = {"fastibp": {"select": "acceps", "grad_clip": 5.0, "schedule": "onecycle"}}


@pytest.mark.parametrize("method", sorted(CASES))
def test_train_command(tmp_path, method):
    flags, expect = CASES[method]
    out = str(tmp_path / method)
    assert main(["train", "--data", "digits", "--method", method, "--epochs", "1", "--batch-size", "256",
                 "--steps", "2", "--test-steps", "0", "--val-size", "64", "-o", out, "--no-progress"] + flags) == 0
    with open(os.path.join(out, "summary.json")) as fh:
        s = json.load(fh)
    assert s["method"] == method and s["epochs_run"] == 1
    for k, v in expect.items():
        assert s["config"]["params"][k] == v, k
    for k, v in CONFIG.get(method, {}).items():
        assert s["config"][k] == v, k
    assert os.path.exists(os.path.join(out, "last.pt"))


# issue 27: the training methods' own flags through `robustops train`, each recorded in the run's summary
ISSUE27 = {
    "ada": (["--ada-nu", "0.05", "--ada-steps", "1", "--ada-step-size", "0.25", "--ada-clean", "0.75",
             "--ada-augmix", "1", "--ada-js", "6", "--augmix-width", "2", "--augmix-depth", "1"],
            {"ada_nu": 0.05, "ada_steps": 1, "ada_step_size": 0.25, "ada_clean": 0.75, "ada_augmix": 1,
             "ada_js": 6.0, "augmix_width": 2, "augmix_depth": 1}),
    "augrmix": (["--steps", "1", "--augmix-width", "2", "--augmix-depth", "2", "--augmix-severity", "2",
                 "--augmix-alpha", "0.5", "--augrmix-mode", "mask", "--augrmix-views", "1", "--augrmix-ce", "clean",
                 "--js-weight", "3"],
                {"augmix_width": 2, "augmix_depth": 2, "augmix_severity": 2.0, "augmix_alpha": 0.5,
                 "augrmix_mode": "mask", "augrmix_views": 1, "augrmix_ce": "clean", "js_weight": 3.0}),
    "rlat": (["--rlat-eps", "0.5", "--rlat-steps", "2", "--rlat-ridge", "0.01", "--rlat-cg", "3"],
             {"rlat_eps": 0.5, "rlat_steps": 2, "rlat_ridge": 0.01, "rlat_cg": 3}),
    "gaussian": (["--sigma", "0.2", "--sigma-dist", "uniform:0.3"], {"sigma": 0.2, "sigma_dist": "uniform:0.3"}),
}


@pytest.fixture(scope="module")
def corruption_net(tmp_path_factory):
    """A tiny corruption network file (an untrained CorruptionAE, in the checkpoint format of `perturbation
    train --kind autoencoder`)."""
    import torch

    from robustops.perturbation import CorruptionAE, save_perturbation_model
    path = str(tmp_path_factory.mktemp("ae") / "ae.pt")
    torch.manual_seed(0)
    save_perturbation_model(path, CorruptionAE(1, 4))
    return path


@pytest.fixture(scope="module")
def feature_net(tmp_path_factory):
    """A feature-network file for --rlat-net: a natural one-step run's best.pt."""
    out = str(tmp_path_factory.mktemp("nat"))
    assert main(["train", "--data", "digits", "--method", "natural", "--epochs", "1", "--batch-size", "512",
                 "--test-steps", "0", "--val-size", "64", "-o", out, "--no-progress"]) == 0
    return os.path.join(out, "best.pt")


@pytest.mark.parametrize("method", [pytest.param(m, marks=needs("kornia")) if m in ("ada", "augrmix") else m
                                    for m in sorted(ISSUE27)])  # ada's --ada-augmix and augrmix use AugMix's kornia ops
def test_issue27_train_command(tmp_path, method, request):
    flags, expect = ISSUE27[method]
    if method == "ada":
        flags = flags + ["--perturbation-model", request.getfixturevalue("corruption_net")]
    if method == "rlat":
        flags = flags + ["--rlat-net", request.getfixturevalue("feature_net")]
        expect = dict(expect, rlat_net=flags[-1])
    out = str(tmp_path / method)
    assert main(["train", "--data", "digits", "--method", method, "--epochs", "1", "--batch-size", "2048",
                 "--test-steps", "0", "--val-size", "32", "-o", out, "--no-progress"] + flags) == 0
    with open(os.path.join(out, "summary.json")) as fh:
        s = json.load(fh)
    assert s["method"] == method and s["epochs_run"] == 1
    for k, v in expect.items():
        assert s["config"]["params"][k] == v, k


def test_issue29_ijsat_and_robust_mixup_train_commands(tmp_path, digits_flow_path):
    """`robustops train --method ijsat --flow F --eps-z E --ijsat-clean W --ijsat-mix M --robust-mixup A` and
    `--method pgd --robust-mixup A`: one epoch each, every flag recorded in the run's summary."""
    runs = {"ijsat": ["--method", "ijsat", "--flow", digits_flow_path, "--eps-z", "0.02", "--ijsat-clean", "0.3",
                      "--ijsat-mix", "after", "--robust-mixup", "0.3"],
            "pgd": ["--method", "pgd", "--robust-mixup", "0.3"]}
    for name, flags in runs.items():
        out = str(tmp_path / name)
        assert main(["train", "--data", "digits", "--epochs", "1", "--batch-size", "2048", "--steps", "1",
                     "--test-steps", "0", "--val-size", "32", "-o", out, "--no-progress"] + flags) == 0
        with open(os.path.join(out, "summary.json")) as fh:
            s = json.load(fh)
        assert s["method"] == name and s["epochs_run"] == 1 and s["config"]["robust_mixup"] == 0.3
    with open(os.path.join(str(tmp_path / "ijsat"), "summary.json")) as fh:
        p = json.load(fh)["config"]["params"]
    assert p["eps_z"] == 0.02 and p["ijsat_clean"] == 0.3 and p["ijsat_mix"] == "after" and p["flow"]
