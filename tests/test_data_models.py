"""robustops.data (embedded digits, .npz, CIFAR-10, image folders, get_dataset, shard) and
robustops.models (architectures, get_model, checkpoints, load_model)."""
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn

from robustops import data as D
from robustops import models as M

# ---------------------------------------------------------------------------------------- digits


def test_digits_split_is_fixed_and_disjoint():
    tr, te = D.load_digits("train"), D.load_digits("test")
    xtr, ytr = tr.tensors
    xte, yte = te.tensors
    assert xtr.shape == (1437, 1, 8, 8) and xte.shape == (360, 1, 8, 8)
    assert xtr.dtype == torch.float32 and ytr.dtype == torch.int64
    assert float(xtr.min()) == 0.0 and float(xtr.max()) == 1.0
    assert set(ytr.tolist()) == set(range(10))
    with np.load(D.DIGITS_PATH) as f:
        images, labels = f["images"], f["labels"]
    perm = np.random.default_rng(0).permutation(1797)
    assert torch.equal(xtr, torch.from_numpy(images[perm[:1437]] / 16.0).float().unsqueeze(1))
    assert torch.equal(yte, torch.from_numpy(labels[perm[1437:]]))
    assert torch.equal(D.load_digits("test").tensors[0], xte)  # deterministic
    allx = D.load_digits("all").tensors[0]
    assert allx.shape[0] == 1797
    with pytest.raises(ValueError, match="split must be one of"):
        D.load_digits("validation")


# ------------------------------------------------------------------------------------------- npz

def test_load_npz_layouts_and_splits(tmp_path):
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, (6, 5, 4, 3), dtype=np.uint8)
    p = tmp_path / "a.npz"
    np.savez(p, x=nhwc, y=np.arange(6))
    x, y = D.load_npz(str(p)).tensors
    assert x.shape == (6, 3, 5, 4) and x.dtype == torch.float32
    assert torch.equal(x, torch.from_numpy(nhwc).permute(0, 3, 1, 2).float() / 255)
    assert y.dtype == torch.int64
    gray = rng.random((4, 7, 7)).astype(np.float32)
    p2 = tmp_path / "b.npz"
    np.savez(p2, x_train=gray, y_train=np.zeros(4), x_test=gray[:2], y_test=np.ones(2))
    xt, yt = D.load_npz(str(p2), "test").tensors
    assert xt.shape == (2, 1, 7, 7) and yt.tolist() == [1, 1]
    assert torch.equal(xt, torch.from_numpy(gray[:2]).unsqueeze(1))
    assert D.load_npz(str(p2), "train").tensors[0].shape[0] == 4
    p3 = tmp_path / "c.npz"
    np.savez(p3, images=rng.integers(0, 256, (3, 1, 4, 4), dtype=np.uint8), labels=np.array([0, 1, 2]))
    assert D.load_npz(str(p3), "test").tensors[0].shape == (3, 1, 4, 4)  # no split arrays: used whole
    with pytest.raises(KeyError, match="x/y or images/labels"):
        D.load_npz(str(p2))  # split arrays only, and no split asked for
    p4 = tmp_path / "d.npz"
    np.savez(p4, x=nhwc, y=np.arange(5))
    with pytest.raises(ValueError, match="one label per image"):
        D.load_npz(str(p4))
    with pytest.raises(FileNotFoundError):
        D.load_npz(str(tmp_path / "missing.npz"))


# ------------------------------------------------------------------------------------- CIFAR-10

