"""Fault injection for the training side of issue 22: every case fails before its fix.

- checkpoints: a flipped bit in any entry (eps, method, norm, sigma, mean / std, model, model_kwargs,
  config, data, ...) is refused in one line that names the file and the entry; old checkpoints
  (a checksum over the weights only) still load;
- fit stops at the first non-finite loss (NaN data, a diverging run) naming the epoch and the batch,
  and keeps the last good checkpoint;
- refused, not accepted silently: --max-samples 0 / -5, train --eps inf, --sigma 0, a NaN mean in
  ops.gaussian_noise, a text file named .npz;
- one line, not a traceback: --device cuda without a GPU, a CVAE checkpoint given as --checkpoint.
"""
import os
import struct
import subprocess
import sys

import pytest
import torch

from helpers import assert_one_line_error, subprocess_env, train_digits_model
from robustops.models import load_model, save_checkpoint, verify_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def robustops(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "robustops"] + [str(a) for a in args], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------ item 2: checksums over every entry

def flip(v):
    """v with one bit flipped in its first leaf (a float's lowest exponent bit: 0.2 -> 0.4)."""
    if isinstance(v, bool):
        return not v
    if isinstance(v, float):
        return struct.unpack("<d", struct.pack("<Q", struct.unpack("<Q", struct.pack("<d", v))[0] ^ (1 << 52)))[0]
    if isinstance(v, int):
        return v ^ 1
    if isinstance(v, str):
        return chr(ord(v[0]) ^ 1) + v[1:] if v else "\x01"
    if v is None:
        return 0
    if isinstance(v, torch.Tensor):
        t = v.clone().contiguous()
        if t.numel() == 0:
            return torch.zeros(1, dtype=t.dtype)
        b = t.reshape(-1).view(torch.uint8)
        b[0] ^= 1
        return t
    if isinstance(v, dict):
        if not v:
            return {"x": 1}
        k = sorted(v, key=str)[0]
        return {**v, k: flip(v[k])}
    if isinstance(v, (list, tuple)):
        if not v:
            return type(v)([0])
        return type(v)([flip(v[0])] + list(v[1:]))
    raise TypeError(type(v))


@pytest.fixture(scope="module")
def pgd_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    return save_checkpoint(str(d / "pgd.pt"), train_digits_model(epochs=2, seed=0), "small_cnn",
                           {"num_classes": 10, "in_channels": 1, "input_size": 8},
                           method="pgd", eps=0.2, norm="linf", sigma=None, data="digits")


def test_eps_flipped_from_0_2_to_0_4_is_refused_by_the_cli(pgd_ckpt, tmp_path):
    ck = torch.load(pgd_ckpt, weights_only=True)
    assert flip(ck["eps"]) == 0.4
    bad = tmp_path / "eps.pt"
    torch.save({**ck, "eps": flip(ck["eps"])}, bad)
    p = robustops("attack", "--checkpoint", bad, "--steps", "1", "--max-samples", "8", "--no-progress")
    assert_one_line_error(p, str(bad), "'eps'", "corrupt")


def _assert_every_entry_is_covered(path, tmp_path, expect):
    ck = torch.load(path, weights_only=True)
    verify_checkpoint(ck, path)
    covered = [k for k in ck if k not in ("state_dict", "sha256", "train_state_dict", "train_sha256",
                                          "entries_sha256")]
    assert set(expect) <= set(covered), covered
    for k in covered + ["entries_sha256"]:
        bad = str(tmp_path / f"bad_{k}.pt")
        torch.save({**ck, k: flip(ck[k])}, bad)
        with pytest.raises(ValueError) as e:
            verify_checkpoint(torch.load(bad, weights_only=True), bad)
        msg = str(e.value)
        assert "\n" not in msg and bad in msg and "corrupt" in msg
        if k != "entries_sha256":
            assert repr(k) in msg, (k, msg)
    gone = str(tmp_path / "gone.pt")
    torch.save({kk: v for kk, v in ck.items() if kk != "eps"}, gone)
    with pytest.raises(ValueError, match="'eps' entry is missing"):
        verify_checkpoint(torch.load(gone, weights_only=True), gone)


