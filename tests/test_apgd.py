"""robustops.attacks.apgd: APGD-CE and APGD-T (Croce & Hein, ICML 2020) on the projected-gradient engine.

- the checkpoints against the paper's formula evaluated in exact fractions;
- Algorithm 1 against an independent plain-PyTorch transcription (condition 1 from the stored
  history of objective values, condition 2 from the stored step sizes and best values at each
  checkpoint), from the same start: identical iterates and results;
- constraints (L-inf and L2, per-sample eps with zeros, [0, 1]), determinism, early stop changing
  only the work, restarts, APGD-T's targets, the model's state, argument checks, robust_accuracy;
- strength on the SmallCNN of tests/helpers.py over the 360-image digits test split, 20 steps,
  L-inf eps 0.1 and L2 eps 1.0 (robust accuracy = clean-correct and still correct at x_adv; lower is
  stronger):
  * APGD-CE vs robustops' PGD (same eps, same budget: 20 gradient evaluations and a final forward,
    default alpha 2.5 eps / steps, random start, early_stop so that a success at any step counts):
    the mean over SEEDS must not be higher. Measured over 30 seeds: APGD-CE 0.5437 vs PGD 0.5510
    (L-inf), 0.0252 vs 0.0345 (L2).
  * APGD-CE vs torchattacks.APGD(loss="ce", n_restarts=1, same eps and steps, seed=s) and APGD-T vs
    torchattacks.APGDT(n_classes=10: 9 targets). Per seed d_s = ours - theirs; a case fails when
    mean(d) > max(T * stdev(d) / sqrt(n), 1 / 360) with T = 3 (a one-sided paired t statistic above
    3, p ~ 0.01 at 7 degrees of freedom; never below one image). Measured over 30 seeds (100..129 and
    200..229): stdev(d) = 0.0047 (L-inf) and 0.0054 (L2), so the margin is ~0.005 (2 images) at 8
    seeds; mean(d) = +0.0003 (L-inf: 0.5437 vs 0.5434) and -0.0015 (L2: 0.0252 vs 0.0267). At the
    test's seeds 0..7: mean(d) = +0.0007 with margin 0.0030 (L-inf), -0.0052 with margin 0.0040 (L2).
    (With the L2 start uniform in the ball's volume instead, mean(d) was +0.0023, SE 0.0010, over 30
    seeds: the reason for APGD's default l2_radius="uniform".) APGD-T
    reached 0.5250 (L-inf) and 0.0194 (L2) at every one of 16 seeds, as did torchattacks' APGDT, so
    stdev(d) = 0 and 2 seeds suffice; the margin is then one image.
"""
from __future__ import annotations

import math
import statistics
from fractions import Fraction

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import assert_in_ball, assert_not_weaker, one_thread, train_digits_model  # noqa: F401 (one_thread: an autouse fixture)

from robustops import attacks as A
from robustops.attacks.apgd import APGD, APGDT, checkpoints
from robustops.data import load_digits

STEPS = 20
SEEDS = range(8)
CASES = [("linf", 0.1), ("l2", 1.0)]


@pytest.fixture(scope="module")
def model():
    return train_digits_model(epochs=5, seed=0)


@pytest.fixture(scope="module")
def digits(model):
    x, y = load_digits("test").tensors
    with torch.no_grad():
        clean_ok = model(x).argmax(1) == y
    assert clean_ok.float().mean().item() > 0.9
    return x, y, clean_ok


def robust_acc(model, x_adv, y, clean_ok) -> float:
    with torch.no_grad():
        return (clean_ok & (model(x_adv).argmax(1) == y)).float().mean().item()


# ----------------------------------------------------------------------- the step-size schedule

def paper_checkpoints(n: int):
    """w_j = ceil(p_j n), p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), p_j <= 1,
    in exact fractions; repeated values listed once."""
    p = [Fraction(0), Fraction(22, 100)]
    while p[-1] + max(p[-1] - p[-2] - Fraction(3, 100), Fraction(6, 100)) <= 1:
        p.append(p[-1] + max(p[-1] - p[-2] - Fraction(3, 100), Fraction(6, 100)))
    w = []
    for pj in p:
        v = math.ceil(pj * n)
        if not w or v != w[-1]:
            w.append(v)
    return w


