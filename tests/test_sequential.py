"""Sequential certification (robustops.smoothing.sequential / stream, Smooth.certify_radius / certify_radii /
certify_sequential): soundness by simulation against a Bernoulli oracle across the decision boundary, the
closed-form linear classifier, agreement with fixed-n CERTIFY, the noise contract, batch refill, bad input."""
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import devices
from helpers import Linear2
from scipy import stats

from robustops import smoothing as sm
from robustops.smoothing import ABSTAINED, CERTIFIED, NOT_CERTIFIED, Smooth
from robustops.smoothing import betting
from robustops.smoothing import sequential as seq
from robustops.smoothing.sequential import (SequentialTest, clopper_pearson_lower, clopper_pearson_upper, look_schedule,
                                            simulate)

SIGMA = 0.25


def points_at_margin(t, w, gen):
    """Inputs whose signed distance to the hyperplane w.x = 0 is t: Linear2(w) smoothed with sigma votes
    class 1 with probability Phi(t / sigma)."""
    w = torch.as_tensor(w, dtype=torch.float64)
    u = w / w.norm()
    x = torch.randn(len(t), w.numel(), generator=gen, dtype=torch.float64)
    x = x - (x @ u)[:, None] * u + torch.as_tensor(t, dtype=torch.float64)[:, None] * u
    return x.float()