def _write_cifar(d, names, n=4):
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(1)
    for name in names:
        with open(os.path.join(d, name), "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"labels": list(rng.integers(0, 10, n))}, f)


def test_load_cifar10(tmp_path):
    root = tmp_path / "cifar"
    _write_cifar(root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"])
    tr = D.load_cifar10(str(root), "train")
    te = D.load_cifar10(str(root), "test")
    assert len(tr) == 20 and len(te) == 4
    x, y = te.tensors
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1
    with open(root / "cifar-10-batches-py" / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert torch.equal(x, torch.from_numpy(raw[b"data"].reshape(-1, 3, 32, 32)).float() / 255)
    assert y.tolist() == [int(v) for v in raw[b"labels"]]
    # directly in root as well
    flat = tmp_path / "flat"
    _write_cifar(flat, ["test_batch"])
    assert len(D.load_cifar10(str(flat), "test")) == 4
    with pytest.raises(FileNotFoundError, match="data_batch_1.*cifar-10-batches-py"):
        D.load_cifar10(str(flat), "train")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.load_cifar10(str(tmp_path / "nowhere"), "test")


# ---------------------------------------------------------------------------------- image folder

def _write_folder(root, classes=("cat", "dog"), n=3, size=(10, 12)):
    from PIL import Image

    rng = np.random.default_rng(2)
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(os.path.join(root, c, f"{i}.png"))


def test_load_image_folder(tmp_path):
    _write_folder(tmp_path / "f" / "train")
    _write_folder(tmp_path / "f" / "val", n=2)
    tr = D.load_image_folder(str(tmp_path / "f"), "train")
    te = D.load_image_folder(str(tmp_path / "f"), "test")  # finds val/
    assert len(tr) == 6 and len(te) == 4 and tr.classes == ["cat", "dog"]
    x, y = tr[4]
    assert x.shape == (3, 10, 12) and x.dtype == torch.float32 and y.item() == 1
    rs = D.load_image_folder(str(tmp_path / "f"), "train", size=8)
    assert rs[0][0].shape == (3, 8, 8)
    whole = D.load_image_folder(str(tmp_path / "f" / "train"))
    assert len(whole) == 6
    batch = next(iter(torch.utils.data.DataLoader(tr, batch_size=6)))
    assert batch[0].shape == (6, 3, 10, 12)
    with pytest.raises(FileNotFoundError):
        D.load_image_folder(str(tmp_path / "empty"))


# ------------------------------------------------------------------------------------ get_dataset

def test_get_dataset_specs(tmp_path):
    ds, info = D.get_dataset("digits", "test")
    assert len(ds) == 360 and info["num_classes"] == 10 and info["input_shape"] == (1, 8, 8)
    assert info["name"] == "digits"
    p = tmp_path / "m.npz"
    rng = np.random.default_rng(0)
    np.savez(p, x_train=rng.integers(0, 256, (8, 6, 6, 3), dtype=np.uint8), y_train=np.arange(8) % 5,
             x_test=rng.integers(0, 256, (3, 6, 6, 3), dtype=np.uint8), y_test=np.array([0, 1, 2]))
    ds, info = D.get_dataset(str(p), "test")
    assert len(ds) == 3 and info["num_classes"] == 5 and info["input_shape"] == (3, 6, 6)
    assert len(info["mean"]) == 3 and all(isinstance(v, float) for v in info["mean"] + info["std"])
    ds2, info2 = D.get_dataset("npz:" + str(p), "train")
    assert len(ds2) == 8 and info2["mean"] == info["mean"]  # statistics from the training arrays
    _write_cifar(tmp_path / "c", ["test_batch"])
    for spec in (str(tmp_path / "c"), "cifar10:" + str(tmp_path / "c")):
        ds, info = D.get_dataset(spec, "test")
        assert len(ds) == 4 and info["name"] == "cifar10" and info["mean"] == D.CIFAR10_MEAN
    _write_folder(tmp_path / "imgs")
    ds, info = D.get_dataset("imagefolder:" + str(tmp_path / "imgs") + ":16", "test")
    assert info["num_classes"] == 2 and info["input_shape"] == (3, 16, 16) and len(info["std"]) == 3
    ds, info = D.get_dataset(str(tmp_path / "imgs"), "test")
    assert info["input_shape"] == (3, 10, 12)
    with pytest.raises(FileNotFoundError, match="unknown dataset"):
        D.get_dataset(str(tmp_path / "nothing-here"), "test")


# ------------------------------------------------------------------------------------------ shard

@pytest.mark.parametrize("world", [1, 2, 3])
def test_shard_covers_everything_once(world):
    ds = D.load_digits("test")
    parts = [D.shard(ds, r, world) for r in range(world)]
    idx = sorted(i for p in parts for i in p.indices)
    assert idx == list(range(len(ds)))
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
    x, y = parts[-1][0]
    assert torch.equal(x, ds[parts[-1].indices[0]][0])
    indexed = D.IndexedDataset(parts[-1])
    assert int(indexed[1][2]) == parts[-1].indices[1]
    assert D.shard(10, 1, 4) == [1, 5, 9]
    assert torch.equal(D.shard(torch.arange(7), 0, 3), torch.tensor([0, 3, 6]))
    sub = torch.utils.data.Subset(ds, list(range(100, 110)))
    assert D.shard(sub, 1, 2).indices == [101, 103, 105, 107, 109]
    with pytest.raises(ValueError, match="rank must be"):
        D.shard(ds, world, world)
    with pytest.raises(ValueError, match="world_size must be"):
        D.shard(ds, 0, 0)


# ----------------------------------------------------------------------------------------- models

@pytest.mark.parametrize("name,shape,params", [
    ("small_cnn", (2, 1, 8, 8), None),
    ("preact_resnet18", (2, 3, 32, 32), (11.1e6, 11.3e6)),
    ("resnet20", (2, 3, 32, 32), (0.26e6, 0.28e6)),
    ("resnet110", (2, 3, 8, 8), (1.7e6, 1.75e6)),
])
def test_models_forward_and_size(name, shape, params):
    torch.manual_seed(0)
    m = M.get_model(name).eval()
    with torch.no_grad():
        out = m(torch.rand(shape))
    assert out.shape == (2, 10)
    if params:
        n = sum(p.numel() for p in m.parameters())
        assert params[0] <= n <= params[1]


def test_model_options():
    assert M.get_model("small_cnn", input_size=28)(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    small = M.get_model("small_cnn", in_channels=3, num_classes=5, input_size=32)
    assert small(torch.rand(1, 3, 32, 32)).shape == (1, 5)
    assert M.get_model("resnet20", in_channels=1, num_classes=4)(torch.rand(2, 1, 8, 8)).shape == (2, 4)
    assert M.PreActResNet18(num_classes=7, in_channels=1)(torch.rand(2, 1, 32, 32)).shape == (2, 7)
    assert M.cifar_resnet(32).depth == 32
    with pytest.raises(ValueError, match="6n\\+2"):
        M.cifar_resnet(21)
    with pytest.raises(ValueError, match="unknown model 'vgg16'.*small_cnn"):
        M.get_model("vgg16")
    with pytest.raises(ValueError, match="6n\\+2"):
        M.get_model("resnet21")
    wrapped = M.get_model("small_cnn", mean=(0.5,), std=(0.25,))
    assert isinstance(wrapped[0], M.Normalize)
    x = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(wrapped[0](x), (x - 0.5) / 0.25)
    with pytest.raises(ValueError, match="std must be > 0"):
        M.Normalize((0.1,), (0.0,))


# ------------------------------------------------------------------------------------ checkpoints

@pytest.fixture
def small():
    torch.manual_seed(0)
    return M.get_model("small_cnn", mean=(0.1,), std=(0.3,)).eval()


def test_checkpoint_round_trip(small, tmp_path):
    x = torch.rand(4, 1, 8, 8)
    path = M.save_checkpoint(str(tmp_path / "sub" / "c.pt"), small, "small_cnn",
                             {"mean": (0.1,), "std": torch.tensor([0.3])}, epoch=5, metrics={"acc": 0.9})
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["model"] == "small_cnn" and ckpt["epoch"] == 5 and ckpt["metrics"] == {"acc": 0.9}
    assert set(ckpt) >= {"model", "model_kwargs", "state_dict"}
    m = M.load_model(path)
    assert not m.training
    torch.testing.assert_close(m(x), small(x))
    with pytest.raises(ValueError, match="holds a 'small_cnn' model"):
        M.load_model(path, name="resnet20")
    with pytest.raises(ValueError, match="reserved"):
        M.save_checkpoint(str(tmp_path / "x.pt"), small, "small_cnn", {}, state_dict=1)


def test_load_raw_state_dict_and_wrappers(tmp_path):
    torch.manual_seed(0)
    m = M.get_model("resnet20").eval()
    x = torch.rand(2, 3, 16, 16)
    raw = str(tmp_path / "raw.pt")
    torch.save(m.state_dict(), raw)
    with pytest.raises(ValueError, match="raw state dict.*name"):
        M.load_model(raw)
    torch.testing.assert_close(M.load_model(raw, name="resnet20")(x), m(x))
    # DDP-style "module." prefixes and {"state_dict": ...} are understood
    torch.save({"state_dict": {"module." + k: v for k, v in m.state_dict().items()}}, raw)
    torch.testing.assert_close(M.load_model(raw, name="resnet20")(x), m(x))
    with pytest.raises(ValueError, match="do not fit"):
        M.load_model(raw, name="resnet110")
    with pytest.raises(ValueError, match="unknown model"):
        M.load_model(raw, name="nope")
    bad = str(tmp_path / "bad.pt")
    torch.save({"model": "vgg", "model_kwargs": {}, "state_dict": m.state_dict()}, bad)
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        M.load_model(bad)
    # a compiled model's state dict saves cleanly
    path = M.save_checkpoint(str(tmp_path / "c.pt"), nn.parallel.DataParallel(m), "resnet20", {})
    assert not any(k.startswith("module.") for k in torch.load(path, weights_only=True)["state_dict"])
    with pytest.raises(FileNotFoundError):
        M.load_model(str(tmp_path / "missing.pt"))


def test_load_torchscript_and_export(small, tmp_path):
    x = torch.rand(2, 1, 8, 8)
    ts = str(tmp_path / "m.ts.pt")
    torch.jit.save(torch.jit.script(small), ts)
    torch.testing.assert_close(M.load_model(ts)(x), small(x))
    ep = str(tmp_path / "m.pt2")
    torch.export.save(torch.export.export(small, (x,)), ep)
    torch.testing.assert_close(M.load_model(ep)(x), small(x))


def test_import_refuses_a_library_built_for_another_torch():
    """robustops checks at import that its compiled library matches the running torch (and CUDA
    major version), and says how to rebuild."""
    import robustops

    info = robustops.build_info()
    robustops._check_versions(info)  # the library loaded here matches
    with pytest.raises(ImportError, match=r"(?s)built against torch 1\.0\.0.*pip install --no-build-isolation -e \."):
        robustops._check_versions(dict(info, torch_version="1.0.0"))
    if torch.version.cuda:
        with pytest.raises(ImportError, match="compiled with CUDA 99.0"):
            robustops._check_versions(dict(info, cuda=True, cuda_version="99.0"))


def test_normalize_refuses_inputs_with_other_channel_counts():
    from robustops.models import Normalize

    norm = Normalize([0.4, 0.5, 0.6], [0.2, 0.2, 0.2])
    assert norm(torch.rand(2, 3, 4, 4)).shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"expected inputs \[B, 3, \.\.\.\].*\[2, 1, 4, 4\]"):
        norm(torch.rand(2, 1, 4, 4))  # would broadcast to 3 identical channels
    assert Normalize(0.5, 0.25)(torch.rand(2, 1, 4, 4)).shape == (2, 1, 4, 4)  # one value: any channel count
