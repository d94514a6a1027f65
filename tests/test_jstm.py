"""The joint-space threat model (robustops.attacks.jstm: JSTMAttack, JointEngine), robust mixup
(robustops.train.robust_mixup, the robust_mixup option) and method ijsat (Lau et al. 2023), against a
small invertible stand-in flow defined here (an orthogonal linear map with the flow protocol)."""
import json
import math

import pytest
import torch
import torch.nn as nn
from conftest import devices
from helpers import one_thread, resume_matches_uninterrupted, tiny_cnn  # noqa: F401 (one_thread: an autouse fixture)
from torch.utils.data import DataLoader, Subset

from robustops import train as rt
from robustops.attacks import PGD, JSTMAttack, JSTMAttackResult
from robustops.data import load_digits
from robustops.train.cutmix import MixedTarget
from robustops.train.robust_mixup import mixed_losses, robust_interpolation

EPS = 0.2


class OrthoFlow(nn.Module):
    """A stand-in flow: z = Q^T (x - 1/2) flattened, Q orthogonal (exact inverse; log|det| = 0)."""

    def __init__(self, shape=(1, 8, 8), seed=0):
        super().__init__()
        D = math.prod(shape)
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
        self.register_buffer("q", q.float())
        self.scale = nn.Parameter(torch.ones(()))  # a parameter, so that freezing has something to freeze
        self.image_shape = tuple(shape)

    def encode(self, x):
        return (x.flatten(1) - 0.5) @ self.q * self.scale

    def decode(self, z):
        return ((z / self.scale) @ self.q.T + 0.5).view(-1, *self.image_shape)

    def log_prob(self, x):
        z = self.encode(x)
        return -0.5 * z.pow(2).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi)


@pytest.fixture(scope="module")
def digits():
    return load_digits("train"), load_digits("test")


@pytest.fixture(scope="module")
def batch(digits):
    x, y = digits[1].tensors
    return x[:48], y[:48]


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


# ------------------------------------------------------------------------------------------ the attack

@pytest.mark.parametrize("device", devices())
def test_adversaries_satisfy_both_budgets_per_sample_and_the_box(batch, device):
    x, y = (t.to(device) for t in batch)
    flow = OrthoFlow().to(device)
    g = torch.Generator().manual_seed(1)
    eps, eps_z = torch.rand(48, generator=g) * 0.2, torch.rand(48, generator=g) * 0.5
    eps[:4], eps_z[4:8] = 0.0, 0.0
    eps, eps_z = eps.to(device), eps_z.to(device)
    res = JSTMAttack(net().to(device), flow, eps=eps, eps_z=eps_z, steps=6, restarts=2, early_stop=True,
                     seed=2).perturb(x, y)
    assert isinstance(res, JSTMAttackResult) and res.dz.shape == (48, 64) and res.dx.shape == x.shape
    assert (res.dz.abs().amax(1) <= eps_z + 1e-6).all() and (res.dx.flatten(1).abs().amax(1) <= eps + 1e-6).all()
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    rebuilt = (flow.decode(flow.encode(x) + res.dz) + res.dx).clamp(0, 1)
    torch.testing.assert_close(res.x_adv, rebuilt, atol=1e-5, rtol=0)
    assert res.success.float().mean() > 0.3  # it attacks: an untrained net falls
    assert not flow.scale.requires_grad or flow.scale.grad is None


@pytest.mark.parametrize("device", devices())
def test_zero_latent_budget_is_pixel_pgd(batch, device):
    x, y = (t.to(device) for t in batch)
    model, flow = net().to(device), OrthoFlow().to(device)
    for start in (True, False):
        a = JSTMAttack(model, flow, eps=0.1, eps_z=0.0, steps=5, seed=7, random_start=start).perturb(x, y)
        b = PGD(model, eps=0.1, steps=5, seed=7, random_start=start).perturb(x, y)
        torch.testing.assert_close(a.x_adv, b.x_adv, atol=1e-5, rtol=0)
        assert torch.equal(a.success, b.success) and (a.dz == 0).all()