class Recorder(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.rows = net, []

    def forward(self, x):
        self.rows.append(x.shape[0])
        return self.net(x)


# ------------------------------------------------------------------------------- the statistics

def test_look_schedule_and_cp_upper():
    assert look_schedule(100, 100_000, 2.0).tolist() == [100 * 2 ** k for k in range(10)] + [100_000]
    assert look_schedule(100, 100).tolist() == [100]
    assert look_schedule(100, 150, 2.0).tolist() == [100, 150]
    # n_k = ceil(n_min * growth^k), strictly increasing even where the ceilings would repeat
    assert look_schedule(100, 1000, 1.25).tolist() == [100, 125, 157, 196, 245, 306, 382, 477, 597, 746, 932, 1000]
    assert look_schedule(2, 10, 1.1).tolist() == [2, 3, 4, 5, 6, 7, 8, 9, 10]
    # the upper bound is the mirror image of the lower one
    n_a, n = np.array([0, 3, 50, 99, 100]), 100
    up = clopper_pearson_upper(n_a, n, 0.01)
    assert np.allclose(up, 1 - sm.clopper_pearson_lower(n - n_a, n, 0.01))
    assert up[-1] == 1.0


WORST = {}
#: (test, schedule, growth): the old default (doubling looks) for both tests, the new schedules for cp (the
#: betting bounds are anytime-valid whatever the looks; its threshold schedule: test_threshold_schedule_...)
SCHEDULE_CASES = [("betting", "geometric", 2.0), ("cp", "geometric", 2.0), ("cp", "threshold", 1.5)]


#: the tests' names of the sequential tests: "betting" is the default (pilot-weighted mixture of bets and a
#: Clopper-Pearson final look), "plugin" the first version's plug-in bets
VARIANTS = {"betting": {}, "plugin": dict(test="betting", bets="plugin", final_share=0.0), "cp": {}}


def variant(test):
    """simulate / SequentialTest keywords of a test name of VARIANTS."""
    return VARIANTS[test] or dict(test=test)


@pytest.mark.parametrize("test,schedule,growth", SCHEDULE_CASES)
def test_never_certifies_below_the_threshold_more_than_alpha(test, schedule, growth):
    """10^4 simulated inputs per pA on a grid up to the threshold Phi(r / sigma) (pA = Phi(r / sigma)
    itself is the hardest null): the frequency of certifying stays <= alpha with binomial slack. The
    same check at the threshold with the plug-in estimate fails badly, so the check has power."""
    alpha, trials, r = 0.05, 10_000, 0.25
    p0 = stats.norm.cdf(r / SIGMA)
    limit = stats.binom.ppf(1 - 1e-4, trials, alpha) / trials
    worst = 0.0
    for p in [p0 - 0.03, p0 - 0.01, p0 - 0.003, p0]:
        t = simulate(p, trials, seed=int(p * 1e6), test=test, alpha=alpha, thresholds=[p0], n_min=50, n_max=20_000,
                     schedule=schedule, growth=growth)
        rate = float(np.mean(t.decisions[:, 0] == CERTIFIED))
        worst = max(worst, rate)
        assert rate <= limit, f"{test}: pA {p:.4f} < threshold {p0:.4f} certified in {rate:.4f} of trials"
        assert np.all(t.n <= 20_000)
    WORST[(test, schedule, growth)] = worst
    print(f"\n{test} {schedule} {growth}: worst frequency of a wrong certificate {worst:.4f} (alpha {alpha}, limit {limit:.4f})")
    # power of the check: a naive sequential rule (plug-in estimate above p0 at any look) over-certifies
    rng = np.random.default_rng(0)
    s = np.cumsum(rng.binomial(1, p0, size=(2000, 800)), axis=1)
    naive = (s[:, 99::100] / np.arange(100, 801, 100) > p0).any(1).mean()
    assert naive > 5 * limit


def test_plugin_bets_are_sound_at_the_hardest_null():
    """The betting test's other bet (the first version's plug-in bet) at pA = Phi(r / sigma), the hardest
    null of the grid above: 10^4 trials, wrong certificates <= alpha with binomial slack."""
    alpha, trials, p0 = 0.05, 10_000, stats.norm.cdf(1.0)
    limit = stats.binom.ppf(1 - 1e-4, trials, alpha) / trials
    t = simulate(p0, trials, seed=5, alpha=alpha, thresholds=[p0], n_min=50, n_max=20_000, **VARIANTS["plugin"])
    assert np.mean(t.decisions[:, 0] == CERTIFIED) <= limit


@pytest.mark.parametrize("test,schedule,growth", [("betting", "geometric", 2.0), ("cp", "threshold", 1.5)])
def test_grid_and_full_modes_are_sound_by_simulation(test, schedule, growth):
    """Grid mode: P(any radius with Phi(r / sigma) > pA certified) <= alpha with one confidence sequence
    for all radii; full mode: P(certified radius > the true radius) <= alpha; and the upper bound:
    P(U < pA) <= beta."""
    alpha, trials = 0.05, 10_000
    limit = stats.binom.ppf(1 - 1e-4, trials, alpha) / trials
    radii = [0.0, 0.25, 0.5]
    p0 = stats.norm.cdf(np.array(radii) / SIGMA)
    kw = dict(schedule=schedule, growth=growth)
    for p in [p0[1] - 0.002, p0[2] - 0.002, 0.9]:
        t = simulate(p, trials, seed=7, test=test, alpha=alpha, thresholds=p0, n_min=50, n_max=10_000, **kw)
        wrong = ((t.decisions == CERTIFIED) & (p0[None, :] > p)).any(1).mean()
        assert wrong <= limit, f"{test}: grid mode wrongly certified {wrong:.4f} at pA {p:.4f}"
        assert np.mean(t.upper < p) <= limit
    for p in [0.7, 0.95, 0.999]:
        t = simulate(p, trials, seed=11, test=test, alpha=alpha, precision_z=0.2, n_min=50, n_max=10_000, **kw)
        over = np.mean(t.lower > p)
        assert over <= limit, f"{test}: full mode over-certified {over:.4f} at pA {p}"


@pytest.mark.parametrize("test", ["betting", "cp"])
def test_few_samples_on_easy_inputs(test):
    """The issue's target at the statistical level: r = 0.25, sigma = 0.25, alpha = 0.001, n_max =
    100,000: inputs with pA >= 0.9 need >= 10x fewer samples (n0 + estimation) than fixed n0 + n = 100,100,
    and are certified; pA well below the threshold stops early as not certified."""
    p0 = stats.norm.cdf(1.0)
    for p in [0.9, 0.95, 0.99, 1.0]:
        t = simulate(p, 2000, seed=3, test=test, alpha=0.001, thresholds=[p0])
        samples = 100 + t.n.mean()
        assert samples * 10 <= 100_100, f"{test}: pA {p}: {samples:.0f} samples"
        assert np.mean(t.decisions[:, 0] == CERTIFIED) > 0.99
    t = simulate(0.6, 2000, seed=3, test=test, alpha=0.001, thresholds=[p0])
    assert np.all(t.decisions[:, 0] == NOT_CERTIFIED) and t.n.mean() < 1000


def test_mixture_capital_is_the_average_of_the_products():
    """The mixture's capital from the cumulative (s, n) equals the average over its bets of the direct
    products prod_i (1 + l (X_i - m)) (K+) and prod_i (1 - l (X_i - m)) (K-), uniform or pilot weights."""
    x = np.array([1, 0, 1, 1, 1, 0, 1, 1, 1, 1])
    bets, m = np.array([0.1, 0.35, 0.8]), np.array([[0.3, 0.6, 0.85]])
    w = np.exp(betting.pilot_log_weights([40], [50], [0.6], bets, +1))
    assert np.isclose(w.sum(), 1.0) and w.min() >= betting.PILOT_FLOOR / 3 - 1e-12
    for side in (+1, -1):
        prods = np.prod(1 + side * bets[:, None, None] * (x[None, :, None] - m[0][None, None, :]), axis=1)
        got = np.exp(betting.mixture_log_capital([x.sum()], [x.size], m, bets, side))
        assert np.allclose(got[0], prods.mean(0), rtol=1e-12)
        got = np.exp(betting.mixture_log_capital([x.sum()], [x.size], m, bets, side, np.log(w)))
        assert np.allclose(got[0], (w[0][:, None] * prods).sum(0), rtol=1e-12)
    grid = betting.mixture_grid([0.9772], 100_000, 0.001, 0.9)
    assert grid[-1] == 0.9 and np.allclose(grid[1:] / grid[:-1], betting.GRID_RATIO) and 0.05 < grid[0] < 0.1


@pytest.mark.parametrize("test", ["betting", "plugin"])
def test_betting_bounds_are_monotone_in_the_data(test):
    """More successes never lower L nor U (same pilot, same looks), L <= U, and at n_max the default's L
    is at least the final look's Clopper-Pearson bound at final_share * alpha."""
    t = SequentialTest(401, alpha=0.01, thresholds=[0.5], n_min=400, n_max=400, **variant(test))
    rows = np.arange(401)
    t.start(rows, 80, 100)
    s = np.minimum(rows, t.chunk(rows))  # the first look: the same for every row (same pilot)
    t.update(rows, s)
    assert np.all(np.diff(t.lower) >= 0) and np.all(np.diff(t.upper) >= 0) and np.all(t.lower <= t.upper)
    end = t.n >= t.n_max
    if test == "betting" and end.any():
        assert np.all(t.lower[end] >= clopper_pearson_lower(s[end], t.n[end], t.final_share * 0.01))
        assert np.all(t.upper[end] <= clopper_pearson_upper(s[end], t.n[end], t.final_share * 0.01))


def test_unreachable_radius_abstains_without_sampling():
    """A radius that even n_max votes all for cA could not certify is decided at once (ABSTAINED), not
    after n_max samples."""
    t = SequentialTest(3, test="cp", alpha=0.001, thresholds=[stats.norm.cdf(5.0)], n_max=1000)
    t.start([0, 1, 2], 100, 100)
    assert np.all(t.done) and np.all(t.decisions == ABSTAINED)


def test_sequential_test_rejects_bad_settings():
    with pytest.raises(ValueError, match="test must be"):
        SequentialTest(1, test="sprt", thresholds=[0.9])
    with pytest.raises(ValueError, match="max_bet"):
        SequentialTest(1, thresholds=[0.9], max_bet=1.0)
    with pytest.raises(ValueError, match="n_min"):
        SequentialTest(1, thresholds=[0.9], n_min=200, n_max=100)
    with pytest.raises(ValueError, match="precision_z"):
        SequentialTest(1)
    with pytest.raises(ValueError, match="thresholds"):
        SequentialTest(1, thresholds=[1.5])
    with pytest.raises(ValueError, match="bets"):
        SequentialTest(1, thresholds=[0.9], bets="kelly")
    with pytest.raises(ValueError, match="final_share"):
        SequentialTest(1, thresholds=[0.9], final_share=1.0)
    t = SequentialTest(1, thresholds=[0.9])
    t.start([0])
    with pytest.raises(ValueError, match="cumulative successes"):
        t.update([0], [1000])


# ------------------------------------------------------------------------------ on a classifier

def _linear_inputs(p_class1, D=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(D, generator=gen) + 0.5
    t = SIGMA * torch.from_numpy(stats.norm.ppf(np.asarray(p_class1, dtype=np.float64)))
    return Linear2(w), points_at_margin(t, w, gen)


@pytest.mark.parametrize("test", ["betting", "cp"])
def test_linear_classifier_certified_accuracy_matches_the_truth(test):
    """Inputs with known pA (both classes): sequential decisions at r are sound (no input certified at r
    with pA < Phi(r / sigma) beyond alpha, never a wrong class), inputs far from the threshold are
    decided correctly, and on easy inputs fixed-n CERTIFY and the sequential modes agree."""
    M, r, alpha = 300, 0.25, 0.01
    gen = np.random.default_rng(1)
    p_true = gen.uniform(0.55, 0.9999, M)
    side = gen.random(M) < 0.5
    net, x = _linear_inputs(np.where(side, p_true, 1 - p_true))
    true_class = side.astype(np.int64)
    smooth = Smooth(net, 2, SIGMA)
    res = smooth.certify_radius(x, r, alpha, batch_size=4000, test=test, n0=64, n_max=20_000, seed=5)
    p0 = stats.norm.cdf(r / SIGMA)
    cert = res.decisions[:, 0].numpy() == CERTIFIED
    assert np.all(res.prediction.numpy()[cert] == true_class[cert])
    assert np.all(res.prediction.numpy()[~cert] == -1)
    assert np.all(res.radius.numpy()[cert] == r) and np.all(res.radius.numpy()[~cert] == 0)
    assert np.mean(cert & (p_true < p0)) <= stats.binom.ppf(0.999, M, alpha) / M
    easy = np.abs(p_true - p0) > 0.05
    assert np.all(cert[easy] == (p_true[easy] > p0))
    # fixed-n CERTIFY agrees on the easy inputs, with the same selection samples
    fixed = smooth.certify(x, 64, 20_000, alpha, batch_size=4000, seed=5)
    assert torch.equal(fixed.selection_counts, res.selection_counts)
    fixed_cert = (fixed.radius.numpy() >= r) & (fixed.prediction.numpy() >= 0)
    assert np.all(fixed_cert[easy] == cert[easy])
    # certified accuracy at r from the result equals the truth on the easy inputs
    acc = sm.certified_accuracy(res.radius.numpy(), res.prediction.numpy() == true_class, [r])[0]
    truth = np.mean(p_true > p0)
    assert abs(acc - truth) <= np.mean(~easy) + 1e-9
    assert res.samples.float().mean() < 0.2 * (64 + 20_000)


def test_grid_mode_and_full_mode_on_the_linear_classifier():
    net, x = _linear_inputs([0.6, 0.9, 0.99, 0.99999, 0.3])
    smooth = Smooth(net, 2, SIGMA)
    radii = [0.5, 0.25, 0.0]
    res = smooth.certify_radii(x, radii, 0.001, batch_size=2000, seed=2)
    d = res.decisions.numpy()
    assert res.radii.tolist() == radii and d.shape == (5, 3)
    # monotone in the radius: certified at 0.5 implies certified at 0.25 and 0
    order = np.argsort(radii)
    cert = d[:, order] == CERTIFIED
    assert np.all(cert[:, :-1] >= cert[:, 1:])
    for i, p in enumerate([0.6, 0.9, 0.99, 0.99999, 0.7]):
        expect = [stats.norm.cdf(r / SIGMA) < p for r in radii]
        assert (d[i] == CERTIFIED).tolist() == expect, (i, d[i])
        assert res.radius[i] == max([r for r, e in zip(radii, expect) if e], default=0.0)
    assert res.prediction.tolist() == [1, 1, 1, 1, 0]
    full = smooth.certify_sequential(x, 0.001, 2000, precision=0.05, seed=2)
    fixed = smooth.certify(x, 100, 100_000, 0.001, 2000, seed=2)
    assert full.decisions.shape == (5, 0)
    assert torch.equal(full.prediction, fixed.prediction)
    # within precision of fixed-n (plus the bound's looser level), never above the true radius by chance here
    true_r = SIGMA * stats.norm.ppf([0.6, 0.9, 0.99, 0.99999, 0.7])
    assert np.all(full.radius.numpy() <= true_r)
    close = np.abs(full.radius.numpy() - fixed.radius.numpy())
    assert np.all(close[:3] < 0.05 + 0.02), close
    assert full.samples[0] < 100_100 / 5 and full.samples[1] < 100_100 / 5


def test_same_noise_as_certify_and_samples_add_up():
    """Selection samples are certify's; the estimation samples of input index 0 are certify's first n (the
    stride does not matter at index 0); counts + NaN votes add up to the samples."""
    net, x = _linear_inputs([0.93, 0.7])
    smooth = Smooth(net, 2, SIGMA)
    res = smooth.certify_radius(x[:1], 0.25, 0.001, 256, n0=50, seed=9, indices=[0])
    n_est = int(res.samples[0]) - 50
    fixed = smooth.certify(x[:1], 50, n_est, 0.001, 256, seed=9, indices=[0])
    assert torch.equal(fixed.counts, res.counts) and torch.equal(fixed.selection_counts, res.selection_counts)
    assert int(res.counts.sum()) + int(res.nan_votes[0]) == n_est
    # another index: compare with certify at n = n_max (same stride)
    res = smooth.certify_radius(x[1:], 0.25, 0.001, 256, n0=50, n_max=3000, seed=9, indices=[7])
    fixed = smooth.certify(x[1:], 50, 3000, 0.001, 256, seed=9, indices=[7])
    n_est = int(res.samples[0]) - 50
    assert n_est < 3000 and int(res.counts.sum()) == n_est
    assert torch.equal(fixed.selection_counts, res.selection_counts)
    assert int(res.counts[0, 1]) <= int(fixed.counts[0, 1]) <= int(res.counts[0, 1]) + 3000 - n_est


def test_results_do_not_depend_on_batch_size_order_or_slots():
    net, x = _linear_inputs(np.linspace(0.55, 0.999, 12), seed=4)
    smooth = Smooth(net, 2, SIGMA)
    idx = list(range(100, 112))
    ref = smooth.certify_radii(x, [0.1, 0.3], 0.01, 1000, seed=1, indices=idx)
    for bs, active in [(37, None), (5000, 3), (256, 1)]:
        other = smooth.certify_radii(x, [0.1, 0.3], 0.01, bs, seed=1, indices=idx, max_active=active)
        for f in ("prediction", "radius", "decisions", "samples", "counts", "pA_lower"):
            assert torch.equal(getattr(ref, f), getattr(other, f)), (bs, active, f)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    shuffled = smooth.certify_radii(x[perm], [0.1, 0.3], 0.01, 300, seed=1, indices=[idx[i] for i in perm])
    assert torch.equal(shuffled.samples, ref.samples[perm]) and torch.equal(shuffled.decisions, ref.decisions[perm])
    assert not torch.equal(smooth.certify_radii(x, [0.1, 0.3], 0.01, 1000, seed=2, indices=idx).counts, ref.counts)


def test_refill_keeps_every_pass_full_until_the_inputs_run_out():
    """Inputs leave as they are decided and waiting inputs take their places: every forward pass is full
    while inputs are waiting."""
    net, x = _linear_inputs(np.linspace(0.6, 0.999, 40), seed=5)
    rec = Recorder(net)
    smooth = Smooth(rec, 2, SIGMA)
    state = {}

    def source():
        for i in range(len(x)):
            yield i, x[i]
        state["passes_before_end"] = len(rec.rows)

    records = list(smooth.certify_stream(source(), 0.001, 500, radii=[0.25], n0=100, n_max=20_000, seed=0))
    assert sorted(r.index for r in records) == list(range(40))
    k = state["passes_before_end"]
    assert k > 5 and all(n == 500 for n in rec.rows[:k])
    assert sum(rec.rows) == sum(r.samples + r.unused for r in records)
    # completion order: easy inputs (high pA) finish before hard ones that entered earlier
    order = [r.index for r in records]
    assert order != sorted(order)


def test_last_passes_are_filled_with_samples_ahead_of_the_looks(monkeypatch):
    """With fewer open inputs than a pass holds, the passes are filled with samples past the inputs' next
    looks (counted only when a look is reached): fewer passes than without, the same results (counts at
    each look are exact), and the samples per pass add up to the counted samples plus the unused ones."""
    from robustops.smoothing import stream
    net, x = _linear_inputs([0.9, 0.93, 0.95, 0.97], seed=5)
    rec = Recorder(net)
    smooth = Smooth(rec, 2, SIGMA)

    def run():
        rec.rows.clear()
        out = sorted(smooth.certify_stream(enumerate(x), 0.001, 400, radii=[0.25], seed=0), key=lambda r: r.index)
        return out, list(rec.rows)
    full, rows = run()
    assert sum(rows) == sum(r.samples + r.unused for r in full) and sum(r.unused for r in full) > 0
    monkeypatch.setattr(stream._Engine, "_fill_ahead", lambda self, pieces, room: 0)
    plain, plain_rows = run()
    assert sum(plain_rows) == sum(r.samples for r in plain) and all(r.unused == 0 for r in plain)
    assert len(rows) < len(plain_rows) and max(rows[1:]) > max(plain_rows[1:]), (rows, plain_rows)
    for a, b in zip(full, plain):
        assert (a.samples, a.decisions.tolist(), a.counts.tolist()) == (b.samples, b.decisions.tolist(),
                                                                        b.counts.tolist())


def test_constant_classifier_stops_at_the_first_look():
    class Constant(nn.Module):
        def forward(self, x):
            return torch.tensor([[0.0, 1.0, 0.0]]).repeat(x.shape[0], 1)

    smooth = Smooth(Constant(), 3, SIGMA)
    x = torch.rand(4, 1, 4, 4)
    # the threshold schedule's first look: all n0 selection votes for cA, so the anchor for p_hat = 1
    first = int(seq.clearing_n(1.0, stats.norm.cdf(1.0), 0.001 * seq.ANCHOR_SHARE, 100_000))
    # betting's anchor: where its mixture capital with all successes reaches its level (it does there, at
    # the first look: the estimation votes are all successes, as the selection's)
    b = SequentialTest(1, test="betting", thresholds=[stats.norm.cdf(1.0)])
    b.start([0], [seq.DEFAULT_N0], seq.DEFAULT_N0)
    stop = {"cp": first, "betting": int(b.first_looks([seq.DEFAULT_N0], [seq.DEFAULT_N0], b.log_w[:1, 0])[0])}
    assert b.looks[0, 0] == stop["betting"] == 55
    for test in ("betting", "cp"):
        res = smooth.certify_radius(x, 0.25, 0.001, 1000, test=test, seed=0)
        assert res.samples.tolist() == [seq.DEFAULT_N0 + stop[test]] * 4 and res.prediction.tolist() == [1] * 4
        geo = smooth.certify_radius(x, 0.25, 0.001, 1000, test=test, seed=0, schedule="geometric", n0=100, n_min=100)
        assert geo.samples.tolist() == [200] * 4
        assert res.decisions.tolist() == [[CERTIFIED]] * 4
        pred, radius = smooth.certify_radius(x[:1], 0.25, 0.001, test=test, seed=0)
        assert (pred, radius) == (1, 0.25)


def test_nonfinite_input_abstains_with_a_warning():
    net, x = _linear_inputs([0.99, 0.99])
    x[1, 0] = float("nan")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = Smooth(net, 2, SIGMA).certify_radii(x, [0.25], 0.001, 500, seed=0)
    assert any("NaN" in str(m.message) for m in w)
    assert res.prediction.tolist()[1] == -1 and res.decisions[1, 0] == ABSTAINED
    assert res.samples[1] == seq.DEFAULT_N0 and not bool(res.finite_input[1]) and res.prediction[0] == 1


def test_bad_arguments_name_the_argument():
    net, x = _linear_inputs([0.9])
    smooth = Smooth(net, 2, SIGMA)
    cases = [
        (lambda: smooth.certify_radius(x, -0.1), "radius"),
        (lambda: smooth.certify_radius(x, float("nan")), "radius"),
        (lambda: smooth.certify_radii(x, []), "radii"),
        (lambda: smooth.certify_radii(x, [0.1, "a"]), r"radii\[1\]"),
        (lambda: smooth.certify_radius(x, 0.1, 1.5), "alpha"),
        (lambda: smooth.certify_radius(x, 0.1, test="sprt"), "test"),
        (lambda: smooth.certify_radius(x, 0.1, n_min=500, n_max=100), "n_min"),
        (lambda: smooth.certify_radius(x, 0.1, n0=0), "n0"),
        (lambda: smooth.certify_radius(x, 0.1, batch_size=0), "batch_size"),
        (lambda: smooth.certify_radius(x, 0.1, beta=0), "beta"),
        (lambda: smooth.certify_sequential(x, precision=0), "precision"),
        (lambda: list(smooth.certify_stream([(0, x[0])], radii=[0.1], precision=0.1)), "precision"),
        (lambda: list(smooth.certify_stream([(-1, x[0])], radii=[0.1])), "indices"),
        (lambda: list(smooth.certify_stream([(0, x[0]), (1, x)], radii=[0.1])), "shape"),
    ]
    for fn, word in cases:
        with pytest.raises((ValueError, TypeError), match=word):
            fn()


@pytest.mark.parametrize("autocast,channels_last", [(None, False), ("bf16", True), ("fp16", False)])
def test_autocast_and_channels_last_use_certify_noise(autocast, channels_last):
    """With autocast / channels_last the sequential selection and estimation samples are still certify's
    (input index 0: certify's first n estimation samples)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4)).eval()
    x = torch.rand(1, 3, 6, 6)
    smooth = Smooth(net, 4, 0.5, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3], autocast=autocast,
                    channels_last=channels_last)
    res = smooth.certify_radius(x, 0.1, 0.01, 300, n0=40, n_min=60, n_max=2000, seed=4)
    n_est = int(res.samples[0]) - 40
    fixed = smooth.certify(x, 40, n_est, 0.01, 300, seed=4)
    assert torch.equal(fixed.selection_counts, res.selection_counts) and torch.equal(fixed.counts, res.counts)


@pytest.mark.parametrize("device", devices())
def test_devices_agree(device):
    """The sequential result on CUDA (lagged, asynchronous reads) equals the CPU's up to the noise's float
    rounding: with a margin-free classifier the votes are identical."""
    net, x = _linear_inputs(np.linspace(0.6, 0.999, 10), seed=8)
    cpu = Smooth(net, 2, SIGMA).certify_radii(x, [0.25, 0.5], 0.001, 700, seed=3)
    res = Smooth(net.to(device), 2, SIGMA).certify_radii(x.to(device), [0.25, 0.5], 0.001, 700, seed=3)
    assert torch.equal(res.decisions, cpu.decisions)
    assert (res.samples - cpu.samples).abs().max() <= 0 or device == "cuda"
    assert math.isclose(float(res.samples.float().mean()), float(cpu.samples.float().mean()), rel_tol=0.1)


@pytest.mark.parametrize("test", ["betting", "cp"])
def test_selection_votes_steer_the_bets_but_never_count(test):
    """A huge pilot (selection) count for cA with no estimation successes certifies nothing: the bounds
    come from the estimation samples alone; and the pilot does not change the CP bounds at all."""
    for schedule in ("geometric", "threshold"):
        t = SequentialTest(2, test=test, alpha=0.01, thresholds=[0.6], n_min=100, n_max=400, schedule=schedule)
        t.start([0, 1], [10**6, 0], [10**6, 10**6])
        t.update([0, 1], t.s[[0, 1]])
        assert np.all(t.lower == 0.0) and np.all(t.decisions[:, 0] != CERTIFIED)
        if test == "cp" and schedule == "geometric":  # (the threshold schedule moves the looks, not the bounds)
            assert t.upper[0] == t.upper[1]


@pytest.mark.cuda
def test_at_most_one_host_sync_per_forward_pass(monkeypatch):
    """On CUDA the vote table is read one pass late through a pinned buffer and an event: at most one
    synchronization per forward pass, and it is the read's event wait. Strict: the whole run is under sync
    debug mode "error" except the reads, whose event waits and syncs are counted."""
    from sync_budget import counted_syncs, sync_mode
    from robustops.smoothing import stream
    net, x = _linear_inputs(np.linspace(0.6, 0.999, 24), seed=2)
    rec = Recorder(net.cuda())
    smooth = Smooth(rec, 2, SIGMA)
    x = x.cuda()
    smooth.certify_radii(x[:2], [0.25], 0.001, 500, seed=0)  # warm-up
    rec.rows.clear()
    torch.cuda.synchronize()
    waits, read_syncs = [], []
    wait = torch.cuda.Event.synchronize

    def counted_wait(event):
        waits.append(1)
        with sync_mode("default"):
            wait(event)
    original_read = stream._Engine._read

    def counted_read(engine, item):
        with counted_syncs() as found:
            yield from original_read(engine, item)
        read_syncs.extend(found)
    monkeypatch.setattr(torch.cuda.Event, "synchronize", counted_wait)
    monkeypatch.setattr(stream._Engine, "_read", counted_read)
    with sync_mode("error"):
        res = smooth.certify_radii(x, [0.25, 0.5], 0.001, 500, seed=0)
    assert len(waits) + len(read_syncs) <= len(rec.rows) + 1, read_syncs[:5]
    assert len(waits) >= 1  # the reads wait on the event (the copy is asynchronous)
    assert int(res.samples.sum() + res.unused.sum()) == sum(rec.rows)


# ------------------------------------------------------------------------------ look schedules

def test_threshold_schedule_places_its_looks_as_documented():
    """An input whose selection votes all went to cA (p_hat = 1) is anchored where the bound at
    ANCHOR_SHARE * alpha with all successes clears Phi(r / sigma); its looks are the geometric ones through
    the anchor (growth apart, down to n_min), the anchor spends ANCHOR_SHARE of alpha, n_max FINAL_SHARE and the
    others share the rest; an input whose selection rate is not above the threshold keeps the geometric looks from n_min."""
    alpha, n0, p0 = 0.001, 50, stats.norm.cdf(1.0)
    t = SequentialTest(3, alpha=alpha, thresholds=[p0], n_min=50, n_max=100_000, growth=1.5, schedule="threshold")
    t.start([0, 1, 2], [50, 40, 46], n0)
    n1 = math.ceil(math.log(alpha * seq.ANCHOR_SHARE) / math.log(p0))  # alpha_1^(1/n) >= p0 with n successes
    assert t.looks[0, 0] == n1 == 44
    K = t.K_row[0]
    expect = [n1] + [math.ceil(n1 * 1.5 ** k - 1e-9) for k in range(1, K - 1)] + [100_000]
    assert t.looks[0, :K].tolist() == expect and expect[-2] < 100_000 <= math.ceil(n1 * 1.5 ** (K - 1))
    assert t.spend[0, 0] == seq.ANCHOR_SHARE and math.isclose(t.spend[0].sum(), 1.0)
    assert t.spend[0, K - 1] == seq.FINAL_SHARE  # n_max, where inputs near the threshold end
    assert np.allclose(t.spend[0, 1:K - 1], (1 - seq.ANCHOR_SHARE - seq.FINAL_SHARE) / (K - 2))
    assert t.looks[1, :t.K_row[1]].tolist() == look_schedule(50, 100_000, 1.5).tolist()  # 0.8 < p0: geometric
    assert np.allclose(t.spend[1, :t.K_row[1]], 1.0 / t.K_row[1])
    # 0.92: the anchor is further on and the looks below it go down to n_min
    n1 = int(seq.clearing_n(46 / 50, p0, alpha * seq.ANCHOR_SHARE, 100_000))
    looks = t.looks[2, :t.K_row[2]]
    assert n1 in looks and looks[0] >= 50 and looks[0] < 75 and t.spend[2, list(looks).index(n1)] == seq.ANCHOR_SHARE
    assert np.all(np.diff(looks) > 0) and looks[-1] == 100_000
    # the mixture betting test aims at where ITS capital with the expected successes reaches its level
    b = SequentialTest(1, test="betting", alpha=alpha, thresholds=[p0], n_min=50, n_max=100_000, growth=1.5)
    b.start([0], [46], n0)
    n1 = int(b.first_looks([46], [n0], b.log_w[:1, 0])[0])
    cap = [betting.mixture_log_capital([n * 0.92], [n], [[p0]], b.grid, +1, b.log_w[:1, 0])[0, 0] for n in (n1 - 1, n1)]
    level = -math.log((1 - betting.DEFAULT_FINAL_SHARE) * alpha)
    assert cap[0] < level <= cap[1] and n1 in b.looks[0, :b.K_row[0]]


@pytest.mark.parametrize("growth,n_min", [(1.02, 50), (1.02, 2), (1.05, 1), (1.5, 1), (1.5, 2), (2.0, 1), (3.0, 1)])
def test_anchored_schedule_terminates_with_small_growth_or_n_min(growth, n_min):
    """Regression (review of issue 30): stepping down from the anchor by ceil(x / growth) stalls where
    ceil(x / growth) = x (x <= ~growth / (growth - 1)), so growth 1.02 or n_min 1-2 hung in start. The
    looks must be strictly increasing, reach down to min(anchor, n_min), and fit the table's K columns
    (an anchored plan can have one look more than the geometric looks from 1)."""
    p0 = stats.norm.cdf(1.0)
    t = SequentialTest(1, alpha=0.001, thresholds=[p0], n_min=n_min, n_max=2000, growth=growth)
    for n1 in (1, 2, 3, 7, 44, 1999):
        looks = t.anchored_schedule(n1)
        assert np.all(np.diff(looks) > 0) and looks[-1] == 2000 and n1 in looks and len(looks) <= t.K
        assert looks[0] >= min(n1, n_min)
    sim = simulate(0.9, 10, seed=0, n0=50, test="cp", alpha=0.001, thresholds=[p0], n_min=n_min, n_max=2000,
                   growth=growth)
    assert sim.done.all() and np.all(sim.n <= 2000)


def test_cp_does_not_abstain_while_a_look_ahead_can_still_certify():
    """Abstention is judged at every look still ahead with its own share, not at n_max's alone: with n_max
    just past the anchor (44 for p_hat = 1 at r = sigma), all-successes at n_max with FINAL_SHARE cannot
    clear Phi(1), but the anchor with ANCHOR_SHARE can: the input is certified there, not abstained."""
    p0 = stats.norm.cdf(1.0)
    t = simulate(1.0, 3, seed=0, n0=50, test="cp", alpha=0.001, thresholds=[p0], n_min=10, n_max=50)
    assert clopper_pearson_lower(50, 50, 0.001 * seq.FINAL_SHARE) < p0
    assert t.decisions[:, 0].tolist() == [CERTIFIED] * 3 and t.n.tolist() == [44] * 3


@pytest.mark.parametrize("test,trials,ps", [("cp", 10_000, (-0.003, 0.0)), ("betting", 2000, (-0.003, 0.0))])
def test_threshold_schedule_sound_whatever_the_selection(test, trials, ps):
    """The threshold schedule depends on the selection samples only, so the guarantee must hold for ANY
    selection counts: with the selection forced to the worst cases (all for cA: the earliest anchor; a rate
    just above the threshold: an anchor far on), inputs at or below the threshold are certified in <= alpha
    of the trials (binomial slack). Betting's bounds are anytime-valid whatever the looks (fewer trials)."""
    alpha, n0, p0 = 0.05, 50, stats.norm.cdf(1.0)
    limit = stats.binom.ppf(1 - 1e-4, trials, alpha) / trials
    for s0 in (50, 44):
        for d in ps:
            t = simulate(p0 + d, trials, seed=s0 + int(1e4 * -d), n0=n0, s0=s0, test=test, alpha=alpha,
                         thresholds=[p0], n_min=50, n_max=5000, schedule="threshold", growth=1.5)
            assert t.K_row.min() > 1
            rate = float(np.mean(t.decisions[:, 0] == CERTIFIED))
            assert rate <= limit, f"{test}: s0 {s0}, pA {p0 + d:.4f}: certified in {rate:.4f} of trials"


def test_growth_and_schedule_cut_samples_towards_the_oracle():
    """The issue's measurement in small: at r = sigma, alpha 0.001, the threshold schedule (growth 1.5,
    n0 = n_min = 50) needs fewer estimation samples than doubling looks from 100 at every pA bin, and on
    easy inputs (pA 0.999) within 1.3x of the oracle (the one-sided CP bound at alpha with the expected
    successes)."""
    p0 = stats.norm.cdf(1.0)
    for p in (0.9, 0.99, 0.999):
        old = simulate(p, 1000, seed=2, n0=100, test="cp", alpha=0.001, thresholds=[p0], n_min=100, growth=2.0,
                       schedule="geometric")
        new = simulate(p, 1000, seed=2, test="cp", alpha=0.001, thresholds=[p0])
        assert new.n.mean() < old.n.mean(), p
    assert new.n.mean() <= 1.3 * seq.clearing_n(0.999, p0, 0.001, 100_000)


def test_schedule_arguments_are_checked():
    with pytest.raises(ValueError, match="growth"):
        SequentialTest(1, thresholds=[0.9], growth=1.0)
    with pytest.raises(ValueError, match="schedule"):
        SequentialTest(1, thresholds=[0.9], schedule="doubling")
    # full-radius mode has no threshold to aim at: the threshold schedule keeps the geometric looks
    t = SequentialTest(2, precision_z=0.1, n_min=50, growth=1.5, schedule="threshold")
    t.start([0, 1], [50, 50], 50)
    assert t.looks[0, :t.K_row[0]].tolist() == look_schedule(50, 100_000, 1.5).tolist()