def test_checkpoints_match_the_paper_formula():
    assert checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(20) == [0, 5, 9, 12, 14, 16, 18, 19, 20]
    assert checkpoints(1) == [0, 1]
    for n in range(1, 1001):
        assert checkpoints(n) == paper_checkpoints(n), n
    assert APGD(nn.Linear(2, 3), eps=0.1, steps=100).checkpoints == [0, 22, 41, 57, 70, 80, 87, 93, 99]
    with pytest.raises(ValueError, match="steps"):
        checkpoints(0)


# ---------------------------------------------------------- Algorithm 1 against a transcription

def reference_apgd(model, x, y, eps, steps, x0, norm, rho=0.75, a=0.75):
    """Algorithm 1 in plain PyTorch, per sample, CE loss, from x0: returns (success, first fooling
    iterate's index or -1, x_adv, (halvings by condition 1 only, by condition 2 only))."""
    e = eps.view(-1, 1, 1, 1)

    def P(v):
        d = v - x
        if norm == "linf":
            d = torch.max(torch.min(d, e), -e)
        else:
            n = d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            d = d * torch.where(n > e, e / n.clamp_min(1e-30), torch.ones_like(n))
        return (x + d).clamp(0, 1)

    def s(g):
        return g.sign() if norm == "linf" else g / g.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, 1, 1, 1)

    def ev(v):
        v = v.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(v)
            f = F.cross_entropy(logits, y, reduction="none")
            (g,) = torch.autograd.grad(f.sum(), v)
        return f.detach(), g, logits.argmax(1) != y

    def pick(c, u, v):
        return torch.where(c.view(-1, *([1] * (u.dim() - 1))), u, v)

    W = paper_checkpoints(steps)
    eta = 2 * eps
    f0, g0, fooled = ev(x0)
    first, x_first = torch.where(fooled, 0, -1), x0.clone()
    x1 = P(x0 + eta.view(-1, 1, 1, 1) * s(g0))                     # line 1
    f1, g1, fooled = ev(x1)
    new = fooled & (first < 0)
    first, x_first = torch.where(new, 1, first), pick(new, x1, x_first)
    up = f1 > f0                                                     # lines 2-3
    f_max, x_max, g_max = torch.where(up, f1, f0), pick(up, x1, x0), pick(up, g1, g0)
    fs = [f0, f1]                                                    # f of the iterates as the algorithm leaves them
    eta_at, f_max_at = {0: eta.clone()}, {0: f_max.clone()}
    x_prev, xk, gk = x0, x1, g1
    only1 = only2 = 0
    for k in range(1, steps):
        eta_at[k] = eta.clone()
        z = P(xk + eta.view(-1, 1, 1, 1) * s(gk))                    # line 5
        xn = P(xk + a * (z - xk) + (1 - a) * (xk - x_prev))          # line 6
        fn, gn, fooled = ev(xn)
        new = fooled & (first < 0)
        first, x_first = torch.where(new, k + 1, first), pick(new, xn, x_first)
        up = fn > f_max                                              # lines 7-9
        f_max, x_max, g_max = torch.where(up, fn, f_max), pick(up, xn, x_max), pick(up, gn, g_max)
        fs.append(fn)
        x_prev, xk, gk = xk, xn, gn
        f_max_at[k] = f_max.clone()
        if k in W and k < steps - 1:                                 # lines 10-13 (at N - 1: no effect)
            wp = W[W.index(k) - 1]
            c1 = sum((fs[i + 1] > fs[i]).long() for i in range(wp, k)) < rho * (k - wp)
            c2 = (eta_at[wp] == eta_at[k]) & (f_max_at[wp] == f_max_at[k])
            only1 += int((c1 & ~c2 & (first < 0)).sum())
            only2 += int((c2 & ~c1 & (first < 0)).sum())
            h = c1 | c2
            eta = torch.where(h, eta / 2, eta)
            xk, gk = pick(h, x_max, xk), pick(h, g_max, gk)
            fs[-1] = torch.where(h, f_max, fs[-1])
    return first >= 0, first, pick(first >= 0, x_first, x_max), (only1, only2)


