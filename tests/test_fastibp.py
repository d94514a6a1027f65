"""FastIBP (Shi et al. 2021): the IBP initialisation, the warm-up regularisers against their
definitions (an independent float64 computation from explicit lower / upper bounds), the schedule of
their weight; acceps / acr selection; the optimiser options grad_clip and onecycle; a short run."""
import math

import pytest
import torch
import torch.nn as nn
from helpers import one_thread, resume_matches_uninterrupted  # noqa: F401 (one_thread: an autouse fixture)
from torch.utils.data import DataLoader, Subset

from robustops import bounds
from robustops import train as rt
from robustops.data import load_digits
from robustops.train.evaluation import RADIUS_TOL
from robustops.train.methods.fastibp import bound_pass, ibp_init, relu_balance_loss, tightness_loss


@pytest.fixture(scope="module")
def digits():
    return load_digits("train"), load_digits("test")


def bn_cnn(seed=0, w=8):
    """A digits CNN with BatchNorm after every layer (Shi et al.'s architecture rule)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
                         nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
                         nn.Flatten(), nn.Linear(2 * w * 16, 4 * w), nn.BatchNorm1d(4 * w), nn.ReLU(),
                         nn.Linear(4 * w, 10))


# ------------------------------------------------------------------------------ IBP initialisation

def test_ibp_init_std_is_the_formula():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 256, 5), nn.ReLU(), nn.Flatten(), nn.Linear(400, 300), nn.ReLU(),
                        nn.Linear(300, 10))
    last_w, biases = net[5].weight.clone(), [net[0].bias.clone(), net[3].bias.clone()]
    assert ibp_init(net, torch.Generator().manual_seed(1)) == 2
    for layer, fan_in in ((net[0], 4 * 5 * 5), (net[3], 400)):
        w = layer.weight
        assert w.std().item() == pytest.approx(math.sqrt(2 * math.pi) / fan_in, rel=0.02)
        assert abs(w.mean().item()) < 0.05 * w.std().item()
    # the classifier and the biases keep the default initialisation (the authors' code)
    assert torch.equal(net[5].weight, last_w)
    assert torch.equal(net[0].bias, biases[0]) and torch.equal(net[3].bias, biases[1])


def test_trainer_applies_ibp_init_once_from_the_seed():
    def first_weight(**kw):
        net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        torch.manual_seed(5)
        nn.init.normal_(net[0].weight)
        rt.Trainer(net, method="fastibp", eps=0.1, seed=3, **kw)
        return net[0].weight.detach().clone()

    a, b = first_weight(), first_weight()
    assert torch.equal(a, b)  # the initialisation stream follows from the seed
    assert a.std().item() == pytest.approx(math.sqrt(2 * math.pi) / 64, rel=0.1)
    assert first_weight(weight_init="default").std().item() == pytest.approx(1.0, rel=0.1)


# ------------------------------------------------------------------------------ the regularisers

def explicit_pre_activations(net, x, eps):
    """[(lower, upper)] entering each ReLU of a Linear-ReLU-Linear-ReLU-Linear net, in float64, by interval
    arithmetic in lower / upper form (positive and negative weights apart)."""
    lower, upper = (x.double() - eps).clamp(0, 1), (x.double() + eps).clamp(0, 1)
    out = []
    for lin in (net[0], net[2]):
        w, b = lin.weight.double(), lin.bias.double()
        lo = lower @ w.clamp(min=0).T + upper @ w.clamp(max=0).T + b
        hi = upper @ w.clamp(min=0).T + lower @ w.clamp(max=0).T + b
        out.append((lo, hi))
        lower, upper = lo.clamp(min=0), hi.clamp(min=0)
    return out


def definition_losses(pre, delta0, tau):
    """L_tightness and L_relu written out element by element (Shi et al., section 3.4)."""
    tight, relu = 0.0, 0.0
    for lo, hi in pre:
        lo, hi = lo.flatten().tolist(), hi.flatten().tolist()
        n = len(lo)
        centres = [(a + b) / 2 for a, b in zip(lo, hi)]
        mean_radius = sum((b - a) / 2 for a, b in zip(lo, hi)) / n
        tight += max(0.0, tau - float(delta0) / mean_radius) / tau
        mu = sum(centres) / n
        act = [i for i in range(n) if lo[i] > 0]
        inact = [i for i in range(n) if hi[i] < 0]
        rho = (sum(centres[i] for i in act) / n) / (-sum(centres[i] for i in inact) / n)
        nu = sum((centres[i] - mu) ** 2 for i in act) / sum((centres[i] - mu) ** 2 for i in inact)
        relu += (max(0.0, tau - min(rho, 1 / rho)) + max(0.0, tau - min(nu, 1 / nu))) / tau
    return tight / len(pre), relu / len(pre)


def test_regularisers_equal_their_definitions():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3)).double()
    x, y = torch.rand(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
    eps, tau = 0.08, 0.9
    worst, first, pre = bound_pass(net, x, y, eps, 0.0, 1.0, 3)
    assert torch.allclose(worst, bounds.worst_case_logits(net, x, y, eps), rtol=0, atol=1e-12)
    ref_pre = explicit_pre_activations(net, x, eps)
    delta0 = (((x + eps).clamp(0, 1) - (x - eps).clamp(0, 1)) / 2).mean().item()  # the input box's mean radius
    assert len(pre) == 2
    for iv, (lo, hi) in zip(pre, ref_pre):
        assert torch.allclose(iv.lower, lo, atol=1e-12) and torch.allclose(iv.upper, hi, atol=1e-12)
    ref_tight, ref_relu = definition_losses(ref_pre, delta0, tau)
    # float32 inside the losses (as in training): 1e-5 relative
    got_tight, got_relu = tightness_loss(first, pre, tau).item(), relu_balance_loss(pre, tau).item()
    assert ref_tight > 0 and ref_relu > 0  # the test exercises both hinges
    assert got_tight == pytest.approx(ref_tight, rel=1e-5) and got_relu == pytest.approx(ref_relu, rel=1e-5)
    # a layer with no stable unit (0 / 0 ratios) adds 0 but counts in m (the authors' code)
    unstable = bounds.Interval(torch.zeros(4, 5), torch.ones(4, 5))
    alone = relu_balance_loss([pre[0]], tau).item()
    assert relu_balance_loss([pre[0], unstable], tau).item() == pytest.approx(alone / 2, rel=1e-6)
    # no NaN gradient from a dropped (0 / 0) or one-sided (all active: ratio 0) layer
    c = torch.randn(4, 5, requires_grad=True)
    loss = relu_balance_loss([bounds.Interval(c, torch.full((4, 5), 10.0)),
                              bounds.Interval(c.abs() + 1, torch.full((4, 5), 0.5))], tau)
    loss.backward()
    assert loss.item() == pytest.approx(2.0 / 2) and torch.isfinite(c.grad).all()  # (2 + 0) / m


def test_regulariser_weight_schedule():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    tr = rt.Trainer(net, method="fastibp", eps=0.1, warmup=0.1, ramp=0.5, reg_lambda=0.5, seed=0)
    m = tr.method
    assert m.schedule(0.05) == (0.0, 0.5)  # warm-up: eps 0, full weight (the loss is then the clean one)
    assert m.schedule(0.6) == (pytest.approx(0.1), 0.0) and m.schedule(1.0) == (pytest.approx(0.1), 0.0)
    for p in (0.12, 0.2, 0.3, 0.45, 0.59):
        eps_t, lam = m.schedule(p)
        assert 0 < eps_t < 0.1
        assert lam == pytest.approx(0.5 * (1 - eps_t / 0.1))  # lambda_0 (1 - eps_t / eps_target)


# ------------------------------------------------------------------------------ selection

def test_acceps_selection_picks_the_formulas_epoch(digits, tmp_path):
    train_ds, test_ds = digits
    val = DataLoader(Subset(test_ds, list(range(128))), batch_size=128)
    sub = DataLoader(Subset(train_ds, list(range(256))), batch_size=32, shuffle=True)
    eps = 0.02
    res = rt.fit(bn_cnn(), sub, "fastibp", epochs=3, eps=eps, val_loader=val, select="acceps", optimizer="adam",
                 lr=1e-2, weight_decay=0, schedule="constant", warmup=0.0, ramp=0.5, seed=0, progress=False,
                 verbose=False, restore_best=False)
    scores = []
    for row in res.history:
        assert 0 <= row["acr"] <= eps
        scores.append(math.sqrt(row["clean_acc"] * row["acr"] / eps))
        assert row["acceps"] == pytest.approx(scores[-1])
    assert len(set(round(s, 9) for s in scores)) > 1  # the epochs differ, so the choice is tested
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    assert res.select == "acceps" and res.best_epoch == best + 1 and res.best_metric == pytest.approx(scores[best])
    # acr is the mean radius capped at eps, by the documented grid (tol eps / 16)
    x, y = next(iter(val))
    net = bn_cnn()
    m = rt.Trainer(net, method="fastibp", eps=eps, weight_init="default").evaluate(val)
    r = bounds.certified_radius(net, x, y, eps_max=eps, tol=eps * RADIUS_TOL).radius
    assert m["acr"] == pytest.approx(r.mean().item())
    with pytest.raises(ValueError, match="select='acr' needs a certified"):
        rt.Trainer(bn_cnn(), method="natural", select="acr")


# ------------------------------------------------------------------------------ optimiser options

def test_grad_clip_clips_to_the_max_norm():
    torch.manual_seed(0)
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))

    def step_size(clip):
        net = bn_cnn(1)
        before = [p.detach().clone() for p in net.parameters()]
        tr = rt.Trainer(net, method="natural", optimizer="sgd", lr=1.0, momentum=0.0, weight_decay=0.0,
                        schedule="constant", grad_clip=clip)
        tr.train_step(x, y)
        return torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(net.parameters(), before))).item()

    full = step_size(None)  # lr 1, plain SGD: the step is the gradient
    assert full > 1e-2
    assert step_size(1e-3) == pytest.approx(1e-3, rel=1e-4)  # above the max: scaled to it
    assert step_size(10 * full) == pytest.approx(full, rel=1e-6)  # below: unchanged
    with pytest.raises(ValueError, match="grad_clip"):
        rt.FitConfig.make("natural", grad_clip=0).resolved()


def test_onecycle_lr_curve_and_resume():
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))

    def trainer():
        return rt.Trainer(bn_cnn(2), method="natural", optimizer="adam", lr=0.1, schedule="onecycle", epochs=2,
                          steps_per_epoch=10)

    tr = trainer()
    lrs = [tr.optimizer.param_groups[0]["lr"]]
    for _ in range(20):
        tr.train_step(x, y)
        lrs.append(tr.optimizer.param_groups[0]["lr"])

    def cos(a, b, t):  # cosine annealing from a to b
        return b + (a - b) / 2 * (1 + math.cos(math.pi * t))

    # torch's one-cycle defaults: 30% up from lr / 25, then down to lr / 25 / 1e4, over 20 steps
    start, peak, end, up = 0.1 / 25, 0.1, 0.1 / 25 / 1e4, 0.3 * 20 - 1
    ref = [cos(start, peak, s / up) if s <= up else cos(peak, end, (s - up) / (19 - up)) for s in range(20)]
    assert lrs[:20] == pytest.approx(ref, rel=1e-9)
    assert max(lrs) == pytest.approx(0.1) and tr.progress == 1.0
    tr.train_step(x, y)  # past the schedule's end: stays at its last rate
    assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(lrs[20])
    # resume: the scheduler's state continues the curve
    a = trainer()
    for _ in range(7):
        a.train_step(x, y)
    b = trainer()
    b.load_state_dict(a.state_dict())
    b.train_step(x, y)
    assert b.optimizer.param_groups[0]["lr"] == pytest.approx(lrs[8], rel=1e-12)


# ------------------------------------------------------------------------------ a short run

def test_fastibp_trains_the_digits(digits):
    train_ds, test_ds = digits
    val = DataLoader(Subset(test_ds, list(range(256))), batch_size=256)
    net = bn_cnn()
    res = rt.fit(net, DataLoader(Subset(train_ds, list(range(256))), batch_size=32, shuffle=True), "fastibp",
                 epochs=2, eps=0.02, val_loader=val, optimizer="adam", lr=1e-2, weight_decay=0, grad_clip=10,
                 warmup=0.0, ramp=0.5, seed=0, progress=False, verbose=False)
    last = res.history[-1]
    assert res.select == "cert_acc" and res.config.label == "FastIBP (kappa=0)"
    assert all(math.isfinite(r["train_loss"]) for r in res.history)
    # measured (torch 2.14, CPU): clean 0.64, IBP-certified at 0.02: 0.20, acr 0.0074
    assert last["cert_acc"] > 0.1 and last["clean_acc"] > 0.4, last


def test_resume_is_exact_with_onecycle_and_grad_clip(digits, tmp_path):
    train_ds, test_ds = digits
    sub = Subset(train_ds, list(range(128)))
    val = DataLoader(Subset(test_ds, list(range(64))), batch_size=64)
    hp = dict(epochs=3, eps=0.05, warmup=0.0, ramp=0.6, seed=3, optimizer="adam", lr=5e-3, schedule="onecycle",
              grad_clip=0.5, select="acceps", progress=False, verbose=False)
    # dies in the middle of the second epoch, inside the eps ramp (regularisers on)
    ref, res, crash = resume_matches_uninterrupted("fastibp", sub, val, tmp_path, hp, crash_after=lambda n: n + 2,
                                                   width=8, weights_only=False)
    assert crash["epoch"] == 1 and res.epochs_run == ref.epochs_run == 3
    strip = lambda h: [{k: v for k, v in r.items() if "time" not in k} for r in h]  # noqa: E731
    assert str(strip(res.history)) == str(strip(ref.history)) and res.best_epoch == ref.best_epoch
    with pytest.raises(ValueError, match="grad_clip=0.5 \\(now 1.0\\)"):  # a resumed run keeps the clip
        rt.fit(bn_cnn(), DataLoader(sub, batch_size=32), "fastibp", val_loader=val, out_dir=str(tmp_path / "run"),
               resume=True, **{**hp, "grad_clip": 1.0})
