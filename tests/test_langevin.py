"""langevin_step_ (DALE's hybrid Langevin step) against robustops.reference, its noise, its projection,
opcheck and torch.compile, on every device present."""
import zlib

import numpy as np
import pytest
import torch
from scipy import stats

import robustops as ro
from robustops import reference as ref

from conftest import devices

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ULP = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
SHAPES = [(1, 3, 8, 8), (5, 3, 7, 9), (4, 10, 13), (2, 3, 4, 5, 6), (3, 17), (6, 1), (2, 3, 32, 32)]
FORMS = ["gaussian", "laplace"]


def _fmt(shape):
    return torch.channels_last if len(shape) == 4 else torch.channels_last_3d


def cases():
    for shape in SHAPES:
        yield shape, "contiguous"
        if len(shape) in (4, 5):
            yield shape, "channels_last"


def inputs(shape, dtype, device, layout, gen):
    """x in [0, 1], x_adv in a slightly-too-large ball around it (so the projection is exercised),
    a normal gradient; all in the layout."""
    x = torch.rand(shape, generator=gen)
    x_adv = (x + 0.3 * (torch.rand(shape, generator=gen) - 0.5)).clamp(0, 1)
    g = torch.randn(shape, generator=gen)
    out = []
    for t in (x, x_adv, g):
        t = t.to(device=device, dtype=dtype)
        if layout == "channels_last":
            t = t.contiguous(memory_format=_fmt(shape))
        out.append(t)
    return out


def params(kind, B, device, gen, noise):
    if kind == "scalar":
        return 0.1, 0.03, noise
    eps = (torch.rand(B, generator=gen) * 0.2 + 0.01).to(device)
    alpha = (torch.rand(B, generator=gen) * 0.05).to(device)
    c = (torch.rand(B, generator=gen) * 2 * noise).to(device)
    return eps, alpha, c


def _check_against_reference(out, expected, x_adv, x, grad, eps, alpha, c, form, seed, offset, dtype):
    if form == "gaussian":
        torch.testing.assert_close(out.float(), expected.float(), atol=2 * ULP[dtype], rtol=0)
        return
    # Laplace: sign(g + c*l) may differ from the reference's only where g + c*l is within rounding of 0
    # (the kernels' logf and numpy's log differ by an ulp at most).
    bad = (out.float() - expected.float()).abs() > 2 * ULP[dtype]
    if bool(bad.any()):
        n = ref.langevin_noise(tuple(x.shape), seed, offset, form).to(x.device)
        cc = torch.as_tensor(c, dtype=torch.float32, device=x.device)
        cc = cc.reshape((-1,) + (1,) * (x.dim() - 1)) if cc.dim() else cc
        t = (grad.float() + cc * n)
        assert bool((t[bad].abs() <= 1e-5 * (grad.float()[bad].abs() + 1)).all())
        assert int(bad.sum()) <= max(1, out.numel() // 10000)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,layout", list(cases()))
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("pkind", ["scalar", "per_sample"])
def test_langevin_step_matches_reference(device, dtype, shape, layout, form, pkind):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, layout, form, pkind)).encode()))
    x, x_adv, grad = inputs(shape, dtype, device, layout, gen)
    eps, alpha, c = params(pkind, shape[0], device, gen, 0.05 if form == "gaussian" else 0.7)
    seed, offset = 1234 + len(shape), 3
    expected = ref.langevin_step(x_adv, x, grad, eps, alpha, c, form, 0.0, 1.0, seed, offset)
    out = x_adv.clone()
    res = ro.langevin_step_(out, x, grad, eps, alpha, c, form, 0.0, 1.0, seed=seed, offset=offset)
    assert res is out and out.stride() == x_adv.stride()
    _check_against_reference(out, expected, x_adv, x, grad, eps, alpha, c, form, seed, offset, dtype)
    # the projection: within eps of x (to the dtype's rounding) and inside [0, 1]
    d = (out.float() - x.float()).flatten(1).abs().amax(1)
    e = torch.as_tensor(eps, device=device, dtype=torch.float32).expand(shape[0])
    assert bool((d <= e * (1 + 1e-5) + 2 * ULP[dtype]).all())
    assert bool(((out >= 0) & (out <= 1)).all())


