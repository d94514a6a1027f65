"""Every path the PGD kernels take on a GPU: the one-pass L2 kernels (a sample in a sub-warp group, a warp
or a block), the two-pass L2 kernels (D > 8192), tensors of more than 2^31 elements, views that start one
element into their buffer (the scalar fallback of the 16-byte loads), and data on a GPU that is not the
current device. The CPU runs of the same cases check the CPU kernels against the reference; the CUDA
runs check the CUDA kernels against the reference and against the CPU."""
import pytest
import torch

import robustops as ro
from robustops import reference as ref

from conftest import devices

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ULP = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# D <= 8192: one pass (32, 256, 1000 and 8192 take the 16-byte loads, the odd sizes one element at a
# time; up to 256 a warp or less per sample, above it a block holding up to 8, 16 or 32 elements a thread)
ONE_PASS_D = [1, 31, 32, 33, 256, 257, 1000, 4097, 8192]


def _inputs(shape, dtype, device, gen, fmt=None, misaligned=False):
    """x in [0, 1], x_adv near it (some samples outside a 0.3-ball), a normal gradient; optionally in
    channels_last or as views one element into their buffers."""
    x = torch.rand(shape, generator=gen)
    x_adv = (x + 0.2 * torch.randn(shape, generator=gen)).clamp(0, 1)
    g = torch.randn(shape, generator=gen)
    out = []
    for t in (x_adv, x, g):
        t = t.to(dtype)
        if fmt is not None:
            t = t.contiguous(memory_format=fmt)
        out.append(_place(t, device, misaligned))
    return out


def _place(t, device, misaligned):
    """t on device; misaligned: a view starting one element into a fresh buffer, same strides."""
    if not misaligned:
        return t.to(device)
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=device)
    view = buf[1:].as_strided(t.shape, t.stride())
    view.copy_(t)
    return view


def _per_sample(B, gen, device, misaligned=False):
    eps = torch.rand(B, generator=gen) * 0.5 + 0.05
    alpha = torch.rand(B, generator=gen) * 0.3 + 0.01
    return _place(eps, device, misaligned), _place(alpha, device, misaligned)


def _l2_tol(dtype):
    return 4 * ULP[dtype]


