"""AugMix (robustops/train/augmix.py) and the augrmix training method (methods/augrmix.py): the views follow
their definitions on closed-form cases (one known op, width 1 / depth 1, identity ops, the convex and the
box mixing), the geometric ops against PIL, the Jensen-Shannon consistency against its formula,
determinism per generator state, the method's views and attack, bad settings, exact resume on digits."""
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import needs, one_thread, resume_matches_uninterrupted, tiny_cnn  # noqa: F401 (one_thread: autouse)
from torch.utils.data import DataLoader, Subset

from robustops import _checks
from robustops import train as rt
from robustops.data import load_digits
from robustops.train import augmix as am


def one_op_draw(b, op, level, sign=1.0, m=1.0, masked=False, width=1):
    """A hand-written draw: every chain of every image runs op once at level; weights uniform."""
    shape = (b, width, 1)
    return am.AugMixDraw(np.zeros(shape, dtype=np.int64), np.full(shape, level), np.full(shape, sign),
                         np.ones(shape, dtype=bool), np.full((b, width), 1.0 / width), np.full(b, m),
                         np.full(b, masked), np.full((b, 2), 0.5), (op,))


@needs("kornia")
def test_single_known_op_at_full_weight_is_the_op():
    x = torch.rand(4, 3, 8, 8)
    # width 1, depth 1, m = 1: the mix is the chain, here solarize at level 5 (PIL threshold 128 of 255)
    out = am.augmix(x, torch.Generator(), choices=one_op_draw(4, "solarize", 5.0))
    t = 128 / 255
    torch.testing.assert_close(out, torch.where(x >= t, 1 - x, x))
    # m = 0.25: the convex skip mix (1 - m) x + m op(x)
    out = am.augmix(x, torch.Generator(), choices=one_op_draw(4, "solarize", 5.0, m=0.25))
    torch.testing.assert_close(out, 0.75 * x + 0.25 * torch.where(x >= t, 1 - x, x))
    # posterize at level 3: 4 - int(1.2) = 3 bits kept
    out = am.augmix(x, torch.Generator(), choices=one_op_draw(4, "posterize", 3.0))
    torch.testing.assert_close(out, ((x * 255).to(torch.uint8) & 0b11100000).float() / 255)


@needs("kornia")
def test_identity_ops_return_the_image():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 8, 8)
    # equalize is PIL's: a channel of <= 255 pixels has step 0 and is left unchanged
    torch.testing.assert_close(am.augmix(x, g, ops=("equalize",)), x)
    # autocontrast of images that already span [0, 1] in every channel
    x[:, :, 0, 0], x[:, :, 0, 1] = 0.0, 1.0
    torch.testing.assert_close(am.augmix(x, g, ops=("autocontrast",), mode="random"), x)


@needs("kornia")
def test_geometric_ops_closed_form():
    x = torch.rand(3, 2, 8, 8)
    # translate: L/30 of the side; L = 3.75 at 8 px is exactly 1 px (PIL's map: the content moves left / up)
    t = am.apply_ops(x[:2], ["translate_x", "translate_y"], [3.75, 3.75], [1, 1])
    torch.testing.assert_close(t[0, :, :, :-1], x[0, :, :, 1:])
    torch.testing.assert_close(t[1, :, :-1], x[1, :, 1:])
    assert t[0, :, :, -1].abs().max() < 1e-6 and t[1, :, -1].abs().max() < 1e-6  # PIL's black fill
    # rotate int(3 L) degrees: L = 30 is 90 degrees counter-clockwise about the centre
    r = am.apply_ops(x, ["rotate"] * 3, [30, 30, 30], [1, -1, 1])
    torch.testing.assert_close(r[0], torch.rot90(x[0], 1, (1, 2)), atol=1e-5, rtol=0)
    torch.testing.assert_close(r[1], torch.rot90(x[1], -1, (1, 2)), atol=1e-5, rtol=0)


@needs("kornia")
def test_geometric_ops_match_pil_inside_the_border():
    Image = pytest.importorskip("PIL.Image")
    g = np.random.default_rng(0)
    a = (g.uniform(size=(16, 16, 3)) * 255).astype(np.uint8)
    a = ((a[:-1, :-1].astype(float) + a[1:, 1:]) / 2).astype(np.uint8)  # 15 x 15, smoother
    img = Image.fromarray(a)
    x = torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255
    pil = {"rotate": img.rotate(-9, resample=Image.BILINEAR),
           "shear_x": img.transform(img.size, Image.AFFINE, (1, 0.09, 0, 0, 1, 0), resample=Image.BILINEAR),
           "shear_y": img.transform(img.size, Image.AFFINE, (1, 0, 0, -0.09, 1, 0), resample=Image.BILINEAR)}
    for op, sign in (("rotate", -1), ("shear_x", 1), ("shear_y", -1)):
        ours = am.apply_ops(x, [op], [3.0], [sign])[0].permute(1, 2, 0).numpy() * 255
        diff = np.abs(ours - np.asarray(pil[op], dtype=float))[3:-3, 3:-3]
        assert diff.max() <= 1.0, op  # PIL rounds to 8 bits


