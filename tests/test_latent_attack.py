"""Latent attacks in learned perturbation sets (robustops.attacks.latent) and what they stand on:
pgd_step_ / random_init with infinite bounds (the latent iterate has no box) against the reference,
the engine's per-sample context under early exit and restarts, LatentPGD (stays in the ball, beats
random members of the set, finds the analytic optimum of a linear problem), nearest_member,
robust_accuracy and the `--threat learned` command line. The perturbation models here are tiny
hand-made ones implementing the protocol of robustops.perturbation."""
import io
import math
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import train_digits_model
from robustops import ops, perturbation
from robustops import reference as R
from robustops.attacks import Engine, LatentPGD, PGD, nearest_member, random_members, robust_accuracy
from robustops.data import load_digits
from robustops.models import save_checkpoint

INF = float("inf")


class LinearSet(nn.Module):
    """x_hat = x + A z (A: [pixels, D]); prior mu = P x, logvar = tanh(Q x) * 0.5 (both depend on x, so
    rows of the context that went to the wrong sample would change the result), or 0 / 0."""

    def __init__(self, D=6, shape=(1, 8, 8), scale=0.15, seed=0, x_prior=True):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        n = math.prod(shape)
        self.latent_dim = D
        self.A = nn.Parameter(torch.randn(n, D, generator=g) * scale)
        self.P = nn.Parameter(torch.randn(n, D, generator=g) * 0.05 * x_prior)
        self.Q = nn.Parameter(torch.randn(n, D, generator=g) * 0.2 * x_prior)

    def prior(self, x):
        f = x.flatten(1)
        return f @ self.P, 0.5 * torch.tanh(f @ self.Q)

    def decode(self, z, x):
        return x + (z @ self.A.t()).view(x.shape)


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits("test").tensors
    return x[:64], y[:64]


@pytest.fixture(scope="module")
def classifier():
    return train_digits_model(epochs=5, seed=0)


# --------------------------------------------------------------------- ops with infinite bounds

@pytest.mark.parametrize("scalar", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_pgd_step_infinite_bounds_matches_reference(norm, dtype, scalar, monkeypatch):
    if scalar:
        monkeypatch.setenv("ROBUSTOPS_CPU_SCALAR", "1")
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(7, 37, generator=g) * 4).to(dtype)  # far outside [0, 1]: nothing may clamp it
    xa = (x.float() + torch.randn(7, 37, generator=g)).to(dtype)
    grad = torch.randn(7, 37, generator=g).to(dtype)
    eps = torch.rand(7, generator=g) * 2
    eps[0] = 0.0
    out = ops.pgd_step_(xa.clone(), x, grad, eps, 0.4, norm, -INF, INF)
    ref = R.pgd_step(xa, x, grad, eps, 0.4, norm, -INF, INF)
    assert torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-6 if dtype == torch.float32 else 0, rtol=1e-6)
    d = (out.float() - x.float())
    size = d.norm(dim=1) if norm == "l2" else d.abs().amax(1)
    assert (size <= eps * (1 + 1e-5) + (1e-6 if dtype == torch.float32 else 0.05)).all()
    # values beyond [0, 1] survive: the box really is open
    assert out.float().abs().max() > 2


@pytest.mark.parametrize("radius", ["ball", "uniform"])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_random_init_infinite_bounds_matches_reference(norm, radius):
    x = torch.randn(9, 21) * 5
    eps = torch.linspace(0, 3, 9)
    out = ops.random_init(x, eps, norm, -INF, INF, seed=4, offset=11, radius=radius)
    ref = R.random_init(x, eps, norm, -INF, INF, seed=4, offset=11, radius=radius)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    d = out - x
    size = d.norm(dim=1) if norm == "l2" else d.abs().amax(1)
    assert (size <= eps * (1 + 1e-5) + 1e-6).all() and (size[1:] > 0).all()