def test_zero_pixel_budget_stays_on_the_flows_image_of_the_latent_ball(batch):
    x, y = batch
    flow = OrthoFlow(seed=3)
    res = JSTMAttack(net(), flow, eps=0.0, eps_z=0.3, steps=5, seed=1).perturb(x, y)
    assert (res.dx == 0).all() and (res.dz.abs() <= 0.3 + 1e-6).all() and res.dz.abs().max() > 0.2
    torch.testing.assert_close(res.x_adv, flow.decode(flow.encode(x) + res.dz).clamp(0, 1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kw, name", [(dict(eps=-0.1), "eps"), (dict(eps_z=float("nan")), "eps_z"),
                                      (dict(steps=0), "steps"), (dict(flow=nn.Linear(2, 2)), "flow")])
def test_bad_attack_arguments_name_the_argument(kw, name):
    args = dict(flow=OrthoFlow(), eps=0.1, eps_z=0.1)
    args.update(kw)
    with pytest.raises((ValueError, TypeError), match=name):
        JSTMAttack(net(), **args)


def test_wrong_image_shape_is_refused():
    with pytest.raises(ValueError, match="image_shape"):
        JSTMAttack(net(), OrthoFlow(shape=(1, 4, 4)), eps=0.1, eps_z=0.1)(torch.rand(2, 1, 8, 8), torch.zeros(2).long())


# ---------------------------------------------------------------------------------------- robust mixup

def test_robust_mixup_picks_the_more_adverse_interpolation():
    """A model that always says class 0: the more adverse interpolation of a (class 0, class 1) pair is the one
    dominated by the class-1 image, for both members of the pair."""
    def always_zero(x):
        return torch.tensor([[5.0, 0.0]]).expand(x.shape[0], 2)

    x = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)])
    y = torch.tensor([0, 1])
    x_mix, t = robust_interpolation(always_zero, x, y, torch.tensor([1, 0]), 0.3)
    assert t.lam == 0.7 and t.y.tolist() == [1, 1] and t.y2.tolist() == [0, 0]
    torch.testing.assert_close(x_mix, torch.full_like(x, 0.7))  # both: 0.7 * ones + 0.3 * zeros
    plain = mixed_losses(always_zero(x_mix), MixedTarget(y, y.flip(0), 0.7))
    assert (mixed_losses(always_zero(x_mix), t) >= plain).all()


def test_pgd_with_robust_mixup_resumes_exactly(digits, tmp_path):
    sub = Subset(digits[0], list(range(96)))
    val = DataLoader(Subset(digits[1], range(32)), batch_size=32)
    hp = dict(epochs=2, eps=EPS, steps=2, seed=3, progress=False, verbose=False, robust_mixup=1.0)
    ref, res, crash = resume_matches_uninterrupted("pgd", sub, val, tmp_path, hp, crash_after=lambda n: n + 1, width=8)
    assert "mix_gen" in crash["rank_states"][0] and crash["config"]["robust_mixup"] == 1.0
    assert "robust mixup (alpha=1)" in res.config.label


@pytest.mark.parametrize("method", ["natural", "trades"])
def test_robust_mixup_trains_natural_and_trades(digits, method):
    ld = DataLoader(Subset(digits[0], range(64)), batch_size=32)
    res = rt.fit(tiny_cnn(seed=1, width=8), ld, method, epochs=1, eps=EPS, steps=2, seed=0, robust_mixup=0.5,
                 progress=False, verbose=False)
    assert math.isfinite(res.history[-1]["train_loss"])


@pytest.mark.parametrize("kw, match", [(dict(robust_mixup=0.0), "robust_mixup"),
                                       (dict(robust_mixup=1.0, mixup=1.0), "robust_mixup"),
                                       (dict(method="fgsm_sdi", robust_mixup=1.0), "robust_mixup")])
