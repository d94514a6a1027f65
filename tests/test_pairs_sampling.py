"""Training pairs sampled as the reference code samples them: DigitsPairs' fresh perturbations per
(seed, epoch, index), CropFlipPairs' joint crop / flip of both images, fit_perturbation setting the epoch,
and exact resume with both."""
import numpy as np
import pytest
import torch
from helpers import one_thread  # noqa: F401 (an autouse fixture)
from torch.utils.data import DataLoader, Dataset, Subset

from robustops import perturbation as P


def test_fresh_digit_pairs_are_deterministic_per_seed_epoch_and_index():
    a, b = P.DigitsPairs("train", seed=5), P.DigitsPairs("train", seed=5)
    fixed = P.DigitsPairs("train", seed=5, fresh=False)
    idx = [0, 7, 300]
    x0, xt0, _ = a.pair(idx)
    assert torch.equal(xt0, fixed.pair(idx)[1])  # epoch 0 (no set_epoch): the fixed pair of each index
    draws = {}
    for epoch in (1, 2):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        fixed.set_epoch(epoch)
        x, xt, _ = a.pair(idx)
        assert torch.equal(x, x0)  # the clean images do not change
        assert torch.equal(xt, b.pair(idx)[1])  # same (seed, epoch, index): the same pair, in any instance
        assert torch.equal(xt, torch.stack([a[i][1] for i in idx]))  # item by item as in a batch
        assert torch.equal(fixed.pair(idx)[1], xt0)  # fresh=False ignores the epoch
        draws[epoch] = [a.params(i) for i in idx]
    for p1, p2 in zip(draws[1], draws[2]):
        assert all(p1[k] != p2[k] for k in p1)  # new parameters every epoch
    other = P.DigitsPairs("train", seed=6)
    other.set_epoch(2)
    assert not torch.equal(other.pair(idx)[1], a.pair(idx)[1])
    with pytest.raises(ValueError, match="epoch must be an int >= 0"):
        a.set_epoch(-1)
    with pytest.raises(TypeError, match="fresh must be a bool"):
        P.DigitsPairs("train", fresh="yes")


class Scaled(Dataset):
    """Pairs (x, 2 x, y) of random non-symmetric images: a joint transform keeps x_tilde = 2 x exactly."""

    def __init__(self, n=16, shape=(3, 6, 6)):
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand((n,) + shape, generator=g) * 0.5
        self.epochs = []

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], 2 * self.x[i], i

    def set_epoch(self, e):
        self.epochs.append(e)


def reference_crop_flip(img, top, left, flip, pad):
    """numpy: zero pad, slice, mirror the last axis."""
    a = np.pad(img.numpy(), ((0, 0), (pad, pad), (pad, pad)))
    a = a[:, top:top + img.shape[1], left:left + img.shape[2]]
    return torch.from_numpy(np.ascontiguousarray(a[:, :, ::-1] if flip else a))


def test_joint_crop_flip_is_identical_on_both_images():
    inner = Scaled()
    ds = P.CropFlipPairs(inner, padding=2, seed=1)
    seen = set()
    for epoch in (0, 1, 2):
        if epoch:
            ds.set_epoch(epoch)
            assert inner.epochs[-1] == epoch  # forwarded to the inner pairs
        for i in range(len(ds)):
            x, xt, label = ds[i]
            assert label == i and x.shape == inner.x[i].shape
            assert torch.equal(xt, 2 * x)  # the same crop and flip on both images
            top, left, flip = ds.params(i)
            assert torch.equal(x, reference_crop_flip(inner.x[i], top, left, flip, 2))
            seen.add((top, left, flip))
    assert len(seen) > 10 and {f for _, _, f in seen} == {True, False}
    ds.set_epoch(1)
    again = P.CropFlipPairs(Scaled(), padding=2, seed=1)
    again.set_epoch(1)
    assert all(torch.equal(ds[i][0], again[i][0]) for i in range(len(ds)))  # deterministic per (seed, epoch, index)
    no_flip = P.CropFlipPairs(inner, padding=0, flip=False)
    assert all(torch.equal(no_flip[i][0], inner.x[i]) for i in range(len(ds)))
    with pytest.raises(ValueError, match="padding must be an int >= 0"):
        P.CropFlipPairs(inner, padding=-1)


