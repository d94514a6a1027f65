"""robustops.proxy: the mixed real / generated loader (exact ratio, sampling without replacement,
determinism by (seed, epoch), DDP shards), generated-data files, the PCA-GMM generator, the robust
discrimination score, and `robustops generate`."""
import json
import os

import numpy as np
import pytest
import torch

import robustops as ro
from robustops import proxy as P
from robustops.train import discrimination as D


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tagged(n, offset=0, shape=(1, 4, 4), classes=10):
    """Images whose pixels all equal a unique tag (offset + i + 1) / 10000, so a batch names its samples."""
    tags = (torch.arange(n, dtype=torch.float32) + offset + 1) / 10000
    x = tags.view(n, *([1] * len(shape))).expand(n, *shape).contiguous()
    return x, torch.arange(n) % classes


def ids(x):
    return (x.reshape(x.shape[0], -1)[:, 0] * 10000).round().long() - 1


def batches(loader):
    return [tuple(t.clone() for t in b) for b in loader]


# ------------------------------------------------------------------------------------- ratio

@pytest.mark.parametrize("B,ratio,want", [(10, 0.7, (3, 7)), (15, 0.7, (4, 11)), (8, 0.5, (4, 4)),
                                          (4, 0.125, (3, 1)), (7, 0.0, (7, 0)), (3, 0.5, (1, 2))])
def test_split_counts_rounds_half_up(B, ratio, want):
    assert P.split_counts(B, ratio) == want


@pytest.mark.parametrize("B,ratio,match", [(10, 1.0, "ratio"), (10, -0.1, "ratio"), (4, 0.1, "no generated"),
                                           (2, 0.9, "no real"), (0, 0.5, "batch_size")])
def test_split_counts_rejects(B, ratio, match):
    with pytest.raises(ValueError, match=match):
        P.split_counts(B, ratio)


def test_every_batch_has_the_exact_ratio():
    real, gen = tagged(100), tagged(300, offset=1000)
    loader = P.MixedLoader(real, gen, batch_size=15, ratio=0.7, seed=3, return_source=True)
    assert len(loader) == 100 // 4
    got = batches(loader)
    assert len(got) == len(loader)
    for x, y, src in got:
        assert x.shape == (15, 1, 4, 4) and y.shape == (15,)
        assert int(src.sum()) == 11
        k = ids(x)
        assert bool((k[src] >= 1000).all()) and bool((k[~src] < 1000).all())  # the flag tells the truth


def test_each_source_without_replacement_within_an_epoch():
    real, gen = tagged(103), tagged(500, offset=1000)
    loader = P.MixedLoader(real, gen, batch_size=10, ratio=0.7, seed=0)
    for epoch in (0, 1, 5):
        loader.set_epoch(epoch)
        k = torch.cat([ids(x) for x, _ in loader])
        r, g = k[k < 1000], k[k >= 1000]
        assert r.numel() == 34 * 3 and g.numel() == 34 * 7
        assert r.unique().numel() == r.numel() and g.unique().numel() == g.numel()
        assert int(r.max()) < 103 and int(g.max()) < 1500
        # the labels travel with their images
        y = torch.cat([yb for _, yb in loader])
        assert torch.equal(y, torch.where(k < 1000, k, k - 1000) % 10)


def test_generated_data_is_used_without_replacement_across_epochs():
    big = P.ProxyBatchSampler(60, 1000, batch_size=10, ratio=0.5, seed=1)  # 12 batches x 5 = 60 per epoch
    assert big.generated_per_epoch == 60
    across = torch.cat([big.epoch_indices(e)[1].reshape(-1) for e in range(16)])  # 16 epochs in one pass
    assert across.unique().numel() == across.numel() == 960
    nxt = torch.cat([big.epoch_indices(e)[1].reshape(-1) for e in range(16, 32)])  # the next pass: a new order
    assert nxt.unique().numel() == 960 and not torch.equal(across, nxt)
    small = P.ProxyBatchSampler(60, 25, batch_size=10, ratio=0.5, seed=1)  # 60 draws from 25: each 2 or 3 times
    for e in range(3):
        counts = torch.bincount(small.epoch_indices(e)[1].reshape(-1), minlength=25)
        assert int(counts.min()) >= 2 and int(counts.max()) <= 3


