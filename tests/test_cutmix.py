"""The cutmix training option (robustops.train.cutmix, MethodContext.cutmix): the box and its lam, the
mixed loss, the attack's objective, exact resume with ema, and the errors."""
import copy
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import CrashingLoader, Interrupt, has_module, one_thread, tiny_cnn  # noqa: F401 (one_thread: an autouse fixture)
from torch.utils.data import DataLoader, Subset

from robustops import train as rt
from robustops.data import load_digits
from robustops.train.context import mean_ce
from robustops.train.cutmix import MixedTarget, compose, cutmix_box

EPS = 0.2


@pytest.fixture(scope="module")
def digits():
    return load_digits("train"), load_digits("test")


def reference_box(lam, cy, cx, H, W):
    """Yun et al.'s rand_bbox with the centre given, and lam adjusted to the box (their train.py)."""
    cut_rat = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(H * cut_rat), int(W * cut_rat)
    y1, y2 = np.clip(cy - cut_h // 2, 0, H), np.clip(cy + cut_h // 2, 0, H)
    x1, x2 = np.clip(cx - cut_w // 2, 0, W), np.clip(cx + cut_w // 2, 0, W)
    return int(y1), int(y2), int(x1), int(x2), 1 - ((x2 - x1) * (y2 - y1) / (W * H))


def test_box_is_the_reference_box():
    rng = np.random.default_rng(0)
    for H, W in [(8, 8), (32, 32), (7, 12)]:
        for _ in range(200):
            lam, cy, cx = float(rng.uniform()), int(rng.integers(H)), int(rng.integers(W))
            assert cutmix_box(lam, cy, cx, H, W) == pytest.approx(reference_box(lam, cy, cx, H, W), abs=0)
    # closed forms: lam = 0 at the centre of an even image is the whole image; lam = 1 is no box
    assert cutmix_box(0.0, 4, 4, 8, 8) == (0, 8, 0, 8, 0.0)
    assert cutmix_box(1.0, 3, 5, 8, 8)[4] == 1.0
    # lam = 0.75: cut 4 x 4 centred at (2, 6): rows 0:4, columns 4:8, 16 pixels of 64
    assert cutmix_box(0.75, 2, 6, 8, 8) == (0, 4, 4, 8, 0.75)
    # at the border the box is clipped and lam rises: centre (0, 0) keeps a 2 x 2 corner
    assert cutmix_box(0.75, 0, 0, 8, 8) == (0, 2, 0, 2, 1 - 4 / 64)


def test_context_cutmix_takes_the_box_from_the_partner():
    """With a fixed generator: exactly (1 - lam) H W pixels of each image come from its partner, in the
    box the draws name, and lam is the box's; the draws replay from the generator's saved state."""
    tr = rt.Trainer(tiny_cnn(), method="pgd", cutmix=1.0, seed=0)
    B, H, W = 16, 8, 8
    x = (torch.arange(B, dtype=torch.float32) / B).view(B, 1, 1, 1).expand(B, 1, H, W).contiguous()
    y = torch.arange(B) % 10
    for _ in range(20):
        state = tr.mix_gen.get_state()
        xm, t = tr.ctx.cutmix(x, y)
        # replay the draws: a numpy seed, lam ~ Beta(1, 1) and the centre, then the permutation
        g = torch.Generator().set_state(state)
        rng = np.random.default_rng(int(torch.randint(0, 1 << 62, (1,), generator=g)))
        lam0 = float(rng.beta(1.0, 1.0))
        cy, cx = int(rng.integers(H)), int(rng.integers(W))
        perm = torch.randperm(B, generator=g)
        y1, y2, x1, x2, lam = reference_box(lam0, cy, cx, H, W)
        assert isinstance(t, MixedTarget) and t.lam == pytest.approx(lam, abs=1e-15)
        assert torch.equal(t.y, y) and torch.equal(t.y2, y[perm])
        mask = torch.zeros(H, W, dtype=torch.bool)
        mask[y1:y2, x1:x2] = True
        assert torch.equal(xm, torch.where(mask, x[perm], x))
        moved = (xm != x).flatten(1).sum(1)  # each image's pixels now from its partner (all differ)
        expect = torch.where(perm == torch.arange(B), 0, round((1 - lam) * H * W))
        assert torch.equal(moved, expect)


def test_compose_keeps_layout_and_videos():
    x, p = torch.zeros(2, 3, 4, 5, 6), torch.ones(2, 3, 4, 5, 6)  # videos [B, T, C, H, W]
    out = compose(x, p, (1, 3, 2, 6))
    assert out[:, :, :, 1:3, 2:6].eq(1).all() and out.sum() == 2 * 3 * 4 * 2 * 4
    xl = torch.zeros(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    assert compose(xl, torch.ones_like(xl), (0, 2, 0, 2)).is_contiguous(memory_format=torch.channels_last)
    assert compose(x, p, (2, 2, 0, 6)) is x


def test_loss_is_the_mixed_cross_entropy(digits):
    """On a fixed model the trained loss is lam CE(y) + (1 - lam) CE(y[pi]) (the soft-label CE of the
    mixed target), and the engines' default objective (what PGD maximises) is the same function."""
    ds = digits[0]
    x = torch.stack([ds[i][0] for i in range(32)])
    y = torch.tensor([ds[i][1] for i in range(32)])
    model = tiny_cnn(seed=3)
    before = copy.deepcopy(model)  # the step's loss is taken before the update
    tr = rt.Trainer(model, method="natural", cutmix=1.0, seed=4)
    state = tr.mix_gen.get_state()
    loss, correct, n = tr.train_step(x, y)
    tr.mix_gen.set_state(state)
    xm, t = tr.ctx.cutmix(x, y)
    with torch.no_grad():
        logits = before(xm)
    expect = t.lam * F.cross_entropy(logits, t.y) + (1 - t.lam) * F.cross_entropy(logits, t.y2)
    soft = t.lam * F.one_hot(t.y, 10).float() + (1 - t.lam) * F.one_hot(t.y2, 10).float()
    assert n == 32 and 0 < t.lam < 1
    torch.testing.assert_close(loss / n, expect)
    torch.testing.assert_close(loss / n, F.cross_entropy(logits, soft))
    assert int(correct) == int((logits.argmax(1) == t.dominant).sum())
    torch.testing.assert_close(mean_ce(logits, t), expect)
    torch.testing.assert_close(mean_ce(logits, tuple(t)), expect)  # the engine's row-selected plain tuple
    # per-sample weights and label smoothing apply to the mixed target as to labels
    w = torch.rand(32)
    tr.ctx.weights = w

    def per(lab):
        return (F.cross_entropy(logits, lab, reduction="none", label_smoothing=0.1) * w).sum() / w.sum()

    torch.testing.assert_close(tr.ctx.cross_entropy(logits, t, 0.1), t.lam * per(t.y) + (1 - t.lam) * per(t.y2))
    tr.ctx.weights = None


def test_every_adversarial_method_trains_with_cutmix(digits):
    ld = DataLoader(Subset(digits[0], range(64)), batch_size=32)
    for method, kw in [("pgd", dict(awp=0.01)), ("trades", dict(awp=0.01)), ("fgsm", dict(fgsm_init="previous")),
                       ("free", dict(m=2)), ("fgsm_sdi", dict(sdi_width=4)), ("dale", {}),
                       ("dale_pd", dict(dual_update="batch"))] + \
            ([("augrmix", dict(augrmix_views=1))] if has_module("kornia") else []):  # AugMix's ops need kornia
        res = rt.fit(tiny_cnn(seed=1), ld, method, epochs=1, eps=EPS, steps=2, seed=0, cutmix=1.0, ema=0.9,
                     progress=False, verbose=False, **kw)
        assert "CutMix (alpha=1)" in res.config.label and math.isfinite(res.history[-1]["train_loss"]), method


def test_resume_with_cutmix_ema_matches_uninterrupted(digits, tmp_path):
    """trades + cutmix + ema killed in its second epoch and resumed: the weights, the weight average and
    the log are those of the uninterrupted run (the CutMix generator is in the checkpoint)."""
    sub = Subset(digits[0], list(range(96)))
    val = DataLoader(Subset(digits[1], range(48)), batch_size=48)
    hp = dict(epochs=3, eps=EPS, steps=2, seed=3, progress=False, verbose=False, ema=0.9, cutmix=1.0)

    def attempt(name, crash_after=None, resume=False, init=5):
        torch.manual_seed(0)
        data = DataLoader(sub, batch_size=32, shuffle=True)
        model = tiny_cnn(seed=init, bn=True)
        res = rt.fit(model, data if crash_after is None else CrashingLoader(data, after=crash_after), "trades",
                     val_loader=val, out_dir=str(tmp_path / name), resume=resume, **hp)
        return model, [{k: v for k, v in r.items() if "time" not in k} for r in res.history]

    whole, log = attempt("whole")
    with pytest.raises(Interrupt):
        attempt("cut", crash_after=3 + 2)
    ck = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert ck["epoch"] == 1 and "mix_gen" in ck["rank_states"][0] and ck["config"]["cutmix"] == 1.0
    resumed, log2 = attempt("cut", resume=True, init=77)
    assert str(log2) == str(log)
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))
    a, b = (torch.load(tmp_path / d / "last.pt", weights_only=True) for d in ("whole", "cut"))
    assert all(torch.equal(a["train_state_dict"][k], b["train_state_dict"][k]) for k in a["train_state_dict"])
    with pytest.raises(ValueError, match="cutmix"):
        rt.fit(tiny_cnn(), DataLoader(sub, batch_size=32), "trades", out_dir=str(tmp_path / "cut"), resume=True,
               **{**hp, "cutmix": 0.5})


@pytest.mark.parametrize("kw,msg", [
    (dict(method="ibp", cutmix=1.0), "not of 'ibp'"),
    (dict(method="gaussian", cutmix=1.0), "not of 'gaussian'"),
    (dict(method="smoothadv", cutmix=1.0), "not of 'smoothadv'"),
    (dict(method="pgd", cutmix=1.0, mixup=1.0), "cutmix and mixup cannot be combined"),
    (dict(method="pgd", cutmix=0.0), "cutmix .* must be None or a finite number > 0"),
    (dict(method="trades", cutmix=float("inf")), "cutmix .* must be None or a finite number > 0"),
])
def test_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        rt.FitConfig.make(**kw).resolved()


def test_cutmix_off_is_refused_by_the_context():
    tr = rt.Trainer(tiny_cnn(), method="pgd", seed=0)
    with pytest.raises(RuntimeError, match="cutmix option is off"):
        tr.ctx.cutmix(torch.rand(2, 1, 8, 8), torch.tensor([0, 1]))


def test_cli_flag(tmp_path, capsys):
    from robustops.cli import build_parser, main

    args = build_parser().parse_args(["train", "--method", "trades", "--cutmix", "1", "--ema", "0.999"])
    assert (args.cutmix, args.ema) == (1.0, 0.999)
    assert main(["train", "--method", "ibp", "--cutmix", "1", "--out", str(tmp_path / "r")]) == 2
    assert "cutmix (CutMix Beta(alpha, alpha)) is an option of the methods" in capsys.readouterr().err


def test_dale_objective_and_augrmix_targets_mix_the_two_labels():
    from robustops.train.methods.augrmix import repeat_target
    from robustops.train.methods.dale import Dale, log1m_softmax

    logits, y, y2 = torch.randn(6, 10), torch.randint(0, 10, (6,)), torch.randint(0, 10, (6,))
    tr = rt.Trainer(tiny_cnn(0, width=4), method="dale", epochs=1, steps_per_epoch=1, cutmix=1.0)
    assert isinstance(tr.method, Dale)
    want = (0.3 * log1m_softmax(logits, y) + 0.7 * log1m_softmax(logits, y2)) / 6
    torch.testing.assert_close(tr.method.engine.objective(logits, (y, y2, 0.3)), want)
    t = repeat_target(MixedTarget(y, y2, 0.3), 2)
    assert t.lam == 0.3 and torch.equal(t.y, y.repeat(2)) and torch.equal(t.y2, y2.repeat(2))
