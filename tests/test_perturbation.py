"""robustops.perturbation: pair data, the CVAE, its training (ELBO, resume, AMP), the quality of the
learned set on held-out digits pairs, sampling and the picture."""
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset

from robustops import perturbation as P


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------- pair data

def test_digits_pairs_reproducible_and_seed_dependent():
    a, b, c = P.DigitsPairs("train", seed=3), P.DigitsPairs("train", seed=3), P.DigitsPairs("train", seed=4)
    for i in (0, 17, len(a) - 1):
        xa, ta, ya = a[i]
        xb, tb, yb = b[i]
        assert torch.equal(ta, tb) and torch.equal(xa, xb) and ya == yb
        assert a.params(i) == b.params(i)
    assert not torch.equal(a[5][1], c[5][1])
    assert a.params(5) != c.params(5)
    # a batch of pairs equals the items one by one, in any order
    x, xt, y = a.pair([9, 2, 9])
    assert torch.equal(xt[0], a[9][1]) and torch.equal(xt[1], a[2][1]) and torch.equal(xt[2], xt[0])
    assert x.shape == (3, 1, 8, 8) and xt.min() >= 0 and xt.max() <= 1


def test_digits_pairs_params_within_ranges():
    ds = P.DigitsPairs("test", seed=0, rotation=15, translation=(0.0, 2.0), scale=(0.8, 1.2), thickness=(-0.2, 0.7))
    ps = [ds.params(i) for i in range(200)]
    for key, lo, hi in (("angle", -15, 15), ("tx", 0, 2), ("ty", 0, 2), ("scale", 0.8, 1.2), ("thickness", -0.2, 0.7)):
        v = np.array([p[key] for p in ps])
        assert v.min() >= lo - 1e-6 and v.max() <= hi + 1e-6, key
        assert v.max() - v.min() > 0.6 * (hi - lo), key  # spread over the range, not stuck at one value
    rep = P.DigitsPairs("test", seed=0, repeats=3)
    assert len(rep) == 3 * 360 and torch.equal(rep[1][0], rep[361][0]) and not torch.equal(rep[1][1], rep[361][1])
    with pytest.raises(ValueError, match="thickness"):
        P.DigitsPairs("train", thickness=2.0)
    with pytest.raises(ValueError, match="repeats"):
        P.DigitsPairs("train", repeats=0)
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_transform_images_identity_and_translation():
    x = P.DigitsPairs("train").images[:5]
    z, one = torch.zeros(5), torch.ones(5)
    assert torch.allclose(P.transform_images(x, z, z, z, one, z), x, atol=1e-6)
    shifted = P.transform_images(x, z, one, z, one, z)  # one pixel to the right
    assert torch.allclose(shifted[..., 1:], x[..., :-1], atol=1e-6)
    thick = P.transform_images(x, z, z, z, one, one)
    assert (thick >= x - 1e-6).all() and thick.sum() > x.sum()
    rot = P.transform_images(x, torch.full((5,), 90.0), z, z, one, z)
    assert torch.allclose(rot, torch.rot90(x, -1, (2, 3)), atol=1e-5)  # positive angle: clockwise on screen