@pytest.mark.parametrize("early_stop", [False, True])
@pytest.mark.parametrize("norm,eps", CASES)
def test_algorithm_1_matches_a_plain_transcription(model, digits, norm, eps, early_stop):
    x, y, _ = digits
    x, y = x[:96], y[:96]
    e = torch.full((96,), eps)
    e[:3] = 0.0
    e[3:30] *= 0.5
    atk = APGD(model, eps=e, steps=STEPS, norm=norm, seed=5, early_stop=early_stop)
    x0 = atk.engine.start(x, e, "uniform", 5, 0)  # run 0 draws with the seed itself at the batch's offset
    res = atk.perturb(x, y, offset=0)
    ok, first, x_adv, (only1, only2) = reference_apgd(model, x, y, e, STEPS, x0, norm)
    # the halving conditions were exercised on samples still standing (both of them where enough stand)
    assert only1 > 0 and (only2 > 0 or norm == "l2")
    assert torch.equal(res.success, ok)
    assert torch.equal(res.success_step, first)
    torch.testing.assert_close(res.x_adv, x_adv, atol=1e-6 if norm == "l2" else 0.0, rtol=0.0)
    assert 0 < int(ok.sum()) < 93


# --------------------------------------------------------------------------------- constraints

@pytest.mark.parametrize("cls", [APGD, APGDT])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_constraints_hold_for_every_sample(model, digits, cls, norm):
    x, y, _ = digits
    x, y = x[:64], y[:64]
    g = torch.Generator().manual_seed(0)
    eps = torch.rand(64, generator=g) * (0.2 if norm == "linf" else 1.5)
    eps[:4] = 0.0
    kw = {"n_target_classes": 3} if cls is APGDT else {"restarts": 2}
    for early_stop in (True, False):
        xa = cls(model, eps=eps, steps=12, norm=norm, seed=3, early_stop=early_stop, **kw)(x, y)
        assert_in_ball(xa, x, eps, norm)  # eps = 0 (the first 4) leaves the sample unchanged


def test_result_fields_are_consistent(model, digits):
    x, y, _ = digits
    x, y = x[:128], y[:128]
    res = APGD(model, eps=0.1, steps=10, seed=1).perturb(x, y)
    with torch.no_grad():
        logits = model(res.x_adv)
    pred = logits.argmax(1)
    assert torch.equal(res.pred, pred)
    assert torch.equal(res.success, pred != y)
    assert bool((res.success_step[res.success] >= 0).all()) and bool((res.success_step[~res.success] == -1).all())
    torch.testing.assert_close(res.loss, F.cross_entropy(logits, y, reduction="none"), atol=1e-5, rtol=1e-5)
    assert bool((res.restart == 0).all())


# ------------------------------------------------------------------ determinism, early stop, restarts

def test_deterministic_for_a_fixed_seed(model, digits):
    x, y, _ = digits
    x, y = x[:64], y[:64]
    for cls, kw in ((APGD, {}), (APGDT, {"n_target_classes": 2})):
        a = cls(model, eps=0.1, steps=6, seed=11, **kw).perturb(x, y)
        b = cls(model, eps=0.1, steps=6, seed=11, **kw).perturb(x, y)
        c = cls(model, eps=0.1, steps=6, seed=12, **kw).perturb(x, y)
        assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.success, b.success)
        assert torch.equal(a.success_step, b.success_step) and torch.equal(a.loss, b.loss)
        assert not torch.equal(a.x_adv, c.x_adv)
    torch.manual_seed(4)
    d = APGD(model, eps=0.1, steps=4)(x, y)
    torch.manual_seed(4)
    e = APGD(model, eps=0.1, steps=4)(x, y)
    assert torch.equal(d, e)
    atk = APGD(model, eps=0.1, steps=2, seed=0)  # consecutive batches draw different starts
    assert not torch.equal(atk(x[:8], y[:8]), atk(x[:8], y[:8]))