def test_bad_robust_mixup_settings(digits, kw, match):
    ld = DataLoader(Subset(digits[0], range(32)), batch_size=32)
    kw = {"method": "pgd", **kw}
    with pytest.raises(ValueError, match=match):
        rt.fit(tiny_cnn(), ld, kw.pop("method"), epochs=1, progress=False, verbose=False, **kw)


# ------------------------------------------------------------------------------------------------ ijsat

def test_ijsat_resumes_exactly(digits, tmp_path):
    sub = Subset(digits[0], list(range(96)))
    val = DataLoader(Subset(digits[1], range(32)), batch_size=32)
    hp = dict(epochs=2, eps=EPS, steps=2, seed=4, progress=False, verbose=False, perturbation_model=OrthoFlow(),
              eps_z=0.2)
    ref, res, crash = resume_matches_uninterrupted("ijsat", sub, val, tmp_path, hp, crash_after=lambda n: n + 1,
                                                   width=8)
    assert crash["config"]["robust_mixup"] == 0.1 and "mix_gen" in crash["rank_states"][0]
    assert math.isfinite(ref.history[-1]["train_loss"])


def test_ijsat_at_zero_budgets_is_robust_mixup_training(digits):
    """With eps = eps_z = 0 the joint adversary is its input (up to the flow's rounding), so IAT's two terms
    coincide: any ijsat_clean trains the model as ijsat_clean=0 (the adversarial term alone) does."""
    ld = DataLoader(Subset(digits[0], range(64)), batch_size=32)
    params = []
    for w in (0.0, 0.5):
        model = tiny_cnn(seed=1, width=8)
        rt.fit(model, ld, "ijsat", epochs=1, eps=0.0, eps_z=0.0, steps=2, seed=0, perturbation_model=OrthoFlow(),
               ijsat_clean=w, ijsat_mix="before", progress=False, verbose=False)
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(params[0], params[1], atol=1e-5, rtol=1e-4)


def test_ijsat_with_the_clean_term_alone_is_natural_training_on_robust_mixup(digits):
    """ijsat_clean = 1, "clean" (the default order): the step is the clean robust-mixup loss alone, so the model
    trains as ``natural`` with the same robust_mixup does (the same mixing draws, the attack's weight 0)."""
    ld = DataLoader(Subset(digits[0], range(64)), batch_size=32)
    params = []
    for method, kw in (("ijsat", dict(ijsat_clean=1.0, perturbation_model=OrthoFlow())), ("natural", {})):
        model = tiny_cnn(seed=1, width=8)
        rt.fit(model, ld, method, epochs=1, eps=EPS, steps=2, seed=0, robust_mixup=0.1, progress=False,
               verbose=False, **kw)
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(params[0], params[1])


@pytest.mark.parametrize("mix", ["after", "clean"])
def test_ijsat_attacking_the_unmixed_batch_resumes_exactly(digits, tmp_path, mix):
    sub = Subset(digits[0], list(range(64)))
    hp = dict(epochs=2, eps=EPS, steps=2, seed=5, progress=False, verbose=False, perturbation_model=OrthoFlow(),
              eps_z=0.2, ijsat_mix=mix, ijsat_clean=0.3)
    ref, res, crash = resume_matches_uninterrupted("ijsat", sub, None, tmp_path, hp, crash_after=lambda n: n + 1,
                                                   width=8)
    assert crash["config"]["params"]["ijsat_mix"] == mix and math.isfinite(ref.history[-1]["train_loss"])


@pytest.mark.parametrize("kw, match", [(dict(), "flow is required"), (dict(flow="/no/such.pt"), "no normalising-flow"),
                                       (dict(perturbation_model=nn.Linear(2, 2)), "flow protocol"),
                                       (dict(perturbation_model=OrthoFlow(), eps_z=-1.0), "eps_z"),
                                       (dict(perturbation_model=OrthoFlow(), norm="l2"), "norm"),
                                       (dict(perturbation_model=OrthoFlow(), ijsat_clean=1.5), "ijsat_clean"),
                                       (dict(perturbation_model=OrthoFlow(), ijsat_mix="during"), "ijsat_mix")])