@pytest.mark.parametrize("form", FORMS)
def test_vector_loops_equal_scalar_formulas(monkeypatch, form):
    """The CPU vector loop computes what the shared formulas (the CUDA kernel's) compute, bit for bit."""
    gen = torch.Generator().manual_seed(5)
    for dtype in DTYPES:
        x, x_adv, grad = inputs((3, 3, 11, 13), dtype, "cpu", "channels_last", gen)
        a, b = x_adv.clone(), x_adv.clone()
        ro.langevin_step_(a, x, grad, 0.1, 0.02, 0.3, form, seed=9, offset=4)
        monkeypatch.setenv("ROBUSTOPS_CPU_SCALAR", "1")
        ro.langevin_step_(b, x, grad, 0.1, 0.02, 0.3, form, seed=9, offset=4)
        monkeypatch.delenv("ROBUSTOPS_CPU_SCALAR")
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_zero_noise_equals_pgd_step(device, dtype, form, layout):
    gen = torch.Generator().manual_seed(11)
    x, x_adv, grad = inputs((5, 3, 9, 7), dtype, device, layout, gen)
    grad[0, 0, 0, :3] = 0.0  # sign 0: no move
    grad[1, 1, 2, :2] = float("nan")  # NaN poisons its element in both
    eps, alpha, _ = params("per_sample", 5, device, gen, 0.0)
    for e, a in ((0.1, 0.03), (eps, alpha)):
        expected, out = x_adv.clone(), x_adv.clone()
        ro.pgd_step_(expected, x, grad, e, a, "linf", 0.0, 1.0)
        ro.langevin_step_(out, x, grad, e, a, 0.0, form, 0.0, 1.0, seed=1)
        assert torch.equal(out, expected) or torch.testing.assert_close(out, expected, atol=0, rtol=0,
                                                                         equal_nan=True) is None
    # a per-sample noise that is 0 for some samples: those samples take the plain step
    c = torch.tensor([0.0, 0.5, 0.0, 0.5, 0.0], device=device)
    expected, out = x_adv.clone(), x_adv.clone()
    ro.pgd_step_(expected, x, grad, 0.1, 0.03, "linf", 0.0, 1.0)
    ro.langevin_step_(out, x, grad, 0.1, 0.03, c, form, 0.0, 1.0, seed=1)
    torch.testing.assert_close(out[c == 0], expected[c == 0], atol=0, rtol=0, equal_nan=True)
    assert not torch.equal(out[1], expected[1])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("form", FORMS)
def test_noise_is_keyed_by_seed_and_offset(device, form):
    gen = torch.Generator().manual_seed(2)
    x, x_adv, grad = inputs((6, 3, 8, 8), torch.float32, device, "contiguous", gen)
    grad.zero_()  # the Laplace form then moves by alpha * sign(c * l): the noise's sign is visible

    def step(xa, xx, g, seed, offset):
        out = xa.clone()
        return ro.langevin_step_(out, xx, g, 0.5, 0.01, 0.01, form, -10.0, 10.0, seed=seed, offset=offset)

    a = step(x_adv, x, grad, 7, 0)
    assert torch.equal(a, step(x_adv, x, grad, 7, 0))  # reproducible
    assert not torch.equal(a, step(x_adv, x, grad, 8, 0))  # the seed matters
    assert not torch.equal(a, step(x_adv, x, grad, 7, 6))  # so does the offset
    # any split of the batch, each part at the offset of its first sample, draws the same noise
    parts = torch.cat([step(x_adv[:2], x[:2], grad[:2], 7, 0), step(x_adv[2:5], x[2:5], grad[2:5], 7, 2),
                       step(x_adv[5:], x[5:], grad[5:], 7, 5)])
    assert torch.equal(a, parts)
    # and the layout does not change the draw
    cl = [t.contiguous(memory_format=torch.channels_last) for t in (x_adv, x, grad)]
    torch.testing.assert_close(step(*cl, 7, 0), a, atol=0, rtol=0)


