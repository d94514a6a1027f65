"""robustops.smoothing: soundness of CERTIFY / PREDICT by simulation on classifiers whose smoothed
probabilities are known in closed form, the noise scheme, batching, options, edge cases, bad inputs,
ACR / certified accuracy and the plot."""
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import devices
from helpers import Linear2
from scipy import special, stats

from robustops import reference as ref
from robustops import smoothing as sm
from robustops.smoothing import Smooth


class Constant(nn.Module):
    """Always votes for class k (of C)."""

    def __init__(self, k, C=3):
        super().__init__()
        self.k, self.C = k, C

    def forward(self, x):
        out = torch.zeros(x.shape[0], self.C, dtype=x.dtype, device=x.device)
        out[:, self.k] = 1
        return out


class Recorder(nn.Module):
    """Keeps a copy of every batch the smoothed classifier feeds to net."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.batches = []

    def forward(self, x):
        self.batches.append(x.detach().clone())
        return self.net(x)


def points_at_margin(t, w, gen):
    """Inputs whose signed distance to the hyperplane w.x = 0 is t (random position along it)."""
    w = torch.as_tensor(w, dtype=torch.float64)
    u = w / w.norm()
    x = torch.randn(len(t), w.numel(), generator=gen, dtype=torch.float64)
    x = x - (x @ u)[:, None] * u + torch.as_tensor(t, dtype=torch.float64)[:, None] * u
    return x.float()


def conv_net(C_in=3, classes=5, seed=0, size=6):
    """A small random conv net whose votes under noise are spread over several classes."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(C_in, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * size * size, classes)).eval()


# -------------------------------------------------------------------------------- soundness

@pytest.mark.parametrize("D", [1, 3])
def test_certify_is_sound_on_linear_classifiers(D):
    """The certified radius exceeds the true robust radius (or a wrong class is certified) for at most
    about alpha of the inputs; the same counts with the plug-in estimate of pA fail badly, so the check
    has power."""
    M, sigma, alpha, n0, n = 1500, 0.5, 0.1, 16, 128
    gen = torch.Generator().manual_seed(D)
    w = torch.randn(D, generator=gen) + 0.5
    # True pA spread over (0.5, 0.999), both classes.
    p_true = 0.5 + 0.499 * torch.rand(M, generator=gen, dtype=torch.float64)
    sign = torch.where(torch.rand(M, generator=gen) < 0.5, -1.0, 1.0).double()
    t = sign * sigma * torch.from_numpy(stats.norm.ppf(p_true.numpy()))
    x = points_at_margin(t, w, gen)
    true_class = (t > 0).long()
    true_radius = t.abs()

    res = Smooth(Linear2(w), 2, sigma).certify(x, n0, n, alpha, batch_size=4096, seed=123)
    certified = res.prediction >= 0
    wrong = certified & ((res.prediction != true_class) | (res.radius > true_radius))
    limit = stats.binom.ppf(0.999, M, alpha) / M
    rate = wrong.double().mean().item()
    assert rate <= limit, f"unsound: {rate:.3f} of inputs over-certified (alpha {alpha})"
    assert rate >= 0.01, f"the radii are suspiciously small ({rate:.4f} over-certified)"
    assert certified.double().mean() > 0.5

    # Power: the plug-in estimate nA/n instead of the lower bound over-certifies about half the time.
    n_a = res.counts.gather(1, res.selection_counts.argmax(1, keepdim=True)).squeeze(1).double()
    naive = sigma * torch.from_numpy(stats.norm.ppf(np.clip(n_a.numpy() / n, 1e-9, 1 - 1e-9)))
    naive_wrong = (naive > true_radius) & (n_a / n > 0.5)
    assert naive_wrong.double().mean() > 3 * limit