def test_bad_ijsat_settings(digits, kw, match):
    ld = DataLoader(Subset(digits[0], range(32)), batch_size=32)
    with pytest.raises(ValueError, match=match):
        rt.fit(tiny_cnn(), ld, "ijsat", epochs=1, progress=False, verbose=False, **kw)


def test_jstm_rows_for_evaluate(batch, tmp_path):
    """cli.attack_rows.jstm_attacks (what `evaluate --threat jstm` runs): bad flags name the flag; a run's
    rows count the inputs the attack leaves correct."""
    from robustops.attacks import robust_accuracy
    from robustops.cli.attack_rows import jstm_attacks
    from robustops.cli.common import CLIError

    with pytest.raises(CLIError, match="--flow"):
        jstm_attacks(net(), str(tmp_path / "none.pt"), 0.1, 0.1)
    with pytest.raises(CLIError, match="--eps-z"):
        jstm_attacks(net(), "x.pt", 0.1, -1.0)
    x, y = batch
    atk = JSTMAttack(net(), OrthoFlow(), eps=0.1, eps_z=0.2, steps=3)
    res = robust_accuracy(None, [(x, y)], atk, progress=False)
    assert res["n"] == 48 and res["robust_acc"] <= res["clean_acc"]


def test_with_the_real_flow(digits_flow, batch):
    """The same guarantees with robustops.perturbation.Flow (conftest's session-scoped digits_flow): both
    budgets, the box, the rebuilt adversary, and eps_z = 0 as pixel PGD."""
    flow = digits_flow
    x, y = batch
    res = JSTMAttack(net(), flow, eps=0.1, eps_z=0.1, steps=4, seed=1).perturb(x, y)
    assert res.dz.abs().max() <= 0.1 + 1e-6 and res.dx.abs().max() <= 0.1 + 1e-6
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    with torch.no_grad():
        rebuilt = (flow.decode(flow.encode(x) + res.dz) + res.dx).clamp(0, 1)
    torch.testing.assert_close(res.x_adv, rebuilt, atol=1e-5, rtol=0)
    a = JSTMAttack(net(), flow, eps=0.1, eps_z=0.0, steps=4, seed=1).perturb(x, y)
    b = PGD(net(), eps=0.1, steps=4, seed=1).perturb(x, y)
    torch.testing.assert_close(a.x_adv, b.x_adv, atol=1e-4, rtol=0)


def test_evaluate_threat_jstm_cli(digits_flow_path, tmp_path, capsys):
    """`robustops evaluate --threat jstm --flow CKPT --eps-z E --eps E` end to end: one row per input, the
    summary's settings, robust <= clean; the flags it needs or refuses name themselves."""
    from robustops.cli import main
    from robustops.models import get_model, save_checkpoint

    torch.manual_seed(0)
    ckpt = save_checkpoint(str(tmp_path / "m.pt"), get_model("small_cnn"), "small_cnn", {}, method="natural")
    out = tmp_path / "jstm.tsv"
    base = ["evaluate", "--checkpoint", ckpt, "--threat", "jstm", "--eps", "0.1", "--steps", "2", "--max-samples",
            "16", "--batch-size", "8", "--no-progress", "--device", "cpu"]
    assert main(base + ["--flow", digits_flow_path, "--eps-z", "0.05", "-o", str(out)]) == 0
    assert "JSTM attack: JSTM-2 (latent L-inf eps_z 0.05" in capsys.readouterr().out
    assert len(out.read_text().splitlines()) == 17
    s = json.loads(open(str(out) + ".json").read())
    assert s["suite"] == "jstm" and s["settings"]["eps_z"] == 0.05 and s["robust_acc"] <= s["clean_acc"]
    assert main(base) == 2 and "--flow is required with --threat jstm" in capsys.readouterr().err
    assert main(base[:3] + ["--eps-z", "0.1", "--device", "cpu"]) == 2
    assert "--eps-z sets the JSTM attack: add --threat jstm" in capsys.readouterr().err