@pytest.mark.cuda
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_infinite_bounds_cuda_matches_cpu(norm):
    g = torch.Generator().manual_seed(2)
    x, xa, grad = (torch.randn(6, 50, generator=g) * 3 for _ in range(3))
    eps = torch.rand(6, generator=g) * 2
    cpu = ops.pgd_step_(xa.clone(), x, grad, eps, 0.3, norm, -INF, INF)
    dev = ops.pgd_step_(xa.cuda(), x.cuda(), grad.cuda(), eps.cuda(), 0.3, norm, -INF, INF)
    torch.testing.assert_close(dev.cpu(), cpu, atol=1e-6, rtol=1e-6)
    init_cpu = ops.random_init(x, eps, norm, -INF, INF, seed=5, offset=3, radius="uniform")
    init_dev = ops.random_init(x.cuda(), eps.cuda(), norm, -INF, INF, seed=5, offset=3, radius="uniform")
    torch.testing.assert_close(init_dev.cpu(), init_cpu, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- engine context

def _context_engine():
    torch.manual_seed(0)
    lin = nn.Linear(12, 4)
    lin.requires_grad_(False)

    def forward(x, ctx):
        scale, shift = ctx
        return lin(x * scale[:, None] + shift)

    def objective(logits, y):
        return F.cross_entropy(logits, y, reduction="none")

    def success(logits, y):
        return logits.argmax(1) != y

    return lin, forward, objective, success


def test_engine_context_rows_follow_early_exit_and_restarts():
    """A batch run with a per-sample context, early exit (compaction) and restarts gives, per sample,
    what that sample's own run gives (its context baked into the forward), and the full-batch run
    with recording agrees with the early-exit run."""
    lin, forward, objective, success = _context_engine()
    g = torch.Generator().manual_seed(3)
    B = 12
    x = torch.rand(B, 12, generator=g)
    y = torch.randint(0, 4, (B,), generator=g)
    scale = torch.rand(B, generator=g) * 2 + 0.1
    shift = torch.randn(B, 12, generator=g)
    eps = torch.rand(B, generator=g) * 0.8
    eng = Engine(forward, objective, norm="l2", success=success)
    kw = dict(start="uniform", seed=7, restarts=3)
    batch = eng.run(x, y, eps, eps / 4, 8, early_exit=True, context=(scale, shift), **kw)
    full = eng.run(x, y, eps, eps / 4, 8, record=True, context=(scale, shift), **kw)
    assert 0 < int(batch.success.sum()) < B  # some leave the batch early, some stay: compaction happens
    assert torch.equal(batch.success, full.success)
    assert torch.equal(batch.success_step[batch.success], full.success_step[full.success])
    torch.testing.assert_close(batch.x_adv[batch.success], full.x_adv[full.success], atol=1e-5, rtol=0)
    for i in range(B):
        def own(xi, i=i):
            return lin(xi * scale[i] + shift[i])
        one = Engine(own, objective, norm="l2", success=success).run(
            x[i:i + 1], y[i:i + 1], eps[i:i + 1], eps[i:i + 1] / 4, 8, early_exit=True, offset=i, **kw)
        assert bool(one.success[0]) == bool(batch.success[i])
        assert int(one.restart[0]) == int(batch.restart[i])
        torch.testing.assert_close(one.x_adv[0], batch.x_adv[i], atol=1e-5, rtol=0)


def test_engine_context_errors():
    _, forward, objective, success = _context_engine()
    eng = Engine(forward, objective, norm="l2", success=success)
    x, y = torch.rand(4, 12), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"context\[1\] must have the batch dimension B = 4"):
        eng.run(x, y, 0.5, 0.1, 2, context=(torch.ones(4), torch.ones(3, 12)))
    with pytest.raises(TypeError, match="context"):
        eng.run(x, y, 0.5, 0.1, 2, context=(torch.ones(4), 3.0))
    with pytest.raises(ValueError, match="CUDA-graph loop does not take a per-sample context"):
        eng.run(x, y, 0.5, 0.1, 2, context=(torch.ones(4), torch.ones(4, 12)), loop=lambda *a: None)


# ------------------------------------------------------------------------------- LatentPGD

