"""gaussian_noise_rows and count_votes_segments_ (the many-input forms of one smoothing pass) against
gaussian_noise / count_votes_ and robustops.reference; the shared noise formula; count_votes_ at the
row / warp kernel boundary with NaN rows; misaligned views of every input of the smoothing ops; tensors
over 2^31 elements."""
import numpy as np
import pytest
import torch

import robustops as ro
from robustops import ops
from robustops import reference as ref

from conftest import devices

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(3, 3, 8, 8), (3, 3, 5, 7), (4, 10), (2, 3, 2, 3, 5), (3, 1, 4, 4)]


def _tables(device, B, R, gen):
    source = torch.randint(0, B, (R,), generator=gen)
    key = torch.randint(0, 2 ** 62, (R,), generator=gen)
    row = torch.randint(0, 10 ** 6, (R,), generator=gen)
    return source.to(device), key.to(device), row.to(device)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("in_dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("normalize", [False, True])
def test_noise_rows_draw_exactly_what_gaussian_noise_draws(device, in_dtype, out_dtype, shape, normalize):
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.rand(shape, generator=gen).to(device=device, dtype=in_dtype)
    C = shape[1]
    kw = dict(mean=torch.linspace(0.3, 0.6, C).tolist(), std=torch.linspace(0.2, 0.3, C).tolist()) if normalize else {}
    source, key, row = _tables(device, shape[0], 7, gen)
    for cl in ([False, True] if len(shape) in (4, 5) else [False]):
        out = ops.gaussian_noise_rows(x, source, key, row, 0.4, out_dtype=out_dtype, channels_last=cl, **kw)
        one = torch.cat([ops.gaussian_noise(x[s:s + 1], 1, 0.4, seed=k, offset=o, out_dtype=out_dtype, **kw)
                         for s, k, o in zip(source.tolist(), key.tolist(), row.tolist())])
        assert out.shape == one.shape and out.dtype == (out_dtype or in_dtype)
        if cl:
            assert out.is_contiguous(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
        assert torch.equal(out, one)  # bit for bit: the same kernel, formula and Philox counters
        exp = ref.gaussian_noise_rows(x, source.cpu(), key.cpu(), row.cpu(), 0.4, out_dtype=out_dtype, **kw)
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[out_dtype or in_dtype]
        torch.testing.assert_close(out.float().cpu(), exp.float(), atol=tol * 5, rtol=tol)


@pytest.mark.parametrize("device", devices())
def test_noise_rows_of_consecutive_rows_equal_one_gaussian_noise_call(device):
    x = torch.rand(3, 3, 4, 4, device=device)
    whole = ro.gaussian_noise(x, 5, 0.5, seed=11, offset=20)
    ar = torch.arange(15, device=device)
    rows = ops.gaussian_noise_rows(x, ar // 5, torch.full_like(ar, 11), 20 + ar, 0.5)
    assert torch.equal(whole, rows)


def test_noise_formula_is_one_fused_multiply_add():
    """noise_value (csrc/smoothing.h): fma(sigma, z, x), then (v - mean) / std as a product with 1/std:
    the rounding of the GPU's FFMA, on the CPU too (z read back with x = 0, sigma = 1, which is exact)."""
    x = torch.rand(32, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    z = ro.gaussian_noise(torch.zeros_like(x), 1, 1.0, seed=3).double()
    sigma, m, s = 0.37, 0.3, 0.7
    out = ro.gaussian_noise(x, 1, sigma, seed=3, mean=[m] * 3, std=[s] * 3).double()
    fused = (x.double() + np.float32(sigma).item() * z).float()  # exact product, one rounding
    expect = ((fused - np.float32(m).item()).float() * (1 / torch.tensor(s, dtype=torch.float32))).float()
    assert torch.equal(out.float(), expect)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [1, 5, 32, 33, 100])
def test_count_votes_segments_matches_reference(device, dtype, C):
    gen = torch.Generator().manual_seed(C)
    R, S = 97, 6
    logits = torch.randn(R, C, generator=gen).to(device=device, dtype=dtype)
    logits[::3] = logits[::3].round()  # ties
    logits[5] = 0
    if C > 2:
        logits[7, 2] = float("nan")
        logits[8, :] = float("nan")
        logits[9, 0] = logits[9, C - 1] = float("nan")
    segment = torch.randint(0, S, (R,), generator=gen).to(device)
    counts = torch.randint(0, 5, (S, C), generator=gen).to(device)
    exp = ref.count_votes_segments(logits.cpu(), segment.cpu(), counts.cpu())
    out = counts.clone()
    ops.count_votes_segments_(logits, segment, out)
    assert torch.equal(out.cpu(), exp)
    # contiguous segments give count_votes_'s answer
    seg = torch.arange(R - R % S, device=device) // ((R - R % S) // S)
    a, b = counts.clone(), counts.clone()
    ops.count_votes_segments_(logits[:len(seg)], seg, a)
    ro.count_votes_(logits[:len(seg)], b)
    assert torch.equal(a, b)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("C", [32, 33])
@pytest.mark.parametrize("dtype", DTYPES)
def test_count_votes_at_the_warp_boundary_with_nan_rows(device, C, dtype):
    """C = 32 is the last class count of the row kernel, 33 the first of the warp kernel (CUDA)."""
    gen = torch.Generator().manual_seed(C)
    B, num = 4, 45
    logits = torch.randn(B * num, C, generator=gen).to(dtype)
    logits[0] = float("nan")  # all NaN: column 0 (the first NaN)
    logits[1, C - 1] = float("nan")  # NaN in the last lane
    logits[2, 31 % C] = float("nan")
    logits[3, [3, 17]] = float("nan")  # the first NaN wins
    logits[4, C - 1] = 1e4  # the maximum in the 33rd column (C = 33: the second pass of lane 0)
    logits[5] = 1.0  # all tied: column 0
    logits = logits.to(device)
    counts = torch.zeros(B, C, dtype=torch.long, device=device)
    ro.count_votes_(logits, counts)
    exp = ref.count_votes(logits.cpu(), torch.zeros(B, C, dtype=torch.long))
    assert torch.equal(counts.cpu(), exp)
    seg = torch.zeros(B, C, dtype=torch.long, device=device)
    ops.count_votes_segments_(logits, torch.arange(B * num, device=device) // num, seg)
    assert torch.equal(seg.cpu(), exp)


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """t's values in a view that starts one element into its storage (not 16-byte aligned)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    v = buf[1:].view(t.shape)
    v.copy_(t)
    return v


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_misaligned_views_of_every_smoothing_input(device, dtype):
    x = torch.rand(3, 3, 4, 4, device=device).to(dtype)
    mean = torch.tensor([0.4, 0.5, 0.6], device=device)
    std = torch.tensor([0.2, 0.25, 0.3], device=device)
    xm, mm, sm_ = _misaligned(x), _misaligned(mean), _misaligned(std)
    assert xm.data_ptr() % 16 != 0
    for cl in (False, True):
        a = ro.gaussian_noise(x, 4, 0.5, seed=2, offset=3, mean=mean, std=std, channels_last=cl)
        b = ro.gaussian_noise(xm, 4, 0.5, seed=2, offset=3, mean=mm, std=sm_, channels_last=cl)
        assert torch.equal(a, b)
        off = _misaligned(torch.tensor([3], dtype=torch.int64, device=device)).reshape(())
        c = ro.gaussian_noise(xm, 4, 0.5, seed=2, offset=off, mean=mm, std=sm_, channels_last=cl)
        assert torch.equal(a, c) and int(off) == 3 + 12
        ar = torch.arange(12, device=device)
        src, key, row = ar // 4, torch.full_like(ar, 2), 3 + ar
        d = ops.gaussian_noise_rows(xm, _misaligned(src), _misaligned(key), _misaligned(row), 0.5, mean=mm, std=sm_,
                                    channels_last=cl)
        assert torch.equal(a, d)
    logits = torch.randn(12, 5, device=device).to(dtype)
    counts = torch.zeros(3, 5, dtype=torch.long, device=device)
    ro.count_votes_(logits, counts)
    cm = _misaligned(torch.zeros(3, 5, dtype=torch.long, device=device))
    ro.count_votes_(_misaligned(logits), cm)
    assert torch.equal(cm, counts)
    cs = _misaligned(torch.zeros(3, 5, dtype=torch.long, device=device))
    ops.count_votes_segments_(_misaligned(logits), _misaligned(torch.arange(12, device=device) // 4), cs)
    assert torch.equal(cs, counts)


def test_new_ops_bad_inputs():
    x = torch.rand(2, 3, 4, 4)
    ar = torch.arange(4)
    with pytest.raises(TypeError, match=r"source must be a 1-D int64 tensor \[R\]"):
        ops.gaussian_noise_rows(x, ar.int(), ar, ar, 0.5)
    with pytest.raises(ValueError, match=r"row must have as many rows as source \(4\)"):
        ops.gaussian_noise_rows(x, ar % 2, ar, ar[:3], 0.5)
    with pytest.raises(RuntimeError, match=r"source\[2\] must index a row of x \(0 <= source < 2\), got 2"):
        ops.gaussian_noise_rows(x, ar, ar, ar, 0.5)
    with pytest.raises(RuntimeError, match=r"row\[0\] must be >= 0"):
        ops.gaussian_noise_rows(x, ar % 2, ar, ar - 1, 0.5)
    with pytest.raises(ValueError, match="sigma must be a finite float >= 0"):
        ops.gaussian_noise_rows(x, ar % 2, ar, ar, -1.0)
    logits = torch.randn(4, 3)
    counts = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"segment\[1\] must index a row of counts \(0 <= segment < 2\), got 5"):
        ops.count_votes_segments_(logits, torch.tensor([0, 5, 1, 1]), counts)
    assert int(counts.sum()) == 0  # a bad call changes nothing
    with pytest.raises(ValueError, match=r"segment must have as many rows as logits \(4\)"):
        ops.count_votes_segments_(logits, torch.tensor([0, 1]), counts)
    with pytest.raises(ValueError, match="logits has 3 classes but counts has 4"):
        ops.count_votes_segments_(logits, ar % 2, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="counts must not overlap itself"):
        ops.count_votes_segments_(logits, ar % 2, torch.zeros(1, 3, dtype=torch.long).expand(2, 3))
    with pytest.raises(RuntimeError, match="segment must be a 1-D int64 tensor"):
        torch.ops.robustops.count_votes_segments_(logits, (ar % 2).int(), counts)
    # no rows: nothing to do
    empty = ops.gaussian_noise_rows(x, ar[:0], ar[:0], ar[:0], 0.5)
    assert empty.shape == (0, 3, 4, 4)
    ops.count_votes_segments_(torch.randn(0, 3), ar[:0], counts)


@pytest.mark.parametrize("device", devices())
def test_new_ops_opcheck_and_compile(device):
    x = torch.rand(2, 3, 4, 4, device=device)
    mean = torch.tensor([0.4, 0.5, 0.6], device=device)
    std = torch.tensor([0.2, 0.2, 0.3], device=device)
    ar = torch.arange(6, device=device)
    tables = (ar % 2, ar + 100, ar * 3)
    torch.library.opcheck(torch.ops.robustops.gaussian_noise_rows, (x, *tables, 0.5, mean, std, torch.bfloat16, True))
    torch.library.opcheck(torch.ops.robustops.gaussian_noise_rows, (x.half(), *tables, 0.5, None, None, None, False))
    logits = torch.randn(6, 5, device=device)
    counts = torch.zeros(3, 5, dtype=torch.long, device=device)
    torch.library.opcheck(torch.ops.robustops.count_votes_segments_, (logits, ar // 2, counts))

    def step(x, source, key, row, segment, w, counts):
        noisy = ops.gaussian_noise_rows(x, source, key, row, 0.5, mean=[0.5] * 3, std=[0.25] * 3)
        ops.count_votes_segments_(noisy.flatten(1) @ w, segment, counts)
        return counts

    w = torch.randn(48, 5, device=device)
    args = (x, *tables, ar // 2, w)
    eager = step(*args, torch.zeros(3, 5, dtype=torch.long, device=device))
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    assert torch.equal(eager, compiled(*args, torch.zeros(3, 5, dtype=torch.long, device=device)))


def _free_gpu_bytes() -> int:
    return torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else 0


@pytest.mark.cuda
@pytest.mark.parametrize("C", [10, 40])
def test_count_votes_over_2_31_elements(C):
    """logits [R, C] with R * C > 2^31 (fp16, 4.3 GB): the row offsets and the vote keys are 64-bit."""
    R = (2 ** 31) // C + 4096
    if _free_gpu_bytes() < R * C * 2 + (1 << 30):
        pytest.skip("not enough free GPU memory for a tensor over 2^31 elements")
    logits = torch.zeros(R, C, dtype=torch.float16, device="cuda")
    cls = torch.arange(R, device="cuda") % C
    logits[torch.arange(R, device="cuda"), cls] = 1.0
    logits[-1, C - 1] = float("nan")  # the last row: its first NaN is column C - 1 (already the vote)
    B = 4
    R -= R % B
    counts = torch.zeros(B, C, dtype=torch.long, device="cuda")
    ro.count_votes_(logits[:R], counts)
    exp = torch.stack([torch.bincount(cls[b * (R // B):(b + 1) * (R // B)], minlength=C) for b in range(B)])
    assert torch.equal(counts, exp)
    seg = torch.zeros(B, C, dtype=torch.long, device="cuda")
    ops.count_votes_segments_(logits[:R], torch.arange(R, device="cuda") // (R // B), seg)
    assert torch.equal(seg, exp)
