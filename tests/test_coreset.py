"""Adversarial coreset selection (robustops.train.coreset, .coreset_select): the closed-form last-layer
proxies against per-sample autograd (float64), Gram distances, the two selection rules on planted problems, the
schedule's step count, the weighted step at weights 1, exact resume, argument errors."""
from __future__ import annotations

import os

import numpy as np

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

import robustops.train as rt
from robustops.data import load_digits
from robustops.train.coreset import CoresetPlan, dataset_labels, stored_labels
from robustops.train.coreset_select import (ce_proxy, facility_location, gram_distances, nn_omp, proxy_gram,
                                            trades_proxy)

B, C, D = 7, 5, 6


def _explicit(pairs):
    """Per-sample gradients [B, C*D + C] in (W, b) from proxy pairs."""
    gw = sum(torch.einsum("bc,bd->bcd", e.double(), h.double()) for e, h in pairs).reshape(B, -1)
    gb = sum(e.double() for e, _ in pairs)
    return torch.cat([gw, gb], 1)


def _autograd(loss):
    """(W, b, g): g(W, b, h, h_adv, y) the per-sample gradients in (W, b), one autograd call per sample
    (torch.func's vmap gives the same; its import alone costs seconds)."""
    W, b = torch.randn(C, D, dtype=torch.float64), torch.randn(C, dtype=torch.float64)

    def g(W, b, h, ha, y):
        out = []
        for i in range(h.shape[0]):
            Wi, bi = W.clone().requires_grad_(), b.clone().requires_grad_()
            out.append(torch.autograd.grad(loss(Wi, bi, h[i], ha[i], y[i]), (Wi, bi)))
        return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])

    return W, b, g


@pytest.fixture(scope="module")
def feats():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, D, generator=g, dtype=torch.float64), torch.randn(B, D, generator=g, dtype=torch.float64),
            torch.randint(0, C, (B,), generator=g))


def test_ce_proxy_equals_autograd(feats):
    h, _, y = feats

    def loss(W, b, hi, _, yi):
        return F.cross_entropy((W @ hi + b)[None], yi[None])

    W, b, g = _autograd(loss)
    gW, gb = g(W, b, h, h, y)
    want = torch.cat([gW.reshape(B, -1), gb], 1)
    pairs = ce_proxy(h @ W.T + b, h, y)
    torch.testing.assert_close(_explicit(pairs), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(proxy_gram(pairs), want @ want.T, atol=1e-5, rtol=1e-5)


def test_trades_proxy_equals_autograd(feats):
    h, ha, y = feats
    beta = 6.0

    def loss(W, b, hi, hai, yi):
        z, za = (W @ hi + b)[None], (W @ hai + b)[None]
        return F.cross_entropy(z, yi[None]) + beta * F.kl_div(F.log_softmax(za, 1), F.softmax(z, 1),
                                                              reduction="batchmean")

    W, b, g = _autograd(loss)
    gW, gb = g(W, b, h, ha, y)
    want = torch.cat([gW.reshape(B, -1), gb], 1)
    pairs = trades_proxy(h @ W.T + b, h, ha @ W.T + b, ha, y, beta)
    torch.testing.assert_close(_explicit(pairs), want, atol=1e-5, rtol=1e-5)
    G = proxy_gram(pairs)
    torch.testing.assert_close(G, want @ want.T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gram_distances(G), torch.cdist(want, want), atol=1e-5, rtol=1e-5)


def test_facility_location_one_per_planted_cluster():
    g = torch.Generator().manual_seed(1)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    sizes = [5, 7, 9]
    pts = torch.cat([c + 0.1 * torch.randn(n, 2, generator=g) for c, n in zip(centres, sizes)])
    d = torch.cdist(pts, pts)
    idx, w = facility_location(d.max() - d, 3)
    cluster = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))
    assert sorted(cluster[idx].tolist()) == [0, 1, 2]
    assert {int(cluster[i]): int(wi) for i, wi in zip(idx, w)} == {0: 5, 1: 7, 2: 9}