def _recover_laplace(shape, seed, offset, c=1.0, device="cpu", iters=40):
    """The Laplace noise the op draws, recovered by bisection on the gradient: with x_adv = x,
    alpha = 1 and a wide ball, the op returns x + sign(g + c*l), so the root of g -> sign(g + c*l)
    is -c*l."""
    x = torch.zeros(shape, device=device)
    lo = torch.full(shape, -40.0, device=device)
    hi = torch.full(shape, 40.0, device=device)
    for _ in range(iters):
        mid = (lo + hi) / 2
        out = x.clone()
        ro.langevin_step_(out, x, mid, 10.0, 1.0, c, "laplace", -100.0, 100.0, seed=seed, offset=offset)
        pos = out > 0  # mid + c*l > 0: the root lies below mid
        hi = torch.where(pos, mid, hi)
        lo = torch.where(pos, lo, mid)
    return -(lo + hi) / 2 / c


@pytest.mark.parametrize("device", devices())
def test_laplace_noise_is_laplace(device):
    lap = _recover_laplace((40, 500), seed=21, offset=0, device=device).cpu().double()
    torch.testing.assert_close(lap.float(), ref.langevin_noise((40, 500), 21, 0, "laplace"), atol=1e-5, rtol=1e-5)
    p = stats.kstest(lap.flatten().numpy(), stats.laplace.cdf).pvalue
    assert p > 1e-3, p
    assert abs(float((lap > 0).double().mean()) - 0.5) < 0.01
    # neighbours are independent: lag-1 correlation along the sample and across samples
    assert abs(np.corrcoef(lap[:, :-1].flatten(), lap[:, 1:].flatten())[0, 1]) < 0.02
    assert abs(np.corrcoef(lap[:-1].flatten(), lap[1:].flatten())[0, 1]) < 0.02


@pytest.mark.parametrize("device", devices())
def test_gaussian_noise_is_normal(device):
    shape = (40, 500)
    x = torch.full(shape, 0.5, device=device)
    out = x.clone()
    ro.langevin_step_(out, x, torch.zeros_like(x), 100.0, 0.0, 1.0, "gaussian", -100.0, 100.0, seed=5, offset=0)
    z = (out - x).cpu().double()
    torch.testing.assert_close(z.float(), ref.langevin_noise(shape, 5, 0, "gaussian"), atol=1e-5, rtol=0)
    assert stats.kstest(z.flatten().numpy(), stats.norm.cdf).pvalue > 1e-3
    assert abs(np.corrcoef(z[:, :-1].flatten(), z[:, 1:].flatten())[0, 1]) < 0.02


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("form", FORMS)
def test_projection_properties(device, form):
    """Large noise and steps: the result stays in the eps-ball (per-sample eps, eps 0 included) and in
    [lo, hi]; a second projection changes nothing (beyond the rounding of x + (v - x))."""
    gen = torch.Generator().manual_seed(3)
    x, x_adv, grad = inputs((6, 2, 9, 9), torch.float32, device, "contiguous", gen)
    eps = torch.tensor([0.0, 0.05, 0.1, 0.3, 1.0, 2.0], device=device)
    out = x_adv.clone()
    ro.langevin_step_(out, x, grad, eps, 0.5, 3.0, form, 0.1, 0.9, seed=4)
    # within eps of x, except where x itself lies outside the box and the clamp moves it further
    outside = torch.maximum((0.1 - x).clamp_min(0), (x - 0.9).clamp_min(0))
    assert bool(((out - x).abs() <= eps.reshape(-1, 1, 1, 1) + outside + 1e-6).all())
    assert bool(((out >= 0.1) & (out <= 0.9)).all())
    inside = ((x >= 0.1) & (x <= 0.9))[0]
    assert torch.equal(out[0][inside], x[0][inside])  # eps 0: only the box clamp moves x
    again = out.clone()
    ro.pgd_step_(again, x, torch.zeros_like(grad), eps, 0.0, "linf", 0.1, 0.9)
    torch.testing.assert_close(again, out, atol=2e-7, rtol=0)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(form="uniform"), ValueError, "form"),
    (dict(noise=-0.1), ValueError, "noise"),
    (dict(noise=float("inf")), ValueError, "noise"),
    (dict(eps=-1.0), ValueError, "eps"),
    (dict(offset=-1), ValueError, "offset"),
    (dict(lo=1.0, hi=0.0), ValueError, "lo"),
    (dict(grad=torch.zeros(3, 5)), ValueError, "grad"),
    (dict(x=torch.zeros(2, 4, dtype=torch.float64)), TypeError, "x"),
    (dict(noise=torch.zeros(3)), ValueError, "noise"),
    (dict(seed="a"), TypeError, "seed"),
])
def test_bad_inputs_name_the_argument(kwargs, exc, match):
    args = dict(x_adv=torch.zeros(2, 4), x=torch.zeros(2, 4), grad=torch.zeros(2, 4), eps=0.1, alpha=0.01,
                noise=0.1, form="laplace", lo=0.0, hi=1.0, seed=0, offset=0)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        ro.langevin_step_(**args)