def test_latent_pgd_stays_in_the_ball_per_sample_eps(classifier, digits):
    x, y = digits
    pm = LinearSet()
    eps = torch.linspace(0, 2, x.shape[0])
    for early in (True, False):
        res = LatentPGD(classifier, pm, eps=eps, steps=8, restarts=2, early_stop=early).perturb(x, y)
        norms = res.u.norm(dim=1)
        assert (norms <= eps * (1 + 1e-5)).all()
        assert norms[-1] > 0.5  # the attack does move where it may
        assert torch.equal(res.u[0], torch.zeros_like(res.u[0]))
        # x_adv is the member decoded from u, inside the data range
        torch.testing.assert_close(res.x_adv, LatentPGD(classifier, pm, eps=eps).members(x, res.u))
        assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    # __call__ returns x_adv
    atk = LatentPGD(classifier, pm, eps=1.0, steps=4)
    torch.testing.assert_close(atk(x, y), atk.perturb(x, y, offset=0).x_adv)


def test_latent_pgd_beats_random_members(classifier, digits):
    """The attack is at least as strong as 100 random members of the set: on every input it succeeds
    wherever some random member fools the classifier; where none does, its loss is at least the best
    random member's on all but a few inputs (the loss is not concave in u: a restart can end at a
    local maximum below the best of 100 draws, measured 4 of 54 inputs with one restart, 1 of 53 with
    three) and on average well above it."""
    x, y = digits
    pm = LinearSet(scale=0.12)
    eps = 1.0
    loss, fooled = random_members(classifier, pm, x, y, eps, n=100, seed=1)
    assert loss.shape == (64, 100) and fooled.any() and not fooled.all(1).all()
    res = LatentPGD(classifier, pm, eps=eps, steps=20, restarts=3, early_stop=False, seed=0).perturb(x, y)
    assert (res.success | ~fooled.any(1)).all(), "a random member fools the classifier where the attack did not"
    assert int(res.success.sum()) > int(fooled.any(1).sum())
    standing = ~res.success
    below = res.loss[standing] < loss.amax(1)[standing] - 1e-4
    assert int(below.sum()) <= 0.05 * int(standing.sum())
    assert res.loss[standing].mean() > 1.2 * loss.amax(1)[standing].mean()
    # the early-exit attack counts a success at any step: it is at least as strong
    early = LatentPGD(classifier, pm, eps=eps, steps=20, restarts=3, early_stop=True, seed=0).perturb(x, y)
    assert (early.success | ~res.success).all()


def test_latent_pgd_early_exit_equals_recording(classifier, digits):
    """Early exit (rows compacted with their (x, mu, sigma) context) returns for the samples that
    succeed what the full batch with step recording returns."""
    x, y = digits
    pm = LinearSet(scale=0.12)
    kw = dict(eps=1.0, steps=10, restarts=3, seed=5)
    early = LatentPGD(classifier, pm, early_stop=True, **kw).perturb(x, y)
    full = LatentPGD(classifier, pm, early_stop=False, record_steps=True, **kw).perturb(x, y)
    ok = early.success
    assert 0 < int(ok.sum()) < x.shape[0]
    assert torch.equal(ok, full.success)
    assert torch.equal(early.success_step[ok], full.success_step[ok])
    assert torch.equal(early.restart[ok], full.restart[ok])
    torch.testing.assert_close(early.u[ok], full.u[ok], atol=1e-5, rtol=0)
    torch.testing.assert_close(early.x_adv[ok], full.x_adv[ok], atol=1e-5, rtol=0)
    # more restarts never weaken it
    one = LatentPGD(classifier, pm, early_stop=True, **{**kw, "restarts": 1}).perturb(x, y)
    assert (ok | ~one.success).all()


@pytest.mark.parametrize("targeted", [False, True])
def test_latent_pgd_finds_the_linear_optimum(targeted):
    """Linear decoder and linear two-class classifier, no clamping: the loss is monotone in
    w . (x + A (mu + sigma * u)) with w = W[other] - W[label], so the optimum is u* = eps * v / ||v||,
    v = sigma * (A^T w)."""
    torch.manual_seed(0)
    pm = LinearSet(D=5, shape=(10,), scale=0.3)
    clf = nn.Linear(10, 2)
    x = torch.randn(16, 10)
    y = torch.randint(0, 2, (16,))
    eps = torch.rand(16) + 0.5
    # a large step (eps / 2) turns u along the sphere fast; the default 2 * eps / steps needs ~30 steps per e-fold
    atk = LatentPGD(clf, pm, eps=eps, alpha=eps / 2, steps=40, early_stop=False, lo=-INF, hi=INF, targeted=targeted)
    res = atk.perturb(x, y, 1 - y if targeted else None)
    W = clf.weight.detach()
    w = W[1 - y] - W[y]
    _, sigma = perturbation.prior_scale(pm, x)
    v = sigma * (w @ pm.A.detach())
    u_star = eps[:, None] * v / v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(res.u, u_star, atol=2e-3 * float(eps.max()), rtol=0)


