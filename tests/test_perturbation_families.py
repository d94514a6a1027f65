"""The generalisation study's data: the digits' known families one at a time (rotation, translation,
scaling, thickness, L-inf), the held-out split, the real-perturbation baseline's dataset, pair_accuracy,
and CIFAR-10-C pairs from a fake local directory written here."""
import os
import pickle

import numpy as np
import pytest
import torch

from robustops import perturbation as P
from robustops.perturbation import families as F


IDENT = {"angle": 0.0, "tx": 0.0, "ty": 0.0, "scale": 1.0, "thickness": 0.0}


def test_all_is_the_original_family():
    a, b = P.DigitsPairs("test", seed=2), P.DigitsPairs("test", seed=2, family="all")
    assert torch.equal(a.pair(range(30))[1], b.pair(range(30))[1]) and a.params(7) == b.params(7)


@pytest.mark.parametrize("family,free", [("rotation", {"angle"}), ("translation", {"tx", "ty"}),
                                         ("scaling", {"scale"}), ("thickness", {"thickness"})])
def test_single_family_draws_only_its_parameters(family, free):
    full, one = P.DigitsPairs("test", seed=1), P.DigitsPairs("test", seed=1, family=family)
    for i in (0, 5, 99):
        p, q = full.params(i), one.params(i)
        for k in IDENT:
            assert q[k] == (p[k] if k in free else IDENT[k]), (family, k)
    # the pair is transform_images at exactly those parameters
    x, xt, _ = one.pair([4])
    p = one.params(4)
    want = P.transform_images(x, *(torch.tensor([p[k]]) for k in one.PARAM_NAMES))
    assert torch.equal(xt, want)


def test_linf_family_uniform_in_the_ball_and_reproducible():
    ds = P.DigitsPairs("train", seed=0, family="linf", linf_eps=0.1)
    x, xt, _ = ds.pair(range(64))
    d = xt - x
    assert d.abs().max() <= 0.1 + 1e-6 and d.abs().max() > 0.09
    inside = (x > 0.1) & (x < 0.9)  # away from the clamp, d is uniform in [-eps, eps]: mean 0, var eps^2/3
    assert abs(float(d[inside].mean())) < 0.005 and abs(float(d[inside].var()) - 0.01 / 3) < 0.0005
    assert torch.equal(ds[3][1], xt[3]) and ds.params(3) == IDENT
    assert not torch.equal(P.DigitsPairs("train", seed=1, family="linf", linf_eps=0.1)[3][1], xt[3])
    with pytest.raises(ValueError, match="linf_eps"):
        P.DigitsPairs("train", family="linf", linf_eps=1.5)


def test_several_families_alternate_per_item():
    ds = P.DigitsPairs("test", seed=0, family=("rotation", "linf"))
    assert [ds.family_of(i) for i in range(4)] == ["rotation", "linf", "rotation", "linf"]
    x, xt, _ = ds.pair([0, 1, 2, 3])
    rot = P.DigitsPairs("test", seed=0, family="rotation")
    assert torch.equal(xt[0], rot[0][1]) and torch.equal(xt[2], rot[2][1])
    assert (xt[1] - x[1]).abs().max() <= 0.2 + 1e-6
    for bad in ("rotate", "", ("rotation", "rotation"), 3):
        with pytest.raises(ValueError, match="family"):
            P.DigitsPairs("test", family=bad)


def test_held_out_split():
    assert P.held_out_split("scaling") == (("rotation", "translation", "thickness"), "scaling")
    assert P.held_out_split("linf", "rotation,translation") == (("rotation", "translation"), "linf")
    with pytest.raises(ValueError, match="all"):
        P.held_out_split("all")
    with pytest.raises(ValueError, match="held_out"):
        P.held_out_split("shear")
    with pytest.raises(ValueError, match="besides"):
        P.held_out_split("rotation", ("rotation",))


