"""The method context (robustops.train.MethodContext): methods see their run only through it and its
documented attributes; progress / epoch are the step counter's; per-sample loss weights; the
declared options; evaluation as a free function that gives Trainer.evaluate's numbers."""
import os
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import one_thread, tiny_cnn  # noqa: F401 (one_thread: an autouse fixture)
from torch.utils.data import DataLoader, Subset

from robustops import train as rt
from robustops.data import load_digits
from robustops.train.context import CONTEXT_ATTRIBUTES, MethodContext, weighted_cross_entropy

METHODS_DIR = os.path.join(os.path.dirname(rt.__file__), "methods")


@pytest.fixture(scope="module")
def digits():
    return load_digits("train"), load_digits("test")


def test_methods_do_not_see_the_trainer():
    for name in sorted(os.listdir(METHODS_DIR)):
        if name.endswith(".py"):
            with open(os.path.join(METHODS_DIR, name)) as fh:
                text = fh.read()
            assert not re.search("trainer", text, re.IGNORECASE), name


def test_context_attributes_are_the_documented_set():
    tr = rt.Trainer(tiny_cnn(), method="natural", mixup=1.0)
    ctx = tr.method.ctx
    assert tr.method.ctx is tr.ctx and isinstance(ctx, MethodContext) and not hasattr(tr.method, "trainer")
    public = {n for n in dir(ctx) if not n.startswith("_")}
    assert public == set(CONTEXT_ATTRIBUTES)
    doc = MethodContext.__doc__
    for name in CONTEXT_ATTRIBUTES:
        assert re.search(rf"\b{name}\b", doc), name


def old_progress(tr):  # what ibp / acert computed from the scheduler before the context
    return min(1.0, tr.scheduler.last_epoch / max(1, tr.total_steps))


def old_epoch(tr):  # what macer computed
    return int(tr.scheduler.last_epoch) // (tr.steps_per_epoch * tr.cfg.updates_per_batch)


@pytest.mark.parametrize("method,kw", [("natural", dict(epochs=3)), ("free", dict(epochs=5, m=2)),
                                       ("natural", dict(epochs=7))])
def test_progress_and_epoch_are_the_step_counters_values(method, kw):
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))
    tr = rt.Trainer(tiny_cnn(), method=method, steps_per_epoch=7, **kw)
    ctx = tr.method.ctx
    for _ in range(tr.total_steps // tr.cfg.updates_per_batch + 2):
        assert ctx.progress == old_progress(tr) and type(ctx.progress) is float
        assert ctx.epoch == old_epoch(tr)
        tr.train_step(x, y)
    assert ctx.progress == 1.0
    for last in range(0, 60):  # every count, also past the end
        tr.scheduler.last_epoch = last
        assert ctx.progress == old_progress(tr) and ctx.epoch == old_epoch(tr)


def test_an_evaluation_context_takes_no_steps():
    cfg = rt.FitConfig.make("natural").resolved()
    ctx = MethodContext(cfg, tiny_cnn(), "cpu", torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="evaluates only"):
        ctx.update(lambda net: (net(torch.rand(1, 1, 8, 8)).sum(), None))
    with pytest.raises(RuntimeError, match="evaluates only"):
        ctx.progress  # noqa: B018


# --------------------------------------------------------------------------- per-sample loss weights

def test_weighted_cross_entropy():
    torch.manual_seed(0)
    for B in (1, 7, 64, 300):
        z, y = 3 * torch.randn(B, 10), torch.randint(0, 10, (B,))
        assert torch.equal(weighted_cross_entropy(z, y, None), F.cross_entropy(z, y))
        assert torch.equal(weighted_cross_entropy(z, y, torch.ones(B)), F.cross_entropy(z, y))  # bit for bit
        w = torch.rand(B)
        want = (w.double() * F.cross_entropy(z.double(), y, reduction="none")).sum() / w.double().sum()
        torch.testing.assert_close(weighted_cross_entropy(z, y, w).double(), want)


@pytest.mark.parametrize("method,kw", [("natural", {}), ("natural", dict(mixup=1.0)), ("pgd", dict(eps=0.1, steps=2)),
                                       ("free", dict(m=2)), ("gaussian", {})])
def test_weights_none_and_ones_change_nothing(digits, method, kw):
    x, y = digits[0].tensors
    runs = []
    for weights in (None, torch.ones(32), "none"):
        model = tiny_cnn(seed=1)
        tr = rt.Trainer(model, method=method, seed=0, **kw)
        losses = []
        for k in range(3):
            xb, yb = x[32 * k:32 * k + 32], y[32 * k:32 * k + 32]
            out = tr.train_step(xb, yb) if weights == "none" else tr.train_step(xb, yb, weights=weights)
            losses.append(out[0])
        runs.append((losses, model.state_dict()))
    for losses, sd in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0][0], losses))
        assert all(torch.equal(v, sd[k]) for k, v in runs[0][1].items())