def test_kernel_checks_without_the_wrapper():
    x = torch.zeros(2, 4)
    with pytest.raises(RuntimeError, match="form"):
        torch.ops.robustops.langevin_step_(x.clone(), x, x, torch.tensor(0.1), torch.tensor(0.1), torch.tensor(0.1),
                                           "cauchy", 0.0, 1.0, 0, 0)
    with pytest.raises(RuntimeError, match="noise"):
        torch.ops.robustops.langevin_step_(x.clone(), x, x, torch.tensor(0.1), torch.tensor(0.1), torch.zeros(3),
                                           "laplace", 0.0, 1.0, 0, 0)


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    gen = torch.Generator().manual_seed(0)
    for shape, layout, dtype in [((4, 3, 8, 8), "contiguous", torch.float32),
                                 ((3, 3, 5, 7), "channels_last", torch.bfloat16),
                                 ((2, 11), "contiguous", torch.float16)]:
        x, x_adv, g = inputs(shape, dtype, device, layout, gen)
        per = torch.rand(shape[0], generator=gen).to(device)
        for form in FORMS:
            torch.library.opcheck(torch.ops.robustops.langevin_step_,
                                  (x_adv.clone(), x, g, torch.tensor(0.1), per, per * 0.1, form, 0.0, 1.0, 3, 5))


