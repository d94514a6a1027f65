"""A full disk (issue 22, item 11) through the real CLI, in this process with the writes patched: a
certify run whose row writes fail part-way and a training run whose checkpoint write fails each end in
one line naming the file and saying what to do (no traceback, exit 2), keep every finished row or
epoch, and finish with --resume as if nothing had happened."""
import errno
import os

import pytest
import torch

from helpers import digits_checkpoint
from robustops import _runfiles
from robustops.cli import main, rows


class FullDisk:
    """A file object whose writes fail with ENOSPC after `lines` more writes."""

    def __init__(self, fh, lines: int):
        self.fh, self.lines = fh, lines

    def write(self, s):
        if self.lines <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.lines -= 1
        return self.fh.write(s)

    def __getattr__(self, name):
        return getattr(self.fh, name)


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return digits_checkpoint(tmp_path_factory.mktemp("disk"))[0]


def certify(ckpt, out, *extra):
    return main(["certify", "--checkpoint", ckpt, "--sigma", "0.25", "--n0", "10", "--num-samples", "40",
                 "--batch-size", "100", "--skip", "30", "-o", str(out), "--no-progress", *extra])


def rows_of(path):
    return [line.split("\t")[:5] for line in open(path).read().splitlines()]


def test_certify_on_a_full_disk_is_one_line_and_resumes_to_the_same_rows(ckpt, tmp_path, monkeypatch, capsys):
    assert certify(ckpt, tmp_path / "whole.tsv") == 0
    capsys.readouterr()
    init = rows.RowWriter.__init__

    def full_after_four(self, fh, *a, **k):
        init(self, None if fh is None else FullDisk(fh, 4), *a, **k)

    with monkeypatch.context() as m:
        m.setattr(rows.RowWriter, "__init__", full_after_four)
        assert certify(ckpt, tmp_path / "cut.tsv") == 2
    line = one_line(capsys)
    assert "no space left" in line and "cut.tsv" in line and "--resume" in line, line
    assert certify(ckpt, tmp_path / "cut.tsv", "--resume") == 0
    assert rows_of(tmp_path / "cut.tsv") == rows_of(tmp_path / "whole.tsv")


def test_training_on_a_full_disk_keeps_the_last_epoch_and_resumes(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    argv = ["train", "--data", "digits", "--method", "natural", "--epochs", "2", "--batch-size", "256",
            "--out", str(run), "--no-progress"]
    save, calls = torch.save, []

    def torch_save_full_at_epoch_2(obj, f, *a, **k):
        if "last.pt" in str(f):
            calls.append(f)
            if len(calls) == 2:  # what torch raises when its stream writer cannot write
                raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed "
                                   "writing file data/0: file write failed")
        return save(obj, f, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(torch, "save", torch_save_full_at_epoch_2)
        m.setattr(_runfiles, "disk_full", lambda path, margin=1 << 20: True)
        assert main(argv) == 2
    line = one_line(capsys)
    assert "no space left" in line and "last.pt" in line, line
    assert not any(p.name.startswith("last.pt.tmp") for p in run.iterdir())  # no half file left
    assert torch.load(run / "last.pt", weights_only=False)["epoch"] == 1  # the finished epoch is kept
    assert main(argv + ["--resume"]) == 0
    assert torch.load(run / "last.pt", weights_only=False)["epoch"] == 2


def test_atomic_save_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = str(tmp_path / "x.pt")
    _runfiles.atomic_save({"a": torch.ones(2)}, path)

    def failing(obj, f, *a, **k):
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", failing)
    monkeypatch.setattr(_runfiles, "disk_full", lambda path, margin=1 << 20: False)
    with pytest.raises(OSError) as e:
        _runfiles.atomic_save({"a": torch.zeros(2)}, path)
    assert e.value.errno == errno.EIO and e.value.filename == path
    monkeypatch.setattr(_runfiles, "disk_full", lambda path, margin=1 << 20: True)
    with pytest.raises(OSError) as e:
        _runfiles.atomic_save({"a": torch.zeros(2)}, path)
    assert e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert torch.equal(torch.load(path)["a"], torch.ones(2)) and os.listdir(tmp_path) == ["x.pt"]
