"""Issue 22, items 7 and 8: defaults that train well, one thread rule for the API and the CLI.

- item 8: ``train.fit(threads=None)`` applies the rule the CLI applies (``robustops._threads``: one
  thread for the 8x8 digits), an int or 0 / "keep" overrides it, a bad value is refused, the caller's
  torch setting comes back when fit returns; the CLI's choice is unchanged and reaches fit;
- item 7: ``robustops train``'s defaults per dataset (digits: the demo's 30 epochs, lr 0.05, batch
  size 64, 144 validation images) appear in ``--help`` and in the parsed settings, and explicit flags
  win.
"""
import argparse
import json
import os

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from robustops import _threads, data, train
from robustops.cli import build_parser, common, main
from robustops.models import SmallCNN


@pytest.fixture
def set_calls(monkeypatch):
    """Every torch.set_num_threads call (still applied), with 16 physical cores and one process;
    the test's torch setting comes back afterwards."""
    calls = []
    real = torch.set_num_threads

    def spy(n):
        calls.append(n)
        real(n)

    monkeypatch.setattr(torch, "set_num_threads", spy)
    monkeypatch.setattr(_threads, "physical_cores", lambda: 16)
    monkeypatch.setattr(common, "physical_cores", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    old = torch.get_num_threads()
    yield calls
    real(old)


def _digits_loader(n=64):
    ds, _ = data.get_dataset("digits", "train")
    x = torch.stack([ds[i][0] for i in range(n)])
    y = torch.tensor([int(ds[i][1]) for i in range(n)])
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)


def _threads_while_training(monkeypatch):
    """A list that receives torch.get_num_threads() at every training step."""
    seen = []
    step = train.Trainer.train_step

    def spy(self, x, y, weights=None, **kw):  # kw: e.g. the batch's OOD mask
        seen.append(torch.get_num_threads())
        return step(self, x, y, weights, **kw)

    monkeypatch.setattr(train.Trainer, "train_step", spy)
    return seen


# ------------------------------------------------------------------ item 8: one thread rule

def test_fit_applies_the_rule_on_digits_and_restores(set_calls, monkeypatch):
    torch.set_num_threads(2)  # the caller's setting (torch's default on this machine, or another)
    set_calls.clear()
    seen = _threads_while_training(monkeypatch)
    res = train.fit(SmallCNN(num_classes=10, in_channels=1, input_size=8), _digits_loader(), "pgd", epochs=1,
                    eps=0.2, steps=2, progress=False, verbose=False, device="cpu")
    assert res.threads == 1 and seen and set(seen) == {1}  # the rule: 64 values per sample -> 1 thread
    assert set_calls[0] == 1 and torch.get_num_threads() == 2  # the caller's setting restored


def test_fit_rule_for_larger_inputs(set_calls, monkeypatch):
    """3x32x32 inputs on 16 cores: the rule's 8 threads (at most 8), the same as the CLI's run_setup."""
    torch.set_num_threads(1)
    seen = _threads_while_training(monkeypatch)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    res = train.fit(SmallCNN(num_classes=10, in_channels=3, input_size=32), DataLoader(TensorDataset(x, y),
                    batch_size=8), "natural", epochs=1, progress=False, verbose=False, device="cpu")
    cli = common.run_setup(argparse.Namespace(threads=None, progress=False), 3 * 32 * 32)[0]
    assert res.threads == cli == _threads.default_threads(3072) == 8 and set(seen) == {8}
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: the cores divided among the processes
    assert _threads.default_threads(3072) == 4 == common.run_setup(argparse.Namespace(threads=None), 3072)[0]


@pytest.mark.parametrize("threads,want", [(3, 3), (0, 2), ("keep", 2)])
def test_fit_threads_override(set_calls, monkeypatch, threads, want):
    torch.set_num_threads(2)
    set_calls.clear()
    seen = _threads_while_training(monkeypatch)
    res = train.fit(SmallCNN(num_classes=10, in_channels=1, input_size=8), _digits_loader(32), "natural",
                    epochs=1, progress=False, verbose=False, device="cpu", threads=threads)
    assert res.threads == want and set(seen) == {want} and torch.get_num_threads() == 2
    if threads in (0, "keep"):
        assert set_calls == []  # torch's setting left alone