# ------------------------------------------------------------------------------ one-pass L2

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", ONE_PASS_D)
@pytest.mark.parametrize("misaligned", [False, True])
def test_l2_one_pass_sizes_match_reference(device, dtype, D, misaligned):
    gen = torch.Generator().manual_seed(D)
    B = 300 if D <= 33 else 37  # tiny samples: more than one block of sub-warp groups, a partial last block
    x_adv, x, g = _inputs((B, D), dtype, device, gen, misaligned=misaligned)
    eps, alpha = _per_sample(B, gen, device, misaligned)
    expected = ref.pgd_step(x_adv, x, g, eps, alpha, "l2")
    out = x_adv.clone()
    ro.pgd_step_(out, x, g, eps, alpha, "l2")
    torch.testing.assert_close(out.float(), expected.float(), atol=_l2_tol(dtype), rtol=0)
    start = ro.random_init(x, eps, "l2", seed=D, offset=3)
    torch.testing.assert_close(start.float(), ref.random_init(x, eps, "l2", seed=D, offset=3).float(),
                               atol=2 * ULP[dtype] + 1e-6, rtol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", ONE_PASS_D + [12289])
@pytest.mark.parametrize("misaligned", [False, True])
def test_l2_cuda_matches_cpu(dtype, D, misaligned):
    """pgd_step_ and random_init L2, one-pass and two-pass (12289), on the GPU and the CPU: the same
    formulas and draws, the per-sample sums added in another order."""
    gen = torch.Generator().manual_seed(100 + D)
    B = 300 if D <= 33 else 9
    x_adv, x, g = _inputs((B, D), dtype, "cpu", gen)
    eps, alpha = _per_sample(B, gen, "cpu")
    a = x_adv.clone()
    ro.pgd_step_(a, x, g, eps, alpha, "l2")
    xa_c, x_c, g_c = (_place(t, "cuda", misaligned) for t in (x_adv, x, g))
    ro.pgd_step_(xa_c, x_c, g_c, eps.cuda(), alpha.cuda(), "l2")
    torch.testing.assert_close(xa_c.cpu().float(), a.float(), atol=_l2_tol(dtype), rtol=0)
    for radius in ("ball", "uniform"):
        s_cpu = ro.random_init(x, eps, "l2", seed=5, offset=11, radius=radius)
        s_gpu = ro.random_init(x_c, eps.cuda(), "l2", seed=5, offset=11, radius=radius)
        torch.testing.assert_close(s_gpu.cpu().float(), s_cpu.float(), atol=2 * ULP[dtype] + 1e-5, rtol=0)


# ------------------------------------------------------------------------------ two-pass L2

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_l2_two_pass_odd_D_per_sample_params(device, dtype, layout):
    """D = 3 * 61 * 67 = 12261 (> 8192, odd: several chunks, no 16-byte loads), per-sample Tensor
    eps and alpha, fp16 / bf16 / fp32, contiguous and channels_last."""
    gen = torch.Generator().manual_seed(61)
    shape = (4, 3, 61, 67)
    fmt = torch.channels_last if layout == "channels_last" else None
    x_adv, x, g = _inputs(shape, dtype, device, gen, fmt=fmt)
    g[2] *= 1e-3
    eps, alpha = _per_sample(shape[0], gen, device)
    expected = ref.pgd_step(x_adv, x, g, eps, alpha, "l2")
    out = x_adv.clone()
    ro.pgd_step_(out, x, g, eps, alpha, "l2")
    assert out.stride() == x_adv.stride()
    torch.testing.assert_close(out.float(), expected.float(), atol=_l2_tol(dtype), rtol=0)
    start = ro.random_init(x, eps, "l2", seed=4, offset=1)
    assert start.stride() == x.stride()
    torch.testing.assert_close(start.float(), ref.random_init(x, eps, "l2", seed=4, offset=1).float(),
                               atol=2 * ULP[dtype] + 1e-6, rtol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_l2_two_pass_cuda_matches_cpu(dtype, layout):
    gen = torch.Generator().manual_seed(62)
    shape = (5, 3, 96, 97)  # D = 27936: four chunks, the last one partial
    fmt = torch.channels_last if layout == "channels_last" else None
    x_adv, x, g = _inputs(shape, dtype, "cpu", gen, fmt=fmt)
    eps, alpha = _per_sample(shape[0], gen, "cpu")
    a, b = x_adv.clone(), x_adv.cuda()
    ro.pgd_step_(a, x, g, eps, alpha, "l2")
    ro.pgd_step_(b, x.cuda(), g.cuda(), eps.cuda(), alpha.cuda(), "l2")
    torch.testing.assert_close(b.cpu().float(), a.float(), atol=_l2_tol(dtype), rtol=0)
    s_cpu = ro.random_init(x, eps, "l2", seed=9, offset=2)
    s_gpu = ro.random_init(x.cuda(), eps.cuda(), "l2", seed=9, offset=2)
    assert s_gpu.stride() == s_cpu.stride()
    torch.testing.assert_close(s_gpu.cpu().float(), s_cpu.float(), atol=2 * ULP[dtype] + 1e-5, rtol=0)


# ------------------------------------------------------------------------- misaligned views

def _all_ops(x_adv, x, g, eps, alpha):
    """Every PGD-family op on these inputs (not modified): {name: result}."""
    out = {}
    for norm in ("linf", "l2"):
        t = x_adv.clone()
        ro.pgd_step_(t, x, g, eps, alpha, norm)
        out["pgd_" + norm] = t
        out["init_" + norm] = ro.random_init(x, eps, norm, seed=2, offset=5)
    d = x_adv - x
    ro.recycle_step_(d, x, g, eps=eps, step=alpha)
    out["recycle"] = d
    for form in ("gaussian", "laplace"):
        t = x_adv.clone()
        ro.langevin_step_(t, x, g, eps, alpha, 0.05, form, seed=3, offset=1)
        out["langevin_" + form] = t
    return out


def _misaligned_copy(t):
    return _place(t, t.device, True)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 3, 8, 8), (3, 3, 64, 64)])  # D = 192 (one pass) and 12288 (two)
def test_misaligned_views_of_every_input(device, dtype, shape):
    """Every input a view one element into its buffer (eps and alpha too): the in-place ops update the
    view, and every op computes what it computes on aligned copies (the elementwise ops bit for bit)."""
    gen = torch.Generator().manual_seed(3)
    x_adv, x, g = _inputs(shape, dtype, device, gen)
    eps, alpha = _per_sample(shape[0], gen, device)
    eps, alpha = eps * 0.2, alpha * 0.1
    aligned = _all_ops(x_adv, x, g, eps, alpha)
    views = [_misaligned_copy(t) for t in (x_adv, x, g, eps, alpha)]
    assert all(v.storage_offset() == 1 for v in views)
    shifted = _all_ops(*views)
    for name, a in aligned.items():
        b = shifted[name]
        if name in ("pgd_l2", "init_l2"):  # the sums run in another order without the 16-byte loads
            torch.testing.assert_close(b.float(), a.float(), atol=_l2_tol(dtype), rtol=0, msg=name)
        else:
            assert torch.equal(b, a), name
    # in place on the view itself: the bytes before it are untouched
    buf = torch.zeros(x_adv.numel() + 1, dtype=dtype, device=device)
    view = buf[1:].view(shape)
    view.copy_(x_adv)
    ro.pgd_step_(view, *views[1:], "l2")
    torch.testing.assert_close(view.float(), aligned["pgd_l2"].float(), atol=_l2_tol(dtype), rtol=0)
    assert float(buf[0]) == 0.0