@pytest.mark.parametrize("cls", [APGD, APGDT])
@pytest.mark.parametrize("norm,eps", CASES)
def test_early_stop_changes_only_the_work(model, digits, cls, norm, eps):
    x, y, _ = digits
    x, y = x[:96], y[:96]
    kw = {"n_target_classes": 3} if cls is APGDT else {"restarts": 2}
    full = cls(model, eps=eps, steps=12, norm=norm, seed=2, early_stop=False, **kw).perturb(x, y)
    early = cls(model, eps=eps, steps=12, norm=norm, seed=2, early_stop=True, **kw).perturb(x, y)
    for f in ("success", "success_step", "restart", "pred"):
        assert torch.equal(getattr(full, f), getattr(early, f)), f
    torch.testing.assert_close(early.x_adv, full.x_adv, atol=1e-6, rtol=0)
    torch.testing.assert_close(early.loss, full.loss, atol=1e-5, rtol=1e-5)
    # skip: counted as fooled at step 0; with early_stop not attacked at all
    skip = torch.zeros(96, dtype=torch.bool)
    skip[::5] = True
    res = cls(model, eps=eps, steps=12, norm=norm, seed=2, **kw).perturb(x, y, skip=skip)
    assert bool(res.success[skip].all()) and bool((res.success_step[skip] == 0).all())
    assert torch.equal(res.x_adv[skip], x[skip])
    assert torch.equal(res.success[~skip], early.success[~skip])


@pytest.mark.parametrize("norm,eps", [("linf", 0.08), ("l2", 0.6)])
def test_restarts_never_weaken(model, digits, norm, eps):
    x, y, _ = digits
    x, y = x[:160], y[:160]
    one = APGD(model, eps=eps, steps=8, norm=norm, seed=7).perturb(x, y)
    three = APGD(model, eps=eps, steps=8, norm=norm, seed=7, restarts=3).perturb(x, y)
    assert bool((three.success | ~one.success).all())
    assert int(three.restart.max()) <= 2
    neither = ~three.success
    assert bool((three.loss[neither] >= one.loss[neither] - 1e-6).all())


# ------------------------------------------------------------------------------------ APGD-T

def test_apgdt_targets_are_the_top_other_classes(model, digits):
    x, y, _ = digits
    x, y = x[:50], y[:50]
    atk = APGDT(model, eps=0.1, steps=4, n_target_classes=4)
    targets = atk._run_targets(x, y)
    assert len(targets) == 4
    with torch.no_grad():
        logits = model(x)
    t = torch.stack(targets, 1)
    assert bool((t != y[:, None]).all())
    assert bool((t.sort(1).values[:, 1:] != t.sort(1).values[:, :-1]).all())  # distinct
    z = logits.gather(1, t)
    assert bool((z[:, 1:] <= z[:, :-1]).all())  # by the clean logit, largest first
    others = logits.scatter(1, y[:, None], float("-inf"))
    assert torch.equal(t[:, 0], others.argmax(1))
    assert len(APGDT(model, eps=0.1, n_target_classes=50)._run_targets(x, y)) == 9  # at most C - 1
    # success is untargeted misclassification; the run index encodes target * restarts + start
    res = APGDT(model, eps=0.15, steps=10, n_target_classes=3, restarts=2, seed=0).perturb(x, y)
    with torch.no_grad():
        pred = model(res.x_adv).argmax(1)
    assert torch.equal(res.success, pred != y)
    assert int(res.restart.max()) <= 5
    assert not atk.targeted and atk.target_fn is None


# ---------------------------------------------------------------- model state, normalisation, errors

def test_model_mode_and_parameter_flags_restored(digits):
    x, y, _ = digits
    net = train_digits_model(epochs=5, seed=0)
    net.train()
    APGD(net, eps=0.1, steps=3, seed=0)(x[:16], y[:16])
    assert net.training and all(p.requires_grad for p in net.parameters())
    assert all(p.grad is None for p in net.parameters())