@needs("kornia")
def test_point_ops_match_pil():
    Image = pytest.importorskip("PIL.Image")
    ImageOps = pytest.importorskip("PIL.ImageOps")
    a = (np.random.default_rng(1).beta(2, 5, size=(32, 32, 3)) * 255).astype(np.uint8)  # 1024 px: equalize acts
    img = Image.fromarray(a)
    x = torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255
    pil = {"solarize": ImageOps.solarize(img, 256 - int(4.0 * 25.6)), "posterize": ImageOps.posterize(img, 4 - 1),
           "equalize": ImageOps.equalize(img), "autocontrast": ImageOps.autocontrast(img)}
    for op, tol in (("solarize", 0.0), ("posterize", 0.0), ("equalize", 0.0), ("autocontrast", 1.0)):
        ours = am.apply_ops(x, [op], [4.0], [1])[0].permute(1, 2, 0).numpy() * 255
        assert np.abs(ours - np.asarray(pil[op], dtype=float)).max() <= tol + 1e-3, op  # autocontrast: PIL's LUT


@needs("kornia")
def test_the_mix_is_the_convex_or_box_combination_of_the_chains():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(16, 3, 12, 12)
    d = am.draw(16, g, severity=3, width=3, depth=-1, alpha=1.0, mode="random")
    assert np.allclose(d.weights.sum(1), 1) and (d.weights >= 0).all() and ((d.m >= 0) & (d.m <= 1)).all()
    depths = d.active.sum(2)
    assert depths.min() >= 1 and depths.max() <= 3 and (d.active == (np.arange(3) < depths[..., None])).all()
    assert 0 < d.masked.sum() < 16
    ch = am.chains(x, d)
    w = torch.from_numpy(d.weights).float().view(16, 3, 1, 1, 1)
    mixture = (w * ch).sum(1)
    out = am.mix(x, ch, d)
    for b in range(16):
        if d.masked[b]:  # every pixel is the image's or the mixture's; the box's area is about m
            inside = (out[b] - mixture[b]).abs().amax(0) < 1e-6
            assert ((out[b] - x[b]).abs().amax(0) < 1e-6)[~inside].all()
            assert abs(inside.float().mean().item() - d.m[b]) < 0.1
        else:
            torch.testing.assert_close(out[b], (1 - d.m[b]) * x[b] + d.m[b] * mixture[b])
    assert out.min() >= 0 and out.max() <= 1


@needs("kornia")
def test_determinism_per_generator_state():
    x = torch.rand(8, 3, 8, 8)
    g = torch.Generator().manual_seed(7)
    state = g.get_state()
    a, b = am.augmix(x, g), am.augmix(x, g)
    assert not torch.equal(a, b)
    g.set_state(state)
    torch.testing.assert_close(am.augmix(x, g), a, atol=0, rtol=0)


def test_without_kornia_only_its_ops_fail(monkeypatch):
    """kornia is imported at the first op that needs it: autocontrast runs without it, equalize and the
    geometric ops raise an ImportError naming AugMix and the pip fix."""
    monkeypatch.setitem(sys.modules, "kornia", None)
    monkeypatch.setattr(am, "kornia", _checks.LazyModule("kornia", "AugMix's ops"))
    x = torch.rand(2, 3, 8, 8)
    assert torch.allclose(am.apply_ops(x, ["autocontrast"] * 2, [3, 3], [1, 1]).amax(dim=(-2, -1)), torch.ones(2, 3))
    for op in ("equalize", "rotate"):
        with pytest.raises(ImportError, match=r"AugMix's ops needs kornia: pip install kornia==0\.9\.0"):
            am.apply_ops(x, [op, "autocontrast"], [3, 3], [1, 1])


def test_js_consistency_is_its_formula():
    z = torch.randn(5, 4)
    assert am.js_consistency([z, z.clone(), z.clone()]).item() == pytest.approx(0.0, abs=1e-6)
    zs = [torch.randn(5, 4, dtype=torch.float64) * 3 for _ in range(3)]
    p = [F.softmax(v, 1) for v in zs]
    mid = torch.clamp(sum(p) / 3, 1e-7, 1)
    direct = sum((q * (q.log() - mid.log())).sum(1).mean() for q in p) / 3
    assert am.js_consistency(zs).item() == pytest.approx(direct.item(), rel=1e-5)
    with pytest.raises(ValueError, match="at least 2 views"):
        am.js_consistency([z])


