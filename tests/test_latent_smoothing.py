"""Smooth's per-input context, and randomized smoothing in the latent space of a learned perturbation
set (robustops.smoothing.LatentSmooth): soundness and tightness of the certified latent radius on a
linear classifier composed with a linear decoder, whose smoothed probabilities are known in closed form."""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import devices
from helpers import Linear2
from scipy import stats

from robustops.smoothing import LatentSmooth, Smooth, clopper_pearson_lower

BIG = 1e6  # a clamp range that never binds: the decoder stays linear


class LinearSet(nn.Module):
    """A perturbation model with the protocol: prior mu(x) = M x, logvar = 2 log s (per latent
    coordinate, independent of x), decoder g(z, x) = x + A z. So the member at offset u is
    x + A (M x + s * u): linear in u."""

    def __init__(self, A, M, s):
        super().__init__()
        self.register_buffer("A", torch.as_tensor(A, dtype=torch.float32))   # [P, D]
        self.register_buffer("M", torch.as_tensor(M, dtype=torch.float32))   # [D, P]
        self.register_buffer("s", torch.as_tensor(s, dtype=torch.float32))   # [D]
        self.latent_dim = self.A.shape[1]

    def prior(self, x):
        mu = x.flatten(1) @ self.M.t()
        return mu, (2 * torch.log(self.s)).expand_as(mu)

    def decode(self, z, x):
        return x + (z @ self.A.t()).view_as(x)