# ------------------------------------------------------------------ more than 2^31 elements

def _skip_unless_free(nbytes):
    free, _ = torch.cuda.mem_get_info()
    if free < nbytes * 1.1:
        pytest.skip(f"needs {nbytes / 2**30:.1f} GiB of free GPU memory, {free / 2**30:.1f} GiB free")


BIG = [((1 << 31) // 4096 + 1, 4096),  # 16-byte loads, one-pass L2 in a block
       ((1 << 31) + 256, 1),  # sample indices past 2^31 (per-sample eps), one-pass L2 with one lane per sample
       (53688, 40000)]  # the two-pass L2 path


@pytest.mark.cuda
@pytest.mark.parametrize("shape", BIG, ids=["D4096", "D1", "D40000"])
def test_more_than_2_31_elements(shape):
    """pgd_step_ (both norms), recycle_step_, langevin_step_ and random_init on bf16 tensors of more than
    2^31 elements: the last samples (past every 32-bit index) equal the same op on just those samples."""
    B, D = shape
    assert B * D > 1 << 31
    _skip_unless_free(4 * B * D * 2 + 2 * B * 4)
    torch.manual_seed(0)
    x = torch.rand(shape, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    eps = torch.rand(B, device="cuda") * 0.3 + 0.05
    k = 3  # the tail checked
    tail = slice(B - k, B)

    def check(big, small, name, exact=True):
        if exact:
            assert torch.equal(big[tail], small), name
        else:
            torch.testing.assert_close(big[tail].float(), small.float(), atol=_l2_tol(torch.bfloat16), rtol=0,
                                       msg=name)

    x_t, g_t, eps_t = x[tail].clone(), g[tail].clone(), eps[tail].clone()
    for norm in ("linf", "l2"):
        start = ro.random_init(x, eps, norm, seed=1, offset=2)
        start_t = ro.random_init(x_t, eps_t, norm, seed=1, offset=2 + B - k)
        check(start, start_t, "random_init " + norm, exact=norm == "linf" or D == 1)
        start_t = start[tail].clone()
        ro.pgd_step_(start, x, g, eps, 0.02, norm)
        expected = ref.pgd_step(start_t, x_t, g_t, eps_t, 0.02, norm)
        check(start, expected, "pgd_step_ " + norm, exact=False)
        del start
    delta = torch.zeros_like(x)
    ro.recycle_step_(delta, x, g, eps=eps, step=0.01)
    check(delta, ref.recycle_step(torch.zeros_like(x_t), x_t, g_t, eps_t, 0.01), "recycle_step_", exact=False)
    del delta
    xa = x.clone()
    ro.langevin_step_(xa, x, g, eps, 0.01, 0.1, "gaussian", seed=4, offset=6)
    small = x_t.clone()
    ro.langevin_step_(small, x_t, g_t, eps_t, 0.01, 0.1, "gaussian", seed=4, offset=6 + B - k)
    check(xa, small, "langevin_step_")


# ---------------------------------------------------------------------- a non-current device

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("D", [192, 12288])
def test_every_op_on_a_non_current_device(D):
    """Data on cuda:1 while cuda:0 is current: every op runs on the data's device (its guard, its
    stream, its scratch buffers) and computes what it computes on the CPU; the current device stays."""
    gen = torch.Generator().manual_seed(D)
    x_adv, x, g = _inputs((6, D), torch.float32, "cpu", gen)
    eps, alpha = _per_sample(6, gen, "cpu")
    eps, alpha = eps * 0.2, alpha * 0.1
    on_cpu = _all_ops(x_adv, x, g, eps, alpha)
    with torch.cuda.device(0):
        dev = torch.device("cuda", 1)
        on_gpu = _all_ops(*(t.to(dev) for t in (x_adv, x, g, eps, alpha)))
        offs = [torch.tensor(4, dtype=torch.int64, device=dev) for _ in range(2)]
        lv = x_adv.to(dev)
        ro.langevin_step_(lv, x.to(dev), g.to(dev), eps.to(dev), alpha.to(dev), 0.05, "laplace", seed=3, offset=offs[0])
        init = ro.random_init(x.to(dev), eps.to(dev), "l2", seed=2, offset=offs[1])
        torch.cuda.synchronize(dev)
        assert torch.cuda.current_device() == 0
    for name, a in on_cpu.items():
        b = on_gpu[name]
        assert b.device == dev, name
        torch.testing.assert_close(b.cpu(), a, atol=1e-5, rtol=0, msg=name)
    assert [int(o) for o in offs] == [10, 10]
    eager = x_adv.clone()
    ro.langevin_step_(eager, x, g, eps, alpha, 0.05, "laplace", seed=3, offset=4)
    torch.testing.assert_close(lv.cpu(), eager, atol=1e-5, rtol=0)
    torch.testing.assert_close(init.cpu(), ro.random_init(x, eps, "l2", seed=2, offset=4), atol=1e-5, rtol=0)
