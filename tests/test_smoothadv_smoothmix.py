"""SmoothAdv and SmoothMix training (methods smoothadv, smoothmix): the smoothed soft objective and the
attacks against plain-PyTorch transcriptions, SmoothAdv without an attack = Gaussian training with m copies,
the SmoothMix loss against a plain transcription, exact resume, bf16 + channels_last, and a short digits run
certified with randomized smoothing."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import one_thread, resume_matches_uninterrupted, tiny_cnn  # noqa: F401 (one_thread: an autouse fixture)
from torch.utils.data import DataLoader, Subset

from robustops import ops
from robustops import train as rt
from robustops.data import load_digits
from robustops.smoothing import Smooth, acr
from robustops.train.methods.smoothadv import smoothed_nll
from robustops.train.methods.smoothmix import smoothmix_loss


@pytest.fixture(scope="module")
def digits():
    return load_digits("train"), load_digits("test")


def batch(digits, n=16):
    x, y = digits[0].tensors
    return x[:n].clone(), y[:n].clone()


def next_seeds(trainer, k):
    """The next k seeds the trainer will hand out, without consuming them."""
    g = torch.Generator()
    g.set_state(trainer.gen.get_state())
    return [int(torch.randint(0, 1 << 62, (1,), generator=g)) for _ in range(k)]


def plain_noise(x, m, sigma, seed):
    """[m, B, ...]: noise copy i of every sample (rows b*m + i of the op's input-major layout)."""
    z = ops.gaussian_noise(torch.zeros_like(x), m, sigma, seed=seed)
    return torch.stack([z[i::m] for i in range(m)])


def plain_smoothed_nll(model, xa, y, noise):
    """-log(mean_i softmax_y(model(xa + noise_i))) per sample, summed over copies in a loop."""
    p = sum(F.softmax(model(xa + noise[i]), dim=1) for i in range(noise.shape[0])) / noise.shape[0]
    return -torch.log(p.gather(1, y[:, None]).squeeze(1))


def plain_pgd(model, x, y, noise, eps, alpha, steps):
    """L2 PGD on the smoothed soft objective: normalised gradient step, projection on the eps-ball, clamp to [0, 1]."""
    xa = x.clone()
    for _ in range(steps):
        xa.requires_grad_(True)
        (g,) = torch.autograd.grad(plain_smoothed_nll(model, xa, y, noise).sum(), xa)
        with torch.no_grad():
            gn = g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            d = xa + alpha * g / gn - x
            dn = d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            d = d * torch.clamp(eps / dn.clamp_min(1e-12), max=1.0)
            xa = (x + d).clamp(0, 1)
    return xa.detach()


def test_smoothed_objective_matches_plain_pytorch():
    g = torch.Generator().manual_seed(0)
    B, m, C = 5, 3, 7
    logits = 4 * torch.randn(B * m, C, generator=g)
    y = torch.randint(0, C, (B,), generator=g)
    p = F.softmax(logits, 1).view(B, m, C).mean(1)
    ref = -torch.log(p[torch.arange(B), y])
    torch.testing.assert_close(smoothed_nll(logits, y), ref, rtol=1e-5, atol=1e-6)
    # one copy: plain cross-entropy
    torch.testing.assert_close(smoothed_nll(logits[:B], y), F.cross_entropy(logits[:B], y, reduction="none"))


@pytest.mark.parametrize("steps,eps", [(0, 0.5), (2, 0.0)])
def test_smoothadv_without_attack_is_gaussian_training_with_m_copies(digits, steps, eps):
    x, y = batch(digits)
    m, sigma = 3, 0.3
    model = tiny_cnn(seed=2)
    ref_model = copy.deepcopy(model)
    tr = rt.Trainer(model, method="smoothadv", noise_copies=m, sigma=sigma, adv_steps=steps, adv_eps=eps, seed=4,
                    lr=0.05)
    (seed,) = next_seeds(tr, 1)
    loss_sum, correct, n = tr.train_step(x, y)
    noise = plain_noise(x, m, sigma, seed)
    logits = torch.stack([ref_model(x + noise[i]) for i in range(m)], 1)  # [B, m, C]
    ref = F.cross_entropy(logits.flatten(0, 1), y.repeat_interleave(m))
    assert n == m * x.shape[0]
    torch.testing.assert_close(loss_sum / n, ref, rtol=1e-5, atol=1e-6)
    assert int(correct) == int((logits.argmax(2) == y[:, None]).sum())


def test_smoothadv_with_one_copy_and_no_attack_trains_like_gaussian(digits):
    x, y = batch(digits, 32)
    params = {}
    for method, hp in [("gaussian", {}), ("smoothadv", dict(noise_copies=1, adv_steps=0))]:
        model = tiny_cnn(seed=3)
        tr = rt.Trainer(model, method=method, sigma=0.25, seed=9, lr=0.05, **hp)
        for k in range(3):
            tr.train_step(x[8 * k:8 * k + 16], y[8 * k:8 * k + 16])
        params[method] = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(params["gaussian"], params["smoothadv"], rtol=1e-5, atol=1e-6)


def test_smoothadv_attack_matches_plain_pgd_and_stays_in_the_ball(digits):
    x, y = batch(digits)
    m, sigma, eps, steps = 4, 0.25, 0.7, 3
    model = tiny_cnn(seed=1)
    tr = rt.Trainer(model, method="smoothadv", noise_copies=m, sigma=sigma, adv_eps=eps, adv_steps=steps, seed=0,
                    adv_warmup=0)
    noise_bm = ops.gaussian_noise(torch.zeros_like(x), m, sigma, seed=11).view(x.shape[0], m, *x.shape[1:])
    x_adv = tr.method.attack(x, y, noise_bm)
    assert model.training  # back in train mode
    noise = noise_bm.transpose(0, 1)  # [m, B, ...]
    ref = plain_pgd(model, x, y, noise, eps, 2 * eps / steps, steps)
    torch.testing.assert_close(x_adv, ref, rtol=0, atol=1e-5)
    d = (x_adv - x).flatten(1).norm(dim=1)
    assert bool((d <= eps * (1 + 1e-5)).all()) and float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    assert float(d.max()) > 0.5 * eps  # it moved
    with torch.no_grad():
        before, after = plain_smoothed_nll(model, x, y, noise), plain_smoothed_nll(model, x_adv, y, noise)
    assert float(after.mean()) > float(before.mean())


def briefly_trained(digits, steps=40, seed=6):
    """tiny_cnn after a few Adam steps on the digits: right on most inputs, wrong on some."""
    model = tiny_cnn(seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = digits[0].tensors
    for k in range(steps):
        b = slice(32 * k % 1024, 32 * k % 1024 + 32)
        opt.zero_grad()
        F.cross_entropy(model(x[b]), y[b]).backward()
        opt.step()
    return model


def smoothmix_step(digits, m, sigma, T, alpha, eta, **hp):
    """One SmoothMix training step on 24 test digits of a briefly trained tiny_cnn; returns (x, y, a copy of
    the model before the step, the step's noise [m, B, ...] and lam, (loss_sum, correct, n))."""
    x, y = digits[1].tensors
    x, y = x[:24].clone(), y[:24].clone()
    model = briefly_trained(digits)
    ref_model = copy.deepcopy(model)
    tr = rt.Trainer(model, method="smoothmix", noise_copies=m, sigma=sigma, mix_steps=T, mix_alpha=alpha,
                    mix_eta=eta, mix_warmup=0, seed=5, lr=0.05, **hp)
    s_noise, s_lam = next_seeds(tr, 2)
    out = tr.train_step(x, y)
    lam = 0.5 * torch.rand(x.shape[0], generator=torch.Generator().manual_seed(s_lam))
    return x, y, ref_model, plain_noise(x, m, sigma, s_noise), lam, out


def test_smoothmix_loss_matches_plain_transcription(digits):
    m, sigma, T, alpha, eta = 3, 0.25, 2, 0.4, 5.0
    x, y, ref_model, noise, lam, (loss_sum, correct, n) = smoothmix_step(digits, m, sigma, T, alpha, eta)
    x_adv = plain_pgd(ref_model, x, y, noise, T * alpha, alpha, T)
    lv = lam.view(-1, 1, 1, 1)
    x_mix = (1 - lv) * x + lv * x_adv
    K = 10
    probs = [F.softmax(ref_model(x + noise[i]), 1) for i in range(m)]
    ce = sum(F.cross_entropy(ref_model(x + noise[i]), y) for i in range(m)) / m
    p_s = (sum(probs) / m).detach()
    target = (1 - lam[:, None]) * p_s + lam[:, None] / K
    kl = sum((target * (target.log() - F.log_softmax(ref_model(x_mix + noise[i]), 1))).sum(1)
             for i in range(m)) / m
    mask = (p_s.argmax(1) == y).float()
    assert 0 < float(mask.sum()) < len(y)  # the indicator selects some inputs and drops others
    ref = ce + eta * (mask * kl).mean()
    assert n == m * x.shape[0]
    torch.testing.assert_close(loss_sum / n, ref, rtol=1e-4, atol=1e-5)
    assert float(eta * (mask * kl).mean().detach()) > 1e-3  # the mixup term matters in this check
    assert 0 <= int(correct) <= n


def plain_smoothmix_loss(model, x_c, x_adv, y, noise, lam, eta, K=10):
    """The SmoothMix loss transcribed in plain PyTorch, with the clean side x_c given."""
    m = noise.shape[0]
    lv = lam.view(-1, 1, 1, 1)
    x_mix = (1 - lv) * x_c + lv * x_adv
    ce = sum(F.cross_entropy(model(x_c + noise[i]), y) for i in range(m)) / m
    p_s = (sum(F.softmax(model(x_c + noise[i]), 1) for i in range(m)) / m).detach()
    target = (1 - lam[:, None]) * p_s + lam[:, None] / K
    kl = sum((target * (target.log() - F.log_softmax(model(x_mix + noise[i]), 1))).sum(1) for i in range(m)) / m
    return ce + eta * ((p_s.argmax(1) == y).float() * kl).mean()


def test_smoothmix_one_step_adversary_mixes_from_the_first_iterate(digits):
    # mix_step 1 (the authors' --mix_step 1): x^(1), computed here by a separate 1-step plain PGD, replaces x
    # in the whole loss (CE, smoothed target, indicator) and is the clean end of the mixup with x^(T)
    m, sigma, T, alpha, eta = 2, 0.25, 3, 0.4, 5.0
    x, y, ref_model, noise, lam, (loss_sum, _, n) = smoothmix_step(digits, m, sigma, T, alpha, eta, mix_step=1)
    assert "mixed from x^(1)" in rt.FitConfig.make("smoothmix", mix_steps=T, mix_step=1).resolved().label
    x1 = plain_pgd(ref_model, x, y, noise, T * alpha, alpha, 1)
    x_adv = plain_pgd(ref_model, x, y, noise, T * alpha, alpha, T)
    ref = plain_smoothmix_loss(ref_model, x1, x_adv, y, noise, lam, eta)
    torch.testing.assert_close(loss_sum / n, ref, rtol=1e-4, atol=1e-5)
    original = plain_smoothmix_loss(ref_model, x, x_adv, y, noise, lam, eta)  # mix_step 0's loss differs
    assert abs(float(original.detach()) - float(ref.detach())) > 1e-3


def test_smoothmix_one_step_clean_side_warmup_and_bad_mix_step(digits):
    x, y = batch(digits, 8)
    noise = ops.gaussian_noise(torch.zeros_like(x), 2, 0.25, seed=3).view(x.shape[0], 2, *x.shape[1:])
    kw = dict(sigma=0.25, noise_copies=2, mix_steps=2, mix_alpha=0.5, mix_step=1, seed=0)
    full = rt.Trainer(tiny_cnn(seed=2), method="smoothmix", mix_warmup=0, **kw).method
    warm = rt.Trainer(tiny_cnn(seed=2), method="smoothmix", mix_warmup=4, **kw).method  # epoch 0: w = 1/4
    (x1, xa1), (xw, xaw) = full.attack(x, y, noise), warm.attack(x, y, noise)
    torch.testing.assert_close(xa1, xaw)  # the attack is unchanged by the warm-up
    d1, dw = (x1 - x).flatten(1), (xw - x).flatten(1)
    assert float(d1.norm(dim=1).max()) <= 0.5 + 1e-5 and float(d1.norm(dim=1).min()) > 0.1
    torch.testing.assert_close(dw.norm(dim=1), torch.clamp(d1.norm(dim=1), max=0.125))
    torch.testing.assert_close(dw, d1 * (dw.norm(dim=1) / d1.norm(dim=1))[:, None])  # same direction
    with pytest.raises(ValueError, match="mix_step must be below mix_steps"):
        rt.Trainer(tiny_cnn(), method="smoothmix", mix_steps=1, mix_step=1)


def test_smoothmix_target_keeps_its_gradient():
    # the authors' code builds y_mix from the clean smoothed prediction without a stop-gradient, so the
    # mixup term also pulls on the clean copies' logits; a plain float64 transcription with torch.kl_div
    g = torch.Generator().manual_seed(0)
    B, m, K, eta = 6, 2, 4, 3.0
    lc = (2 * torch.randn(B * m, K, generator=g, dtype=torch.float64)).requires_grad_()
    lm = torch.randn(B * m, K, generator=g, dtype=torch.float64).requires_grad_()
    y = torch.randint(0, K, (B,), generator=g)
    lam = 0.5 * torch.rand(B, generator=g, dtype=torch.float64)
    smoothmix_loss(lc, lm, y, lam, eta).backward()
    lc2, lm2 = lc.detach().clone().requires_grad_(), lm.detach().clone().requires_grad_()
    p = torch.stack([F.softmax(lc2.view(B, m, K)[:, i], 1) for i in range(m)]).mean(0)
    tgt = (1 - lam)[:, None] * p + lam[:, None] / K
    ok = (p.argmax(1) == y).double()
    kl = torch.stack([F.kl_div(F.log_softmax(lm2.view(B, m, K)[:, i], 1), tgt, reduction="none").sum(1)
                      for i in range(m)]).mean(0)
    ref = F.cross_entropy(lc2, y.repeat_interleave(m)) + eta * (ok * kl).mean()
    ref.backward()
    assert 0 < float(ok.sum()) < B
    torch.testing.assert_close(lc.grad, lc2.grad)
    torch.testing.assert_close(lm.grad, lm2.grad)


def test_smoothadv_eps_warmup_from_the_step_count(digits):
    x, y = batch(digits, 8)
    kw = dict(sigma=0.25, noise_copies=2, adv_steps=2, seed=0)
    tr = rt.Trainer(tiny_cnn(), method="smoothadv", adv_eps=0.6, adv_warmup=3, steps_per_epoch=2, epochs=4, **kw)
    seen = []
    for _ in range(8):
        seen.append(round(tr.method.eps(), 9))
        tr.train_step(x, y)
    assert seen == [0.2, 0.2, 0.4, 0.4, 0.6, 0.6, 0.6, 0.6]
    # in epoch 0 the attack is the one at eps / W, step 2 * (eps / W) / steps
    tr = rt.Trainer(tiny_cnn(seed=1), method="smoothadv", adv_eps=0.6, adv_warmup=3, **kw)
    ref = rt.Trainer(tiny_cnn(seed=1), method="smoothadv", adv_eps=0.2, adv_warmup=0, **kw)
    noise = ops.gaussian_noise(torch.zeros_like(x), 2, 0.25, seed=3).view(x.shape[0], 2, *x.shape[1:])
    torch.testing.assert_close(tr.method.attack(x, y, noise), ref.method.attack(x, y, noise))


def test_smoothmix_eta_warmup_from_the_step_count(digits):
    x, y = batch(digits, 8)
    tr = rt.Trainer(tiny_cnn(), method="smoothmix", sigma=0.25, noise_copies=1, mix_steps=1, mix_eta=4.0,
                    mix_warmup=2, steps_per_epoch=2, epochs=4)
    seen = []
    for _ in range(6):
        seen.append(tr.method.eta())
        tr.train_step(x, y)
    assert seen == [2.0, 2.0, 4.0, 4.0, 4.0, 4.0]
    assert rt.Trainer(tiny_cnn(), method="smoothmix", mix_eta=4.0, mix_warmup=0).method.eta() == 4.0


@pytest.mark.parametrize("method,hp", [("smoothadv", dict(adv_steps=2, adv_eps=0.5)),
                                       ("smoothmix", dict(mix_steps=2, mix_alpha=0.3))])
def test_resume_matches_uninterrupted(digits, tmp_path, method, hp):
    train_ds, test_ds = digits
    sub = Subset(train_ds, list(range(96)))
    val = DataLoader(Subset(test_ds, list(range(32))), batch_size=32)
    hp = dict(hp, epochs=3, seed=3, sigma=0.25, noise_copies=2, val_eps=0.0, progress=False, verbose=False)

    ref, res, crash = resume_matches_uninterrupted(method, sub, val, tmp_path, hp, crash_after=lambda n: n + 2)
    assert ref.select == "noise_acc" and all(0 <= row["noise_acc"] <= 1 for row in ref.history)
    assert crash["epoch"] == 1
    assert res.epochs_run == 3


@pytest.mark.parametrize("method", ["smoothadv", "smoothmix"])
def test_bf16_and_channels_last(digits, method):
    train_ds, test_ds = digits
    model = tiny_cnn(seed=1, bn=True)
    res = rt.fit(model, DataLoader(Subset(train_ds, list(range(64))), batch_size=32), method, epochs=1, amp="bf16",
                 channels_last=True, seed=0, val_eps=0.0, progress=False, verbose=False, adv_steps=2, mix_steps=2,
                 val_loader=DataLoader(Subset(test_ds, list(range(32))), batch_size=32))
    row = res.last
    assert math.isfinite(row["train_loss"]) and 0 <= row["noise_acc"] <= 1


def test_unknown_and_bad_hyperparameters_are_refused(digits):
    with pytest.raises(ValueError, match="adv_steps"):
        rt.Trainer(tiny_cnn(), method="smoothadv", adv_steps=-1)
    with pytest.raises(ValueError, match="noise_copies"):
        rt.Trainer(tiny_cnn(), method="smoothmix", noise_copies=0)
    assert rt.FitConfig.make("smoothmix", sigma=0.5).resolved().noise_sigma == 0.5


@pytest.mark.parametrize("method", ["smoothadv", "smoothmix"])
def test_short_digits_run_certifies(digits, method):
    train_ds, test_ds = digits
    sigma = 0.25
    torch.manual_seed(0)
    model = tiny_cnn(seed=0, width=16)
    rt.fit(model, DataLoader(train_ds, batch_size=64, shuffle=True), method, epochs=4, optimizer="adam", lr=3e-3,
           schedule="constant", sigma=sigma, noise_copies=2, adv_steps=2, adv_eps=0.5, mix_steps=2, mix_alpha=0.25,
           seed=1, val_eps=0.0, progress=False, verbose=False)
    model.eval()
    x, y = test_ds.tensors
    x, y = x[:60], y[:60]
    res = Smooth(model, 10, sigma).certify(x, n0=20, n=200, alpha=0.001, batch_size=1000, seed=0)
    value = acr(res.radius, res.prediction == y)
    print(f"\n{method}: ACR (sigma={sigma}, n=200, 60 digits) = {value:.4f}, "
          f"certified-correct {(res.prediction == y).float().mean().item():.2f}")
    assert math.isfinite(value) and value > 0.05