def test_perturbed_images_and_pair_accuracy():
    pairs = P.DigitsPairs("test", seed=0, family="translation")
    ds = P.PerturbedImages(pairs)
    assert len(ds) == len(pairs) and torch.equal(ds[5][0], pairs[5][1]) and ds[5][1] == pairs[5][2]
    both = P.PerturbedImages(pairs, include_clean=True)
    assert len(both) == 2 * len(pairs) and torch.equal(both[5][0], pairs[5][0])
    assert torch.equal(both[len(pairs) + 5][0], pairs[5][1])

    class Oracle(torch.nn.Module):  # right on images equal to a clean test image, wrong otherwise
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.x, self.y = pairs.images, pairs.labels

        def forward(self, x):
            hit = (x.flatten(1)[:, None] == self.x.flatten(1)[None]).all(-1).float()
            y = torch.where(hit.any(1), self.y[hit.argmax(1)], 10)  # class 10: no digit's label
            return torch.nn.functional.one_hot(y, 11).float() + 0 * self.w

    acc = P.pair_accuracy(Oracle(), torch.utils.data.Subset(pairs, range(50)), batch_size=16)
    moved = sum(not torch.equal(pairs[i][0], pairs[i][1]) for i in range(50))
    assert acc["clean_acc"] == 1.0 and acc["n"] == 50 and acc["perturbed_acc"] == pytest.approx(1 - moved / 50)


# ------------------------------------------------------------------------------- CIFAR-10-C

N = 3


@pytest.fixture(scope="module")
def fake_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("c10")
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 256, (N, 3, 32, 32), dtype=np.uint8)
    labels = np.array([4, 0, 7], dtype=np.int64)
    cifar = root / "cifar"
    cifar.mkdir()
    with open(cifar / "test_batch", "wb") as f:
        pickle.dump({b"data": clean.reshape(N, -1), b"labels": labels.tolist()}, f)
    cdir = root / "c"
    cdir.mkdir()
    arrays = {}
    for name in ("fog", "gaussian_noise"):
        arrays[name] = rng.integers(0, 256, (5 * N, 32, 32, 3), dtype=np.uint8)
        np.save(cdir / f"{name}.npy", arrays[name])
    np.save(cdir / "labels.npy", np.tile(labels, 5).astype(np.uint8))
    return str(cdir), str(cifar), clean, labels, arrays


def test_cifar_c_pairs_layout(fake_dirs):
    cdir, cifar, clean, labels, arrays = fake_dirs
    ds = P.CifarCPairs(cdir, cifar)
    assert ds.corruptions == ("fog", "gaussian_noise") and len(ds) == 2 * 5 * N
    k = 1 * 5 * N + 2 * N + 1  # gaussian_noise, severity 3, image 1
    assert ds.info(k) == ("gaussian_noise", 3, 1)
    x, xt, y = ds[k]
    assert torch.equal(x, torch.from_numpy(clean[1]).float() / 255) and int(y) == labels[1]
    assert torch.equal(xt, torch.from_numpy(arrays["gaussian_noise"][2 * N + 1]).permute(2, 0, 1).float() / 255)
    one = P.CifarCPairs(cdir, cifar, corruptions=["fog"], severities=[5])
    assert len(one) == N and torch.equal(one[2][1], torch.from_numpy(arrays["fog"][4 * N + 2]).permute(2, 0, 1) / 255.0)
    with pytest.raises(IndexError):
        one[N]


def test_cifar_c_pairs_clear_errors(fake_dirs, tmp_path):
    cdir, cifar, *_ = fake_dirs
    with pytest.raises(FileNotFoundError, match="does not exist"):
        P.CifarCPairs(str(tmp_path / "nope"), cifar)
    with pytest.raises(FileNotFoundError, match="labels.npy"):
        P.CifarCPairs(str(tmp_path), cifar)
    with pytest.raises(FileNotFoundError, match="snow.npy"):
        P.CifarCPairs(cdir, cifar, corruptions=["snow"])
    with pytest.raises(FileNotFoundError, match="CIFAR-10"):
        P.CifarCPairs(cdir, str(tmp_path / "nocifar"))
    with pytest.raises(ValueError, match="severities"):
        P.CifarCPairs(cdir, cifar, severities=[0])
    bad = tmp_path / "bad"
    bad.mkdir()
    np.save(bad / "labels.npy", np.zeros(5 * N, np.uint8))
    np.save(bad / "fog.npy", np.zeros((5 * N, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="test labels"):
        P.CifarCPairs(str(bad), cifar)
    np.save(bad / "labels.npy", np.tile([4, 0, 7], 5).astype(np.uint8))
    np.save(bad / "fog.npy", np.zeros((5 * N, 32, 32), np.uint8))
    with pytest.raises(ValueError, match=r"uint8 \[5 \* N, 32, 32, 3\]"):
        P.CifarCPairs(str(bad), cifar)
    assert os.path.isfile(bad / "fog.npy")