def linear_setup(P=5, D=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(P, generator=gen)
    A = torch.randn(P, D, generator=gen)
    M = 0.3 * torch.randn(D, P, generator=gen)
    s = 0.5 + torch.rand(D, generator=gen)
    return w, A, M, s, gen


def closed_form(x, w, b, A, M, s):
    """(margin at u = 0, direction v): h(u) = margin + v.u for the linear set (float64)."""
    w, A, M, s, x = (t.double() for t in (w, A, M, s, x))
    margin = x @ w + b + (x @ M.t()) @ (A.t() @ w)
    v = s * (A.t() @ w)
    return margin, v


# ----------------------------------------------------------------------------- Smooth's context

class IgnoresContext(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net
        self.calls = 0

    def forward(self, x, context):
        self.calls += 1
        assert context[0].shape[0] == x.shape[0] and context[1].shape[0] == x.shape[0]
        return self.net(x)


@pytest.mark.parametrize("batch_size", [7, 64, 1000])
def test_context_unused_gives_the_old_results(batch_size):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(4, generator=gen)
    x = 0.3 * torch.randn(9, 4, generator=gen)
    ctx = (torch.randn(9, 2, 2, generator=gen), torch.arange(9))
    old = Smooth(Linear2(w), 2, 0.5)
    new = Smooth(IgnoresContext(Linear2(w)), 2, 0.5)
    a = old.certify(x, 20, 150, 0.01, batch_size, seed=5, indices=range(10, 19))
    b = new.certify(x, 20, 150, 0.01, batch_size, seed=5, indices=range(10, 19), context=ctx)
    assert new.base_classifier.calls > 0
    for f in ("prediction", "radius", "counts", "selection_counts", "pA_lower"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    pa = old.predict(x, 150, 0.01, batch_size, seed=6, return_details=True)
    pb = new.predict(x, 150, 0.01, batch_size, seed=6, return_details=True, context=ctx)
    assert torch.equal(pa.prediction, pb.prediction) and torch.equal(pa.counts, pb.counts)


class OwnerCheck(nn.Module):
    """Inputs are far apart (x[i] = 100 i): the input a noisy row came from is round(row / 100); the
    context row must be that input's. Votes for class 1 when it is (else class 0)."""

    def __init__(self):
        super().__init__()
        self.rows = 0

    def forward(self, x, context):
        owner = torch.round(x[:, 0] / 100).long()
        self.rows += x.shape[0]
        ok = (context == owner).all() and context.dtype == torch.int64
        return torch.stack([torch.zeros(x.shape[0]), torch.full((x.shape[0],), 1.0 if ok else -1.0)], 1)


@pytest.mark.parametrize("batch_size", [1, 5, 33, 500])
def test_context_rows_follow_their_input_across_batches(batch_size):
    B = 6
    x = 100.0 * torch.arange(B, dtype=torch.float32)[:, None].repeat(1, 3)
    net = OwnerCheck()
    res = Smooth(net, 2, 0.1).certify(x, 7, 40, 0.01, batch_size, seed=1, context=torch.arange(B))
    assert net.rows == B * 47
    assert (res.counts[:, 1] == 40).all() and (res.selection_counts[:, 1] == 7).all()


def test_context_errors_are_clear():
    sm = Smooth(IgnoresContext(Linear2(torch.ones(2))), 2, 0.5)
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match=r"context\[1\] must have one row per input of x \(shape \[3, \.\.\.\]\)"):
        sm.certify(x, 2, 4, 0.1, 8, context=(torch.zeros(3), torch.zeros(2)))
    with pytest.raises(ValueError, match=r"context must have one row per input"):
        sm.predict(x, 4, 0.1, 8, context=torch.zeros(4, 1))
    with pytest.raises(TypeError, match="context must be a tensor"):
        sm.certify(x, 2, 4, 0.1, 8, context=[1, 2, 3])
    with pytest.raises(ValueError, match="graph=True"):
        Smooth(IgnoresContext(Linear2(torch.ones(2))), 2, 0.5, graph=True).certify(
            x, 2, 4, 0.1, 8, context=(torch.zeros(3), torch.zeros(3)))


# ------------------------------------------------------------------------- latent smoothing

def test_latent_radius_is_sound_and_tight_on_a_linear_set():
    """h_x(u) = margin + v.u: the smoothed probability of class 1 is Phi(margin / (sigma |v|)) and the
    exact latent robust radius is |margin| / |v|. The certified radius is exactly sigma * Phi^-1 of the
    Clopper-Pearson bound of the votes; the votes follow the closed-form pA; at most about alpha of the
    inputs are over-certified; and no sampled offset inside a certified radius (nor the worst one)
    flips the exact smoothed prediction."""
    P, D, Mn, sigma, alpha, n0, n = 5, 3, 600, 0.7, 0.1, 16, 256
    w, A, M, s, gen = linear_setup(P, D, seed=1)
    b = 0.1
    x = torch.randn(Mn, P, generator=gen)
    margin, v = closed_form(x, w, b, A, M, s)
    # spread the margins over a useful range: shift x along w so that margin / (sigma |v|) ~ U(-3, 3)
    target = sigma * v.norm() * (6 * torch.rand(Mn, generator=gen, dtype=torch.float64) - 3)
    gain = closed_form(w[None] / w.norm(), w, 0.0, A, M, s)[0][0]  # margin change per unit step along w / |w|
    x = (x.double() + ((target - margin) / gain)[:, None] * (w.double() / w.norm())[None]).float()
    margin, v = closed_form(x, w, b, A, M, s)
    assert torch.allclose(margin, target, atol=1e-3)

    ls = LatentSmooth(Linear2(w, b), LinearSet(A, M, s), 2, sigma, lo=-BIG, hi=BIG)
    res = ls.certify(x, n0, n, alpha, batch_size=1000, seed=7)

    p1 = torch.from_numpy(stats.norm.cdf((margin / (sigma * v.norm())).numpy()))
    true_class = (margin > 0).long()
    true_radius = margin.abs() / v.norm()

    # the radius is sigma * Phi^-1(pA_lower) of the counts, pA_lower the Clopper-Pearson bound
    c_a = res.selection_counts.argmax(1)
    n_a = res.counts.gather(1, c_a[:, None]).squeeze(1)
    lower = clopper_pearson_lower(n_a.numpy(), n, alpha)
    cert = res.prediction >= 0
    assert torch.equal(cert, torch.from_numpy(lower >= 0.5))
    expect = np.where(lower >= 0.5, sigma * stats.norm.ppf(np.clip(lower, 0.5, 1.0)), 0.0)
    assert np.allclose(res.radius.numpy(), expect, rtol=1e-9, atol=1e-12)

    # the votes follow the closed form: class-1 counts ~ Binomial(n, p1)
    k1 = res.counts[:, 1].double()
    z = (k1 - n * p1) / torch.sqrt(n * p1 * (1 - p1) + 1e-12)
    assert abs(float(z.mean())) < 4 / math.sqrt(Mn) + 0.05 and 0.7 < float(z.std()) < 1.3

    # soundness: over-certified (wrong class or radius beyond the exact one) for about alpha at most
    wrong = cert & ((res.prediction != true_class) | (res.radius > true_radius))
    limit = stats.binom.ppf(0.999, Mn, alpha) / Mn
    assert wrong.double().mean().item() <= limit
    assert cert.double().mean() > 0.5
    # tightness: the certified radius is close to what the Clopper-Pearson bound of the *expected*
    # count allows, i.e. the gap to the exact radius is the statistics' gap, not a loose construction
    mid = cert & (p1 > 0.6) & (p1 < 0.99) & (p1 > 0.5) | cert & (p1 < 0.4) & (p1 > 0.01)
    pA = torch.where(true_class == 1, p1, 1 - p1)
    ideal = sigma * torch.from_numpy(stats.norm.ppf(clopper_pearson_lower((pA * n).numpy(), n, alpha)))
    gap = (res.radius - ideal)[mid].abs()
    assert gap.median() < 0.15 * sigma

    # sampling: offsets u in the certified ball (random ones and the worst direction -sign * v/|v|) do not
    # change the exact smoothed prediction, except on the few over-certified inputs
    ok_inputs = cert & ~wrong
    idx = torch.nonzero(ok_inputs).squeeze(1)
    r = res.radius[idx]
    sign = torch.where(res.prediction[idx] == 1, 1.0, -1.0).double()
    dirs = torch.randn(len(idx), 64, D, generator=gen, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=2, keepdim=True)
    radii = r[:, None] * torch.rand(len(idx), 64, generator=gen, dtype=torch.float64) ** (1 / D)
    us = torch.cat([dirs * radii[..., None], (-sign[:, None] * r[:, None] * v[None] / v.norm())[:, None]], 1)
    shifted = margin[idx, None] + us @ v  # h's mean at the offset
    assert ((sign[:, None] * shifted) >= 0).all()
    # and just beyond the exact radius the worst offset does flip it (the check has power)
    beyond = margin[idx] - sign * (true_radius[idx] * 1.01) * v.norm()
    assert ((sign * beyond) < 0).all()


def test_latent_certify_matches_pixel_smoothing_when_the_set_is_pixel_noise():
    """Decoder g(z, x) = x + z, prior N(0, I), identity clamp: latent smoothing is Smooth on x itself,
    with the same noise stream, so the votes agree."""
    class Shift(nn.Module):
        latent_dim = 4

        def prior(self, x):
            z = torch.zeros(x.shape[0], 4, device=x.device)
            return z, z

        def decode(self, z, x):
            return x + z

    gen = torch.Generator().manual_seed(2)
    w = torch.randn(4, generator=gen)
    x = 0.5 * torch.randn(12, 4, generator=gen)
    a = Smooth(Linear2(w), 2, 0.4).certify(x, 10, 100, 0.01, 37, seed=9)
    b = LatentSmooth(Linear2(w), Shift(), 2, 0.4, lo=-BIG, hi=BIG).certify(x, 10, 100, 0.01, 37, seed=9)
    # the same Philox draws; u + x vs x + u rounds identically, so the votes are the same
    assert torch.equal(a.counts, b.counts) and torch.equal(a.prediction, b.prediction)
    assert torch.allclose(a.radius, b.radius)


@pytest.mark.parametrize("device", devices())
def test_latent_predict_and_image_shapes(device):
    """Images [B, C, H, W], a decoder that brightens, a conv classifier; predict agrees with certify's
    class where both decide; members are clamped to [lo, hi]; NaN images abstain."""
    class Brightness(nn.Module):
        latent_dim = 1

        def prior(self, x):
            mu = torch.zeros(x.shape[0], 1, device=x.device)
            return mu, torch.full_like(mu, math.log(0.04))

        def decode(self, z, x):
            return x + z.view(-1, 1, 1, 1)

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval()
    net.to(device)
    x = torch.rand(5, 1, 8, 8)
    x[3] = float("nan")
    ls = LatentSmooth(net, Brightness(), 3, 0.5)
    with pytest.warns(UserWarning, match="NaN / Inf"):
        res = ls.certify(x.to(device), 20, 200, 0.01, 64, seed=4)
    assert res.prediction[3] == -1 and res.radius[3] == 0
    with pytest.warns(UserWarning):
        pred = ls.predict(x.to(device), 200, 0.01, 64, seed=5)
    both = (pred >= 0) & (res.prediction >= 0)
    assert torch.equal(pred[both], res.prediction[both])
    assert pred[3] == -1


def test_latent_smooth_bad_arguments():
    w, A, M, s, _ = linear_setup()
    with pytest.raises(TypeError, match="perturbation_model .*lacks decode"):
        class NoDecode(nn.Module):
            latent_dim = 2

            def prior(self, x):
                return x, x
        LatentSmooth(Linear2(w), NoDecode(), 2, 0.5)
    with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
        LatentSmooth(Linear2(w), LinearSet(A, M, s), 2, 0.0)
    with pytest.raises(ValueError, match="lo must be <= hi"):
        LatentSmooth(Linear2(w), LinearSet(A, M, s), 2, 0.5, lo=1.0, hi=0.0)
    ls = LatentSmooth(Linear2(w), LinearSet(A, M, s), 2, 0.5)
    with pytest.raises(ValueError, match="x must be a batch"):
        ls.certify(torch.zeros(5), 2, 4, 0.1, 8)
    with pytest.raises(TypeError, match="floating-point"):
        ls.certify(torch.zeros(2, 5, dtype=torch.long), 2, 4, 0.1, 8)


# ------------------------------------------------------------------- robustops certify --threat learned

@pytest.fixture(scope="module")
def learned_files(tmp_path_factory):
    """A digits classifier checkpoint and a small CVAE checkpoint (untrained but with perturbations: the
    decoder's last layer is randomised so that members differ from x) with its eps stored."""
    from helpers import train_digits_model

    from robustops.models import save_checkpoint
    from robustops.perturbation import CVAE, save_perturbation_model

    d = tmp_path_factory.mktemp("latent_certify")
    model = train_digits_model(epochs=4, seed=0)
    ckpt = save_checkpoint(str(d / "digits.pt"), model, "small_cnn", {})
    torch.manual_seed(0)
    cvae = CVAE(in_channels=1, input_size=8, latent_dim=4, width=8)
    with torch.no_grad():
        for p in cvae.decoder_net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cvae.eps = 1.0
    pm = save_perturbation_model(str(d / "cvae.pt"), cvae)
    return ckpt, pm, model


LATENT = ["--threat", "learned", "--sigma", "0.5", "--N0", "16", "--N", "64", "--alpha", "0.01", "--batch", "200",
          "--skip", "24", "--seed", "3", "--no-progress"]


def tsv_rows(path):
    with open(path) as fh:
        lines = fh.read().splitlines()
    assert lines[0] == "idx\tlabel\tpredict\tradius\tcorrect\ttime"
    return [tuple(line.split("\t")[:5]) for line in lines[1:]]


def test_certify_cli_learned_threat_matches_the_api_and_resumes(learned_files, tmp_path):
    import json

    from robustops.cli import main
    from robustops.data import load_digits
    from robustops.perturbation import load_perturbation_model

    ckpt, pm_path, model = learned_files
    out = str(tmp_path / "latent.tsv")
    assert main(["certify", "--checkpoint", ckpt, "--perturbation-model", pm_path, "-o", out] + LATENT) == 0
    full = tsv_rows(out)
    idx = list(range(0, 360, 24))
    assert [int(r[0]) for r in full] == idx
    # the same numbers through the API, with the same seed and the dataset indices
    x, y = load_digits("test").tensors
    ls = LatentSmooth(model.eval(), load_perturbation_model(pm_path), 10, 0.5)
    res = ls.certify(x[idx], 16, 64, 0.01, 200, seed=3, indices=idx)
    assert [int(r[2]) for r in full] == res.prediction.tolist()
    assert np.allclose([float(r[3]) for r in full], res.radius.numpy(), rtol=1e-5)
    assert (res.prediction >= 0).float().mean() > 0.5 and (res.radius > 0).any()
    summary = json.load(open(out + ".json"))
    assert summary["settings"]["threat"] == "learned" and summary["summary"]["radius"] == "latent L2"

    # an interrupted run (--max) continued with --resume gives the same rows
    part = str(tmp_path / "part.tsv")
    assert main(["certify", "--checkpoint", ckpt, "--perturbation-model", pm_path, "-o", part, "--max", "100"]
                + LATENT) == 0
    assert len(tsv_rows(part)) == 5
    assert main(["certify", "--checkpoint", ckpt, "--perturbation-model", pm_path, "-o", part, "--resume"]
                + LATENT) == 0
    assert tsv_rows(part) == full
    # resuming with another threat model or another perturbation model is refused
    pixel = [a for a in LATENT if a not in ("--threat", "learned")]
    assert main(["certify", "--checkpoint", ckpt, "-o", part, "--resume"] + pixel) == 2
    import shutil

    other = shutil.copy(pm_path, str(tmp_path / "other_cvae.pt"))
    assert main(["certify", "--checkpoint", ckpt, "--perturbation-model", other, "-o", part, "--resume"]
                + LATENT) == 2


def test_certify_cli_learned_threat_sizes_sigma_from_eps(learned_files, tmp_path, capsys):
    """Without --sigma the latent noise level is sized from the set's eps (sigma_for_radius at --n, --alpha,
    --sigma-dissent), the summary reports certified accuracy at r = eps; a too small --sigma is flagged."""
    import json

    from robustops.cli import main
    from robustops.smoothing import COVER_DISSENT, certified_accuracy, sigma_for_radius

    ckpt, pm_path, _ = learned_files
    out = str(tmp_path / "sized.tsv")
    no_sigma = [a for a in LATENT if a not in ("--sigma", "0.5")]
    assert main(["certify", "--checkpoint", ckpt, "--perturbation-model", pm_path, "-o", out] + no_sigma) == 0
    summary = json.load(open(out + ".json"))["summary"]
    assert summary["sigma"] == pytest.approx(sigma_for_radius(1.0, 64, 0.01, COVER_DISSENT))
    assert summary["sigma_sized"] is True and summary["perturbation_eps"] == 1.0
    rows = tsv_rows(out)
    expect = certified_accuracy([float(r[3]) for r in rows], [int(r[4]) for r in rows], 1.0)
    assert summary["certified_accuracy_at_eps"] == pytest.approx(expect)
    assert "certified accuracy at r = eps = 1" in capsys.readouterr().out
    # --sigma 0.2 cannot reach eps = 1 with n = 64: the note gives the n that would
    small = ["--sigma", "0.2"] + no_sigma
    assert main(["certify", "--checkpoint", ckpt, "--perturbation-model", pm_path, "-o", out, "--force", "--max", "30"]
                + small) == 0
    text = capsys.readouterr().out
    assert "below the set's eps 1" in text and "(eps is beyond what n samples can certify" in text
    assert json.load(open(out + ".json"))["summary"]["sigma_sized"] is False
    # --sigma-dissent sets the margin of the sizing rule
    assert main(["certify", "--checkpoint", ckpt, "--perturbation-model", pm_path, "-o", out, "--force", "--max", "10",
                 "--sigma-dissent", "0.05"] + no_sigma) == 0
    summary = json.load(open(out + ".json"))["summary"]
    assert summary["sigma"] == pytest.approx(sigma_for_radius(1.0, 64, 0.01, 0.05)) and summary["sigma_sized"] is True
    assert "dissent 0.05" in capsys.readouterr().out


def test_certify_cli_learned_threat_errors(learned_files, tmp_path, capsys):
    from robustops.cli import main

    ckpt, pm_path, _ = learned_files
    out = str(tmp_path / "x.tsv")
    assert main(["certify", "--checkpoint", ckpt, "-o", out] + LATENT) == 2
    assert "--threat learned needs --perturbation-model" in capsys.readouterr().err
    no_sigma = [a for a in LATENT if a not in ("--sigma", "0.5")]
    # a perturbation model without eps: sigma cannot be sized from it
    from robustops.perturbation import load_perturbation_model, save_perturbation_model

    bare = load_perturbation_model(pm_path)
    bare.eps = None
    bare_path = save_perturbation_model(str(tmp_path / "bare.pt"), bare)
    assert main(["certify", "--checkpoint", ckpt, "--perturbation-model", bare_path, "-o", out] + no_sigma) == 2
    assert "needs --sigma" in capsys.readouterr().err
    assert main(["certify", "--checkpoint", ckpt, "-o", out, "--sigma-dissent", "0.1"] + no_sigma[2:]) == 2
    assert "--sigma-dissent is for --threat learned" in capsys.readouterr().err
    assert main(["certify", "--checkpoint", ckpt, "--perturbation-model", ckpt, "-o", out] + LATENT) == 2
    assert "--perturbation-model" in capsys.readouterr().err
    assert main(["certify", "--checkpoint", ckpt, "--perturbation-model", pm_path, "-o", out, "--graph"]
                + LATENT) == 2
    assert "--graph is not supported with --threat learned" in capsys.readouterr().err
    assert not os.path.exists(out)