@pytest.mark.parametrize("crop", [False, True])
def test_fit_perturbation_resumes_exactly_with_fresh_pairs(tmp_path, crop):
    """fit_perturbation sets the epoch of its pairs (through a Subset), and a run stopped after epoch 1 and
    resumed ends with the weights of an uninterrupted one."""
    def run(out, stop_after=None, resume=False):
        pairs = P.DigitsPairs("train", seed=2)
        pairs.epochs_set = []
        set_epoch = pairs.set_epoch
        pairs.set_epoch = lambda e: (pairs.epochs_set.append(e), set_epoch(e))
        ds = Subset(P.CropFlipPairs(pairs, padding=1, seed=3) if crop else pairs, list(range(96)))
        torch.manual_seed(0)
        model = P.CVAE(1, 8, latent_dim=2, width=4)
        P.fit_perturbation(model, DataLoader(ds, batch_size=32, shuffle=True), epochs=2, seed=0, progress=False,
                           out_dir=str(out), stop_after=stop_after, resume=resume)
        return model, pairs

    full, pairs = run(tmp_path / "full")
    # each epoch's pairs while training, then back to epoch 0 (what choose_eps / quality read next)
    assert pairs.epochs_set == [1, 2, 0] and pairs.epoch == 0
    run(tmp_path / "run", stop_after=1)
    resumed, _ = run(tmp_path / "run", resume=True)
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_cli_refuses_a_negative_crop_padding(tmp_path, capsys):
    from robustops.cli import main

    assert main(["perturbation", "train", "-o", str(tmp_path / "p"), "--crop-flip", "-1", "--no-progress"]) == 2
    assert "--crop-flip must be >= 0" in capsys.readouterr().err


def test_fit_perturbation_refuses_a_resume_with_other_data_settings(tmp_path):
    ds = torch.utils.data.TensorDataset(torch.rand(16, 1, 8, 8), torch.rand(16, 1, 8, 8))

    def fit(settings, **kw):
        torch.manual_seed(0)
        P.fit_perturbation(P.CVAE(1, 8, latent_dim=2, width=4), DataLoader(ds, batch_size=8), epochs=2, seed=0,
                           progress=False, out_dir=str(tmp_path), data_settings=settings, **kw)

    fit({"pairs": "fixed"}, stop_after=1)
    with pytest.raises(ValueError, match=r"different settings: pairs='fixed' \(now 'fresh'\)"):
        fit({"pairs": "fresh"}, resume=True)
    with pytest.raises(ValueError, match=r"pairs='fixed' \(now None\)"):
        fit({"pairs": None}, resume=True)
    fit({"pairs": "fixed"}, resume=True)
    with pytest.raises(ValueError, match="must not reuse fit_perturbation's own setting names"):
        fit({"lr": 1.0})
    with pytest.raises(TypeError, match="data_settings must be a mapping"):
        fit(["pairs"])


def test_fit_perturbation_refuses_persistent_workers_with_pairs_drawn_per_epoch():
    fresh = Subset(P.DigitsPairs("train", seed=2), list(range(16)))
    assert P.pairs_per_epoch(fresh) and not P.pairs_per_epoch(P.DigitsPairs("train", seed=2, fresh=False))
    assert P.pairs_per_epoch(P.CropFlipPairs(P.DigitsPairs("train", seed=2, fresh=False), padding=1, seed=3))
    loader = DataLoader(fresh, batch_size=8, num_workers=1, persistent_workers=True)
    with pytest.raises(ValueError, match="persistent_workers"):  # refused before a worker starts
        P.fit_perturbation(P.CVAE(1, 8, latent_dim=2, width=4), loader, epochs=1, seed=0, progress=False)
