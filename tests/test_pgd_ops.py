"""pgd_step_, random_init and recycle_step_ against robustops.reference, on every device present."""
import math
import zlib

import numpy as np
import pytest
import torch
from scipy import stats

import robustops as ro
from robustops import reference as ref

from conftest import devices

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# One unit in the last place at magnitude 1: kernel and reference both compute in fp32 and may
# round the final cast differently by at most this much.
ULP = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
SHAPES = [(1, 3, 8, 8), (5, 3, 7, 9), (4, 10, 13), (2, 3, 4, 5, 6), (3, 17), (6, 1), (2, 3, 32, 32)]


def layouts(shape):
    out = ["contiguous"]
    if len(shape) in (4, 5):
        out.append("channels_last")
    return out


def make(shape, dtype, device, layout, gen, kind="unit"):
    if kind == "unit":
        t = torch.rand(shape, generator=gen)
    else:
        t = torch.randn(shape, generator=gen)
    t = t.to(device=device, dtype=dtype)
    if layout == "channels_last":
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        t = t.contiguous(memory_format=fmt)
    return t


def cases():
    for shape in SHAPES:
        for layout in layouts(shape):
            yield shape, layout


def params(kind, B, device, gen):
    """eps and alpha as floats or as per-sample tensors."""
    if kind == "scalar":
        return 0.1, 0.03
    eps = (torch.rand(B, generator=gen) * 0.2 + 0.01).to(device)
    alpha = (torch.rand(B, generator=gen) * 0.05).to(device)
    return eps, alpha


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,layout", list(cases()))
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("pkind", ["scalar", "per_sample"])
def test_pgd_step_matches_reference(device, dtype, shape, layout, norm, pkind):
    # A fixed integer per case (crc32 of its parameters; hash() of a string is salted per process).
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, layout, norm, pkind)).encode()))
    x = make(shape, dtype, device, layout, gen)
    # x_adv within a slightly-too-large ball so that the projection is exercised.
    x_adv = (x.float() + 0.3 * (torch.rand(shape, generator=gen).to(device) - 0.5)).clamp(0, 1).to(dtype)
    if layout == "channels_last":
        x_adv = x_adv.contiguous(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
    grad = make(shape, dtype, device, layout, gen, kind="normal")
    eps, alpha = params(pkind, shape[0], device, gen)
    if norm == "l2":
        eps, alpha = (eps * 3, alpha * 10) if pkind == "per_sample" else (0.3, 0.3)
    expected = ref.pgd_step(x_adv, x, grad, eps, alpha, norm, 0.0, 1.0)
    out = x_adv.clone()
    res = ro.pgd_step_(out, x, grad, eps, alpha, norm, 0.0, 1.0)
    assert res is out
    assert out.stride() == x_adv.stride()
    tol = ULP[dtype] * (1 if norm == "linf" else 4)
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=0)
    # The constraint holds for every sample (within the dtype's rounding).
    d = (out.float() - x.float()).flatten(1)
    e = torch.as_tensor(eps, device=device, dtype=torch.float32).expand(shape[0])
    n = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert bool((n <= e * (1 + 1e-5) + 2 * ULP[dtype] * (1 if norm == "linf" else math.sqrt(d.shape[1]))).all())
    assert bool(((out >= 0) & (out <= 1)).all())


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,layout", list(cases()))
@pytest.mark.parametrize("pkind", ["scalar", "per_sample"])
def test_recycle_step_matches_reference(device, dtype, shape, layout, pkind):
    gen = torch.Generator().manual_seed(7)
    x = make(shape, dtype, device, layout, gen)
    delta = (0.1 * make(shape, torch.float32, device, layout, gen, kind="normal")).to(dtype)
    grad = make(shape, dtype, device, layout, gen, kind="normal")
    eps, step = params(pkind, shape[0], device, gen)
    expected = ref.recycle_step(delta, x, grad, eps, step, 0.0, 1.0)
    out = delta.clone()
    assert ro.recycle_step_(out, x, grad, eps=eps, step=step, lo=0.0, hi=1.0) is out
    torch.testing.assert_close(out.float(), expected.float(), atol=2 * ULP[dtype], rtol=0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,layout", list(cases()))
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_init_matches_reference(device, dtype, shape, layout, norm):
    gen = torch.Generator().manual_seed(3)
    x = make(shape, dtype, device, layout, gen)
    eps = (torch.rand(shape[0], generator=gen) * 0.5).to(device)
    out = ro.random_init(x, eps, norm, 0.0, 1.0, seed=1234, offset=5)
    expected = ref.random_init(x, eps, norm, 0.0, 1.0, seed=1234, offset=5)
    assert out.dtype == dtype and out.shape == x.shape and out.stride() == x.stride()
    torch.testing.assert_close(out.float(), expected.float(), atol=2 * ULP[dtype] + 1e-6, rtol=0)


def test_random_init_layout_independent():
    x = torch.rand(4, 3, 9, 11)
    a = ro.random_init(x, 0.2, "l2", seed=9)
    b = ro.random_init(x.contiguous(memory_format=torch.channels_last), 0.2, "l2", seed=9)
    torch.testing.assert_close(a, b.contiguous(), atol=1e-6, rtol=0)


def test_random_init_non_dense_input_is_handled():
    x = torch.rand(4, 3, 16, 16)[:, :, ::2, 1::2]
    out = ro.random_init(x, 0.1, "linf", seed=2)
    torch.testing.assert_close(out, ref.random_init(x, 0.1, "linf", seed=2))
    assert out.is_contiguous()


@pytest.mark.cuda
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_init_same_draw_on_cpu_and_cuda(norm):
    x = torch.rand(8, 3, 32, 32)
    a = ro.random_init(x, 0.3, norm, -10, 10, seed=77, offset=3)
    b = ro.random_init(x.cuda(), 0.3, norm, -10, 10, seed=77, offset=3)
    torch.testing.assert_close(a, b.cpu(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", devices())
def test_random_init_seed_reproducibility(device):
    x = torch.rand(16, 3, 8, 8, device=device)
    a = ro.random_init(x, 0.1, "linf", seed=5)
    assert torch.equal(a, ro.random_init(x, 0.1, "linf", seed=5))
    assert not torch.equal(a, ro.random_init(x, 0.1, "linf", seed=6))
    assert not torch.equal(a, ro.random_init(x, 0.1, "linf", seed=5, offset=x.numel() // 4))
    torch.manual_seed(0)
    b = ro.random_init(x, 0.1, "l2")
    c = ro.random_init(x, 0.1, "l2")
    torch.manual_seed(0)
    assert torch.equal(b, ro.random_init(x, 0.1, "l2"))
    assert not torch.equal(b, c)


@pytest.mark.parametrize("device", devices())
def test_random_init_linf_is_uniform_in_the_box(device):
    x = torch.full((64, 3, 16, 16), 0.5, device=device)
    eps = 0.25
    out = ro.random_init(x, eps, "linf", -1e9, 1e9, seed=11)
    u = ((out - x) / eps).flatten().double().cpu().numpy()
    assert np.abs(u).max() <= 1.0
    assert stats.kstest(u, stats.uniform(loc=-1, scale=2).cdf).pvalue > 1e-3
    # Per coordinate: every coordinate position is uniform across the batch.
    per_coord = ((out - x) / eps).flatten(1).double().cpu().numpy()
    assert stats.kstest(per_coord[:, 0], stats.uniform(loc=-1, scale=2).cdf).pvalue > 1e-4
    assert stats.kstest(per_coord[:, -1], stats.uniform(loc=-1, scale=2).cdf).pvalue > 1e-4
    assert abs(np.corrcoef(per_coord[:, 0], per_coord[:, 1])[0, 1]) < 0.4


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("D", [3, 50, 3072])
def test_random_init_l2_is_uniform_in_the_ball(device, D):
    B = 4000
    x = torch.zeros(B, D, device=device)
    eps = 0.7
    out = ro.random_init(x, eps, "l2", -1e9, 1e9, seed=D)
    r = out.double().norm(dim=1).cpu().numpy() / eps
    assert r.max() <= 1 + 1e-6
    # Uniform in the ball: P(r <= t) = t^D, so r^D is uniform on [0, 1].
    assert stats.kstest(r ** D, "uniform").pvalue > 1e-3
    # Uniform direction: the mean direction vanishes and each coordinate of the unit vector has
    # variance 1/D.
    u = (out.double() / out.double().norm(dim=1, keepdim=True)).cpu().numpy()
    assert np.abs(u.mean(0)).max() < 6 / math.sqrt(B * D)
    assert abs(u.var(0).mean() * D - 1) < 0.1


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_init_inside_ball_and_bounds(device, norm):
    x = torch.rand(32, 3, 8, 8, device=device)
    eps = torch.rand(32, device=device)
    out = ro.random_init(x, eps, norm, 0.0, 1.0, seed=1)
    d = (out - x).flatten(1)
    n = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert bool((n <= eps * (1 + 1e-5) + 1e-6).all())
    assert bool(((out >= 0) & (out <= 1)).all())


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_nan_grad_stays_in_its_sample(device, norm):
    x = torch.rand(4, 3, 8, 8, device=device)
    x_adv = x.clone()
    g = torch.randn_like(x)
    g[1, 0, 2, 3] = float("nan")
    expected = ref.pgd_step(x_adv, x, g, 0.1, 0.05, norm)
    ro.pgd_step_(x_adv, x, g, 0.1, 0.05, norm)
    for b in (0, 2, 3):
        assert torch.isfinite(x_adv[b]).all()
        torch.testing.assert_close(x_adv[b], expected[b], atol=1e-5, rtol=0)
    assert torch.isnan(x_adv[1]).any()
    delta = torch.zeros_like(x)
    ro.recycle_step_(delta, x, g, eps=0.1, step=0.05)
    assert torch.isfinite(delta[[0, 2, 3]]).all()


@pytest.mark.parametrize("device", devices())
def test_grad_in_another_layout_is_accepted(device):
    x = torch.rand(3, 4, 5, 6, device=device).contiguous(memory_format=torch.channels_last)
    x_adv = x.clone()
    g = torch.randn(3, 4, 5, 6, device=device)  # contiguous
    expected = ref.pgd_step(x_adv, x, g, 0.1, 0.02, "l2")
    ro.pgd_step_(x_adv, x, g, 0.1, 0.02, "l2")
    torch.testing.assert_close(x_adv, expected, atol=1e-5, rtol=0)


def test_zero_grad_l2_is_a_no_op_step():
    x = torch.rand(2, 5)
    x_adv = x.clone()
    ro.pgd_step_(x_adv, x, torch.zeros_like(x), 0.1, 0.05, "l2")
    assert torch.equal(x_adv, x)


# ------------------------------------------------------------------------------ bad inputs

@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(grad=torch.rand(4, 3, 8)), ValueError, "grad must have the same shape as x_adv"),
        (dict(x=torch.rand(4, 3, 8, 8, dtype=torch.float64)), TypeError, "x must have the same dtype as x_adv"),
        (dict(norm="l1"), ValueError, 'norm must be "linf" or "l2"'),
        (dict(eps=-0.1), ValueError, "eps must be >= 0"),
        (dict(alpha=-1.0), ValueError, "alpha must be >= 0"),
        (dict(eps=torch.tensor([0.1, -0.2, 0.1, 0.1])), ValueError, "eps must be >= 0 for every sample"),
        (dict(lo=1.0, hi=0.0), ValueError, "lo must be <= hi"),
        (dict(eps=torch.rand(3)), ValueError, r"eps must be a float or a Tensor\[B\] with B = 4"),
        (dict(alpha=torch.rand(4, 1)), ValueError, r"alpha must be a float or a Tensor\[B\]"),
        (dict(eps="big"), TypeError, "eps must be a float or a Tensor"),
    ],
)
def test_pgd_step_bad_inputs(kwargs, exc, match):
    args = dict(x_adv=torch.rand(4, 3, 8, 8), x=torch.rand(4, 3, 8, 8), grad=torch.rand(4, 3, 8, 8),
                eps=0.1, alpha=0.01, norm="linf", lo=0.0, hi=1.0)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        ro.pgd_step_(**args)


def test_bad_inputs_other_ops():
    x = torch.rand(4, 3)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16, got torch.int64"):
        ro.random_init(torch.ones(4, 3, dtype=torch.long), 0.1)
    with pytest.raises(TypeError, match="x_adv must be float32, float16 or bfloat16"):
        ro.pgd_step_(torch.ones(4, 3, dtype=torch.float64), x.double(), x.double(), 0.1, 0.1)
    with pytest.raises(ValueError, match="x must have a leading batch dimension"):
        ro.random_init(torch.tensor(0.5), 0.1)
    with pytest.raises(ValueError, match=r"offset must be an int in \[0, 2\^63\)"):
        ro.random_init(x, 0.1, offset=-1)
    with pytest.raises(TypeError, match="seed must be an int"):
        ro.random_init(x, 0.1, seed=1.5)
    with pytest.raises(ValueError, match="step must be >= 0"):
        ro.recycle_step_(torch.zeros_like(x), x, x, eps=0.1, step=-0.5)
    with pytest.raises(ValueError, match="x must have the same shape as delta"):
        ro.recycle_step_(torch.zeros_like(x), torch.rand(4, 4), x, eps=0.1, step=0.5)
    with pytest.raises(TypeError, match="grad must be a torch.Tensor"):
        ro.recycle_step_(torch.zeros_like(x), x, 1.0, eps=0.1, step=0.5)
    # pgd_step_'s order (out, x, grad); eps and step by keyword, so the old order (delta, grad, x, eps,
    # step), which would swap x and grad silently, fails loudly instead
    with pytest.raises(TypeError):
        ro.recycle_step_(torch.zeros_like(x), x, x, 0.1, 0.5)
    # The C++ layer has its own checks for callers that use torch.ops directly.
    with pytest.raises(RuntimeError, match='norm must be "linf" or "l2"'):
        torch.ops.robustops.pgd_step_(x.clone(), x, x, torch.tensor(0.1), torch.tensor(0.1), "l3", 0.0, 1.0)
    with pytest.raises(RuntimeError, match="eps must be a float or a Tensor"):
        torch.ops.robustops.pgd_step_(x.clone(), x, x, torch.rand(5), torch.tensor(0.1), "l2", 0.0, 1.0)
    with pytest.raises(RuntimeError, match="x_adv must be dense"):
        y = torch.rand(4, 6)[:, ::2]
        torch.ops.robustops.pgd_step_(y, x, x, torch.tensor(0.1), torch.tensor(0.1), "l2", 0.0, 1.0)


@pytest.mark.cuda
def test_device_mismatch():
    x = torch.rand(4, 3)
    with pytest.raises(ValueError, match="x must be on the same device as x_adv"):
        ro.pgd_step_(x.cuda(), x, x.cuda(), 0.1, 0.1)


# ---------------------------------------------------------------------- opcheck and compile

def _opcheck_samples(device):
    gen = torch.Generator().manual_seed(0)
    for shape, layout, dtype in [((4, 3, 8, 8), "contiguous", torch.float32),
                                 ((3, 3, 5, 7), "channels_last", torch.bfloat16),
                                 ((2, 11), "contiguous", torch.float16)]:
        x = make(shape, dtype, device, layout, gen)
        g = make(shape, dtype, device, layout, gen, kind="normal")
        per = torch.rand(shape[0], generator=gen).to(device)
        yield x, g, per


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    for x, g, per in _opcheck_samples(device):
        for norm in ("linf", "l2"):
            torch.library.opcheck(torch.ops.robustops.pgd_step_,
                                  (x.clone(), x, g, torch.tensor(0.1), per, norm, 0.0, 1.0))
            torch.library.opcheck(torch.ops.robustops.random_init, (x, per, norm, 0.0, 1.0, 3, 0))
        torch.library.opcheck(torch.ops.robustops.recycle_step_,
                              (torch.zeros_like(x), x, g, per, torch.tensor(0.01), 0.0, 1.0))


@pytest.mark.parametrize("device", devices())
def test_torch_compile_fullgraph(device):
    def attack_steps(x, g, eps):
        x_adv = ro.random_init(x, eps, "linf", 0.0, 1.0, seed=3)
        for _ in range(3):
            ro.pgd_step_(x_adv, x, g, eps, 0.01, "linf", 0.0, 1.0)
        ro.pgd_step_(x_adv, x, g, eps, 0.05, "l2", 0.0, 1.0)
        delta = x_adv - x
        ro.recycle_step_(delta, x, g, eps=eps, step=0.02, lo=0.0, hi=1.0)
        return x + delta

    x = torch.rand(8, 3, 8, 8, device=device)
    g = torch.randn_like(x)
    eps = torch.full((8,), 0.1, device=device)
    compiled = torch.compile(attack_steps, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    torch.testing.assert_close(compiled(x, g, eps), attack_steps(x, g, eps))


def test_build_info():
    info = ro.build_info()
    assert set(info) >= {"cuda", "cuda_archs", "torch_version", "compiler"}
    assert info["torch_version"] == torch.__version__.split("+")[0]
    if torch.cuda.is_available():
        assert info["cuda"]