@pytest.mark.parametrize("kw,words", [
    (dict(augmix_width=0), "augmix_width"), (dict(augmix_severity=11.0), "augmix_severity"),
    (dict(augmix_depth=0), "augmix_depth"), (dict(augrmix_mode="cut"), "augrmix_mode"),
    (dict(augrmix_views=0), "augrmix_views"), (dict(js_weight=-1.0), "js_weight"),
    (dict(augmix_alpha=0.0), "augmix_alpha"),
])
def test_bad_hyperparameters_are_refused(kw, words):
    with pytest.raises(ValueError, match=words):
        rt.Trainer(tiny_cnn(width=4), method="augrmix", epochs=1, steps_per_epoch=1, **kw)


def test_bad_augmix_arguments_are_refused():
    g = torch.Generator()
    with pytest.raises(ValueError, match=r"x must be a batch"):
        am.augmix(torch.rand(3, 8, 8), g)
    for kw, word in ((dict(width=0), "width"), (dict(depth=0), "depth"), (dict(alpha=-1.0), "alpha"),
                     (dict(mode="cut"), "mode"), (dict(ops=("blur",)), "ops"), (dict(severity=0), "severity")):
        with pytest.raises(ValueError, match=word):
            am.augmix(torch.rand(2, 1, 8, 8), g, **kw)


@needs("kornia")
def test_the_method_attacks_its_views_and_trains_on_them():
    tr = rt.Trainer(tiny_cnn(width=4), method="augrmix", epochs=1, steps_per_epoch=1, eps=0.1, steps=2,
                    augrmix_views=2, seed=0)
    m = tr.method
    x, y = torch.rand(6, 1, 8, 8), torch.arange(6)
    state = m.generator.get_state()
    views = m.views(x)
    g = torch.Generator()
    g.set_state(state)
    c = m.cfg
    expected = [am.augmix(x, g, c.augmix_severity, c.augmix_width, c.augmix_depth, c.augmix_alpha,
                          mode="random") for _ in range(2)]
    torch.testing.assert_close(views, torch.cat(expected), atol=0, rtol=0)
    m.generator.set_state(state)
    adv = m.adversarial_views(x, y)
    assert adv.shape == views.shape and (adv - views).abs().max() <= 0.1 + 1e-6 and not torch.equal(adv, views)
    # the loss: mean CE over [x, adv views] + lambda * JS, or the clean CE alone
    logits = torch.randn(18, 10)
    js = am.js_consistency(logits.split(6))
    ce = F.cross_entropy(logits, y.repeat(3))
    assert m.loss(logits, y).item() == pytest.approx((ce + 12.0 * js).item(), rel=1e-6)
    tr2 = rt.Trainer(tiny_cnn(width=4), method="augrmix", epochs=1, steps_per_epoch=1, augrmix_ce="clean",
                     js_weight=0.0)
    assert tr2.method.loss(logits, y).item() == pytest.approx(F.cross_entropy(logits[:6], y).item(), rel=1e-6)


@needs("kornia")
def test_resume_matches_uninterrupted_and_trains_without_nans(tmp_path):
    train_ds, test_ds = load_digits("train"), load_digits("test")
    sub = Subset(train_ds, list(range(96)))
    val = DataLoader(Subset(test_ds, list(range(64))), batch_size=64)
    hp = dict(epochs=2, eps=0.1, steps=2, seed=3, progress=False, verbose=False)
    ref, res, crash = resume_matches_uninterrupted("augrmix", sub, val, tmp_path, hp, crash_after=lambda n: n + 1,
                                                   width=8, weights_only=False)
    assert crash["epoch"] == 1 and res.epochs_run == ref.epochs_run == 2
    strip = lambda h: [{k: v for k, v in r.items() if "time" not in k} for r in h]  # noqa: E731
    assert str(strip(res.history)) == str(strip(ref.history))
    assert all(np.isfinite(r["train_loss"]) and np.isfinite(r["val_loss"]) for r in ref.history)


def test_check_hypers_names_the_augmix_flag_for_every_method_using_them():
    from types import SimpleNamespace

    from robustops.train import registry as reg
    ok = dict(augmix_severity=3.0, augmix_width=3, augmix_depth=-1, augmix_alpha=1.0)
    am.check_hypers(SimpleNamespace(**ok))
    with pytest.raises(ValueError, match="^augmix_depth"):
        am.check_hypers(SimpleNamespace(**dict(ok, augmix_depth=0)))
    for name in ("ada", "augrmix"):  # one definition of the --augmix-* hyperparameters, shared
        assert all(h in reg.get(name).hyper for h in am.AUGMIX_HYPERS), name