@pytest.mark.parametrize("bad", [-1, 1.5, "many", True])
def test_fit_refuses_bad_threads(bad):
    with pytest.raises(ValueError, match="threads must be"):
        train.fit(SmallCNN(num_classes=10, in_channels=1, input_size=8), _digits_loader(32), "natural",
                  epochs=1, progress=False, verbose=False, device="cpu", threads=bad)


def test_cli_choice_unchanged_and_reaches_fit(set_calls, tmp_path, monkeypatch, capsys):
    """The CLI's default stays the rule (1 thread on digits); --threads N is what fit trains with."""
    assert common.setup_run(argparse.Namespace(threads=None, progress=False), 64) == 1
    assert common.setup_run(argparse.Namespace(threads=3, progress=False), 64) == 3
    seen = _threads_while_training(monkeypatch)
    out = tmp_path / "run"
    assert main(["train", "--data", "digits", "--method", "natural", "--epochs", "1", "--val-size", "0",
                 "--test-steps", "0", "--threads", "2", "--no-progress", "-o", str(out)]) == 0
    assert seen and set(seen) == {2}
    assert json.loads((out / "summary.json").read_text())["threads"] == 2


# ------------------------------------------------------------------ item 7: defaults per dataset

def _parsed(*argv):
    from robustops.cli import train as cli_train

    args = build_parser("train").parse_args(["train", *argv])
    cli_train.dataset_defaults(args)
    return args


def test_train_help_shows_the_defaults_per_dataset(capsys):
    with pytest.raises(SystemExit):
        build_parser("train").parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for want in ("30 on digits, 10 on moving_digits and otherwise", "64 on digits and moving_digits, 128 otherwise",
                 "0.05 on digits with sgd", "144 on digits"):
        assert want in text, want


def test_digits_gets_the_demos_settings_without_training():
    """The settings of robustops demo (the README's table): 30 epochs, lr 0.05, batch size 64, 144
    validation images; other data keeps 10 epochs, the optimizer's lr, batch size 128, 10% validation."""
    a = _parsed("--method", "pgd")
    d = build_parser("demo").parse_args(["demo"])
    assert (a.epochs, a.lr, a.batch_size, a.val_size) == (d.epochs, d.lr, d.batch_size, d.val_size) == \
        (30, 0.05, 64, 144)
    o = _parsed("--data", "cifar10:/nowhere")
    assert (o.epochs, o.lr, o.batch_size, o.val_size) == (10, None, 128, None)
    assert _parsed("--optimizer", "adam").lr is None  # adam keeps its own default (1e-3)


def test_explicit_flags_win():
    a = _parsed("--epochs", "3", "--lr", "0.2", "--batch-size", "32", "--val-size", "0")
    assert (a.epochs, a.lr, a.batch_size, a.val_size) == (3, 0.2, 32, 0)
    o = _parsed("--data", "cifar10:/nowhere", "--epochs", "30", "--batch-size", "64")
    assert (o.epochs, o.batch_size) == (30, 64)


def test_the_digits_defaults_reach_the_run_and_its_summary(tmp_path, monkeypatch, capsys):
    """Without --epochs / --lr / --batch-size / --val-size a digits run trains with the digits
    defaults (fit's settings and the loader's batches) and records them in summary.json; two epochs
    of training stand in for thirty (fit is cut short, the settings checked are the ones it got)."""
    got = {}
    fit = train.fit

    def spy(model, loader, method, **kw):
        got.update(kw, batch=loader.batch_size, n_val=len(kw["val_loader"].dataset))
        return fit(model, loader, method, **{**kw, "epochs": 2})

    monkeypatch.setattr(train, "fit", spy)
    out = tmp_path / "run"
    assert main(["train", "--method", "natural", "--test-steps", "0", "--no-progress", "-o", str(out)]) == 0
    assert (got["epochs"], got["lr"], got["batch"], got["n_val"]) == (30, 0.05, 64, 144)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["batch_size"], summary["val_size"]) == (64, 144)
    assert summary["config"]["lr"] == 0.05