def test_latent_pgd_errors(classifier, digits):
    x, y = digits
    with pytest.raises(TypeError, match="latent_dim"):
        LatentPGD(classifier, nn.Linear(3, 3), eps=1.0)
    with pytest.raises(ValueError, match="eps"):
        LatentPGD(classifier, LinearSet(), eps=-1.0)
    with pytest.raises(ValueError, match="eps must be a float or a Tensor"):
        LatentPGD(classifier, LinearSet(), eps=torch.ones(3)).perturb(x, y)
    with pytest.raises(ValueError, match="clip"):
        LatentPGD(classifier, LinearSet(), eps=1.0).perturb(x + 2, y)
    assert not isinstance(LatentPGD(classifier, LinearSet(), eps=1.0), PGD)  # siblings on attacks.Attack
    empty = LatentPGD(classifier, LinearSet(), eps=1.0).perturb(x[:0], y[:0])
    assert empty.x_adv.shape[0] == 0 and empty.u.shape == (0, 6)


def test_latent_pgd_leaves_models_as_they_were(classifier, digits):
    x, y = digits
    pm = LinearSet().train()
    classifier.train()
    LatentPGD(classifier, pm, eps=1.0, steps=2).perturb(x, y)
    assert pm.training and classifier.training
    assert all(p.requires_grad for p in pm.parameters()) and all(p.requires_grad for p in classifier.parameters())
    assert all(p.grad is None for p in pm.parameters())
    classifier.eval()


# ---------------------------------------------------------------------------- nearest member

def test_nearest_member_recovers_a_member_and_beats_the_centre():
    torch.manual_seed(1)
    pm = LinearSet(D=4, shape=(1, 8, 8), scale=0.1)
    x = torch.rand(10, 1, 8, 8) * 0.5 + 0.25  # the members stay inside [0, 1]: no clamping
    mu, sigma = perturbation.prior_scale(pm, x)
    u_true = F.normalize(torch.randn(10, 4), dim=1) * 0.6
    target = perturbation.member(pm, x, u_true, mu, sigma).detach()
    x_best, u_best = nearest_member(pm, x, target, eps=1.0, steps=60)
    assert (u_best.norm(dim=1) <= 1.0 + 1e-5).all()
    torch.testing.assert_close(u_best, u_true, atol=2e-2, rtol=0)
    assert (x_best - target).flatten(1).norm(dim=1).max() < 5e-3
    # a point outside the set: the nearest member is nearer than the centre and than random members
    far = (target + 0.2 * torch.randn_like(target)).clamp(0, 1)
    xb, ub = nearest_member(pm, x, far, eps=1.0, steps=60, restarts=3, seed=2)
    d_best = (xb - far).flatten(1).norm(dim=1)
    d_centre = (perturbation.member(pm, x, torch.zeros_like(ub), mu, sigma) - far).flatten(1).norm(dim=1)
    assert (d_best <= d_centre + 1e-6).all() and (ub.norm(dim=1) <= 1.0 + 1e-5).all()
    u_rand = ops.random_init(torch.zeros(10, 4), 1.0, "l2", -INF, INF, seed=3, radius="ball")
    d_rand = (perturbation.member(pm, x, u_rand, mu, sigma) - far).flatten(1).norm(dim=1)
    assert (d_best <= d_rand + 1e-6).all()
    with pytest.raises(ValueError, match="x_tilde must have x's shape"):
        nearest_member(pm, x, far[:, :, :4], eps=1.0)


# ------------------------------------------------------------------------- robust accuracy