def test_determinism_by_seed_and_epoch():
    real, gen = tagged(64), tagged(200, offset=1000)

    def epoch_batches(seed, epoch, history=()):
        loader = P.MixedLoader(real, gen, batch_size=8, ratio=0.5, seed=seed)
        for e in history:  # a run that went through earlier epochs first
            loader.set_epoch(e)
            batches(loader)
        loader.set_epoch(epoch)
        torch.manual_seed(len(history))  # the global RNG plays no part
        return [b[0] for b in batches(loader)]

    resumed, continued = epoch_batches(7, 3), epoch_batches(7, 3, history=(0, 1, 2))
    assert all(torch.equal(a, b) for a, b in zip(resumed, continued, strict=True))
    again = P.MixedLoader(real, gen, batch_size=8, ratio=0.5, seed=7)
    again.set_epoch(3)
    assert all(torch.equal(a, b[0]) for a, b in zip(resumed, batches(again), strict=True))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches(again), batches(again)))  # same epoch, same batches
    other_epoch, other_seed = epoch_batches(7, 4), epoch_batches(8, 3)
    assert not torch.equal(torch.cat(resumed), torch.cat(other_epoch))
    assert not torch.equal(torch.cat(resumed), torch.cat(other_seed))


def test_ddp_shards_are_disjoint_and_equal_length():
    real, gen = tagged(100), tagged(400, offset=1000)
    world = 3
    per_rank = []
    for rank in range(world):
        loader = P.MixedLoader(real, gen, batch_size=10, ratio=0.6, seed=5, rank=rank, world_size=world)
        loader.set_epoch(2)
        per_rank.append(torch.cat([ids(x) for x, _ in loader]))
        assert len(loader) == 100 // (world * 4)
    assert len({k.numel() for k in per_rank}) == 1
    allk = torch.cat(per_rank)
    assert allk.unique().numel() == allk.numel()  # no sample on two ranks (either source)
    assert int((allk < 1000).sum()) == 8 * world * 4
    single = P.ProxyBatchSampler(100, 400, 10, 0.6, seed=5)
    assert (single.rank, single.world_size) == (0, 1)  # no process group: one rank
    with pytest.raises(ValueError, match="rank"):
        P.ProxyBatchSampler(100, 400, 10, 0.6, rank=3, world_size=3)
    with pytest.raises(ValueError, match="do not fill one batch"):
        P.ProxyBatchSampler(10, 400, 10, 0.6, world_size=4)


def test_loader_input_errors():
    real = tagged(20)
    with pytest.raises(ValueError, match=r"generated: images have shape \[1, 5, 5\]"):
        P.MixedLoader(real, tagged(20, shape=(1, 5, 5)), 4, 0.5)
    with pytest.raises(ValueError, match=r"generated: labels must lie in \[0, 9\]"):
        P.MixedLoader(real, (tagged(20)[0], torch.full((20,), 10)), 4, 0.5)
    with pytest.raises(ValueError, match="generated: pixel values"):
        P.MixedLoader(real, (tagged(20)[0] + 2, torch.zeros(20, dtype=torch.long)), 4, 0.5)
    with pytest.raises(ValueError, match="generated data is empty"):
        P.MixedLoader(real, None, 4, 0.5)
    assert len(P.MixedLoader(real, None, 4, 0.0)) == 5  # ratio 0: real data only


# ------------------------------------------------------------------------------ npz files

def test_load_generated_accepts_uint8_and_layouts(tmp_path):
    p = tmp_path / "g.npz"
    x = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)  # NHWC uint8
    np.savez(p, x=x, y=np.arange(6))
    gx, gy = P.load_generated(str(p), (1, 8, 8), 10)
    assert gx.shape == (6, 1, 8, 8) and gx.dtype == torch.float32 and float(gx.max()) <= 1
    assert torch.allclose(gx[:, 0], torch.from_numpy(x[..., 0] / 255.0).float())
    assert gy.dtype == torch.int64


@pytest.mark.parametrize("arrays,match", [
    ({"x": np.zeros((4, 1, 8, 8), np.float32)}, r"missing array\(s\) \['y'\]"),
    ({"x": np.zeros((4, 64), np.float32), "y": np.zeros(4, np.int64)}, "x must be images"),
    ({"x": np.zeros((4, 1, 7, 7), np.float32), "y": np.zeros(4, np.int64)}, r"shape \[1, 7, 7\], the real data"),
    ({"x": np.zeros((4, 1, 8, 8), np.float32), "y": np.array([0, 1, 2, 12])}, r"labels must lie in \[0, 9\]"),
    ({"x": np.zeros((4, 1, 8, 8), np.float32), "y": np.array([0, 1.5, 2, 3])}, "integer class labels"),
    ({"x": np.zeros((4, 1, 8, 8), np.float32), "y": np.zeros(3, np.int64)}, "one label per image"),
    ({"x": np.full((4, 1, 8, 8), 16, np.float32), "y": np.zeros(4, np.int64)}, r"pixel values must lie in \[0, 1\]"),
    ({"x": np.zeros((4, 1, 8, 8), np.complex64), "y": np.zeros(4, np.int64)}, "uint8 or float"),
])
def test_load_generated_errors(tmp_path, arrays, match):
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    with pytest.raises(ValueError, match=match) as e:
        P.load_generated(str(p), (1, 8, 8), 10)
    assert "bad.npz" in str(e.value)
    with pytest.raises(ValueError, match=match):  # the loader reports the same
        P.MixedLoader(ro.data.load_digits("test"), str(p), 8, 0.5)


