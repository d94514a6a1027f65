"""FGSM-SDI (methods/fgsm_sdi.py): a zero generator gives FGSM from the clean input bit for bit, |delta0| <= eps,
generator steps on batches 0, k, 2k, ..., exact resume after a generator step, the label-smoothed weighted
cross-entropy, clear errors for bad hyperparameters, video inputs."""
import pytest
import torch
import torch.nn.functional as F
from helpers import free_port, gloo_group, one_thread, rank_loader, resume_matches_uninterrupted  # noqa: F401
from helpers import tiny_cnn as _tiny_cnn
from torch.utils.data import DataLoader, Subset

from robustops import train as rt
from robustops.data import load_digits
from robustops.train.context import weighted_cross_entropy
from robustops.train.methods.fgsm_sdi import SDIGenerator, smoothing_from_factor


@pytest.fixture(scope="module")
def digits():
    return load_digits("train"), load_digits("test")


def tiny_cnn(seed=0, bn=False):
    return _tiny_cnn(seed, bn, width=8)


def batch(digits, n=32, start=0):
    x, y = digits[0].tensors
    return x[start:start + n], y[start:start + n]


def test_zero_generator_step_equals_fgsm_from_the_clean_input(digits):
    x, y = batch(digits)
    ref = rt.Trainer(tiny_cnn(), method="fgsm", fgsm_init="zero", eps=0.1, alpha=0.1, steps_per_epoch=4)
    ref.train_step(x, y)
    tr = rt.Trainer(tiny_cnn(), method="fgsm_sdi", sdi_factor=1.0, eps=0.1, steps_per_epoch=4)
    m = tr.method
    assert tr.cfg.alpha == 0.1  # alpha defaults to eps
    gen = m.ensure_generator(x)
    with torch.no_grad():
        gen.last.weight.zero_()
        gen.last.bias.zero_()
    m.batches = 1  # not a generator batch: the zeroed generator stays zero
    tr.train_step(x, y)
    assert m.generator_steps == 0
    for k, v in ref.model.state_dict().items():
        assert torch.equal(v, tr.model.state_dict()[k]), k
    assert not torch.equal(ref.model.state_dict()["0.weight"], tiny_cnn().state_dict()["0.weight"])


def test_delta0_stays_inside_the_ball():
    torch.manual_seed(0)
    gen = SDIGenerator(3).eval()
    x, s = torch.rand(4, 3, 8, 8), torch.randn(4, 3, 8, 8).sign()
    d = gen(x, s, 0.05)
    assert d.shape == x.shape and d.abs().max() < 0.05 and d.abs().max() > 0
    eps = torch.tensor([0.0, 0.1, 0.2, 0.3])
    d = gen(x, s, eps)
    assert (d.abs().flatten(1).amax(1) < eps + (eps == 0)).all() and (d[0] == 0).all()
    with torch.no_grad():
        gen.last.weight.mul_(1e4)  # saturated tanh: at most eps, never beyond
    assert gen(x, s, 0.05).abs().max() <= 0.05
    with pytest.raises(ValueError, match="x must be"):
        gen(torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8), 0.1)


def test_generator_steps_on_batches_0_k_2k(digits):
    x, y = batch(digits, 16)
    tr = rt.Trainer(tiny_cnn(), method="fgsm_sdi", eps=0.1, sdi_every=5, steps_per_epoch=12, epochs=2)
    m = tr.method
    at, inner = [], m.generator_step

    def counted(*a):
        at.append(m.batches)
        return inner(*a)

    m.generator_step = counted
    gen = m.ensure_generator(x)
    before = [p.detach().clone() for p in gen.parameters()]
    for _ in range(12):
        tr.train_step(x, y)
    assert at == [0, 5, 10] and m.generator_steps == 3
    assert all(int(s["step"]) == 3 for s in m.optimizer.state.values())
    assert any(not torch.equal(b, p) for b, p in zip(before, gen.parameters()))
    tr.train_step(x, y)  # the next epoch counts its batches from 0 again (batch_idx % k in the official code)
    assert at == [0, 5, 10, 0] and m.generator_steps == 4