@pytest.mark.parametrize("device", devices())
def test_torch_compile_fullgraph(device):
    def chain(x, g, eps):
        x_adv = x.clone()
        for k in range(3):
            ro.langevin_step_(x_adv, x, g, eps, 0.02, 0.01, "gaussian", 0.0, 1.0, seed=11, offset=8 * k)
        ro.langevin_step_(x_adv, x, g, eps, 0.02, 0.3, "laplace", 0.0, 1.0, seed=12, offset=0)
        return x_adv * 2

    x = torch.rand(8, 3, 8, 8, device=device)
    g = torch.randn_like(x)
    eps = torch.full((8,), 0.1, device=device)
    compiled = torch.compile(chain, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    torch.testing.assert_close(compiled(x, g, eps), chain(x, g, eps))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_matches_cpu(dtype, form, layout):
    """The same noise on both devices, so the same step (to float rounding; a Laplace sign may flip
    where g + c*l is within an ulp of 0)."""
    gen = torch.Generator().manual_seed(17)
    shape = (7, 3, 16, 16)
    x, x_adv, grad = inputs(shape, dtype, "cpu", layout, gen)
    eps, alpha, c = params("per_sample", shape[0], "cpu", gen, 0.05 if form == "gaussian" else 0.7)
    a = x_adv.clone()
    ro.langevin_step_(a, x, grad, eps, alpha, c, form, seed=77, offset=9)
    b = x_adv.cuda()
    ro.langevin_step_(b, x.cuda(), grad.cuda(), eps.cuda(), alpha.cuda(), c.cuda(), form, seed=77, offset=9)
    assert b.stride() == a.stride()
    close = (b.cpu().float() - a.float()).abs() <= 2 * ULP[dtype]
    assert int((~close).sum()) <= max(1, a.numel() // 10000)


@pytest.mark.cuda
def test_cuda_noise_matches_cpu():
    for form in FORMS:
        shape = (5, 1001)  # D not a multiple of 4: groups straddle the vector path's fallback
        x = torch.zeros(shape)
        g = torch.zeros(shape)
        outs = []
        for dev in ("cpu", "cuda"):
            o = x.to(dev).clone()
            ro.langevin_step_(o, x.to(dev), g.to(dev), 100.0, 0.0 if form == "gaussian" else 1.0, 1.0, form,
                              -100.0, 100.0, seed=3, offset=2)
            outs.append(o.cpu())
        torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    l_cpu = _recover_laplace((4, 300), 8, 1, device="cpu")
    l_gpu = _recover_laplace((4, 300), 8, 1, device="cuda").cpu()
    torch.testing.assert_close(l_gpu, l_cpu, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------- the device-offset form

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("form", FORMS)
def test_device_offset_draws_the_integer_forms_stream(device, form):
    """offset as a one-element int64 tensor: the step at its value, and the offset advanced by B, so two
    calls draw what the integer offsets 7 and 7 + B draw."""
    gen = torch.Generator().manual_seed(8)
    x, x_adv, grad = inputs((5, 3, 6, 7), torch.float32, device, "channels_last", gen)
    eps, alpha, c = params("per_sample", 5, device, gen, 0.05 if form == "gaussian" else 0.7)
    off = torch.tensor(7, dtype=torch.int64, device=device)
    a, b = x_adv.clone(), x_adv.clone()
    assert ro.langevin_step_(a, x, grad, eps, alpha, c, form, seed=3, offset=off) is a
    assert int(off) == 7 + 5
    ro.langevin_step_(b, x, grad, eps, alpha, c, form, seed=3, offset=off)
    assert int(off) == 7 + 10
    for out, start in ((a, 7), (b, 12)):
        eager = x_adv.clone()
        ro.langevin_step_(eager, x, grad, eps, alpha, c, form, seed=3, offset=start)
        assert torch.equal(out, eager)
    expected, new_off = ref.langevin_step_dev_offset(x_adv, x, grad, eps, alpha, c, form, 0.0, 1.0, 3,
                                                     torch.tensor(7))
    assert int(new_off) == 12
    _check_against_reference(a, expected, x_adv, x, grad, eps, alpha, c, form, 3, 7, torch.float32)
    # a zero noise scale draws nothing but still advances the offset (the stream position counts samples)
    ro.langevin_step_(x_adv.clone(), x, grad, 0.1, 0.01, 0.0, form, seed=3, offset=off)
    assert int(off) == 22


@pytest.mark.parametrize("device", devices())
def test_device_offset_bad_inputs(device):
    x = torch.zeros(2, 4, device=device)
    with pytest.raises(TypeError, match="one-element int64"):
        ro.langevin_step_(x.clone(), x, x, 0.1, 0.01, 0.1, offset=torch.zeros(2, dtype=torch.int64, device=device))
    with pytest.raises(TypeError, match="one-element int64"):
        ro.langevin_step_(x.clone(), x, x, 0.1, 0.01, 0.1, offset=torch.zeros((), device=device))
    with pytest.raises(RuntimeError, match="offset must be a one-element int64 tensor"):
        torch.ops.robustops.langevin_step_dev_offset_(x.clone(), x, x, torch.tensor(0.1), torch.tensor(0.1),
                                                      torch.tensor(0.1), "laplace", 0.0, 1.0, 0,
                                                      torch.zeros(3, dtype=torch.int64, device=device))


@pytest.mark.parametrize("device", devices())
def test_opcheck_device_offset(device):
    gen = torch.Generator().manual_seed(1)
    for shape, layout, dtype in [((4, 3, 8, 8), "contiguous", torch.float32),
                                 ((3, 3, 5, 7), "channels_last", torch.bfloat16)]:
        x, x_adv, g = inputs(shape, dtype, device, layout, gen)
        per = torch.rand(shape[0], generator=gen).to(device)
        for form in FORMS:
            off = torch.tensor(2, dtype=torch.int64, device=device)
            torch.library.opcheck(torch.ops.robustops.langevin_step_dev_offset_,
                                  (x_adv.clone(), x, g, torch.tensor(0.1), per, per * 0.1, form, 0.0, 1.0, 3, off))


@pytest.mark.parametrize("device", devices())
def test_torch_compile_fullgraph_device_offset(device):
    def chain(x, g, eps, off):
        x_adv = x.clone()
        for _ in range(3):
            ro.langevin_step_(x_adv, x, g, eps, 0.02, 0.05, "gaussian", 0.0, 1.0, seed=11, offset=off)
        ro.langevin_step_(x_adv, x, g, eps, 0.02, 0.3, "laplace", 0.0, 1.0, seed=12, offset=off)
        return x_adv * 2

    x = torch.rand(8, 3, 8, 8, device=device)
    g = torch.randn_like(x)
    eps = torch.full((8,), 0.1, device=device)
    off_c, off_e = (torch.tensor(5, dtype=torch.int64, device=device) for _ in range(2))
    compiled = torch.compile(chain, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    torch.testing.assert_close(compiled(x, g, eps, off_c), chain(x, g, eps, off_e), atol=0, rtol=0)
    assert int(off_c) == int(off_e) == 5 + 4 * 8


@pytest.mark.cuda
def test_cuda_graph_device_offset_replays_fresh_noise():
    """Captured with a device offset, each replay draws the next B samples' noise, exactly as the
    eager integer-offset calls at 8, 16, ... would."""
    gen = torch.Generator().manual_seed(4)
    x, x_adv, grad = inputs((8, 3, 8, 8), torch.float32, "cuda", "contiguous", gen)
    off = torch.zeros((), dtype=torch.int64, device="cuda")
    work = x_adv.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ro.langevin_step_(work, x, grad, 0.1, 0.01, 0.3, "laplace", seed=6, offset=off)  # warm-up: samples 0..7
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # recorded, not run: the offset stays at 8
        ro.langevin_step_(work, x, grad, 0.1, 0.01, 0.3, "laplace", seed=6, offset=off)
    assert int(off) == 8
    for k in range(3):
        work.copy_(x_adv)
        graph.replay()
        torch.cuda.synchronize()
        eager = x_adv.clone()
        ro.langevin_step_(eager, x, grad, 0.1, 0.01, 0.3, "laplace", seed=6, offset=8 * (1 + k))
        assert torch.equal(work, eager), k
    assert int(off) == 32


@pytest.mark.cuda
def test_cuda_graph_capture_is_refused():
    x = torch.rand(4, 8, device="cuda")
    g = torch.randn_like(x)
    s = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s), pytest.raises(RuntimeError, match="CUDA graph"):
        with torch.cuda.graph(graph, stream=s):
            ro.langevin_step_(x.clone(), x, g, 0.1, 0.01, 0.1, "laplace", seed=0)