def test_load_generated_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        P.load_generated(str(tmp_path / "none.npz"))


# -------------------------------------------------------------------------------- fit

def test_fit_takes_the_mixed_loader_and_sets_its_epoch(tmp_path):
    x, y = ro.data.load_digits("train").tensors
    gen = P.fit_generator(x, y, components=2, pca_dim=12)
    path = str(tmp_path / "gen.npz")
    gen.save(path, 400, seed=1)
    loader = P.MixedLoader((x[:200], y[:200]), path, batch_size=20, ratio=0.5, seed=0)
    calls = []
    inner = loader.batch_sampler.set_epoch
    loader.batch_sampler.set_epoch = lambda e: (calls.append(e), inner(e))
    model = ro.models.SmallCNN()
    res = ro.train.fit(model, loader, "natural", epochs=2, optimizer="adam", lr=1e-3, progress=False, verbose=False,
                       device="cpu")
    assert calls == [1, 2]  # fit selects each epoch on loader.batch_sampler
    assert len(res.history) == 2 and res.history[-1]["train_acc"] > 0.3


def test_batch_sampler_works_with_a_dataloader():
    from torch.utils.data import ConcatDataset, DataLoader, TensorDataset

    real, gen = TensorDataset(*tagged(40)), TensorDataset(*tagged(90, offset=1000))
    s = P.ProxyBatchSampler(40, 90, batch_size=10, ratio=0.6, seed=2)
    loader = DataLoader(ConcatDataset([real, gen]), batch_sampler=s)
    mixed = P.MixedLoader(real, gen, batch_size=10, ratio=0.6, seed=2)
    for (xa, ya), (xb, yb) in zip(loader, mixed, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


# ---------------------------------------------------------------------------- generator

@pytest.fixture(scope="module")
def digits():
    return ro.data.load_digits("train").tensors


def test_generator_output(digits):
    x, y = digits
    gen = P.fit_generator(x, y, components=4, pca_dim=24)
    gx, gy = gen.generate(1003, seed=4)
    assert gx.shape == (1003, 1, 8, 8) and gx.dtype == torch.float32 and gy.dtype == torch.int64
    assert float(gx.min()) >= 0 and float(gx.max()) <= 1 and gx.std() > 0.1
    counts = torch.bincount(gy, minlength=10)
    want = torch.bincount(y, minlength=10).double() / len(y) * 1003
    assert int(counts.sum()) == 1003 and bool(((counts - want).abs() < 1).all())  # largest-remainder counts
    again = gen.generate(1003, seed=4)
    assert torch.equal(gx, again[0]) and torch.equal(gy, again[1])
    assert not torch.equal(gx, gen.generate(1003, seed=5)[0])
    with pytest.raises(ValueError, match="pca_dim"):
        P.fit_generator(x, y, pca_dim=65)
    with pytest.raises(ValueError, match="components"):
        P.fit_generator(x, y, components=0)


def test_generator_is_class_conditional(digits):
    """A classifier trained on real digits labels the generated ones as their class. Logistic
    regression on pixels reaches 0.98 on the real test split; samples that are recognisable digits of
    their class should stay near that, so we ask 0.9. A 1-component mixture in 2 PCA dimensions (a
    blurry class mean plus noise along two shared directions) gets about 0.5: the check can fail."""
    from sklearn.linear_model import LogisticRegression

    x, y = digits
    clf = LogisticRegression(max_iter=2000).fit(x.reshape(len(x), -1).numpy(), y.numpy())

    def acc(gen):
        gx, gy = gen.generate(2000, seed=1)
        return clf.score(gx.reshape(len(gx), -1).numpy(), gy.numpy())

    good, bad = acc(P.fit_generator(x, y, components=4, pca_dim=24)), acc(P.fit_generator(x, y, 1, 2))
    assert good >= 0.9, good
    assert bad < 0.8, bad


# ---------------------------------------------------------------------- robust discrimination

def test_score_ranks_the_good_generator_closest(digits):
    """Robust discrimination (few epochs, 600 samples per source, eps 0, 1/16, 1/8): the PCA-GMM
    proxy is harder to tell from real digits than a 1-component 2-dim one, and that than uniform noise."""
    x, y = digits
    kw = dict(eps_list=(0, 1 / 16, 1 / 8), epochs=4, max_samples=600, seed=0, device="cpu")
    scores = {}
    for name, gx in (("good", P.fit_generator(x, y, 4, 24).generate(len(x), seed=1)[0]),
                     ("lowdim", P.fit_generator(x, y, 1, 2).generate(len(x), seed=1)[0]),
                     ("noise", torch.rand(x.shape, generator=torch.Generator().manual_seed(0)))):
        scores[name] = ro.train.robust_discrimination(x, gx, **kw)
    arc = {k: v["arc_norm"] for k, v in scores.items()}
    assert arc["good"] + 0.1 < arc["lowdim"] < arc["noise"], arc
    assert scores["noise"]["robust_acc"][-1] > 0.8  # noise stays recognisable at every budget
    s = scores["good"]
    assert s["n_test"] == 300 and s["n_train"] == 900 and len(s["robust_acc"]) == 3
    assert abs(s["arc"] - s["arc_norm"] / 8) < 1e-12


def test_score_errors(digits):
    x, _ = digits
    with pytest.raises(ValueError, match="eps_list"):
        ro.train.robust_discrimination(x, x, eps_list=(0.1, 0.05))
    with pytest.raises(ValueError, match="gen_x: images have shape"):
        ro.train.robust_discrimination(x, torch.rand(10, 1, 5, 5))
    with pytest.raises(ValueError, match="gen_x: pixel values"):
        ro.train.robust_discrimination(x, x * 3)


def test_area_and_eps50():
    assert D._area([0, 1, 3], [1.0, 0.5, 0.5]) == pytest.approx(0.75 + 1.0)
    assert D._eps_at([0, 1, 2], [1.0, 0.6, 0.5], 0.55) == pytest.approx(1.5)
    assert D._eps_at([0, 1], [1.0, 0.9], 0.55) is None


# ----------------------------------------------------------------------------------- CLI

def test_generate_command_end_to_end(tmp_path, capsys):
    from robustops.cli import main

    out = str(tmp_path / "gen.npz")
    assert main(["generate", "--data", "digits", "--n", "300", "-o", out, "--components", "3", "--seed", "2",
                 "--no-progress"]) == 0
    gx, gy = P.load_generated(out, (1, 8, 8), 10)
    assert gx.shape == (300, 1, 8, 8) and set(gy.tolist()) == set(range(10))
    summary = json.load(open(out + ".json"))
    assert summary["samples"] == 300 and summary["components"] == 3 and sum(summary["class_counts"]) == 300
    assert "score" not in summary
    # scoring an existing file, summary on request
    sp = str(tmp_path / "score.json")
    assert main(["generate", "--score-of", out, "--score-eps", "0,1/8", "--score-epochs", "1", "--score-samples",
                 "100", "--summary", sp, "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "ARC" in printed and "robust discrimination" in printed
    score = json.load(open(sp))["score"]
    assert score["eps"] == [0.0, 0.125] and len(score["robust_acc"]) == 2 and os.path.exists(out)


@pytest.mark.parametrize("argv,match", [
    (["generate", "--n", "10"], "-o/--out is required"),
    (["generate", "--n", "0", "-o", "{tmp}/g.npz"], "--n must be >= 1"),
    (["generate", "-o", "{tmp}/g.txt"], "give a .npz"),
    (["generate", "--score-of", "{tmp}/none.npz"], "--score-of"),
    (["generate", "--score-of", "{tmp}/none.npz", "-o", "{tmp}/g.npz"], "drop -o"),
    (["generate", "-o", "{tmp}/g.npz", "--pca-dim", "100"], "pca_dim must be <="),
    (["generate", "-o", "{tmp}/g.npz", "--score-eps", "0.1"], "at least two"),
])
def test_generate_command_errors(tmp_path, capsys, argv, match):
    from robustops.cli import main

    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("robustops generate: error:") and match in err, err


def test_train_command_mixes_generated_data(tmp_path, capsys):
    """robustops train --extra-data: every batch holds the asked fraction of generated samples (checked
    through the summary and the loader the command builds), and a bad file is refused on one line."""
    from robustops.cli import main

    gen = str(tmp_path / "gen.npz")
    assert main(["generate", "--data", "digits", "--n", "400", "-o", gen, "--no-progress"]) == 0
    run = str(tmp_path / "run")
    assert main(["train", "--data", "digits", "--method", "pgd", "--epochs", "1", "--steps", "2", "--batch-size",
                 "64", "--extra-data", gen, "--extra-ratio", "0.25", "--test-steps", "0", "-o", run,
                 "--no-progress"]) == 0
    with open(os.path.join(run, "summary.json")) as fh:
        s = json.load(fh)
    assert s["extra_data"]["ratio"] == 0.25 and s["extra_data"]["path"] == os.path.abspath(gen)
    bad = str(tmp_path / "bad.npz")
    np.savez(bad, x=np.zeros((5, 3, 8, 8), np.float32), y=np.zeros(5, np.int64))
    capsys.readouterr()
    assert main(["train", "--data", "digits", "--epochs", "1", "--extra-data", bad, "-o", str(tmp_path / "r2"),
                 "--no-progress"]) == 2
    assert "--extra-data" in capsys.readouterr().err