def test_normalization_inside_or_outside(model, digits):
    x, y, _ = digits
    x, y = x[:32], y[:32]
    mean, std = [0.3], [0.4]

    class Shifted(nn.Module):  # a model that expects normalized inputs
        def forward(self, z):
            return model(z * 0.4 + 0.3)

    a = APGD(model, eps=0.1, steps=5, seed=0).perturb(x, y)
    b = APGD(Shifted(), eps=0.1, steps=5, seed=0, mean=mean, std=std).perturb(x, y)
    assert torch.equal(a.success, b.success)
    torch.testing.assert_close(a.x_adv, b.x_adv, atol=1e-5, rtol=0)


def test_bad_arguments_raise(model, digits):
    x, y, _ = digits
    with pytest.raises(ValueError, match="loss"):
        APGD(model, eps=0.1, loss="xent")
    with pytest.raises(ValueError, match="loss"):
        APGD(model, eps=0.1, loss=lambda logits, yy: logits.sum())
    with pytest.raises(ValueError, match="rho"):
        APGD(model, eps=0.1, rho=1.5)
    with pytest.raises(ValueError, match="steps"):
        APGD(model, eps=0.1, steps=0)
    with pytest.raises(ValueError, match="targeted DLR"):
        APGDT(model, eps=0.1, loss="ce")
    with pytest.raises(ValueError, match="n_target_classes"):
        APGDT(model, eps=0.1, n_target_classes=0)
    with pytest.raises(ValueError, match="untargeted"):
        APGD(model, eps=0.1, steps=2)(x[:4], y[:4], y[:4])
    with pytest.raises(ValueError, match="clip"):
        APGD(model, eps=0.1, steps=2)(x[:4] + 2, y[:4])
    with pytest.raises(ValueError, match="4 classes"):
        APGDT(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), eps=0.1, steps=2)(x[:4], y[:4] % 3)
    empty = APGD(model, eps=0.1, steps=2).perturb(x[:0], y[:0])
    assert empty.x_adv.shape == (0, 1, 8, 8) and empty.success.numel() == 0


# -------------------------------------------------------------------------------- robust_accuracy

@pytest.mark.parametrize("cls", [APGD, APGDT])
def test_robust_accuracy_runs(model, digits, cls):
    x, y, clean_ok = digits
    x, y, clean_ok = x[:160], y[:160], clean_ok[:160]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=50)
    kw = {"n_target_classes": 3} if cls is APGDT else {}
    r = A.robust_accuracy(model, loader, cls(model, eps=0.1, steps=10, seed=2, **kw), progress=False)
    assert r["n"] == 160
    assert r["clean_correct"] == int(clean_ok.sum())
    assert 0 < r["robust_acc"] < r["clean_acc"]
    s = r["samples"]
    assert torch.equal(s["robust_correct"], clean_ok & ~s["success"])
    assert bool((s["linf"] <= 0.1 + 1e-6).all())
    assert bool((s["success_step"][s["success"]] >= 0).all())
    # the same answer as one call on the whole set (starts are keyed by the sample's index)
    whole = cls(model, eps=0.1, steps=10, seed=2, **kw).perturb(x, y, offset=0, skip=~clean_ok)
    assert torch.equal(s["success"], whole.success)


# ------------------------------------------------------------------------------------- strength

@pytest.fixture(scope="module")
def apgd_ce_runs(model, digits):
    """Per case, APGD-CE robust accuracy per seed (20 steps), shared by the strength tests."""
    x, y, ok = digits
    return {(norm, eps): [robust_acc(model, APGD(model, eps=eps, steps=STEPS, norm=norm, seed=s)(x, y), y, ok)
                          for s in SEEDS] for norm, eps in CASES}


