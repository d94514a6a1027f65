"""robustops.train.budget: the attack-budget schedules (Kinfu & Vidal 2022): their definitions, the step
size following the budget, the constant schedule's old path bit for bit, exact resume, errors."""
import csv
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import CrashingLoader, Interrupt, one_thread, tiny_cnn  # noqa: F401 (one_thread: autouse)
from torch.utils.data import DataLoader, Subset

from robustops import train as rt
from robustops.data import load_digits
from robustops.train import budget as bd

EPS = 0.2


@pytest.fixture(scope="module")
def digits_sub():
    return Subset(load_digits("train"), list(range(96)))


def cfg(method="pgd", **kw):
    return rt.FitConfig.make(method, eps=EPS, **kw).resolved()


def at(p):
    """A stand-in context at progress p (linear and curriculum read only the progress)."""
    return SimpleNamespace(progress=p)


X, Y = torch.zeros(3, 4), torch.zeros(3, dtype=torch.long)


def test_linear_ramp_values():
    c = cfg(budget_schedule="linear", budget_start=0.25, budget_warmup=0.5)
    s = bd.make_schedule(c)
    for p, f in ((0.0, 0.25), (0.1, 0.25 + 0.75 * 0.2), (0.25, 0.625), (0.5, 1.0), (0.9, 1.0)):
        eps, alpha = s(at(p), X, Y)
        assert eps == pytest.approx(EPS * f) and alpha == pytest.approx(c.alpha * f)
    assert s.log_values()["train_eps"] == pytest.approx(EPS * (0.25 + 0.4 + 0.625 + 2) / 5)


def test_curriculum_levels():
    c = cfg(budget_schedule="curriculum", budget_start=0.0, budget_warmup=0.8, budget_stages=4)
    s = bd.make_schedule(c)
    # stage k = min(3, floor(4 p / 0.8)): levels 0, eps/4, eps/2, 3 eps/4 (the last from p = 0.6 on)
    for p, f in ((0.0, 0.0), (0.19, 0.0), (0.2, 0.25), (0.45, 0.5), (0.6, 0.75), (1.0, 0.75)):
        assert s(at(p), X, Y)[0] == pytest.approx(EPS * f), p
    # the defaults: one level per epoch, the official code's np.linspace(s eps, eps, E + 1)[epoch]
    c = cfg(budget_schedule="curriculum", epochs=6)
    want = np.linspace(0.125 * EPS, EPS, 7)
    for e in range(6):
        assert bd.make_schedule(c)(at((e + 0.5) / 6), X, Y)[0] == pytest.approx(want[e])


@pytest.mark.parametrize("alpha", [None, 0.05])
def test_alpha_follows_eps(alpha):
    c = cfg(method="fgsm", budget_schedule="linear", budget_start=0.0, budget_warmup=1.0, alpha=alpha)
    eps, a = bd.make_schedule(c)(at(0.5), X, Y)
    # no alpha: the method's default ratio (fgsm: 1.25); given: the user's alpha / eps
    assert eps == pytest.approx(0.1) and a == pytest.approx(0.125 if alpha is None else 0.025)
    for m, ratio in (("pgd", 2.5 / 7), ("free", 1.0), ("trades", 2.5 / 7)):
        eps, a = bd.make_schedule(cfg(method=m, budget_schedule="curriculum"))(at(0.5), X, Y)
        assert a == pytest.approx(ratio * eps)