def test_weights_are_a_weighted_mean(digits):
    x, y = digits[0].tensors
    x, y = x[:16], y[:16]
    w = torch.zeros(16)
    w[:4] = 1.0
    a, b = tiny_cnn(seed=2), tiny_cnn(seed=2)
    kw = dict(method="natural", lr=0.1, momentum=0.0, weight_decay=0.0, schedule="constant", seed=0)
    rt.Trainer(a, **kw).train_step(x, y, weights=2.5 * w)  # a scale of the weights cancels
    rt.Trainer(b, **kw).train_step(x[:4], y[:4])
    for (k, v), u in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(v, u, rtol=1e-5, atol=1e-7, msg=k)


def test_weights_refused_where_not_applied():
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="per-sample loss weights are applied by the methods natural, pgd"):
        rt.Trainer(tiny_cnn(), method="dale", eps=0.1).train_step(x, y, weights=torch.ones(4))
    with pytest.raises(ValueError, match=r"weights must be a Tensor\[B\] with B = 4"):
        rt.Trainer(tiny_cnn(), method="natural").train_step(x, y, weights=torch.ones(3))


# --------------------------------------------------------------------------- declared options

def test_options_and_perturbation_model_are_declared_on_the_method():
    reg = rt.registry
    assert all(isinstance(reg.get(n).options, tuple) for n in rt.METHODS)
    assert [n for n in rt.METHODS if reg.get(n).uses_perturbation_model] == ["learned", "learned_aug", "learned_noise", "ada"]
    assert [n for n in rt.METHODS if "awp" in reg.get(n).options] == ["pgd", "trades", "iwd"]

    class WithAWP(rt.Method):
        name = "test_with_awp"
        help = "natural training that accepts awp (test only)"
        options = ("awp",)
        adversarial = False

        def step(self, x, y):
            return self.ctx.natural_step(x, y)

    rt.register(WithAWP)
    try:
        c = rt.FitConfig.make("test_with_awp", awp=0.01, ema=0.9).resolved()  # ema: every method's
        assert c.awp == 0.01
        with pytest.raises(ValueError, match="mixup"):
            rt.FitConfig.make("test_with_awp", mixup=1.0).resolved()
        tr = rt.Trainer(tiny_cnn(), c)
        tr.train_step(torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,)))
    finally:
        rt.registry.unregister("test_with_awp")


# --------------------------------------------------------------------------- evaluation as a free function

@pytest.mark.parametrize("method,kw", [("pgd", dict(eps=0.1)), ("gaussian", dict(sigma=0.3)),
                                       ("ibp", dict(eps=0.05)), ("natural", dict(val_eps=0.1, amp="bf16"))])
def test_free_evaluate_equals_a_fresh_trainers(digits, method, kw):
    val = DataLoader(Subset(digits[1], list(range(100))), batch_size=32)
    model = tiny_cnn(seed=3)
    a = rt.Trainer(model, method=method, seed=4, val_steps=3, **kw).evaluate(val)
    b = rt.evaluate(model, val, method=method, seed=4, val_steps=3, **kw)
    c = rt.evaluate(model, val, rt.FitConfig.make(method, seed=4, **kw), val_steps=3)
    assert a == b == c
    assert set(a) >= {"clean_acc", "robust_acc", "val_loss"}