@pytest.mark.parametrize("n,p", [(10, 0.5), (50, 0.9), (100, 0.3), (1000, 0.6), (1000, 0.99), (5, 0.999)])
def test_clopper_pearson_coverage(n, p):
    """P(lower bound > p) <= alpha, by simulation with scipy binomial draws, and tight for large n."""
    alpha, draws = 0.1, 20000
    n_a = stats.binom.rvs(n, p, size=draws, random_state=np.random.default_rng(n))
    lower = sm.clopper_pearson_lower(n_a, n, alpha)
    miss = (lower > p).mean()
    assert miss <= alpha + 4 * math.sqrt(alpha * (1 - alpha) / draws)
    if n == 1000 and p < 0.9:
        assert miss >= alpha / 2  # not vacuous: close to the nominal level


def test_clopper_pearson_closed_forms():
    alpha = 0.05
    assert sm.clopper_pearson_lower(0, 10, alpha) == 0.0
    assert sm.clopper_pearson_lower(10, 10, alpha) == pytest.approx(alpha ** (1 / 10), rel=1e-12)
    assert sm.clopper_pearson_lower(1, 1, alpha) == pytest.approx(alpha, rel=1e-12)
    k = np.arange(0, 101)
    lo = sm.clopper_pearson_lower(k, 100, alpha)
    assert np.all(np.diff(lo) > 0) and np.all(lo < k / 100 + 1e-15)
    np.testing.assert_allclose(lo[1:], special.betaincinv(k[1:], 100 - k[1:] + 1, alpha), rtol=0, atol=0)


def test_predict_on_the_boundary_abstains_and_far_from_it_is_right():
    M, sigma, alpha = 400, 0.5, 0.1
    gen = torch.Generator().manual_seed(7)
    w = torch.tensor([1.0, -2.0])
    on = points_at_margin(torch.zeros(M, dtype=torch.float64), w, gen)  # pA = pB = 1/2
    smooth = Smooth(Linear2(w), 2, sigma)
    pred = smooth.predict(on, n=64, alpha=alpha, batch_size=1000, seed=1)
    assert pred.dtype == torch.int64 and pred.shape == (M,)
    assert (pred >= 0).double().mean() <= stats.binom.ppf(0.999, M, alpha) / M

    t = torch.where(torch.arange(M) % 2 == 0, 3 * sigma, -3 * sigma).double()  # pA = 0.9987
    far = points_at_margin(t, w, gen)
    pred = smooth.predict(far, n=64, alpha=0.001, batch_size=1000, seed=2)
    assert torch.equal(pred, (t > 0).long())


def test_predict_details_match_binomtest():
    smooth = Smooth(Linear2([1.0, 1.0]), 2, 1.0)
    x = torch.tensor([[0.2, 0.1], [0.0, 0.0], [-1.0, 0.3]])
    res = smooth.predict(x, n=40, alpha=0.05, batch_size=33, seed=4, return_details=True)
    for i in range(3):
        c = res.counts[i].sort(descending=True).values
        p = stats.binomtest(int(c[0]), int(c[0] + c[1]), 0.5).pvalue
        assert res.pvalue[i].item() == p
        assert res.prediction[i].item() == (int(res.counts[i].argmax()) if p <= 0.05 else -1)
    assert torch.equal(res.prediction, smooth.predict(x, n=40, alpha=0.05, batch_size=7, seed=4))


# ------------------------------------------------------------------------------ edge cases

