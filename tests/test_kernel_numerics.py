"""The kernels' arithmetic where it is fragile: L2 steps with tiny, zero, huge and NaN gradients;
Box-Muller at the ends of its range; batches past CUDA's 65535 grid limit; the device-offset random
ops that CUDA graphs replay; the CPU vector loops against the scalar formulas the CUDA kernels run
(csrc/*.h). Every test runs on the CPU; the CUDA ones run where a GPU is present."""
import math

import pytest
import torch

import robustops as ro
from robustops import reference as ref

from conftest import devices

AVX = ro.build_info()["cpu_capability"] != "baseline"


def _l2_case(device, scale, gen):
    """A batch whose samples stress the L2 step: gradient scales (1, 2e-23, 1e-24, 0, 1e30 and a
    denormal 1e-40), one sample with a NaN element, one whose x_adv starts far outside the ball."""
    B, D = 8, 3 * 8 * 8
    x = torch.rand(B, D, generator=gen).to(device)
    x_adv = (x + 0.05 * torch.randn(B, D, generator=gen).to(device))
    g = torch.randn(B, D, generator=gen).to(device)
    for b, s in enumerate((1.0, 2e-23, 1e-24, 0.0, 1e30, 1e-40)):
        g[b] *= s
    g[6, 5] = float("nan")
    x_adv[7] = x[7] + 50.0  # far outside the ball: the projection must bring it back
    return x_adv * scale, x * scale, g


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("alpha", [0.05, 2.0])
def test_l2_step_tiny_zero_huge_and_nan_gradients(device, alpha):
    gen = torch.Generator().manual_seed(5)
    eps, lo, hi = 0.3, -1e3, 1e3  # a wide box, so the ball's projection is what bounds the step
    x_adv, x, g = _l2_case(device, 1.0, gen)
    out = x_adv.clone()
    ro.pgd_step_(out, x, g, eps, alpha, "l2", lo, hi)
    expected = ref.pgd_step(x_adv, x, g, eps, alpha, "l2", lo, hi)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, equal_nan=True)
    nan_rows = torch.isnan(out).any(1)
    assert nan_rows.tolist() == [False] * 6 + [True, False]
    assert bool(torch.isnan(out[6]).all()), "a NaN gradient element makes the whole sample NaN"
    d = (out[~nan_rows].double() - x[~nan_rows].double()).norm(dim=1)
    assert bool((d <= eps * (1 + 1e-6)).all()), d
    # Tiny gradients still move the iterate along their direction: a step of alpha (or the projection).
    step = (out.double() - x_adv.double()).norm(dim=1)
    for b in (1, 2):
        assert step[b] > 0.5 * min(alpha, eps), (b, step[b])
    # A zero gradient leaves the direction term out: only the projection acts.
    torch.testing.assert_close(out[3], (x_adv[3] - x[3]) * min(1.0, eps / float((x_adv[3] - x[3]).norm())) + x[3],
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("device", devices())
def test_l2_step_chunked_path_and_misaligned_views(device):
    """D > 8192 (CUDA's cross-chunk path; the CPU's chunked path when samples are few) and a view
    starting one element into its buffer (D a multiple of the vector width)."""
    gen = torch.Generator().manual_seed(2)
    B, D = 3, 40000
    x = torch.rand(B, D, generator=gen).to(device)
    g = torch.randn(B, D, generator=gen).to(device)
    g[1] *= 1e-24
    x_adv = (x + 0.01 * torch.randn(B, D, generator=gen).to(device)).clamp(0, 1)
    out = x_adv.clone()
    ro.pgd_step_(out, x, g, 0.5, 0.1, "l2")
    torch.testing.assert_close(out, ref.pgd_step(x_adv, x, g, 0.5, 0.1, "l2"), atol=2e-6, rtol=0)
    buf = torch.empty(B * 64 + 1, device=device)
    view = buf[1:].view(B, 64)
    xs, gs = x[:, :64].contiguous(), g[:, :64].contiguous()
    view.copy_(x_adv[:, :64])
    ro.pgd_step_(view, xs, gs, 0.5, 0.1, "l2")
    torch.testing.assert_close(view, ref.pgd_step(x_adv[:, :64], xs, gs, 0.5, 0.1, "l2"), atol=2e-6, rtol=0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_more_than_65535_samples(device, norm):
    """CUDA's grid.y caps at 65535; the L2 kernels use a 1-D grid of B * chunks blocks."""
    B, D = 70000, 3
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(B, D, generator=gen).to(device)
    g = torch.randn(B, D, generator=gen).to(device)
    start = ro.random_init(x, 0.2, norm, seed=1)
    torch.testing.assert_close(start, ref.random_init(x.cpu(), 0.2, norm, seed=1).to(device), atol=2e-6, rtol=0)
    out = start.clone()
    ro.pgd_step_(out, x, g, 0.2, 0.05, norm)
    torch.testing.assert_close(out, ref.pgd_step(start, x, g, 0.2, 0.05, norm), atol=2e-6, rtol=0)


# ---------------------------------------------------------------------------------- Box-Muller

@pytest.mark.parametrize("device", devices())
def test_forty_million_box_muller_pairs_are_finite(device):
    x = torch.zeros(1, 1 << 20, device=device)
    z = ro.gaussian_noise(x, 80, 1.0, seed=12345)  # 8.4e7 normals = 4.2e7 Box-Muller pairs
    assert bool(torch.isfinite(z).all())
    # The largest radius a 24-bit uniform allows is sqrt(-2 ln 2^-24) = 5.77.
    assert float(z.abs().max()) <= math.sqrt(-2 * math.log(2.0 ** -24)) + 1e-5
    m, s = float(z.mean()), float(z.std())
    assert abs(m) < 1e-3 and abs(s - 1) < 1e-3


@pytest.mark.cuda
def test_noise_same_on_cpu_and_cuda_to_1e5_sigma():
    x = torch.rand(64, 3, 8, 8)
    sigma = 0.5
    a = ro.gaussian_noise(x, 50, sigma, seed=9, offset=3)
    b = ro.gaussian_noise(x.cuda(), 50, sigma, seed=9, offset=3).cpu()
    assert float((a - b).abs().max()) <= 1e-5 * sigma


# ----------------------------------------------------------------- CPU vector loops vs formulas

def _both(monkeypatch, fn):
    """fn() with the CPU vector loops, and with every element through the scalar formulas."""
    monkeypatch.delenv("ROBUSTOPS_CPU_SCALAR", raising=False)
    vec = fn()
    monkeypatch.setenv("ROBUSTOPS_CPU_SCALAR", "1")
    scalar = fn()
    monkeypatch.delenv("ROBUSTOPS_CPU_SCALAR")
    return vec, scalar


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_vector_loops_compute_the_scalar_formulas(monkeypatch, dtype):
    gen = torch.Generator().manual_seed(11)
    B, D = 6, 1000  # vector body plus a scalar tail in every sample
    x = torch.rand(B, D, generator=gen).to(dtype)
    xa = (x.float() + 0.2 * torch.randn(B, D, generator=gen)).clamp(0, 1).to(dtype)
    g = torch.randn(B, D, generator=gen).to(dtype)
    g[2] = (g[2].float() * 1e-24).to(dtype) if dtype == torch.float32 else g[2]
    eps = torch.rand(B, generator=gen) * 0.3

    def step(norm):
        def run():
            out = xa.clone()
            ro.pgd_step_(out, x, g, eps, 0.05, norm)
            return out
        return run

    def recycle():
        d = (xa.float() - x.float()).to(dtype)
        ro.recycle_step_(d, x, g, eps=eps, step=0.03)
        return d

    for fn, exact in ((step("linf"), True), (recycle, True), (step("l2"), False)):
        vec, scalar = _both(monkeypatch, fn)
        if exact and AVX:  # the same operations in the same order: bitwise
            assert torch.equal(vec, scalar)
        else:  # L2: the per-sample sums are accumulated in another order; the factors agree to an ulp
            torch.testing.assert_close(vec.float(), scalar.float(), atol=2 * torch.finfo(dtype).eps, rtol=0)


def test_cpu_vector_box_muller_matches_the_scalar_one(monkeypatch):
    x = torch.rand(4, 3, 16, 16)
    vec, scalar = _both(monkeypatch, lambda: ro.gaussian_noise(x, 20, 1.0, seed=3))
    assert float((vec - scalar).abs().max()) <= 4e-6  # float angle 2 pi u vs sincospi: ~2e-6 * radius


# --------------------------------------------------------------------------- device offsets

@pytest.mark.parametrize("device", devices())
def test_device_offset_forms_draw_the_integer_forms_stream(device):
    x = torch.rand(5, 3, 4, 4, device=device)
    off = torch.tensor(7, dtype=torch.int64, device=device)
    a = ro.gaussian_noise(x, 3, 0.5, seed=4, offset=off)
    assert int(off) == 7 + 15  # advanced by the B*num rows it drew
    b = ro.gaussian_noise(x, 3, 0.5, seed=4, offset=off)
    assert torch.equal(a, ro.gaussian_noise(x, 3, 0.5, seed=4, offset=7))
    assert torch.equal(b, ro.gaussian_noise(x, 3, 0.5, seed=4, offset=22))
    for norm, radius in (("linf", "ball"), ("l2", "ball"), ("l2", "uniform")):
        off = torch.zeros((), dtype=torch.int64, device=device)
        r1 = ro.random_init(x, 0.3, norm, seed=8, offset=off, radius=radius)
        adv = x.shape[0]  # the offset counts samples
        assert int(off) == adv
        r2 = ro.random_init(x, 0.3, norm, seed=8, offset=off, radius=radius)
        assert torch.equal(r1, ro.random_init(x, 0.3, norm, seed=8, offset=0, radius=radius))
        assert torch.equal(r2, ro.random_init(x, 0.3, norm, seed=8, offset=adv, radius=radius))
    with pytest.raises(TypeError, match="int64"):
        ro.gaussian_noise(x, 1, 0.5, offset=torch.zeros(2, dtype=torch.int64, device=device))


def test_l2_radius_laws():
    """radius="ball": r^D uniform (uniform in the volume); radius="uniform": r uniform in [0, eps]."""
    from scipy import stats

    x = torch.zeros(4000, 50)
    r = ro.random_init(x, 0.7, "l2", -1e9, 1e9, seed=2, radius="uniform").double().norm(dim=1) / 0.7
    assert stats.kstest(r.numpy(), "uniform").pvalue > 1e-3
    r = ro.random_init(x, 0.7, "l2", -1e9, 1e9, seed=2, radius="ball").double().norm(dim=1) / 0.7
    assert stats.kstest((r ** 50).numpy(), "uniform").pvalue > 1e-3
    with pytest.raises(ValueError, match="radius"):
        ro.random_init(x, 0.7, "l2", radius="shell")


@pytest.mark.cuda
def test_integer_offset_refuses_graph_capture_device_offset_replays_fresh_noise():
    x = torch.rand(8, 3, 8, 8, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        g = torch.cuda.CUDAGraph()
        with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
            with torch.cuda.graph(g):
                ro.gaussian_noise(x, 4, 0.5, seed=1, offset=0)
    off = torch.zeros((), dtype=torch.int64, device="cuda")
    ro.gaussian_noise(x, 4, 0.5, seed=1, offset=off)  # warm-up, draws rows 0..31
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):  # recorded, not run: the offset stays at 32
        noise = ro.gaussian_noise(x, 4, 0.5, seed=1, offset=off)
    draws = []
    for _ in range(3):
        g.replay()
        draws.append(noise.clone())
    torch.cuda.synchronize()
    assert int(off) == 32 * 4
    for k, d in enumerate(draws):  # replay k draws rows (1 + k) * 32 onwards, as the eager calls would
        assert torch.equal(d, ro.gaussian_noise(x, 4, 0.5, seed=1, offset=(1 + k) * 32))
    # random_init likewise, L2 (two kernels and the radius stream)
    off = torch.zeros((), dtype=torch.int64, device="cuda")
    adv = x.shape[0]
    ro.random_init(x, 0.5, "l2", seed=3, offset=off)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        start = ro.random_init(x, 0.5, "l2", seed=3, offset=off)
    for k in range(2):
        g.replay()
        assert torch.equal(start, ro.random_init(x, 0.5, "l2", seed=3, offset=(1 + k) * adv))


@pytest.mark.cuda
def test_more_than_2_31_elements():
    rows, D = 1 << 16, (1 << 15) + 8  # 2^31 + 2^19 elements in bf16 (4.3 GB)
    x = torch.zeros(1, D, device="cuda")
    big = ro.gaussian_noise(x, rows, 1.0, seed=5, out_dtype=torch.bfloat16)
    tail = ro.gaussian_noise(x, 4, 1.0, seed=5, offset=rows - 4, out_dtype=torch.bfloat16)
    assert torch.equal(big[-4:], tail)


@pytest.mark.cuda
def test_random_init_on_another_stream_and_device():
    """Kept apart from the 2^31 test so that compute-sanitizer (benchmarks/gpu_session.sh) runs it."""
    s = torch.cuda.Stream()
    xs = torch.rand(16, 3, 8, 8, device="cuda")  # written on the current stream
    s.wait_stream(torch.cuda.current_stream())  # ... so s must wait for it before reading it
    with torch.cuda.stream(s):
        a = ro.random_init(xs, 0.1, "l2", seed=2)
    torch.cuda.current_stream().wait_stream(s)  # a was written on s
    assert torch.equal(a, ro.random_init(xs, 0.1, "l2", seed=2))
    if torch.cuda.device_count() > 1:
        x1 = xs.to("cuda:1")
        torch.testing.assert_close(ro.random_init(x1, 0.1, "l2", seed=2).cpu(), a.cpu(), atol=0, rtol=0)


# ------------------------------------------------------------------------- random_init contract

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("D", [5, 7, 64])
def test_random_init_any_batch_split_gives_the_same_draw(device, norm, D):
    """The offset counts samples: the part of a batch from sample k, drawn at offset + k, equals that
    part of the whole batch's draw, for any per-sample size (not only multiples of 4) and for L2."""
    x = torch.rand(9, D, device=device)
    whole = ro.random_init(x, 0.3, norm, seed=21, offset=4)
    for k in (1, 3, 8):
        head = ro.random_init(x[:k], 0.3, norm, seed=21, offset=4)
        tail = ro.random_init(x[k:], 0.3, norm, seed=21, offset=4 + k)
        assert torch.equal(torch.cat([head, tail]), whole), k


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_reduced_precision_starts_stay_inside_the_bounds(device, dtype, norm):
    """Bounds that fp16 / bf16 cannot represent: round-to-nearest used to step one ulp past them."""
    gen = torch.Generator().manual_seed(4)
    lo, hi, eps = -0.3003, 0.7007, 0.1001
    x = (torch.rand(64, 3, 8, 8, generator=gen) * (hi - lo) + lo).to(device=device, dtype=dtype)
    out = ro.random_init(x, eps, norm, lo, hi, seed=3)
    assert float(out.float().min()) >= lo and float(out.float().max()) <= hi
    if norm == "linf":
        assert float((out.float() - x.float()).abs().max()) <= eps * (1 + 1e-6)