def _greedy(S, k):
    """Exact greedy facility location, column by column (the oracle of the lazy one)."""
    cur, chosen = torch.zeros(S.shape[0], dtype=torch.float64), []
    for _ in range(k):
        gains = [-1.0 if j in chosen else float((S[:, j] - cur).clamp_min(0).sum()) for j in range(S.shape[0])]
        j = max(range(len(gains)), key=lambda i: (gains[i], -i))
        chosen.append(j)
        cur = torch.maximum(cur, S[:, j])
    return chosen


def test_facility_location_is_exact_greedy_on_a_symmetric_gram():
    g = torch.Generator().manual_seed(4)
    pairs = [(torch.randn(30, 4, generator=g), torch.randn(30, 6, generator=g)) for _ in range(2)]  # TRADES-like
    G = proxy_gram(pairs)
    assert torch.equal(G, G.T)  # exactly: facility_location reads rows for columns
    naive = sum((e.double() @ f.double().T) * (h.double() @ k.double().T + 1) for e, h in pairs for f, k in pairs)
    torch.testing.assert_close(G, naive, rtol=1e-12, atol=1e-12)
    D = gram_distances(G)
    S = D.max() - D
    idx, w = facility_location(S, 6)
    assert idx.tolist() == _greedy(S, 6)
    assert torch.equal(w, torch.bincount(S[:, idx].argmax(1), minlength=6).double())


class Plain(Dataset):
    """A dataset without a label tensor: the labels come from one pass."""

    def __init__(self, y):
        self.y = y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return torch.zeros(2), self.y[i]


class Targets(Plain):
    def __init__(self, y):
        super().__init__(y)
        self.targets = y.tolist()


def test_labels_read_without_a_pass_where_stored():
    y = torch.randint(0, 10, (40,), generator=torch.Generator().manual_seed(5))
    tensors = TensorDataset(torch.zeros(40, 2), y)
    for ds in (tensors, Targets(y), Subset(tensors, range(3, 30))):
        want = torch.cat([b[1] for b in DataLoader(ds, batch_size=7)])
        assert torch.equal(stored_labels(ds), want) and torch.equal(dataset_labels(ds), want)
    assert stored_labels(Plain(y)) is None and torch.equal(dataset_labels(Plain(y)), y)


def test_nn_omp_recovers_planted_combination():
    g = torch.Generator().manual_seed(2)
    X = torch.randn(20, 50, generator=g, dtype=torch.float64)
    t = 2.0 * X[3] + 3.0 * X[7]
    idx, w = nn_omp(X @ X.T, X @ t, k=2, lam=0.0)
    got = dict(zip(idx.tolist(), w.tolist()))
    assert set(got) == {3, 7}
    assert got[3] == pytest.approx(2.0, abs=1e-6) and got[7] == pytest.approx(3.0, abs=1e-6)


@pytest.fixture(scope="module")
def data():
    ds = load_digits("train")
    return Subset(ds, list(range(160)))


def _fit(data, out, **kw):
    torch.manual_seed(0)
    from robustops.models import SmallCNN

    model = SmallCNN()
    hp = dict(epochs=6, eps=0.2, steps=2, seed=3, progress=False, verbose=False, coreset_every=2, lr=0.05)
    hp.update(kw)
    res = rt.fit(model, DataLoader(data, batch_size=32, shuffle=True), "pgd", out_dir=out, **hp)
    return model, res