def test_per_sample_budgets_from_an_adaptive_schedule(digits):
    x, y = batch(digits, 16)  # 16 samples of 8x8: a [B] budget mis-broadcast against the width would fail here
    tr = rt.Trainer(tiny_cnn(), method="fgsm_sdi", eps=0.1, sdi_every=1, steps_per_epoch=4,
                    budget_schedule="adaptive", budget_adapt="sample", budget_grid=3)
    m, seen = tr.method, {}
    inner = m.generator_step

    def spy(x_, y_, sign_g, eps, alpha):
        seen["eps"] = eps
        return inner(x_, y_, sign_g, eps, alpha)

    m.generator_step = spy
    tr.train_step(x, y)
    assert seen["eps"].shape == (16,) and m.generator_steps == 1
    with torch.no_grad():
        d0 = m.generator(x, torch.sign(torch.randn_like(x)), seen["eps"])
    assert (d0.abs().flatten(1).amax(1) <= seen["eps"] + 1e-7).all()


def test_the_command_line_takes_every_sdi_flag(tmp_path):
    import json

    from robustops.cli import main

    out = tmp_path / "sdi"
    assert main(["train", "--method", "fgsm_sdi", "--epochs", "1", "--eps", "0.2", "--sdi-every", "3",
                 "--sdi-lr", "0.002", "--sdi-weight-decay", "0", "--sdi-factor", "1", "--sdi-lr-schedule",
                 "multistep", "--sdi-width", "8", "--val-size", "64", "--val-steps", "1", "--test-steps", "1",
                 "--batch-size", "256", "--out", str(out), "--no-progress"]) == 0
    with open(out / "summary.json") as fh:
        p = json.load(fh)["config"]["params"]
    assert p == {"sdi_every": 3, "sdi_lr": 0.002, "sdi_weight_decay": 0.0, "sdi_factor": 1.0,
                 "sdi_lr_schedule": "multistep", "sdi_width": 8}


def test_generator_lr_constant_or_multistep():
    tr = rt.Trainer(tiny_cnn(), method="fgsm_sdi", eps=0.1, sdi_lr=0.01, epochs=1, steps_per_epoch=110)
    ms = rt.Trainer(tiny_cnn(), method="fgsm_sdi", eps=0.1, sdi_lr=0.01, sdi_lr_schedule="multistep", epochs=1,
                    steps_per_epoch=110)
    assert tr.cfg.sdi_lr_schedule == "constant"
    for done, want in ((0, 0.01), (99, 0.01), (100, 0.001), (105, 0.0001), (110, 0.0001)):
        tr.scheduler.last_epoch = ms.scheduler.last_epoch = done  # the run's progress: done / 110 steps
        assert tr.method.generator_lr() == 0.01
        assert ms.method.generator_lr() == pytest.approx(want)


def test_resume_after_a_generator_step_matches_uninterrupted(digits, tmp_path):
    train_ds, test_ds = digits
    sub = Subset(train_ds, list(range(128)))  # 4 batches of 32: generator steps on batches 0, 3, 6, 9
    val = DataLoader(Subset(test_ds, list(range(64))), batch_size=64)
    hp = dict(epochs=3, eps=0.1, sdi_every=3, seed=3, progress=False, verbose=False)
    ref, res, crash = resume_matches_uninterrupted("fgsm_sdi", sub, val, tmp_path, hp, crash_after=lambda n: n + 2,
                                                   width=8)
    assert crash["epoch"] == 1
    st = crash["rank_states"][0]["method"]
    assert st["batches"] == 4 and st["generator_steps"] == 2  # the checkpoint follows the step on batch 3
    strip = lambda h: [{k: v for k, v in r.items() if "time" not in k} for r in h]  # noqa: E731
    assert str(strip(res.history)) == str(strip(ref.history))