def test_robust_accuracy_with_latent_pgd(classifier, digits):
    x, y = digits
    pm = LinearSet(scale=0.12)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=24)
    atk = LatentPGD(classifier, pm, eps=1.0, steps=10, seed=0)
    res = robust_accuracy(classifier, loader, atk, progress=False)
    s = res["samples"]
    assert res["n"] == 64 and res["robust_acc"] < res["clean_acc"]
    assert (s["latent_l2"] <= 1.0 + 1e-5).all() and s["latent_l2"].max() > 0.5
    # the same numbers as the attack run directly, batch by batch with the same offsets
    clean_ok = classifier(x).argmax(1) == y
    direct = []
    for i in range(0, 64, 24):
        r = LatentPGD(classifier, pm, eps=1.0, steps=10, seed=0).perturb(x[i:i + 24], y[i:i + 24], offset=i,
                                                                          skip=~clean_ok[i:i + 24])
        direct.append(~r.success)
    assert torch.equal(s["robust_correct"], clean_ok & torch.cat(direct))


# ----------------------------------------------------------------------------- command line

def _cli(argv):
    from robustops.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(["attack"] + [str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def cli_files(classifier, tmp_path_factory):
    d = tmp_path_factory.mktemp("latent_cli")
    ckpt = save_checkpoint(str(d / "digits.pt"), classifier, "small_cnn",
                           {"num_classes": 10, "in_channels": 1, "input_size": 8})
    pm_path = str(d / "pm.pt")
    torch.save({"eps": 0.75, "state_dict": LinearSet(scale=0.12).state_dict()}, pm_path)
    return ckpt, pm_path


def test_cli_learned_threat(cli_files, tmp_path, monkeypatch):
    """--threat learned wires the checkpoint's perturbation model (loaded by
    perturbation.load_perturbation_model, replaced here by a loader of the tiny model) and its eps."""
    ckpt, pm_path = cli_files
    seen = []

    def loader(path, device):
        seen.append(path)
        pm = LinearSet(scale=0.12)
        pm.load_state_dict(torch.load(path)["state_dict"])
        return pm.to(device)

    monkeypatch.setattr(perturbation, "load_perturbation_model", loader, raising=False)
    out = tmp_path / "latent.tsv"
    rc, text, err = _cli(["--checkpoint", ckpt, "--threat", "learned", "--perturbation-model", pm_path, "--steps", 5,
                          "--max", 40, "--no-progress", "--early-stop", "--out", out])
    assert rc == 0, err
    assert seen == [pm_path]
    assert "latent PGD-5 learned eps=0.75 (from the perturbation model)" in text
    rows = out.read_text().splitlines()
    header = rows[0].split("\t")
    assert "latent_l2" in header and len(rows) == 41
    col = header.index("latent_l2")
    assert all(float(r.split("\t")[col]) <= 0.75 * (1 + 1e-5) for r in rows[1:])
    rc, text, err = _cli(["--checkpoint", ckpt, "--threat", "learned", "--perturbation-model", pm_path, "--eps", 0,
                          "--steps", 2, "--max", 40, "--no-progress"])
    assert rc == 0 and "eps=0 (from --eps)" in text


def test_cli_learned_threat_errors(cli_files, tmp_path, monkeypatch):
    ckpt, pm_path = cli_files
    rc, _, err = _cli(["--checkpoint", ckpt, "--threat", "learned", "--max", 4])
    assert rc == 2 and "--threat learned needs --perturbation-model" in err
    rc, _, err = _cli(["--checkpoint", ckpt, "--perturbation-model", pm_path, "--max", 4])
    assert rc == 2 and "--perturbation-model is for --threat learned" in err
    rc, _, err = _cli(["--checkpoint", ckpt, "--threat", "learned", "--perturbation-model", pm_path, "--suite",
                       "autoattack", "--max", 4])
    assert rc == 2 and "--suite" in err
    rc, _, err = _cli(["--checkpoint", ckpt, "--threat", "learned", "--perturbation-model", tmp_path / "none.pt"])
    assert rc == 2 and "no such file" in err
    monkeypatch.setattr(perturbation, "load_perturbation_model", lambda path, device: LinearSet(), raising=False)
    no_eps = str(tmp_path / "no_eps.pt")
    torch.save({"state_dict": {}}, no_eps)
    rc, _, err = _cli(["--checkpoint", ckpt, "--threat", "learned", "--perturbation-model", no_eps, "--max", 4])
    assert rc == 2 and "give --eps" in err