def test_schedule_steps_exact_and_resume(data, tmp_path):
    plan = CoresetPlan(6, 0.5, 2, 0.6)
    assert (plan.full, plan.subset, plan.passes) == (2, 3, 5)  # K = 3, W = round(1.5) = 2
    assert [plan.selects(e) for e in range(1, 6)] == [False, False, True, False, True]
    full = str(tmp_path / "full")
    model, res = _fit(data, full, coreset="craig", keep_all=True)
    ck = torch.load(os.path.join(full, "last.pt"), weights_only=False)
    k = ck["coreset"]["idx"].numel()
    assert k == 80 and res.history[-1]["coreset_size"] == k
    expected = 2 * 5 + 3 * -(-k // 32)  # 2 full epochs of 160 / 32, 3 coreset epochs of ceil(k / 32)
    sched = ck["scheduler"]
    assert sched["last_epoch"] == expected == sched["lr_lambdas"][0]["total"]
    assert res.history[-1]["equiv_epochs"] == pytest.approx((2 * 160 + 3 * k + 2 * 160) / 160)
    # resume after epoch 3 (a coreset epoch): epoch 4 reuses the stored subset, epoch 5 selects again
    other = str(tmp_path / "other")
    torch.manual_seed(123)
    model2, res2 = _fit(data, other, coreset="craig", resume=os.path.join(full, "epoch_3.pt"))
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    assert res2.history[-1]["equiv_epochs"] == res.history[-1]["equiv_epochs"]


@pytest.mark.parametrize("method", ["pgd", "trades"])
def test_unit_weights_step_equals_base(data, method):
    x, y = next(iter(DataLoader(data, batch_size=32)))[:2]
    states = []
    for weights in (None, torch.ones(32)):
        torch.manual_seed(0)
        from robustops.models import SmallCNN

        model = SmallCNN()
        tr = rt.Trainer(model, method=method, eps=0.2, steps=2, seed=1, steps_per_epoch=4)
        tr.train_step(x, y, weights)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


def test_gradmatch_and_random_select(data):
    for rule in ("gradmatch", "random"):
        _, res = _fit(data, None, coreset=rule, epochs=2, steps=1, coreset_warmup=0.0, coreset_frac=0.25)
        assert [r["coreset_size"] for r in res.history] == [40, 40]


def test_errors(capsys, tmp_path):
    bad = [(dict(coreset="kmeans"), "coreset must be"), (dict(coreset="craig", coreset_frac=0), "coreset_frac"),
           (dict(coreset="craig", coreset_every=0), "coreset_every"),
           (dict(coreset="craig", coreset_warmup=1.0), "coreset_warmup"),
           (dict(coreset="craig", method="natural"), "needs an adversarial method"),
           (dict(coreset="craig", method="free"), "needs an adversarial method")]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            rt.FitConfig.make(**{"method": "pgd", **kw}).resolved()
    from robustops.cli import main

    assert main(["train", "--method", "natural", "--coreset", "craig", "--out", str(tmp_path / "r")]) == 2
    assert "needs an adversarial method" in capsys.readouterr().err
    assert main(["train", "--coreset", "craig", "--coreset-frac", "1.5", "--out", str(tmp_path / "r")]) == 2
    assert "coreset_frac" in capsys.readouterr().err
    assert main(["train", "--coreset-every", "3", "--out", str(tmp_path / "r")]) == 2
    assert "--coreset-every is a setting of --coreset" in capsys.readouterr().err
    with pytest.raises(ValueError, match="DataLoader"):
        rt.fit(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), [(torch.zeros(2, 1, 8, 8), torch.zeros(2).long())],
               "pgd", coreset="craig", progress=False, verbose=False)


def test_cli_craig_coreset_size_in_the_log(tmp_path):
    import csv

    from robustops.cli import main

    threads = torch.get_num_threads()
    try:
        assert main(["train", "--data", "digits", "--coreset", "craig", "--coreset-frac", "0.5", "--coreset-every",
                     "1", "--coreset-warmup", "0", "--epochs", "2", "--batch-size", "256", "--val-size", "64",
                     "--val-steps", "1", "--test-steps", "1", "--no-progress", "--steps", "1", "--threads", "1",
                     "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    with open(os.path.join(tmp_path, "log.csv")) as fh:
        rows = list(csv.DictReader(fh))
    n = len(load_digits("train")) - 64
    assert len(rows) == 2 and all(abs(int(r["coreset_size"]) - n / 2) <= 5 for r in rows)  # 10 classes' rounding
    assert all(float(r["select_time"]) > 0 for r in rows)  # selected before each epoch (every 1, no warm-up)


def test_cli_refuses_coreset_settings_without_a_coreset_and_with_extra_data(tmp_path, capsys):
    from robustops.cli import main

    assert main(["train", "--coreset-frac", "0.5", "--out", str(tmp_path / "a"), "--no-progress"]) == 2
    assert "--coreset-frac is a setting of --coreset" in capsys.readouterr().err
    gen = tmp_path / "gen.npz"
    np.savez(gen, x=np.random.rand(8, 1, 8, 8).astype(np.float32), y=np.arange(8) % 10)
    assert main(["train", "--coreset", "random", "--extra-data", str(gen), "--out", str(tmp_path / "b"),
                 "--no-progress"]) == 2
    assert "cannot be combined with --extra-data" in capsys.readouterr().err
