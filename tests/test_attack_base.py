"""The neutral base of the attacks (robustops.attacks.base): a tiny custom Attack gets the box,
normalisation, targets, seeds and the model's state from the base; PGD, APGD and LatentPGD are
siblings on it; Madry's default step 2.5 * eps / steps is one function that PGD, nearest_member and
training use."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from robustops import _rng, attacks
from robustops.attacks import APGD, APGDT, FGSM, PGD, Attack, AttackResult, LatentPGD, madry_step
from robustops.attacks import base
from robustops.train.config import FitConfig


class Shift(Attack):
    """One signed-gradient step of size ``step`` on the base's engine (projected on the box the base
    owns): enough to exercise the base. Records what the base handed to attack()."""

    def __init__(self, model, step=0.1, **kwargs):
        super().__init__(model, **kwargs)
        self.step = step
        self.engine = self.make_engine("linf")
        self.seen = {}

    def prepare(self, x, step=None):
        return {"step": self.step if step is None else step}

    def attack(self, x, y, targets, *, seed, offset, skip, evaluate, step):
        net = self.net
        self.seen = dict(training=getattr(net, "training", None), seed=seed, offset=offset, targets=targets,
                         grad_flags=[p.requires_grad for p in net.parameters()], step=step, skip=skip)
        g, logits, _ = self.engine.gradient(x, (y, targets))
        xa = self.engine.step_(x.clone(), x, g, 1.0, step)
        pred = logits.argmax(1)
        return AttackResult(xa, self.success(logits, (y, targets)), None, None, None, pred)


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 5)
        self.seen = None

    def forward(self, x):
        self.seen = x.detach().clone()
        return self.fc(x)


def data(B=6):
    g = torch.Generator().manual_seed(1)
    return torch.rand(B, 4, generator=g) * 0.5 + 0.25, torch.randint(0, 5, (B,), generator=g)


def test_custom_attack_gets_box_normalisation_and_model_state():
    model = Linear().train()
    atk = Shift(model, step=10.0, clip=(0.2, 0.8), mean=[0.5], std=[0.25])
    x, y = data()
    xa = atk(x, y)
    lo, hi = torch.tensor(0.2), torch.tensor(0.8)
    assert bool(((xa >= lo) & (xa <= hi)).all()) and bool(((xa == lo) | (xa == hi)).any())   # the box
    assert torch.allclose(model.seen, (x - 0.5) / 0.25)               # normalisation in front of the model
    assert atk.seen["training"] is False and atk.seen["grad_flags"] == [False, False]
    assert model.training and all(p.requires_grad for p in model.parameters())   # restored
    with pytest.raises(ValueError, match="clip"):
        atk(x + 1.0, y)
    assert Shift(model, train_mode=True).perturb(x, y) is not None
    assert model.training


def test_custom_attack_gets_targets_seeds_offsets_and_params():
    model = Linear()
    x, y = data()
    atk = Shift(model, seed=7)
    atk.perturb(x, y)
    assert atk.seen["targets"] is None and atk.seen["seed"] == 7 and atk.seen["offset"] == 0
    atk.perturb(x, y, step=0.5)
    assert atk.seen["offset"] == x.shape[0] and atk.seen["step"] == 0.5      # offsets continue
    with pytest.raises(ValueError, match="untargeted"):
        atk.perturb(x, y, (y + 1) % 5)
    with pytest.raises(TypeError, match="unexpected"):
        Attack.prepare(atk, x, eps=1.0)
    tatk = Shift(model, targeted=True, target_fn=lambda a, b: (b + 2) % 5)
    tatk.perturb(x, y)
    assert torch.equal(tatk.seen["targets"], (y + 2) % 5)
    t = (y + 1) % 5
    res = tatk.perturb(x, y, t)
    assert torch.equal(tatk.seen["targets"], t) and torch.equal(res.success, res.pred == t)
    with pytest.raises(ValueError, match="needs targets"):
        Shift(model, targeted=True).perturb(x, y)
    torch.manual_seed(3)
    expected = _rng.resolve_seed(None)
    torch.manual_seed(3)
    unseeded = Shift(model)
    unseeded.perturb(x, y)
    assert unseeded.seen["seed"] == expected                          # seed None: torch's generator
    empty = atk.perturb(x[:0], y[:0])
    assert empty.x_adv.shape == (0, 4) and empty.success.shape == (0,)


def test_attack_must_be_implemented():
    with pytest.raises(NotImplementedError, match="attack"):
        Attack(Linear()).perturb(*data())


def test_pgd_apgd_latent_are_siblings():
    for a, b in [(PGD, APGD), (PGD, LatentPGD), (APGD, LatentPGD)]:
        assert not issubclass(a, b) and not issubclass(b, a)
    for cls in (PGD, FGSM, APGD, APGDT, LatentPGD):
        assert issubclass(cls, Attack)
    assert issubclass(FGSM, PGD) and issubclass(APGDT, APGD)


def test_madry_step_is_the_default_of_pgd_nearest_member_and_training():
    assert attacks.madry_step is base.madry_step
    assert madry_step(0.1, 4) == 2.5 * 0.1 / 4
    eps = torch.tensor([0.1, 0.3, 8 / 255])
    assert torch.equal(madry_step(eps, 7), eps * (2.5 / 7))
    # PGD's default step size: the same function, bit for bit
    model = Linear()
    x, _ = data()
    for e, steps in [(8 / 255, 10), (0.3, 7), (1.0, 3), (0.2, 20)]:
        assert PGD(model, eps=e, steps=steps).prepare(x)["alpha"] == madry_step(e, steps)
    et = torch.linspace(0.01, 0.5, x.shape[0])
    assert torch.equal(PGD(model, eps=et, steps=7).prepare(x)["alpha"], madry_step(et, 7))
    # LatentPGD's default is its own 2 * eps / steps (Wong and Kolter's), on the same rule
    assert LatentPGD.ALPHA_PER_STEP == 2.0
    # training: the threat model's and the validation attack's defaults
    cfg = FitConfig.make("pgd", eps=0.3, steps=7, val_steps=9).resolved()
    assert cfg.alpha == madry_step(0.3, 7) and cfg.val_alpha == madry_step(0.3, 9)


def test_madry_step_float_forms_agree_in_float32():
    """PGD's float form before madry_step became its default (eps * (2.5 / steps)) and madry_step's
    (2.5 * eps / steps) give the same float32 step size, what the kernels take, on a grid of common
    radii: attack results did not change when PGD moved to madry_step."""
    for steps in range(1, 60):
        for k in range(0, 256, 3):
            e = k / 255
            assert np.float32(base.scaled_step(e, steps, 2.5)) == np.float32(madry_step(e, steps))
    assert math.isclose(madry_step(1.0, 3), 2.5 / 3)
