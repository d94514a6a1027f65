"""Property tests of the ops (hypothesis): every op against a float64 formula written here, over
dtypes, layouts (contiguous, channels_last, transposed, offset views, expanded inputs), B = 0 / 1,
5-D inputs, large C, per-sample parameters with zeros, lo == hi, zero / NaN / Inf gradients and
gradient magnitudes from 1e-30 to 1e30.

The default profile ("ci") keeps the whole module under a minute inside `make test`; `make fuzz`
runs the "long" profile (HYPOTHESIS_PROFILE=long). No example database is written.
"""
import os

import numpy as np
import pytest
import torch

import robustops as ro
from robustops import reference as ref

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

settings.register_profile("ci", max_examples=200, deadline=None, database=None, derandomize=True)
settings.register_profile("long", max_examples=3000, deadline=None, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS32 = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


@st.composite
def batches(draw, max_b=4):
    """(x_adv, x, grad, eps, alpha, lo, hi, norm) with the layouts and values the properties cover."""
    dtype = draw(st.sampled_from(DTYPES))
    nd = draw(st.sampled_from([2, 3, 4, 5]))
    B = draw(st.integers(0, max_b))
    rest = [draw(st.integers(1, 5)) for _ in range(nd - 1)]
    shape = [B] + rest
    seed = draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)
    lo = draw(st.sampled_from([0.0, -1.0, 0.3]))
    hi = lo if draw(st.booleans()) and draw(st.booleans()) else lo + draw(st.sampled_from([1.0, 2.5]))
    x = (torch.rand(shape, generator=g) * (hi - lo) + lo).to(dtype)
    x_adv = (x.float() + 0.3 * torch.randn(shape, generator=g)).clamp(lo, hi).to(dtype)
    scale = 10.0 ** draw(st.integers(-30, 30))
    grad = torch.randn(shape, generator=g) * scale
    special = draw(st.sampled_from(["none", "zero", "nan", "inf"]))
    if B and special != "none":
        b = draw(st.integers(0, B - 1))
        flat = grad[b].reshape(-1)
        if special == "zero":
            grad[b] = 0.0
        else:
            flat[draw(st.integers(0, flat.numel() - 1))] = float("nan") if special == "nan" else float("inf")
    grad = grad.to(dtype)
    layout = draw(st.sampled_from(["contiguous", "channels_last", "offset_view", "expanded", "transposed"]))
    if layout == "channels_last" and nd in (4, 5):
        fmt = torch.channels_last if nd == 4 else torch.channels_last_3d
        x_adv, x, grad = (t.contiguous(memory_format=fmt) for t in (x_adv, x, grad))
    elif layout == "offset_view":  # x_adv starts one element into its buffer
        buf = torch.empty(x_adv.numel() + 1, dtype=dtype)
        view = buf[1:].view(x_adv.shape)
        view.copy_(x_adv)
        x_adv = view
    elif layout == "expanded" and B:  # x and grad broadcast over the batch (stride 0)
        x = x[:1].expand(shape)
        grad = grad[:1].expand(shape)
        x_adv = (x.float() + (x_adv.float() - x_adv.float()[:1])).clamp(lo, hi).to(dtype)
    elif layout == "transposed" and nd >= 3:  # x and grad as strided views of another layout
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
        grad = grad.transpose(1, 2).contiguous().transpose(1, 2)
    per_sample = draw(st.booleans())
    if per_sample:
        eps = torch.rand(B, generator=g) * 0.5
        alpha = torch.rand(B, generator=g) * 0.2
        if B:
            eps[0] = 0.0  # a zero radius
    else:
        eps, alpha = draw(st.sampled_from([0.0, 0.1, 0.5])), draw(st.sampled_from([0.0, 0.05, 0.3]))
    norm = draw(st.sampled_from(["linf", "l2"]))
    return x_adv, x, grad, eps, alpha, lo, hi, norm


def _ps(p, B, shape):
    t = torch.as_tensor(p, dtype=torch.float64)
    return (t.expand(B) if t.dim() == 0 else t).reshape((B,) + (1,) * (len(shape) - 1))


