"""The certification modes of `robustops certify` / `predict` as Certifier objects (robustops.cli.certifiers):
a new mode is one class in the table, and a run reads its flags without writing resolved state to them."""
import copy
import json
import os

import pytest
import torch

from robustops.cli import build_parser, certifiers, certify, main
from robustops.models import get_model, save_checkpoint

SMALL = ["--N0", "8", "--N", "32", "--alpha", "0.1", "--batch", "64", "--skip", "40", "--seed", "1", "--no-progress"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """An untrained small_cnn checkpoint for digits (trained with eps 0.05: --method ibp reads it) and a
    small perturbation model."""
    from robustops.perturbation import CVAE, save_perturbation_model

    d = tmp_path_factory.mktemp("certifiers")
    torch.manual_seed(0)
    ckpt = save_checkpoint(str(d / "m.pt"), get_model("small_cnn", 10, 1, 8), "small_cnn",
                           {"num_classes": 10, "in_channels": 1, "input_size": 8}, eps=0.05, norm="linf")
    cvae = CVAE(in_channels=1, input_size=8, latent_dim=4, width=8)
    cvae.eps = 1.0
    return ckpt, save_perturbation_model(str(d / "cvae.pt"), cvae)


class LatentSequential(certifiers.Certifier):
    """A toy mode for --threat learned --sequential (refused by the modes of robustops): each input's
    prediction is the classifier's, certified at the radius of its own flag --toy-radius."""

    when = {"threat": "learned", "sequential": True}
    settings_keys = ("checkpoint", "threat", "sequential", "perturbation_model", "toy_radius")

    @classmethod
    def add_arguments(cls, p):
        p.add_argument_group("toy").add_argument("--toy-radius", type=float, default=0.5)

    def check_flags(self, args):
        pass

    def check(self, args, ckpt):
        return certifiers.Settings(ckpt.model)

    def describe(self, args, s):
        return "toy"

    def step(self, args, s, info, device):
        def step(x, ids):
            with torch.no_grad():
                pred = s.model(x).argmax(1)
            return pred, torch.full(pred.shape, args.toy_radius), torch.zeros_like(pred), torch.ones_like(pred, dtype=torch.bool)

        return step

    def summary(self, args, s, fields, info, threads):
        return {"command": "toy", "inputs": len(fields)}


def test_a_new_mode_is_one_class(files, tmp_path, monkeypatch, capsys):
    ckpt, pm = files
    out = str(tmp_path / "toy.tsv")
    argv = ["certify", "--checkpoint", ckpt, "--threat", "learned", "--sequential", "--perturbation-model", pm,
            "--sigma", "0.5", "-o", out] + SMALL
    assert main(argv) == 2
    assert "--sequential is not supported with --threat learned" in capsys.readouterr().err
    monkeypatch.setattr(certifiers, "CERTIFIERS", [LatentSequential] + certifiers.CERTIFIERS)
    args = build_parser("certify").parse_args(argv)
    assert isinstance(certifiers.choose(args, "certify"), LatentSequential)
    assert type(certifiers.choose(build_parser("certify").parse_args(argv[:-len(SMALL)] + ["--threat", "norm"]),
                                  "certify")) is certifiers.SequentialCertifier
    argv += ["--toy-radius", "0.25"]  # the mode's own flag, added by its add_arguments
    assert main(argv) == 0
    assert "toy" in capsys.readouterr().out
    lines = open(out).read().splitlines()
    assert lines[0] == certify.HEADERS["certify"] and len(lines) == 1 + len(range(0, 360, 40))
    assert all(line.split("\t")[3] == "0.25" for line in lines[1:])
    record = json.load(open(out + ".json"))
    assert record["settings"] == {"checkpoint": os.path.abspath(ckpt), "threat": "learned", "sequential": True,
                                  "perturbation_model": pm, "toy_radius": 0.25}
    assert record["summary"] == {"command": "toy", "inputs": len(lines) - 1}


def test_the_table_chooses_each_mode():
    p = build_parser("certify")
    cases = {(): certifiers.SmoothingCertifier, ("--sequential",): certifiers.SequentialCertifier,
             ("--method", "ibp"): certifiers.IbpCertifier, ("--threat", "learned"): certifiers.LatentCertifier,
             # ties: the earlier mode is chosen, and refuses the other's flag
             ("--method", "ibp", "--sequential"): certifiers.SequentialCertifier,
             ("--method", "ibp", "--threat", "learned"): certifiers.IbpCertifier}
    for extra, cls in cases.items():
        args = p.parse_args(["certify", "--checkpoint", "c", "-o", "o"] + list(extra))
        assert type(certifiers.choose(args, "certify")) is cls, extra
    args = build_parser("predict").parse_args(["predict", "--checkpoint", "c", "-o", "o", "--threat", "learned"])
    assert type(certifiers.choose(args, "predict")) is certifiers.LatentCertifier
    assert certifiers.choices("method") == ("smoothing", "ibp", "crown", "crown-ibp", "best") and certifiers.choices("threat") == ("norm", "learned")


@pytest.mark.parametrize("command,extra", [
    ("certify", ["--sigma", "0.25"]),
    ("predict", ["--sigma", "0.25"]),
    ("certify", ["--sigma", "0.25", "--sequential", "--radii", "0.1,1/4", "--n-min", "16"]),
    ("certify", ["--sigma", "0.25", "--sequential", "--n-min", "16", "--precision", "0.2"]),
    ("certify", ["--method", "ibp", "--tol", "0.01"]),
    ("certify", ["--threat", "learned", "--sigma", "0.5", "--perturbation-model", None])])
def test_a_run_leaves_the_parsed_flags_as_they_were(files, tmp_path, command, extra):
    ckpt, pm = files
    extra = [pm if a is None else a for a in extra]
    small = [a for a in SMALL if a not in ("--N0", "8")] if command == "predict" else SMALL
    args = build_parser(command).parse_args([command, "--checkpoint", ckpt, "-o", str(tmp_path / "r.tsv")] + small
                                            + extra)
    parsed = copy.deepcopy(vars(args))
    assert certify.run(args, mode=command) == 0
    assert vars(args) == parsed
    assert os.path.exists(tmp_path / "r.tsv") and not [f for f in os.listdir(tmp_path) if f.endswith(".part")]