@pytest.mark.parametrize("kw,match", [
    (dict(sdi_every=0), r"^sdi_every \(FGSM-SDI batches per generator step"),
    (dict(sdi_lr=0.0), r"^sdi_lr \(FGSM-SDI generator learning rate"),
    (dict(sdi_weight_decay=-1.0), r"^sdi_weight_decay"),
    (dict(sdi_factor=0.3), r"^sdi_factor \(FGSM-SDI label smoothing"),
    (dict(sdi_lr_schedule="cosine"), r"^sdi_lr_schedule .* must be one of constant, multistep"),
    (dict(sdi_width=0), r"^sdi_width \(FGSM-SDI generator hidden channels"),
    (dict(norm="l2"), r'norm must be "linf" for fgsm_sdi'),
])
def test_bad_hyperparameters_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        rt.Trainer(tiny_cnn(), method="fgsm_sdi", eps=0.1, **kw)


def test_label_smoothed_weighted_cross_entropy():
    torch.manual_seed(0)
    z, y = torch.randn(6, 10), torch.randint(0, 10, (6,))
    ones = torch.ones(6)
    assert torch.equal(weighted_cross_entropy(z, y, ones, 0.0), weighted_cross_entropy(z, y, ones))
    assert torch.equal(weighted_cross_entropy(z, y, None, 0.0), F.cross_entropy(z, y))
    ls = smoothing_from_factor(0.9, 10)
    target = torch.full((6, 10), 0.1 / 9).scatter(1, y[:, None], 0.9)  # the official code's smoothed labels
    official = -(target * F.log_softmax(z, 1)).sum(1).mean()
    torch.testing.assert_close(weighted_cross_entropy(z, y, None, ls), official)
    torch.testing.assert_close(weighted_cross_entropy(z, y, ones, ls), official)
    w = torch.tensor([2.0, 1, 1, 1, 1, 0])  # weight 2 = the sample twice, weight 0 = left out
    idx = torch.tensor([0, 0, 1, 2, 3, 4])
    torch.testing.assert_close(weighted_cross_entropy(z, y, w, ls), F.cross_entropy(z[idx], y[idx], label_smoothing=ls))


def test_video_inputs_smoke():
    T = 3
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(T * 64, 10))
    tr = rt.Trainer(model, method="fgsm_sdi", eps=0.1, sdi_every=1, steps_per_epoch=2)
    x, y = torch.rand(4, T, 1, 8, 8), torch.randint(0, 10, (4,))
    for _ in range(2):
        loss, correct, n = tr.train_step(x, y, weights=torch.tensor([1.0, 2.0, 0.5, 1.0]))
        assert torch.isfinite(loss) and n == 4
    assert tr.method.generator.channels == 1 and tr.method.generator_steps == 2


def _ddp_worker(rank, world, port, out):
    with gloo_group(rank, world, port):
        train_ds = Subset(load_digits("train"), list(range(64)))  # 2 batches of 2 x 16: generator steps on both
        rt.fit(tiny_cnn(seed=11), rank_loader(train_ds, rank, world), "fgsm_sdi", epochs=1, eps=0.1, sdi_every=1,
               seed=0, out_dir=out, progress=False, verbose=False)


@pytest.mark.slow  # two spawned processes: most of this file's time
def test_ddp_ranks_keep_one_generator(tmp_path):
    """Two gloo processes on different halves of each batch: G's gradients and BN statistics are averaged,
    so both ranks' checkpointed generators (and Adam states) are equal."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    states = [s["method"] for s in torch.load(tmp_path / "last.pt", weights_only=True)["rank_states"]]
    assert states[0]["generator_steps"] == states[1]["generator_steps"] == 2
    for k, v in states[0]["generator"].items():
        assert torch.equal(v, states[1]["generator"][k]), k
    for k, v in states[0]["optimizer"]["state"].items():
        for name, t in v.items():
            assert torch.equal(t, states[1]["optimizer"]["state"][k][name]), (k, name)