def test_all_votes_for_one_class():
    sigma, alpha, n = 0.25, 0.01, 20
    res = Smooth(Constant(2), 3, sigma).certify(torch.rand(4, 5), n0=3, n=n, alpha=alpha, batch_size=16, seed=0)
    p = alpha ** (1 / n)
    assert torch.equal(res.prediction, torch.full((4,), 2))
    assert torch.equal(res.counts, torch.tensor([[0, 0, n]] * 4))
    assert torch.equal(res.selection_counts, torch.tensor([[0, 0, 3]] * 4))
    torch.testing.assert_close(res.pA_lower, torch.full((4,), p, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(res.radius, torch.full((4,), sigma * stats.norm.ppf(p), dtype=torch.float64),
                               rtol=1e-12, atol=0)


def test_selected_class_never_seen_in_estimation():
    """nA = 0: the stream gives the selection samples first; this classifier changes its mind after them."""
    class Fickle(nn.Module):
        def __init__(self):
            super().__init__()
            self.seen = 0

        def forward(self, x):
            out = torch.zeros(x.shape[0], 3)
            cls = torch.where(torch.arange(self.seen, self.seen + x.shape[0]) < 5, 0, 1)
            out[torch.arange(x.shape[0]), cls] = 1
            self.seen += x.shape[0]
            return out

    res = Smooth(Fickle(), 3, 0.5).certify(torch.rand(1, 2), n0=5, n=10, alpha=0.1, batch_size=4, seed=0)
    assert res.selection_counts.tolist() == [[5, 0, 0]] and res.counts.tolist() == [[0, 10, 0]]
    assert res.prediction.tolist() == [-1] and res.radius.tolist() == [0.0] and res.pA_lower.tolist() == [0.0]


def test_n0_larger_than_n_and_tiny_n():
    x = torch.rand(3, 2)
    res = Smooth(Constant(1), 3, 0.5).certify(x, n0=50, n=3, alpha=0.2, batch_size=8, seed=0)
    assert res.prediction.tolist() == [1, 1, 1] and res.counts.sum(1).tolist() == [3, 3, 3]
    torch.testing.assert_close(res.pA_lower, torch.full((3,), 0.2 ** (1 / 3), dtype=torch.float64))
    # n = 1: pA_lower = alpha, so the certificate exists only for alpha >= 1/2.
    res = Smooth(Constant(0), 3, 0.5).certify(x, n0=1, n=1, alpha=0.4, batch_size=1, seed=0)
    assert res.prediction.tolist() == [-1, -1, -1] and res.radius.tolist() == [0.0] * 3
    res = Smooth(Constant(0), 3, 0.5).certify(x, n0=1, n=1, alpha=0.7, batch_size=1, seed=0)
    assert res.prediction.tolist() == [0, 0, 0]
    torch.testing.assert_close(res.radius, torch.full((3,), 0.5 * stats.norm.ppf(0.7), dtype=torch.float64))
    # PREDICT: two-sided p-value of (n, 0) is 2 / 2^n.
    smooth = Smooth(Constant(2), 3, 0.5)
    assert smooth.predict(x, n=5, alpha=0.05, batch_size=4, seed=0).tolist() == [-1] * 3   # 0.0625
    assert smooth.predict(x, n=6, alpha=0.05, batch_size=4, seed=0).tolist() == [2] * 3    # 0.03125
    assert smooth.predict(x, n=1, alpha=0.5, batch_size=4, seed=0).tolist() == [-1] * 3


def test_empty_batch():
    res = Smooth(Constant(0), 3, 0.5).certify(torch.rand(0, 4), 10, 10, 0.1, 8)
    assert res.prediction.shape == (0,) and res.radius.shape == (0,) and res.counts.shape == (0, 3)
    assert Smooth(Constant(0), 3, 0.5).predict(torch.rand(0, 4), 10, 0.1, 8).shape == (0,)


# ------------------------------------------------------------------------- noise and batching

def test_noise_depends_only_on_seed_and_index():
    """Input i's samples are gaussian_noise(x[i], m, sigma) at Philox samples indices[i]*m + j under a
    per-phase key, whatever the batch split; selection, estimation and PREDICT draws differ."""
    x = torch.rand(3, 2, 3, 3)
    idx = [5, 6, 9]
    n0, n, bs, sigma, seed = 4, 7, 5, 0.3, 11
    rec = Recorder(conv_net(2, 4, size=3))
    Smooth(rec, 4, sigma).certify(x, n0, n, 0.1, bs, seed=seed, indices=idx)
    rows = torch.cat(rec.batches)
    assert [b.shape[0] for b in rec.batches] == [5] * 6 + [3]
    assert rows.shape[0] == 3 * (n0 + n)
    for i in range(3):
        sel = ref.gaussian_noise(x[i:i + 1], n0, sigma, seed=sm.phase_seed(seed, 0), offset=idx[i] * n0)
        est = ref.gaussian_noise(x[i:i + 1], n, sigma, seed=sm.phase_seed(seed, 1), offset=idx[i] * n)
        torch.testing.assert_close(rows[i * n0:(i + 1) * n0], sel, atol=1e-5, rtol=0)
        torch.testing.assert_close(rows[3 * n0 + i * n:3 * n0 + (i + 1) * n], est, atol=1e-5, rtol=0)
    rec.batches.clear()
    Smooth(rec, 4, sigma).predict(x[:1], n0, 0.1, bs, seed=seed, indices=idx[:1])
    pred_rows = torch.cat(rec.batches)
    assert not torch.allclose(pred_rows, rows[:n0])
    assert not torch.allclose(rows[:n0], rows[3 * n0:3 * n0 + n0])


def test_results_do_not_depend_on_batching_or_neighbours():
    net = conv_net()
    x = torch.rand(6, 3, 6, 6)
    idx = torch.arange(100, 106)
    smooth = Smooth(net, 5, 0.5)
    runs = [smooth.certify(x, 13, 37, 0.05, bs, seed=3, indices=idx) for bs in (7, 64, 1000)]
    for r in runs[1:]:
        assert torch.equal(r.counts, runs[0].counts) and torch.equal(r.selection_counts, runs[0].selection_counts)
        assert torch.equal(r.radius, runs[0].radius)
    # A subset, in another order, with other neighbours.
    perm = [5, 2, 4]
    sub = smooth.certify(x[perm], 13, 37, 0.05, 50, seed=3, indices=idx[perm])
    assert torch.equal(sub.counts, runs[0].counts[perm])
    # A non-contiguous x holding the same values.
    strided = x.transpose(2, 3).contiguous().transpose(2, 3)
    assert torch.equal(smooth.certify(strided, 13, 37, 0.05, 64, seed=3, indices=idx).counts, runs[0].counts)
    # Another seed gives other votes.
    other = smooth.certify(x, 13, 37, 0.05, 64, seed=4, indices=idx)
    assert not torch.equal(other.counts, runs[0].counts)


def test_forward_passes_are_full():
    rec = Recorder(Linear2([1.0]))
    B, n0, n, bs = 7, 10, 30, 64
    Smooth(rec, 2, 0.5).certify(torch.rand(B, 1), n0, n, 0.1, bs, seed=0)
    sizes = [b.shape[0] for b in rec.batches]
    assert len(sizes) == math.ceil(B * (n0 + n) / bs) and all(s == bs for s in sizes[:-1])
    assert sum(sizes) == B * (n0 + n)


def test_seed_none_follows_torch_manual_seed():
    smooth = Smooth(Linear2([1.0, 0.5]), 2, 1.0)
    x = torch.zeros(4, 2)
    torch.manual_seed(5)
    a = smooth.certify(x, 20, 50, 0.1, 64)
    b = smooth.certify(x, 20, 50, 0.1, 64)
    torch.manual_seed(5)
    c = smooth.certify(x, 20, 50, 0.1, 64)
    assert torch.equal(a.counts, c.counts) and not torch.equal(a.counts, b.counts)


def test_fused_normalization_matches_a_normalize_layer():
    from robustops.models import Normalize

    net = conv_net()
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    x = torch.rand(6, 3, 6, 6)
    inside = Smooth(nn.Sequential(Normalize(mean, std), net), 5, 0.25).certify(x, 20, 200, 0.1, 128, seed=1)
    fused = Smooth(net, 5, 0.25, mean=mean, std=std).certify(x, 20, 200, 0.1, 128, seed=1)
    # Same noise; the normalization may round differently, which can flip a near-tie vote.
    assert (inside.counts - fused.counts).abs().sum() <= 4


def test_autocast_and_channels_last():
    net = conv_net()
    x = torch.rand(6, 3, 6, 6)
    exp = Smooth(net, 5, 0.25).certify(x, 20, 200, 0.1, 128, seed=1)
    rec = Recorder(conv_net())
    smooth = Smooth(rec, 5, 0.25, autocast="bf16", channels_last=True)
    got = smooth.certify(x, 20, 200, 0.1, 128, seed=1)
    assert all(b.dtype == torch.bfloat16 and b.is_contiguous(memory_format=torch.channels_last) for b in rec.batches)
    assert rec.net[0].weight.is_contiguous(memory_format=torch.channels_last)
    # bf16 rounds the inputs and the arithmetic: a few near-tie votes may move.
    assert (got.counts - exp.counts).abs().sum() <= 0.1 * exp.counts.sum()
    got16 = Smooth(net, 5, 0.25, autocast=torch.float16).certify(x, 20, 200, 0.1, 128, seed=1)
    assert (got16.counts - exp.counts).abs().sum() <= 0.1 * exp.counts.sum()


@pytest.mark.parametrize("device", devices())
def test_one_host_sync_per_call(device, monkeypatch):
    """One sync per call (the final copy of the vote table); the forward passes themselves run under
    sync debug mode "error" (a 0-dim device tensor as masked_fill's value was an .item() per pass)."""
    net = conv_net().to(device)
    x = torch.rand(5, 3, 6, 6, device=device)
    smooth = Smooth(net, 5, 0.25)
    if device == "cuda":
        from sync_budget import counted_syncs, forbid_syncs_in
        from robustops.smoothing.votes import VoteSampler
        forbid_syncs_in(monkeypatch, VoteSampler, "run")
        smooth.certify(x, 10, 300, 0.1, 256, seed=0)  # warm-up (lazy initialisation)
        torch.cuda.synchronize()
        with counted_syncs() as syncs:
            res = smooth.certify(x, 10, 300, 0.1, 256, seed=0)
        assert len(syncs) == 1, syncs
    else:
        res = smooth.certify(x, 10, 300, 0.1, 256, seed=0)
    assert res.counts.device.type == "cpu" and res.counts.sum().item() == 5 * 300


@pytest.mark.cuda
def test_cuda_matches_cpu():
    net = conv_net()
    x = torch.rand(4, 3, 6, 6)
    cpu = Smooth(net, 5, 0.25).certify(x, 20, 300, 0.1, 128, seed=2)
    gpu = Smooth(conv_net().cuda(), 5, 0.25).certify(x.cuda(), 20, 300, 0.1, 128, seed=2)
    assert (cpu.counts - gpu.counts).abs().sum() <= 6


# ------------------------------------------------------------------------------- bad inputs

def test_bad_arguments_name_the_argument():
    net = Linear2([1.0, 1.0])
    for sigma in (0, -0.5, float("nan"), float("inf"), "0.5", True):
        with pytest.raises(ValueError, match="sigma"):
            Smooth(net, 2, sigma)
    for k in (1, 0, 2.5, None, True):
        with pytest.raises(ValueError, match="num_classes"):
            Smooth(net, k, 0.5)
    with pytest.raises(ValueError, match="autocast"):
        Smooth(net, 2, 0.5, autocast="int8")
    with pytest.raises(TypeError, match="base_classifier"):
        Smooth("model", 2, 0.5)
    smooth = Smooth(net, 2, 0.5)
    x = torch.rand(3, 2)
    for alpha in (0, 1, -0.1, 1.5, float("nan"), None):
        with pytest.raises(ValueError, match="alpha"):
            smooth.certify(x, 10, 10, alpha, 8)
        with pytest.raises(ValueError, match="alpha"):
            smooth.predict(x, 10, alpha, 8)
    for bad in (0, -1, 2.0, None):
        with pytest.raises(ValueError, match=r"\bn\b"):
            smooth.certify(x, 10, bad, 0.1, 8)
        with pytest.raises(ValueError, match=r"\bn\b"):
            smooth.predict(x, bad, 0.1, 8)
        with pytest.raises(ValueError, match="n0"):
            smooth.certify(x, bad, 10, 0.1, 8)
        with pytest.raises(ValueError, match="batch_size"):
            smooth.certify(x, 10, 10, 0.1, bad)
    with pytest.raises(ValueError, match="num_classes"):
        Smooth(net, 3, 0.5).certify(x, 10, 10, 0.1, 8)  # the classifier returns 2 logits
    with pytest.raises(ValueError, match=r"\bx\b"):
        smooth.certify(torch.rand(2), 10, 10, 0.1, 8)
    with pytest.raises(TypeError, match=r"\bx\b"):
        smooth.certify(torch.ones(3, 2, dtype=torch.int64), 10, 10, 0.1, 8)
    with pytest.raises(TypeError, match=r"\bx\b"):
        smooth.certify([[0.0, 1.0]], 10, 10, 0.1, 8)
    shaped = Smooth(conv_net(), 5, 0.5, input_shape=(3, 6, 6))
    assert shaped.certify(torch.rand(3, 6, 6), 10, 10, 0.1, 8).counts.shape == (1, 5)  # one input, Cohen-style
    with pytest.raises(ValueError, match="input_shape"):
        shaped.certify(torch.rand(2, 3, 5, 6), 10, 10, 0.1, 8)
    with pytest.raises(ValueError, match="channels_last"):
        Smooth(net, 2, 0.5, channels_last=True).certify(x, 10, 10, 0.1, 8)
    with pytest.raises(ValueError, match="indices"):
        smooth.certify(x, 10, 10, 0.1, 8, indices=[0, 1])
    with pytest.raises(ValueError, match="indices"):
        smooth.certify(x, 10, 10, 0.1, 8, indices=[0, -1, 2])
    with pytest.raises(TypeError, match="seed"):
        smooth.certify(x, 10, 10, 0.1, 8, seed=1.5)
    with pytest.raises(ValueError, match="std"):
        Smooth(conv_net(), 5, 0.5, mean=[0.5] * 3, std=[0.2, 0.0, 0.2]).certify(torch.rand(1, 3, 6, 6), 2, 2, 0.1, 8)


# ------------------------------------------------------------------------------ ACR, curves

def test_acr_and_certified_accuracy_by_hand():
    # idx:      0    1    2    3    4 (abstain)
    radius = [1.0, 0.5, 0.0, 2.0, 0.0]
    correct = [1, 1, 1, 0, 0]
    assert sm.acr(radius, correct) == pytest.approx((1.0 + 0.5 + 0.0) / 5)
    acc = sm.certified_accuracy(torch.tensor(radius), torch.tensor(correct, dtype=torch.bool),
                                [0.0, 0.25, 0.5, 0.75, 1.0, 1.5])
    np.testing.assert_allclose(acc, [0.6, 0.4, 0.4, 0.2, 0.2, 0.0])
    assert sm.certified_accuracy(np.array(radius), np.array(correct), 0.5) == pytest.approx(0.4)
    assert sm.acr([], []) == 0.0
    with pytest.raises(ValueError, match="same length"):
        sm.acr([1.0], [1, 0])


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "curve.png"
    r = torch.tensor([0.1, 0.4, 0.9, 0.0])
    c = torch.tensor([1, 1, 0, 0])
    assert sm.plot_certified_accuracy(str(path), {"sigma 0.25": (r, c), "sigma 0.5": (r / 2, c)}) == str(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    sm.plot_certified_accuracy(str(tmp_path / "one.png"), (r, c), max_radius=1.0, title="digits")
    assert (tmp_path / "one.png").stat().st_size > 1000


def test_graph_option_on_cpu_warns_and_gives_the_eager_answer():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    x = torch.rand(2, 3, 2, 2)
    eager = Smooth(model, 3, 0.5).certify(x, 20, 200, 0.01, 64, seed=1)
    with pytest.warns(UserWarning, match="needs CUDA"):
        g = Smooth(model, 3, 0.5, graph=True).certify(x, 20, 200, 0.01, 64, seed=1)
    assert torch.equal(g.counts, eager.counts) and torch.equal(g.selection_counts, eager.selection_counts)


@pytest.mark.cuda
@pytest.mark.parametrize("autocast", [None, "bf16"])
def test_graph_replays_give_the_eager_votes(autocast, monkeypatch):
    """Full single-input batches replayed from a CUDA graph (device-offset noise) vote exactly as the
    eager path does: same noise rows, same counts; remainders and shared batches run eagerly. No pass
    and no replay synchronizes (sync debug mode "error"): capture does not fall back."""
    from sync_budget import counted_syncs, forbid_syncs_in
    from robustops.smoothing.graph import VoteGraphs
    from robustops.smoothing.votes import VoteSampler
    forbid_syncs_in(monkeypatch, VoteSampler, "run")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 8 * 8, 10)).cuda().eval()
    x = torch.rand(3, 3, 8, 8, device="cuda")
    kw = dict(seed=5, indices=[4, 9, 10])
    eager = Smooth(model, 10, 0.25, autocast=autocast).certify(x, 30, 1000, 0.001, 128, **kw)
    sm_g = Smooth(model, 10, 0.25, autocast=autocast, graph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a capture failure warns: fail instead
        graph = sm_g.certify(x, 30, 1000, 0.001, 128, **kw)
    assert len(sm_g._graphs.runners) == 1  # estimation: 1000 // 128 = 7 replays per input
    # The same noise rows; a row's logits may differ in the last bit with the batch it shares a
    # forward pass with (other kernels per batch size), which can flip a near tie: allow 0.2%.
    assert int((graph.counts - eager.counts).abs().sum()) <= 6
    assert torch.equal(graph.selection_counts, eager.selection_counts)  # no full batch: eager
    forbid_syncs_in(monkeypatch, VoteGraphs, "run")  # the cached graph: no capture, no sync
    with counted_syncs() as syncs:
        again = sm_g.certify(x, 30, 1000, 0.001, 128, **kw)  # the cached graph, fresh offsets
    assert len(syncs) == 1, syncs
    assert torch.equal(again.counts, graph.counts)


class _NaNSome(torch.nn.Module):
    """Class 0 always, except that a noisy sample whose first feature exceeds t gets NaN logits."""

    def __init__(self, t):
        super().__init__()
        self.t = t

    def forward(self, z):
        z = z.flatten(1)
        out = torch.zeros(z.shape[0], 3, device=z.device)
        out[:, 0] = 1.0
        return torch.where((z[:, :1] > self.t), torch.full_like(out, float("nan")), out)


def test_nan_logits_are_votes_for_no_class():
    """The issue's example certified a NaN input with radius 0.616; and a sample with NaN logits used
    to vote for class 0 (torch.argmax lets NaN win)."""
    with pytest.warns(UserWarning, match="NaN / Inf"):
        res = Smooth(torch.nn.Linear(4, 2), 2, 0.25).certify(torch.full((1, 4), float("nan")), 100, 1000, 0.001,
                                                             1000)
    assert int(res.prediction[0]) == -1 and float(res.radius[0]) == 0.0 and not bool(res.finite_input[0])
    # 16% of the noisy samples (N(0, 0.25^2) > 0.25) give NaN logits, the rest class 0
    x = torch.zeros(2, 4)
    sm_ = Smooth(_NaNSome(0.25), 3, 0.25)
    res = sm_.certify(x, 100, 2000, 0.001, 500, seed=3)
    nan = res.nan_votes
    assert bool((nan > 200).all()) and bool((nan < 450).all())
    assert torch.equal(res.counts[:, 0] + nan, torch.full((2,), 2000))  # NaN votes are no class's
    expected = 0.25 * stats.norm.ppf(sm.clopper_pearson_lower(res.counts[:, 0].numpy(), 2000, 0.001))
    np.testing.assert_allclose(res.radius.numpy(), expected)
    assert float(res.radius.max()) < 0.25 * stats.norm.ppf(sm.clopper_pearson_lower(2000, 2000, 0.001)) - 0.1
    # every sample NaN: abstain (certify and predict)
    all_nan = Smooth(_NaNSome(-1e9), 3, 0.25)
    assert int(all_nan.certify(x, 50, 200, 0.01, 100).prediction[0]) == -1
    det = all_nan.predict(x, 200, 0.01, 100, return_details=True)
    assert det.prediction.tolist() == [-1, -1] and det.nan_votes.tolist() == [200, 200]