def step64(x_adv, x, grad, eps, alpha, lo, hi, norm):
    """The step in float64, from the inputs as stored."""
    xa, x0, g = x_adv.double(), x.double(), grad.double()
    B = xa.shape[0]
    e, a = _ps(eps, B, xa.shape), _ps(alpha, B, xa.shape)
    if norm == "linf":
        d = torch.clamp(xa + a * torch.sign(g) - x0, -e, e)
        d = torch.where(torch.isnan(g), g, d)
    else:
        gn = torch.linalg.vector_norm(g.flatten(1), dim=1).reshape(e.shape)
        c = a / torch.maximum(gn, torch.tensor(1.17549435e-38, dtype=torch.float64))
        v = (xa - x0) + c * g
        dn = torch.linalg.vector_norm(v.flatten(1), dim=1).reshape(e.shape)
        f = torch.where(dn > e, e / dn, torch.where(torch.isnan(dn), dn, torch.ones_like(dn)))
        d = f * v
    out = x0 + d
    return torch.where(torch.isnan(out), out, out.clamp(lo, hi))


@given(batches())
def test_pgd_step_against_float64(case):
    x_adv, x, grad, eps, alpha, lo, hi, norm = case
    expected = step64(x_adv, x, grad, eps, alpha, lo, hi, norm)
    out = x_adv  # in place, in its own layout (contiguous, channels_last or an offset view)
    ro.pgd_step_(out, x, grad, eps, alpha, norm, lo, hi)
    got = out.double()
    assert torch.equal(torch.isnan(got), torch.isnan(expected))
    ok = ~torch.isnan(expected)
    # float32 compute, stored in the dtype: a few ulps of the value range, plus eps-relative slack for L2
    tol = 4 * EPS32[x_adv.dtype] * max(1.0, abs(lo), abs(hi)) + 1e-6
    assert torch.allclose(got[ok], expected[ok], atol=tol, rtol=1e-5), (got - expected).abs()[ok].max()
    if x_adv.shape[0] and norm == "l2":
        d = (got - x.double()).flatten(1)
        finite = ~torch.isnan(d).any(1)
        e = _ps(eps, x.shape[0], x.shape).reshape(-1)
        assert bool((d[finite].norm(dim=1) <= e[finite] * (1 + 1e-5) + 4 * EPS32[x.dtype] *
                     d.shape[1] ** 0.5 * max(1.0, abs(lo), abs(hi))).all())


@given(batches())
def test_recycle_step_against_float64(case):
    delta_src, x, grad, eps, step, lo, hi, _ = case
    delta = (delta_src.float() - x.float()).to(x.dtype).contiguous()
    B = x.shape[0]
    e, s = _ps(eps, B, x.shape), _ps(step, B, x.shape)
    d = torch.clamp(delta.double() + s * torch.sign(grad.double()), -e, e)
    d = torch.where(torch.isnan(grad.double()), grad.double(), d)
    x0 = x.double()
    expected = torch.where(torch.isnan(d), d, (x0 + d).clamp(lo, hi) - x0)
    out = delta.clone()
    ro.recycle_step_(out, x, grad, eps=eps, step=step, lo=lo, hi=hi)
    assert torch.equal(torch.isnan(out.double()), torch.isnan(expected))
    ok = ~torch.isnan(expected)
    tol = 4 * EPS32[x.dtype] * max(1.0, abs(lo), abs(hi)) + 1e-6
    assert torch.allclose(out.double()[ok], expected[ok], atol=tol, rtol=0)


@given(batches(), st.integers(0, 2 ** 40), st.sampled_from(["ball", "uniform"]))
def test_random_init_properties(case, offset, radius):
    _, x, _, eps, _, lo, hi, norm = case
    out = ro.random_init(x, eps, norm, lo, hi, seed=7, offset=offset, radius=radius)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert bool(torch.isfinite(out).all())
    if lo == hi:  # an interval the dtype may hold no value of (0.3): within an ulp of it
        assert bool(((out.double() - lo).abs() <= 2 * EPS32[x.dtype] * max(1.0, abs(lo))).all())
        return
    assert float(out.double().min()) >= lo if out.numel() else True
    assert float(out.double().max()) <= hi if out.numel() else True
    d = (out.double() - x.double()).flatten(1)
    e = _ps(eps, x.shape[0], x.shape).reshape(-1)
    slack = 4 * EPS32[x.dtype] * max(1.0, abs(lo), abs(hi))
    n = d.abs().amax(1) if (norm == "linf" and d.shape[1]) else d.norm(dim=1)
    assert bool((n <= e * (1 + 1e-5) + slack * (1 if norm == "linf" else d.shape[1] ** 0.5)).all())
    assert torch.equal(out, ro.random_init(x, eps, norm, lo, hi, seed=7, offset=offset, radius=radius))
    if x.shape[0] > 1:  # any split of the batch draws the same numbers
        k = x.shape[0] // 2
        e_head = eps if not isinstance(eps, torch.Tensor) else eps[:k]
        e_tail = eps if not isinstance(eps, torch.Tensor) else eps[k:]
        head = ro.random_init(x[:k], e_head, norm, lo, hi, seed=7, offset=offset, radius=radius)
        tail = ro.random_init(x[k:], e_tail, norm, lo, hi, seed=7, offset=offset + k, radius=radius)
        assert torch.equal(torch.cat([head, tail]), out)