class Linear2(nn.Module):
    """Two classes, logits W x + b: the L-inf robust radius of x is margin / ||w_y - w_other||_1."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, -0.5, 0.25, 0.0], [-1.0, 0.5, 0.0, 0.5]]))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(x)


def toy_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 4, generator=g) * 2 - 1
    net = Linear2()
    with torch.no_grad():
        logits = net(x)
    y = torch.randint(0, 2, (64,), generator=g)
    margin = logits.gather(1, y[:, None])[:, 0] - logits.gather(1, 1 - y[:, None])[:, 0]
    radius = margin.clamp(min=0) / (net.fc.weight[0] - net.fc.weight[1]).abs().sum()
    return x, y, radius.detach()


def trainer(**kw):
    return rt.Trainer(Linear2(), rt.FitConfig.make("pgd", eps=EPS, lo=-10.0, hi=10.0, seed=0, **kw), steps_per_epoch=4)


def test_adaptive_distribution_is_the_adversarial_loss():
    """On a two-class linear model PGD (7 steps of 2.5 eps / 7) ends at x - eps sign(w_y - w_o), so the
    loss at budget e is mean_i softplus(e ||w_y - w_o||_1 - margin_i): the distribution in closed form."""
    x, y, radius = toy_batch()
    tr = trainer(budget_schedule="adaptive", budget_grid=5)
    eps, alpha = tr.ctx.budget(x, y)
    assert tr.ctx.forward.training  # the estimate's eval mode is undone
    v = (tr.model.fc.weight[0] - tr.model.fc.weight[1]).abs().sum().item()
    with torch.no_grad():
        logits = tr.model(x)
    margin = logits.gather(1, y[:, None])[:, 0] - logits.gather(1, 1 - y[:, None])[:, 0]
    grid = [EPS * j / 4 for j in range(5)]
    L = torch.tensor([F.softplus(e * v - margin).mean().item() for e in grid], dtype=torch.float64)
    assert torch.allclose(tr.budget.probs, L / L.sum(), atol=1e-6)
    assert tr.budget.probs[-1] > tr.budget.probs[0]  # larger budgets, larger losses
    assert min(abs(eps - e) for e in grid) < 1e-12 and alpha == pytest.approx(tr.cfg.alpha * eps / EPS)


class Clock(SimpleNamespace):
    def seed(self):
        self.n += 1
        return self.n


def test_adaptive_draws_follow_the_distribution():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3], dtype=torch.float64)
    for mode in ("batch", "sample"):
        s = bd.make_schedule(cfg(budget_schedule="adaptive", budget_grid=4, budget_adapt=mode))
        s.load_state_dict({"probs": probs, "estimated_epoch": 0})
        ctx = Clock(epoch=1, n=0)  # epoch 1 of budget_every 10: no new estimate
        draws = torch.cat([torch.as_tensor(s(ctx, torch.zeros(50, 4), Y)[0]).reshape(-1) for _ in range(60)])
        assert draws.numel() == (60 if mode == "batch" else 3000)
        freq = torch.stack([(draws - EPS * j / 3).abs().lt(1e-6).double().mean() for j in range(4)])
        assert freq.sum() == 1.0 and freq[1] == 0.0  # on the grid, never where p = 0
        assert torch.allclose(freq, probs, atol=0.12 if mode == "batch" else 0.03)


def test_adaptive_reestimates_every_few_epochs():
    x, y, _ = toy_batch()
    tr = trainer(budget_schedule="adaptive", budget_every=2, budget_adapt="sample")
    eps, _ = tr.ctx.budget(x, y)
    assert eps.shape == (64,) and tr.budget.estimated_epoch == 0
    tr.train_step(x, y)  # the engine and the op take the per-sample budgets
    seen = []
    for _ in range(11):  # 4 steps per epoch: epochs 0, 1, 2 -> estimates at epochs 0 and 2
        tr.train_step(x, y)
        seen.append(tr.budget.estimated_epoch)
    assert seen == [0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2]


def test_constant_is_the_old_path_bit_for_bit():
    x, y, _ = toy_batch()
    a, b = trainer(steps=3), trainer(steps=3)
    assert a.ctx.budget(x, y) == (a.cfg.eps, a.cfg.alpha)
    a.train_step(x, y)
    # the step before schedules: PGD on the engine with cfg.eps / cfg.alpha, then a natural step
    c, ctx = b.cfg, b.ctx
    b.fwd.train()
    x_adv = ctx.engine().run(x, y, c.eps, c.alpha, c.steps, start="uniform", seed=ctx.seed(), evaluate=False).x_adv
    ctx.natural_step(x_adv, y)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)


def test_curriculum_in_fit_logs_its_levels(digits_sub, tmp_path):
    res = rt.fit(tiny_cnn(seed=1), DataLoader(digits_sub, batch_size=32), "fgsm", epochs=4, eps=EPS, seed=0,
                 budget_schedule="curriculum", budget_start=0.0, progress=False, verbose=False, out_dir=str(tmp_path))
    assert [r["train_eps"] for r in res.history] == pytest.approx([EPS * k / 4 for k in (0, 1, 2, 3)])
    with open(os.path.join(tmp_path, "log.csv")) as fh:
        assert "train_eps" in next(csv.reader(fh))
    plain = rt.fit(tiny_cnn(seed=1), DataLoader(digits_sub, batch_size=32), "fgsm", epochs=1, eps=EPS,
                   progress=False, verbose=False)
    assert "train_eps" not in plain.history[0]
    assert res.config.label == "FGSM-RS AT + curriculum budget" and plain.config.label == "FGSM-RS AT"


@pytest.mark.parametrize("kw", [dict(budget_schedule="adaptive", budget_grid=3, budget_every=2),
                                dict(budget_schedule="linear", budget_warmup=1.0)])
def test_resume_mid_schedule(digits_sub, tmp_path, kw):
    hp = dict(epochs=3, eps=EPS, steps=1, seed=3, progress=False, verbose=False, **kw)
    ld = lambda: DataLoader(digits_sub, batch_size=32, shuffle=True)  # noqa: E731
    torch.manual_seed(0)
    full = tiny_cnn(seed=5, bn=True, width=8)
    ref = rt.fit(full, ld(), "pgd", out_dir=str(tmp_path / "full"), **hp)
    run = str(tmp_path / "run")
    torch.manual_seed(0)
    with pytest.raises(Interrupt):
        rt.fit(tiny_cnn(seed=5, bn=True, width=8), CrashingLoader(ld(), after=3 + 2), "pgd", out_dir=run, **hp)
    with pytest.raises(ValueError, match="budget_schedule"):
        rt.fit(tiny_cnn(seed=5, bn=True, width=8), ld(), "pgd", out_dir=run, resume=True,
               **{**hp, "budget_schedule": "curriculum"})
    torch.manual_seed(123)
    model = tiny_cnn(seed=9, bn=True, width=8)
    res = rt.fit(model, ld(), "pgd", out_dir=run, resume=True, **hp)
    for p, q in zip(full.state_dict().values(), model.state_dict().values()):
        assert torch.equal(p, q)
    strip = lambda h: [{k: v for k, v in r.items() if "time" not in k} for r in h]  # noqa: E731
    assert str(strip(res.history)) == str(strip(ref.history))


#: {what the error says: the settings that cause it}
BAD = {
    "budget_schedule must be one of": dict(budget_schedule="cosine"),
    "budget_start": dict(budget_schedule="linear", budget_start=1.5),
    "budget_warmup": dict(budget_schedule="linear", budget_warmup=0),
    "budget_stages": dict(budget_schedule="curriculum", budget_stages=0),
    "budget_grid": dict(budget_schedule="adaptive", budget_grid=2.5),
    "budget_adapt": dict(budget_schedule="adaptive", budget_adapt="epoch"),
    "budget_every": dict(budget_schedule="adaptive", budget_every=0),
    "needs eps > 0": dict(budget_schedule="linear", eps=0.0),
    "'ibp' has its own budget": dict(method="ibp", budget_schedule="curriculum"),
    "'gaussian' has its own budget": dict(method="gaussian", budget_schedule="adaptive"),
    "two spellings": dict(eps_schedule="curriculum", budget_schedule="adaptive"),
    "eps_schedule \\(the attack-budget schedule": dict(eps_schedule="smooth"),
}


def test_bad_settings():
    for msg, kw in BAD.items():
        with pytest.raises(ValueError, match=msg):
            rt.FitConfig.make(**{"method": "pgd", "eps": EPS, **kw}).resolved()


def test_eps_schedule_spells_the_budget_schedule_for_attacking_methods():
    c = rt.FitConfig.make("pgd", eps=EPS, eps_schedule="curriculum").resolved()
    assert c.budget_schedule == "curriculum" and "eps_schedule" not in c.params
    c = rt.FitConfig.make("ibp", eps=EPS, eps_schedule="smooth").resolved()  # the certified ramp's shape stays
    assert c.eps_schedule == "smooth" and (c.budget_schedule or "constant") == "constant"


def test_cli_flags(capsys, tmp_path):
    from robustops.cli import main

    assert main(["train", "--eps-schedule", "adaptive", "--budget-grid", "1", "--out", str(tmp_path / "e")]) == 2
    assert "budget_grid" in capsys.readouterr().err  # --eps-schedule reached the budget schedule's checks

    assert main(["train", "--budget-schedule", "linear", "--budget-warmup", "2", "--out", str(tmp_path / "r")]) == 2
    assert "budget_warmup" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--budget-schedule", "steps"])
    assert "--budget-schedule" in capsys.readouterr().err
    # a certified method's --eps-schedule is its ramp shape: a budget schedule there is refused, not ignored
    assert main(["train", "--method", "ibp", "--eps-schedule", "adaptive", "--out", str(tmp_path / "i")]) == 2
    assert "eps_schedule" in capsys.readouterr().err


def test_a_selection_pass_leaves_train_eps_and_the_estimate():
    """coreset_inputs (a selection pass) asks ctx.budget(x, y, log=False): nothing logged, no estimate."""
    x, y, _ = toy_batch()
    for method in ("pgd", "fgsm", "trades"):
        tr = rt.Trainer(Linear2(), rt.FitConfig.make(method, eps=EPS, lo=-10.0, hi=10.0, seed=0, budget_grid=3,
                                                     budget_schedule="adaptive", budget_every=1), steps_per_epoch=4)
        tr.method.coreset_inputs(x, y)  # before any estimate: a uniform draw, the schedule untouched
        assert tr.budget.probs is None and tr.budget.estimated_epoch == -1
        eps, _ = tr.ctx.budget(x, y)
        probs = tr.budget.probs.clone()
        for _ in range(3):
            tr.method.coreset_inputs(x, y)
        assert torch.equal(tr.budget.probs, probs) and tr.budget.estimated_epoch == 0
        assert tr.budget.log_values()["train_eps"] == pytest.approx(eps), method


@pytest.mark.parametrize("adapt", ["batch", "sample"])
def test_free_clamps_the_carried_perturbation_to_a_lower_budget(adapt):
    """The perturbation carried from a minibatch at eps enters the next, at eps / 2, clamped to it: the
    step equals one from the clamped perturbation (the first replay trains inside the new ball)."""
    x, y, _ = toy_batch()
    models = []
    for start in (EPS, EPS / 2):
        tr = rt.Trainer(Linear2(), rt.FitConfig.make("free", eps=EPS, m=2, lo=-10.0, hi=10.0, seed=0, budget_grid=3,
                                                     budget_schedule="adaptive", budget_adapt=adapt),
                        steps_per_epoch=4)
        tr.budget.load_state_dict({"probs": torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), "estimated_epoch": 0})
        g = torch.Generator().manual_seed(1)
        tr.method.perturbation(x).copy_(torch.randint(0, 2, x.shape, generator=g) * 2.0 * start - start)
        tr.train_step(x, y)
        assert tr.method.perturbation(x).abs().max() <= EPS / 2 + 1e-7
        models.append(tr.model)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(p, q)


def test_adaptive_estimate_averages_the_losses_over_processes(monkeypatch):
    """Under DDP the estimate all-reduces L (mean over the processes): one distribution everywhere."""
    x, y, _ = toy_batch()
    tr = trainer(budget_schedule="adaptive", budget_grid=3)
    # this process's losses (PGD on the linear toy ends at the same corner whatever its start)
    mine = bd.adversarial_losses(tr.ctx, x, y, [EPS * j / 2 for j in range(3)])
    other = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)  # another process's
    calls = []
    monkeypatch.setattr(bd.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(bd.dist, "all_reduce", lambda t: calls.append(1) or t.add_(other.to(t.device)))
    tr.ctx.world_size = 2
    tr.ctx.budget(x, y)
    L = mine + other
    assert calls == [1] and torch.allclose(tr.budget.probs, L / L.sum(), atol=1e-6)


#: the tiny one-epoch command line of the CLI tests
TINY = ["--epochs", "1", "--batch-size", "256", "--val-size", "64", "--val-steps", "1", "--test-steps", "1",
        "--no-progress", "--steps", "1", "--threads", "1"]


def cli_run(out, *args):
    """``robustops train`` in process: (the saved config, the log's rows)."""
    import json

    from robustops.cli import main

    assert main(["train", *args, *TINY, "--out", str(out)]) == 0
    with open(os.path.join(out, "summary.json")) as fh:
        config = json.load(fh)["config"]
    with open(os.path.join(out, "log.csv")) as fh:
        return config, list(csv.DictReader(fh))


def test_cli_adaptive_per_sample_budgets_on_moving_digits(tmp_path):
    config, rows = cli_run(tmp_path, "--data", "moving_digits", "--budget-schedule", "adaptive", "--budget-adapt",
                           "sample", "--budget-every", "1", "--budget-grid", "3")
    assert {k: config[k] for k in ("budget_schedule", "budget_adapt", "budget_every", "budget_grid")} == \
        {"budget_schedule": "adaptive", "budget_adapt": "sample", "budget_every": 1, "budget_grid": 3}
    assert len(rows) == 1 and 0.0 < float(rows[0]["train_eps"]) < config["eps"]  # a mean of draws on [0, eps]


def test_cli_curriculum_spelled_eps_schedule(tmp_path):
    config, rows = cli_run(tmp_path, "--data", "digits", "--eps-schedule", "curriculum", "--budget-start", "0.25",
                           "--budget-stages", "2", "--budget-warmup", "0.5")
    assert {k: config[k] for k in ("budget_schedule", "budget_start", "budget_stages", "budget_warmup")} == \
        {"budget_schedule": "curriculum", "budget_start": 0.25, "budget_stages": 2, "budget_warmup": 0.5}
    n = -(-(len(load_digits("train")) - 64) // 256)  # the epoch's minibatches, at progress i / n
    want = config["eps"] * sum(bd.curriculum_fraction(i / n, 0.25, 0.5, 2) for i in range(n)) / n
    assert float(rows[0]["train_eps"]) == pytest.approx(want, rel=1e-5)