def test_bit_flips_in_every_entry_of_save_checkpoint_are_refused(pgd_ckpt, tmp_path):
    _assert_every_entry_is_covered(pgd_ckpt, tmp_path, ["model", "model_kwargs", "method", "eps", "norm", "sigma",
                                                        "data"])
    ck = torch.load(pgd_ckpt, weights_only=True)
    bad = str(tmp_path / "size.pt")  # input_size 8 -> 9 builds a model the weights fit
    torch.save({**ck, "model_kwargs": {**ck["model_kwargs"], "input_size": 9}}, bad)
    with pytest.raises(ValueError, match="'model_kwargs' entry does not match"):
        load_model(bad)


def test_bit_flips_in_every_entry_of_a_training_run_are_refused(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    from robustops import train
    from robustops.data import load_digits

    x, y = load_digits("train").tensors
    loader = DataLoader(TensorDataset(x[:128], y[:128]), batch_size=64, shuffle=True)
    val = DataLoader(TensorDataset(x[128:192], y[128:192]), batch_size=64)
    torch.manual_seed(0)
    model = train_digits_model(epochs=1, seed=0, cache=False).train()
    out = str(tmp_path / "run")
    train.fit(model, loader, "pgd", val_loader=val, out_dir=out, epochs=1, eps=0.2, steps=2, val_steps=2,
              progress=False, verbose=False, model_name="small_cnn", mean=[0.5], std=[0.25],
              extra={"data": "digits"})
    for name in ("last.pt", "best.pt"):
        _assert_every_entry_is_covered(os.path.join(out, name), tmp_path,
                                       ["method", "eps", "norm", "sigma", "mean", "std", "config", "data", "model",
                                        "model_kwargs"])


def test_checkpoints_with_a_checksum_over_the_weights_only_still_load(pgd_ckpt, tmp_path):
    ck = torch.load(pgd_ckpt, weights_only=True)
    old = tmp_path / "old.pt"
    torch.save({k: v for k, v in ck.items() if k != "entries_sha256"}, old)
    load_model(str(old))
    p = robustops("attack", "--checkpoint", old, "--steps", "1", "--max-samples", "8", "--no-progress")
    assert p.returncode == 0, p.stderr


def test_perturbation_checkpoint_entries_are_covered(tmp_path):
    from robustops.perturbation import CVAE, load_perturbation_model, save_perturbation_model

    torch.manual_seed(0)
    path = save_perturbation_model(str(tmp_path / "cvae.pt"), CVAE(in_channels=1, input_size=8, latent_dim=4),
                                   eps=1.5)
    load_perturbation_model(path)
    ck = torch.load(path, weights_only=True)
    bad = str(tmp_path / "cvae_eps.pt")
    torch.save({**ck, "eps": flip(ck["eps"])}, bad)
    with pytest.raises(ValueError, match="'eps' entry"):
        load_perturbation_model(bad)


# ------------------------------------------------------------------ item 4: NaN data / a diverging run

class _PoisonedLoader:
    """Fixed batches of digits (not shuffled); from epoch ``bad_epoch`` on, batch ``bad_batch`` holds a NaN."""

    def __init__(self, bad_epoch, bad_batch, n_batches=4, bs=32):
        from robustops.data import load_digits

        x, y = load_digits("train").tensors
        self.batches = [(x[i * bs:(i + 1) * bs], y[i * bs:(i + 1) * bs]) for i in range(n_batches)]
        self.bad_epoch, self.bad_batch, self.epoch = bad_epoch, bad_batch, 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        self.epoch += 1
        for i, (x, y) in enumerate(self.batches):
            if self.epoch >= self.bad_epoch and i == self.bad_batch:
                x = x.clone()
                x[0, 0, 0, 0] = float("nan")
            yield x, y


@pytest.mark.parametrize("method,progress", [("natural", False), ("pgd", True), ("gaussian", False)])
def test_fit_stops_at_the_first_non_finite_loss_and_keeps_the_last_good_checkpoint(tmp_path, method, progress):
    from robustops import train
    from robustops.models import SmallCNN

    torch.manual_seed(0)
    model = SmallCNN()
    out = str(tmp_path / "run")
    with pytest.raises(train.NonFiniteLoss) as e:
        train.fit(model, _PoisonedLoader(bad_epoch=2, bad_batch=2), method, out_dir=out, epochs=3, eps=0.2, steps=2,
                  progress=progress, verbose=False, model_name="small_cnn")
    msg = str(e.value)
    assert "\n" not in msg and "epoch 2, batch 3 of 4" in msg and "last.pt keeps epoch 1" in msg, msg
    ck = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert ck["epoch"] == 1
    assert all(bool(torch.isfinite(v).all()) for v in ck["state_dict"].values() if v.is_floating_point())


def test_fit_on_nan_data_fails_in_the_first_batch():
    from robustops import train
    from robustops.models import SmallCNN

    with pytest.raises(ValueError, match="epoch 1, batch 1 of 4; no checkpoint was written"):
        train.fit(SmallCNN(), _PoisonedLoader(bad_epoch=1, bad_batch=0), "natural", epochs=2, progress=False,
                  verbose=False)


# ------------------------------------------------------------------ item 12: nothing accepted silently

@pytest.mark.parametrize("args,words", [
    (["attack", "--max-samples", "0"], ["--max-samples", ">= 1", "got 0"]),
    (["attack", "--max-samples", "-5"], ["--max-samples", ">= 1", "got -5"]),
    (["certify", "--max-samples", "0", "--sigma", "0.25"], ["--max-samples", "got 0"]),
    (["certify", "--max-samples", "-5", "--sigma", "0.25"], ["--max-samples", "got -5"]),
    (["predict", "--max-samples", "0", "--sigma", "0.25"], ["--max-samples", "got 0"]),
])
def test_max_samples_below_one_is_refused(pgd_ckpt, tmp_path, args, words):
    out = tmp_path / "out.tsv"
    flag = "--out" if args[0] == "attack" else "-o"
    p = robustops(*args, "--checkpoint", pgd_ckpt, flag, out, "--no-progress")
    assert_one_line_error(p, *words)
    assert not out.exists()


@pytest.mark.parametrize("args,words", [
    (["--eps", "inf"], ["eps", "finite"]),
    (["--eps", "nan"], ["eps", "finite"]),
    (["--method", "gaussian", "--sigma", "0"], ["sigma", "> 0"]),
    (["--method", "consistency", "--sigma", "0"], ["sigma", "> 0"]),
])
def test_train_refuses_meaningless_budgets(tmp_path, args, words):
    p = robustops("train", *args, "--epochs", "1", "--out", tmp_path / "run", "--no-progress")
    assert_one_line_error(p, *words)
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.parametrize("kw", [dict(mean=float("nan")), dict(mean=[float("inf")]), dict(std=float("nan"))])
def test_gaussian_noise_refuses_non_finite_normalisation(kw):
    import robustops as ro

    kw = {"mean": 0.5, "std": 0.25, **kw}
    with pytest.raises(ValueError, match="must be finite"):
        ro.gaussian_noise(torch.zeros(2, 1, 4, 4), num=2, sigma=0.25, seed=0, **kw)


def test_a_text_file_named_npz_is_not_called_pickled_data(tmp_path):
    fake = tmp_path / "data.npz"
    fake.write_text("x,y\n0.1,3\n")
    p = robustops("train", "--data", fake, "--epochs", "1", "--out", tmp_path / "run", "--no-progress")
    line = assert_one_line_error(p, str(fake), "not a .npz file", "numpy.savez")
    assert "pickle" not in line


# ------------------------------------------------------------------ item 11: one line, not a traceback

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
@pytest.mark.parametrize("command", ["attack", "certify", "train"])
def test_device_cuda_without_a_gpu_is_one_line(pgd_ckpt, tmp_path, command):
    args = {"attack": ["--checkpoint", pgd_ckpt, "--max-samples", "4", "--out", tmp_path / "a.tsv"],
            "certify": ["--checkpoint", pgd_ckpt, "--sigma", "0.25", "-o", tmp_path / "c.tsv"],
            "train": ["--epochs", "1", "--out", tmp_path / "run"]}[command]
    p = robustops(command, *args, "--device", "cuda", "--no-progress")
    assert_one_line_error(p, "--device cuda", "no CUDA GPU", "--device cpu")


@pytest.mark.parametrize("command", ["attack", "certify"])
def test_a_perturbation_model_given_as_checkpoint_is_one_line(tmp_path, command):
    from robustops.perturbation import CVAE, save_perturbation_model

    cvae = save_perturbation_model(str(tmp_path / "cvae.pt"), CVAE(in_channels=1, input_size=8, latent_dim=4),
                                   eps=1.5)
    extra = ["--sigma", "0.25", "-o", tmp_path / "c.tsv"] if command == "certify" else ["--max-samples", "4"]
    p = robustops(command, "--checkpoint", cvae, *extra, "--no-progress")
    assert_one_line_error(p, "--checkpoint", cvae, "perturbation-model", "--perturbation-model")