@given(st.integers(0, 3), st.integers(1, 7), st.sampled_from([1, 2, 300, 1001]), st.integers(0, 2 ** 31 - 1),
       st.sampled_from(DTYPES), st.booleans())
def test_count_votes_against_numpy(B, num, C, seed, dtype, with_nan):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B * num, C, generator=g)
    if C > 1:
        logits[:, 1] = logits[:, 0]  # ties -> the lowest index
    if with_nan and B:
        logits[0, C // 2] = float("nan")
    logits = logits.to(dtype)
    counts = torch.randint(0, 5, (B, C), generator=g)
    expected = counts.numpy().copy()
    lf = logits.float().numpy()
    for r in range(B * num):
        row = lf[r]
        nan = np.flatnonzero(np.isnan(row))
        c = int(nan[0]) if nan.size else int(np.argmax(row))  # torch.argmax's rule
        expected[r // num, c] += 1
    ro.count_votes_(logits, counts)
    assert np.array_equal(counts.numpy(), expected)


@given(st.integers(0, 3), st.integers(1, 4), st.sampled_from([(1, 3, 3), (3, 5, 4), (2, 2, 3, 3), (7,)]),
       st.sampled_from([0.0, 0.25, 1.0]), st.integers(0, 2 ** 40), st.sampled_from(DTYPES), st.booleans())
def test_gaussian_noise_against_float64(B, num, shape, sigma, offset, dtype, normalize):
    x = torch.rand((B,) + shape).to(dtype)
    C = shape[0]
    mean, std = (torch.rand(C) * 0.5, torch.rand(C) + 0.5) if normalize else (None, None)
    out = ro.gaussian_noise(x, num, sigma, seed=11, offset=offset, mean=mean, std=std, out_dtype=torch.float32)
    expected = ref.gaussian_noise(x.double().float(), num, sigma, seed=11, offset=offset, mean=mean, std=std,
                                  out_dtype=torch.float32)
    assert out.shape == (B * num,) + shape
    assert torch.allclose(out, expected, atol=2e-5 * max(1.0, sigma) * (3.0 if normalize else 1.0), rtol=1e-5)


@given(batches(), st.sampled_from([0.0, 0.01, 0.3]), st.sampled_from(["gaussian", "laplace"]),
       st.integers(0, 2 ** 40))
def test_langevin_step_against_float64(case, noise, form, offset):
    """noise 0: pgd_step_'s L-inf step exactly; Gaussian noise: the float64 step with the reference's draw;
    Laplace noise: inside the ball and the box, NaN only where the gradient is NaN."""
    x_adv, x, grad, eps, alpha, lo, hi, _ = case
    out = x_adv.clone(memory_format=torch.preserve_format)
    ro.langevin_step_(out, x, grad, eps, alpha, noise, form, lo, hi, seed=5, offset=offset)
    if noise == 0.0:
        expected = x_adv.clone(memory_format=torch.preserve_format)
        ro.pgd_step_(expected, x, grad, eps, alpha, "linf", lo, hi)
        torch.testing.assert_close(out, expected, atol=0, rtol=0, equal_nan=True)
        return
    B = x.shape[0]
    xa, x0, g = x_adv.double(), x.double(), grad.double()
    e, a = _ps(eps, B, xa.shape), _ps(alpha, B, xa.shape)
    got = out.double()
    assert torch.equal(torch.isnan(got), torch.isnan(g))
    ok = ~torch.isnan(g)
    tol = 4 * EPS32[x.dtype] * max(1.0, abs(lo), abs(hi)) + 1e-6
    if form == "gaussian":
        n = ref.langevin_noise(tuple(x.shape), 5, offset, "gaussian").double()
        d = torch.clamp(xa + a * torch.sign(g) + noise * n - x0, -e, e)
        expected = (x0 + d).clamp(lo, hi)
        assert torch.allclose(got[ok], expected[ok], atol=tol + noise * 1e-5, rtol=0)
    assert bool(((got[ok] - x0[ok]).abs() <= e.expand_as(got)[ok] + tol).all() | (lo == hi))
    assert bool(((got[ok] >= lo - tol) & (got[ok] <= hi + tol)).all())