@pytest.mark.parametrize("norm,eps", CASES)
def test_apgd_ce_at_least_as_strong_as_pgd(model, digits, apgd_ce_runs, norm, eps):
    x, y, ok = digits
    pgd = []
    for s in SEEDS:
        res = A.PGD(model, eps=eps, steps=STEPS, norm=norm, seed=s, early_stop=True).perturb(x, y)
        pgd.append((ok & ~res.success).float().mean().item())
    ours = apgd_ce_runs[(norm, eps)]
    assert statistics.fmean(ours) <= statistics.fmean(pgd), (norm, statistics.fmean(ours), statistics.fmean(pgd))


def torchattacks_acc(model, attack_cls, x, y, clean_ok, **kwargs) -> float:
    with torch.random.fork_rng(devices=[]):  # torchattacks' APGD seeds torch's global generator
        x_adv = attack_cls(model, **kwargs)(x, y)
    model.eval()
    return robust_acc(model, x_adv, y, clean_ok)


@pytest.mark.parametrize("norm,eps", CASES)
def test_apgd_ce_not_weaker_than_torchattacks(model, digits, apgd_ce_runs, norm, eps):
    torchattacks = pytest.importorskip("torchattacks")
    x, y, ok = digits
    ta_norm = "Linf" if norm == "linf" else "L2"
    theirs = [torchattacks_acc(model, torchattacks.APGD, x, y, ok, norm=ta_norm, eps=eps, steps=STEPS, n_restarts=1,
                               seed=s, loss="ce") for s in SEEDS]
    assert_not_weaker(apgd_ce_runs[(norm, eps)], theirs, x.shape[0], f"APGD-CE {norm} eps {eps}")


@pytest.mark.parametrize("norm,eps", CASES)
def test_apgd_t_not_weaker_than_torchattacks(model, digits, norm, eps):
    torchattacks = pytest.importorskip("torchattacks")
    x, y, ok = digits
    ta_norm = "Linf" if norm == "linf" else "L2"
    seeds = range(2)
    ours = [robust_acc(model, APGDT(model, eps=eps, steps=STEPS, norm=norm, seed=s)(x, y), y, ok) for s in seeds]
    theirs = [torchattacks_acc(model, torchattacks.APGDT, x, y, ok, norm=ta_norm, eps=eps, steps=STEPS, n_restarts=1,
                               seed=s, n_classes=10) for s in seeds]
    assert_not_weaker(ours, theirs, x.shape[0], f"APGD-T {norm} eps {eps}")


def test_robust_accuracy_runs_an_ensemble_in_order():
    """robust_accuracy([APGD, APGDT]): the first attack's figures are APGD's alone (it sees every
    sample), the second attacks only what the first left robust, and a sample is robust when it
    survives both; the rows say which attack they hold."""
    from helpers import train_digits_model
    from torch.utils.data import DataLoader, TensorDataset

    from robustops.attacks import APGD, APGDT, robust_accuracy
    from robustops.data import IndexedDataset, load_digits

    model = train_digits_model(epochs=3, seed=0)
    x, y = load_digits("test").tensors
    loader = DataLoader(IndexedDataset(TensorDataset(x[:120], y[:120])), batch_size=50)
    ce = robust_accuracy(model, loader, APGD(model, eps=0.1, steps=10, seed=0), progress=False)
    both = robust_accuracy(model, loader, [APGD(model, eps=0.1, steps=10, seed=0),
                                           APGDT(model, eps=0.1, steps=10, seed=0, n_target_classes=3)],
                           progress=False)
    assert both["robust_acc_after"][0] == ce["robust_acc"]
    assert both["robust_acc_after"][1] == both["robust_acc"] <= ce["robust_acc"]
    s, s_ce = both["samples"], ce["samples"]
    assert torch.equal(s["index"], s_ce["index"]) and torch.equal(s["clean_correct"], s_ce["clean_correct"])
    assert not (s["robust_correct"] & ~s_ce["robust_correct"]).any()  # robust under both => under the first
    broken_first = s_ce["clean_correct"] & ~s_ce["robust_correct"]
    assert (s["attack"][broken_first] == 0).all() and (s["attack"][s_ce["robust_correct"]] == 1).all()
    with pytest.raises(ValueError, match="empty"):
        robust_accuracy(model, loader, [], progress=False)
