"""gaussian_noise and count_votes_ against robustops.reference, plus the statistics of the noise."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

import robustops as ro
from robustops import reference as ref

from conftest import devices

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ULP = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
SHAPES = [(2, 3, 8, 8), (3, 3, 5, 7), (1, 1, 8, 8), (4, 10), (2, 3, 2, 3, 5), (5, 7)]


def _layouts(shape):
    return [False, True] if len(shape) in (4, 5) else [False]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("in_dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("normalize", [False, True])
def test_gaussian_noise_matches_reference(device, in_dtype, out_dtype, shape, normalize):
    x = torch.rand(shape).to(device=device, dtype=in_dtype)
    C = shape[1]
    mean = torch.linspace(0.3, 0.6, C).tolist() if normalize else None
    std = torch.linspace(0.2, 0.3, C).tolist() if normalize else None
    for cl in _layouts(shape):
        out = ro.gaussian_noise(x, 5, 0.25, seed=42, offset=7, mean=mean, std=std, out_dtype=out_dtype,
                                channels_last=cl)
        exp = ref.gaussian_noise(x, 5, 0.25, seed=42, offset=7, mean=mean, std=std, out_dtype=out_dtype,
                                 channels_last=cl)
        assert out.shape == exp.shape and out.dtype == exp.dtype
        if cl:
            fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
            assert out.is_contiguous(memory_format=fmt)
        else:
            assert out.is_contiguous()
        od = out_dtype or in_dtype
        torch.testing.assert_close(out.float(), exp.float(), atol=ULP[od] * (5 if normalize else 2), rtol=ULP[od])


def test_gaussian_noise_channels_last_input_is_fine():
    x = torch.rand(2, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ro.gaussian_noise(x, 3, 0.5, seed=1), ref.gaussian_noise(x, 3, 0.5, seed=1),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("device", devices())
def test_gaussian_noise_is_independent_of_the_batch_split(device):
    x = torch.rand(6, 3, 4, 4, device=device)
    whole = ro.gaussian_noise(x, 8, 0.5, seed=9)
    parts = torch.cat([ro.gaussian_noise(x[:2], 8, 0.5, seed=9),
                       ro.gaussian_noise(x[2:5], 8, 0.5, seed=9, offset=16),
                       ro.gaussian_noise(x[5:], 8, 0.5, seed=9, offset=40)])
    assert torch.equal(whole, parts)
    # One input's 8 draws split as 3 + 5 noisy copies.
    one = ro.gaussian_noise(x[:1], 8, 0.5, seed=9)
    split = torch.cat([ro.gaussian_noise(x[:1], 3, 0.5, seed=9), ro.gaussian_noise(x[:1], 5, 0.5, seed=9, offset=3)])
    assert torch.equal(one, split)


@pytest.mark.cuda
def test_gaussian_noise_same_on_cpu_and_cuda():
    x = torch.rand(4, 3, 32, 32)
    a = ro.gaussian_noise(x, 16, 0.5, seed=3, offset=5, mean=[0.5] * 3, std=[0.25] * 3)
    b = ro.gaussian_noise(x.cuda(), 16, 0.5, seed=3, offset=5, mean=[0.5] * 3, std=[0.25] * 3, channels_last=True)
    torch.testing.assert_close(a, b.cpu(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", devices())
def test_gaussian_noise_statistics(device):
    sigma = 0.7
    x = torch.rand(8, 3, 16, 16, device=device)
    out = ro.gaussian_noise(x, 64, sigma, seed=123)
    z = ((out - x.repeat_interleave(64, 0)) / sigma).double().cpu()
    flat = z.flatten().numpy()
    assert abs(flat.mean()) < 5 / math.sqrt(flat.size)
    assert abs(flat.var() - 1) < 0.01
    assert stats.kstest(flat[::7], "norm").pvalue > 1e-3
    # Independence: across noisy copies of one input, across inputs, and across neighbouring elements
    # (in particular within one Box-Muller pair and one Philox group).
    rows = z.flatten(1).numpy()
    assert abs(np.corrcoef(rows[0], rows[1])[0, 1]) < 0.1
    assert abs(np.corrcoef(rows[0], rows[64])[0, 1]) < 0.1
    for lag in (1, 2, 3, 4):
        c = np.corrcoef(rows[:, :-lag].ravel(), rows[:, lag:].ravel())[0, 1]
        assert abs(c) < 0.01, (lag, c)
    # Per-element standard deviation across copies is sigma everywhere.
    per_elem = z[:64].std(0)
    assert float((per_elem - 1).abs().max()) < 0.5


def test_gaussian_noise_seeds():
    x = torch.rand(2, 5)
    assert torch.equal(ro.gaussian_noise(x, 3, 1.0, seed=1), ro.gaussian_noise(x, 3, 1.0, seed=1))
    assert not torch.equal(ro.gaussian_noise(x, 3, 1.0, seed=1), ro.gaussian_noise(x, 3, 1.0, seed=2))
    torch.manual_seed(5)
    a = ro.gaussian_noise(x, 3, 1.0)
    torch.manual_seed(5)
    assert torch.equal(a, ro.gaussian_noise(x, 3, 1.0))
    assert torch.equal(ro.gaussian_noise(x, 3, 0.0, seed=1), x.repeat_interleave(3, 0))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [1, 2, 10, 33, 100])
def test_count_votes_matches_bincount_argmax(device, dtype, C):
    B, num = 5, 37
    logits = torch.randn(B * num, C).to(device=device, dtype=dtype)
    # Ties, and rows where several classes share the maximum.
    logits[::4] = logits[::4].round()
    logits[3] = 0
    counts = torch.randint(0, 5, (B, C), device=device)
    expected = counts + torch.stack([torch.bincount(r, minlength=C)
                                     for r in logits.float().argmax(1).reshape(B, num)])
    assert torch.equal(ref.count_votes(logits, counts), expected)
    out = counts.clone()
    ro.count_votes_(logits, out)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("C", [3, 50])
def test_count_votes_nan_like_argmax(device, C):
    logits = torch.randn(8, C, device=device)
    logits[1, 2] = float("nan")
    logits[5, 0] = float("nan")
    logits[5, 1] = float("nan")
    logits[6] = float("nan")
    counts = torch.zeros(2, C, dtype=torch.long, device=device)
    ro.count_votes_(logits, counts)
    assert torch.equal(counts, ref.count_votes(logits, torch.zeros_like(counts)))


@pytest.mark.parametrize("device", devices())
def test_count_votes_accumulates_and_strided_counts(device):
    logits = torch.randn(12, 4, device=device)
    big = torch.zeros(3, 8, dtype=torch.long, device=device)
    counts = big[:, ::2]  # a strided view of a larger tensor
    ro.count_votes_(logits, counts)
    ro.count_votes_(logits, counts)
    assert torch.equal(counts, 2 * ref.count_votes(logits, torch.zeros(3, 4, dtype=torch.long, device=device)))
    assert int(big[:, 1::2].abs().sum()) == 0


def test_smoothing_ops_bad_inputs():
    x = torch.rand(2, 3, 4, 4)
    with pytest.raises(ValueError, match="num must be an int >= 1"):
        ro.gaussian_noise(x, 0, 0.5)
    with pytest.raises(ValueError, match="sigma must be a finite float >= 0"):
        ro.gaussian_noise(x, 2, -0.5)
    with pytest.raises(ValueError, match="sigma must be a finite float >= 0"):
        ro.gaussian_noise(x, 2, float("inf"))
    with pytest.raises(RuntimeError, match="sigma must be a finite number >= 0"):
        torch.ops.robustops.gaussian_noise(x, 2, float("inf"), 0, 0, None, None, None, False)
    with pytest.raises(ValueError, match=r"mean must be a float or a sequence / Tensor\[C\] with C = 3"):
        ro.gaussian_noise(x, 2, 0.5, mean=[0.1, 0.2])
    with pytest.raises(ValueError, match="std must be > 0"):
        ro.gaussian_noise(x, 2, 0.5, std=[0.1, 0.0, 0.2])
    with pytest.raises(TypeError, match="out_dtype must be float32, float16 or bfloat16"):
        ro.gaussian_noise(x, 2, 0.5, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="channels_last needs a 4-D or 5-D x"):
        ro.gaussian_noise(torch.rand(2, 3), 2, 0.5, channels_last=True)
    logits = torch.randn(6, 4)
    with pytest.raises(TypeError, match="counts must be an int64 tensor"):
        ro.count_votes_(logits, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="logits has 4 classes but counts has 5"):
        ro.count_votes_(logits, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"logits rows \(6\) must be a multiple of counts rows \(B = 4\)"):
        ro.count_votes_(logits, torch.zeros(4, 4, dtype=torch.long))
    with pytest.raises(RuntimeError, match="counts must be int64"):
        torch.ops.robustops.count_votes_(logits, torch.zeros(2, 4))
    # an expanded counts would add every vote into one element
    with pytest.raises(ValueError, match="counts must not overlap itself"):
        ro.count_votes_(logits, torch.zeros(1, 4, dtype=torch.long).expand(2, 4))
    with pytest.raises(RuntimeError, match="counts must not overlap itself"):
        torch.ops.robustops.count_votes_(logits, torch.zeros(1, 4, dtype=torch.long).expand(2, 4))
    # B = 0: nothing to count, no error
    empty = torch.zeros(0, 4, dtype=torch.long)
    assert ro.count_votes_(torch.randn(0, 4), empty) is empty
    torch.ops.robustops.count_votes_(torch.randn(0, 4), empty)


@pytest.mark.parametrize("device", devices())
def test_smoothing_ops_opcheck_and_compile(device):
    x = torch.rand(2, 3, 4, 4, device=device)
    mean = torch.tensor([0.4, 0.5, 0.6], device=device)
    std = torch.tensor([0.2, 0.2, 0.3], device=device)
    torch.library.opcheck(torch.ops.robustops.gaussian_noise, (x, 3, 0.5, 1, 0, mean, std, torch.bfloat16, True))
    torch.library.opcheck(torch.ops.robustops.gaussian_noise, (x.half(), 2, 0.5, 1, 4, None, None, None, False))
    logits = torch.randn(6, 5, device=device)
    counts = torch.zeros(2, 5, dtype=torch.long, device=device)
    torch.library.opcheck(torch.ops.robustops.count_votes_, (logits, counts))

    def step(x, w, counts):
        noisy = ro.gaussian_noise(x, 4, 0.5, seed=0, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
        logits = noisy.flatten(1) @ w
        ro.count_votes_(logits, counts)
        return counts

    w = torch.randn(48, 5, device=device)
    c_eager = step(x, w, torch.zeros(2, 5, dtype=torch.long, device=device))
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    c_comp = compiled(x, w, torch.zeros(2, 5, dtype=torch.long, device=device))
    assert torch.equal(c_eager, c_comp)