def _npz(tmp_path, name="p.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


def test_npz_pairs_loads_and_scales(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    ds = P.NpzPairs(_npz(tmp_path, x=x, x_perturbed=255 - x, y=np.arange(6)))
    a, b, y = ds[2]
    assert a.shape == (3, 8, 8) and torch.allclose(a + b, torch.ones_like(a)) and int(y) == 2
    assert int(P.NpzPairs(_npz(tmp_path, "noy.npz", x=x, x_perturbed=x))[0][2]) == -1


def test_npz_pairs_errors(tmp_path):
    x = np.zeros((4, 1, 8, 8), np.float32)
    with pytest.raises(KeyError, match="x_perturbed"):
        P.NpzPairs(_npz(tmp_path, x=x, y=np.arange(4)))
    with pytest.raises(KeyError, match="'x'"):
        P.NpzPairs(_npz(tmp_path, x_perturbed=x))
    with pytest.raises(ValueError, match="same number of images, got 4 and 3"):
        P.NpzPairs(_npz(tmp_path, x=x, x_perturbed=x[:3]))
    with pytest.raises(ValueError, match=r"x_perturbed must have x's shape \[4, 1, 8, 8\]"):
        P.NpzPairs(_npz(tmp_path, x=x, x_perturbed=np.zeros((4, 1, 7, 7), np.float32)))
    with pytest.raises(TypeError, match=r"\['x'\] must be uint8 or floating-point images"):
        P.NpzPairs(_npz(tmp_path, x=np.full((4, 8, 8), "a"), x_perturbed=np.zeros((4, 8, 8), np.float32)))
    with pytest.raises(ValueError, match=r"y'\] must be labels \[N\] with N = 4"):
        P.NpzPairs(_npz(tmp_path, x=x, x_perturbed=x, y=np.arange(5)))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        P.NpzPairs(_npz(tmp_path, x=x + 3, x_perturbed=x))
    with pytest.raises(FileNotFoundError):
        P.NpzPairs(str(tmp_path / "missing.npz"))


# ---------------------------------------------------------------------------------------- CVAE

@pytest.mark.parametrize("C,S,D", [(1, 8, 8), (3, 32, 16)])
def test_cvae_shapes_and_protocol(C, S, D):
    torch.manual_seed(0)
    m = P.CVAE(C, S, latent_dim=D)
    P.check_perturbation_model(m)
    x, xt = torch.rand(3, C, S, S), torch.rand(3, C, S, S)
    mu, lv = m.prior(x)
    assert mu.shape == lv.shape == (3, D)
    assert m.posterior(x, xt)[0].shape == (3, D)
    assert m.decode(torch.randn(3, D), x).shape == x.shape
    assert torch.allclose(m.decode(torch.randn(3, D), x), x)  # an untrained decoder is the identity map
    out = m(x, xt)
    assert out[0].shape == x.shape and len(out) == 5
    mu_s, sigma = P.prior_scale(m, x)
    assert P.member(m, x, torch.zeros(3, D), mu_s, sigma).shape == x.shape


def test_cvae_user_modules_and_errors():
    D = 3

    class Prior(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], 2 * D)

    class Enc(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(128, 2 * D)

        def forward(self, x, xt):
            return self.lin(torch.cat([x, xt], 1).flatten(1))

    class Dec(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(D, 64)

        def forward(self, z, x):
            return x + self.lin(z).view_as(x)

    m = P.CVAE(latent_dim=D, prior=Prior(), encoder=Enc(), decoder=Dec())
    x = torch.rand(2, 1, 8, 8)
    assert m.config is None and m.posterior(x, x)[1].shape == (2, D) and m.decode(torch.zeros(2, D), x).shape == x.shape
    with pytest.raises(ValueError, match="input_size must be a power of two"):
        P.CVAE(1, 28)
    with pytest.raises(ValueError, match="latent_dim must be an int >= 1"):
        P.CVAE(latent_dim=0)
    with pytest.raises(TypeError, match="decoder must be an nn.Module"):
        P.CVAE(decoder=lambda z, x: x)


def test_kl_gaussians_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mq, lq, mp, lp = (torch.randn(4, 5, generator=g) for _ in range(4))
    from torch.distributions import Normal, kl_divergence

    ref = kl_divergence(Normal(mq, (0.5 * lq).exp()), Normal(mp, (0.5 * lp).exp())).sum(1)
    assert torch.allclose(P.kl_gaussians(mq, lq, mp, lp), ref, atol=1e-5)


# ------------------------------------------------------------------------------------ training

def _small_loader(n=192, batch=64, seed=0):
    ds = Subset(P.DigitsPairs("train", seed=seed), range(n))
    return DataLoader(ds, batch_size=batch, shuffle=True)


@pytest.fixture(scope="module")
def trained():
    """A digits CVAE trained 5 epochs on the 1437 training pairs (about 5 s on one core)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    train = P.DigitsPairs("train", seed=0)
    model = P.CVAE(latent_dim=8)
    res = P.fit_perturbation(model, DataLoader(train, batch_size=64, shuffle=True), epochs=5, beta=0.01,
                             progress=False, seed=0)
    return model, res, train, P.DigitsPairs("test", seed=1)


def test_elbo_decreases(trained):
    _, res, _, _ = trained
    loss = [r["loss"] for r in res.history]
    assert len(loss) == 5 and all(math.isfinite(v) for v in loss)
    assert loss[-1] < 0.5 * loss[0], loss
    assert res.history[-1]["recon_mse"] < res.history[0]["recon_mse"]


@pytest.mark.parametrize("percentile", [90.0, 95.0])
def test_trained_set_covers_held_out_perturbations(trained, percentile):
    model, _, train, test = trained
    eps = P.choose_eps(model, DataLoader(train, batch_size=256), percentile)
    norms = P.latent_norms(model, DataLoader(train, batch_size=256))
    assert abs(float((norms <= eps).double().mean()) - percentile / 100) < 0.01  # eps is that percentile
    q = P.quality(model, DataLoader(test, batch_size=256), eps, approx_steps=0)
    # The held-out pairs come from the same perturbation family (other images, other draws), so a
    # model that generalises puts about `percentile`% of their posterior means inside the ball; 360
    # pairs give a binomial standard deviation of about 1.5 points, and 5 epochs leave a little
    # overfitting: 8 points below the percentile is a clear failure (measured: 89.7% / 93.9%).
    assert q["coverage"] >= percentile / 100 - 0.08, q
    # x~ reconstructed through the posterior beats "x~ = x" by far (measured 0.026 against 0.095)
    assert q["recon_mse"] < 0.5 * q["identity_mse"], q
    assert q["projected_mse"] < 0.5 * q["identity_mse"], q
    assert q["n"] == 360 and q["eps"] == eps


def test_quality_approximation_error(trained):
    pytest.importorskip("robustops.attacks.latent")
    model, _, train, test = trained
    eps = P.choose_eps(model, DataLoader(train, batch_size=256), 95)
    loader = DataLoader(Subset(test, range(64)), batch_size=64)
    q = P.quality(model, loader, eps, approx_steps=30)
    # the closest member found by latent PGD is at least about as close as the projected posterior mean
    assert q["approx_mse"] is not None and q["approx_mse"] <= q["projected_mse"] * 1.05 + 1e-4, q
    assert q["approx_mse"] < 0.5 * q["identity_mse"]


def test_quality_needs_eps(trained):
    model, _, train, test = trained
    loader = DataLoader(Subset(test, range(32)), batch_size=32)
    with pytest.raises(ValueError, match="quality needs eps"):
        P.quality(model, loader, approx_steps=0)
    q = P.quality(model, loader, train_loader=DataLoader(Subset(train, range(256)), batch_size=256), percentile=50,
                  approx_steps=0)
    assert q["eps"] > 0
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        P.quality(model, loader, -1.0, approx_steps=0)


def test_resume_continues_exactly(tmp_path):
    torch.manual_seed(1)
    full = P.CVAE(latent_dim=4, width=8)
    init = {k: v.clone() for k, v in full.state_dict().items()}
    P.fit_perturbation(full, _small_loader(), epochs=2, beta=0.05, progress=False, seed=7, schedule="cosine",
                       out_dir=str(tmp_path / "full"))
    part = P.CVAE(latent_dim=4, width=8)
    part.load_state_dict(init)
    out = str(tmp_path / "part")
    first = P.fit_perturbation(part, _small_loader(), epochs=2, beta=0.05, progress=False, seed=7, schedule="cosine",
                               out_dir=out, stop_after=1)
    assert first.epochs_run == 1
    resumed = P.CVAE(latent_dim=4, width=8)  # a fresh process: new model, loader and optimizer
    res = P.fit_perturbation(resumed, _small_loader(), epochs=2, beta=0.05, progress=False, seed=7,
                             schedule="cosine", out_dir=out, resume=True)
    assert res.resumed_from == 1 and res.epochs_run == 1 and len(res.history) == 2
    for k, v in full.state_dict().items():
        assert torch.allclose(resumed.state_dict()[k], v, atol=1e-6, rtol=1e-5), k
    with pytest.raises(ValueError, match="different settings: beta"):
        P.fit_perturbation(P.CVAE(latent_dim=4, width=8), _small_loader(), epochs=2, beta=0.1, progress=False,
                           seed=7, schedule="cosine", out_dir=out, resume=True)


def test_amp_bf16_runs():
    torch.manual_seed(0)
    m = P.CVAE(latent_dim=4, width=8)
    res = P.fit_perturbation(m, _small_loader(128), epochs=1, amp="bf16", progress=False, seed=0)
    assert math.isfinite(res.last["loss"])
    with pytest.raises(ValueError, match="amp"):
        P.fit_perturbation(m, _small_loader(64), epochs=1, amp="int8", progress=False)


def test_fit_argument_errors():
    m = P.CVAE(latent_dim=4, width=8)
    with pytest.raises(ValueError, match="epochs"):
        P.fit_perturbation(m, _small_loader(64), epochs=0)
    with pytest.raises(ValueError, match="schedule"):
        P.fit_perturbation(m, _small_loader(64), epochs=1, schedule="step")
    with pytest.raises(ValueError, match="pairs"):
        P.fit_perturbation(m, DataLoader(torch.utils.data.TensorDataset(torch.rand(4, 1, 8, 8)), batch_size=2),
                           epochs=1, progress=False)


def test_checkpoint_round_trip(tmp_path, trained):
    model, _, _, test = trained
    model.eps = 1.25
    path = P.save_perturbation_model(str(tmp_path / "m.pt"), model, percentile=95.0)
    loaded = P.load_perturbation_model(path, "cpu")
    assert loaded.eps == 1.25 and not loaded.training
    x = test.pair(range(4))[0]
    assert torch.equal(loaded.prior(x)[0], model.prior(x)[0])
    torch.save({"x": 1}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a perturbation-model checkpoint"):
        P.load_perturbation_model(str(tmp_path / "bad.pt"))
    model.eps = None


# ------------------------------------------------------------------------------ sampling, plot

def test_sample_in_ball_and_seeded(trained):
    model, _, _, test = trained
    x = test.pair(range(5))[0]
    a, u = P.sample(model, x, 1.5, n=7, seed=3, return_u=True)
    assert a.shape == (5, 7, 1, 8, 8) and u.shape == (5, 7, 8)
    assert (u.norm(dim=-1) <= 1.5 + 1e-5).all() and u.norm(dim=-1).max() > 1.0  # uniform in the ball: mostly near
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(P.sample(model, x, 1.5, n=7, seed=3), a)
    assert not torch.equal(P.sample(model, x, 1.5, n=7, seed=4), a)
    # the same draws for any split of the inputs into calls
    tail = P.sample(model, x[2:], 1.5, n=7, seed=3, offset=2 * 7)
    assert torch.allclose(tail, a[2:], atol=1e-6)
    mu, sigma = P.prior_scale(model, x)
    assert torch.allclose(a[:, 0], P.member(model, x, u[:, 0], mu, sigma), atol=1e-6)
    assert torch.allclose(P.sample(model, x, 0.0, n=2, seed=0)[:, 0],
                          P.member(model, x, torch.zeros_like(mu), mu, sigma), atol=1e-6)
    with pytest.raises(ValueError, match="eps"):
        P.sample(model, x, -1.0)


def test_plot_perturbations(tmp_path, trained):
    model, _, _, test = trained
    x, xt, _ = test.pair(range(3))
    paths = P.plot_perturbations(model, x, torch.stack([xt, xt], 1), [0.5, 1.0], str(tmp_path / "grid.png"),
                                 adversarial=xt, n=2)
    import os

    assert all(os.path.getsize(p) > 1000 for p in paths) and paths[1].endswith(".pdf")
    with pytest.raises(ValueError, match="x_tilde_true"):
        P.plot_perturbations(model, x, xt[:2], [1.0], str(tmp_path / "g2.png"))


@pytest.mark.cuda
def test_fit_and_sample_on_cuda():
    torch.manual_seed(0)
    m = P.CVAE(latent_dim=4, width=8).cuda()
    res = P.fit_perturbation(m, _small_loader(128), epochs=1, amp="bf16", device="cuda", progress=False, seed=0)
    assert math.isfinite(res.last["loss"])
    x = P.DigitsPairs("test").pair(range(4))[0].cuda()
    s = P.sample(m, x, 1.0, n=3, seed=0)
    assert s.is_cuda and s.shape == (4, 3, 1, 8, 8)
