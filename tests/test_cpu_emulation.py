"""The CPU's device emulation (ROBUSTOPS_CPU_SCALAR=1: every element through the shared RO_HD
formulas the CUDA kernels run) against the default vector loops, for every op, dtype and layout,
with parameters that are not powers of two (where an unfused a*b + c would round apart from a
fused one; the host code is built with -ffp-contract=off so that only the formulas' explicit fmaf
fuse, as on the device). Bitwise where both run the same operations in the same order; otherwise
within the documented difference (the L2 step's per-sample sums, the vector Box-Muller)."""
import pytest
import torch

import robustops as ro

AVX = ro.build_info()["cpu_capability"] != "baseline"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(5, 3, 7, 9), (3, 2, 67, 69)]  # scalar tails everywhere; D > 8192, odd


def _both(monkeypatch, fn):
    monkeypatch.delenv("ROBUSTOPS_CPU_SCALAR", raising=False)
    vec = fn()
    monkeypatch.setenv("ROBUSTOPS_CPU_SCALAR", "1")
    try:
        scalar = fn()
    finally:
        monkeypatch.delenv("ROBUSTOPS_CPU_SCALAR")
    return vec, scalar


def _case(shape, dtype, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    B = shape[0]
    x = torch.rand(shape, generator=gen)
    xa = (x + 0.1 * torch.randn(shape, generator=gen)).clamp(0, 1)
    g = torch.randn(shape, generator=gen) * torch.logspace(-20, 2, B).view(B, 1, 1, 1)
    g.view(-1)[::97] = 0.0
    x, xa, g = (t.to(dtype).contiguous(memory_format=fmt) for t in (x, xa, g))
    eps = torch.rand(B, generator=gen) * 0.3 + 0.013
    alpha = torch.rand(B, generator=gen) * 0.07 + 0.0011
    return x, xa, g, eps, alpha


def _same(vec, scalar, exact: bool, atol: float = 0.0):
    assert vec.stride() == scalar.stride()
    if exact and AVX:
        assert torch.equal(vec, scalar), float((vec.float() - scalar.float()).abs().max())
    else:
        torch.testing.assert_close(vec.float(), scalar.float(), atol=atol, rtol=0)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_pgd_family_emulation_equals_the_vector_loops(monkeypatch, shape, dtype, layout):
    x, xa, g, eps, alpha = _case(shape, dtype, layout, 3)
    ulp = torch.finfo(dtype).eps

    def step(norm, e, a):
        def run():
            out = xa.clone(memory_format=torch.preserve_format)
            ro.pgd_step_(out, x, g, e, a, norm, 0.0, 1.0)
            return out
        return run

    for e, a in ((0.0314, 0.0077), (eps, alpha)):
        _same(*_both(monkeypatch, step("linf", e, a)), exact=True)
        # the per-sample sums are accumulated in another order: the factors agree to an ulp
        _same(*_both(monkeypatch, step("l2", 3 * e, 7 * a)), exact=False, atol=2 * ulp)

    def recycle():
        d = (xa.float() - x.float()).to(dtype)  # x's layout
        ro.recycle_step_(d, x, g, eps=eps, step=alpha, lo=0.0, hi=1.0)
        return d

    _same(*_both(monkeypatch, recycle), exact=True)
    for form in ("gaussian", "laplace"):
        def langevin():
            out = xa.clone(memory_format=torch.preserve_format)
            ro.langevin_step_(out, x, g, eps, alpha, 0.3, form, 0.0, 1.0, seed=5, offset=9)
            return out

        _same(*_both(monkeypatch, langevin), exact=True)
    for norm, radius in (("linf", "ball"), ("l2", "ball"), ("l2", "uniform")):
        for e in (0.0314, eps, 1.7):
            _same(*_both(monkeypatch, lambda: ro.random_init(x, e, norm, 0.0, 1.0, seed=7, offset=3,
                                                             radius=radius)), exact=True)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_noise_and_votes_emulation_equals_the_vector_loops(monkeypatch, dtype, channels_last):
    x, _, _, _, _ = _case((4, 3, 9, 11), dtype, "contiguous", 8)
    mean, std = [0.49, 0.48, 0.45], [0.247, 0.243, 0.261]
    for sigma in (0.3, 0.12):
        for kw in ({}, {"mean": mean, "std": std}):
            for out_dtype in (None, torch.float32):
                vec, scalar = _both(monkeypatch, lambda: ro.gaussian_noise(
                    x, 5, sigma, seed=2, offset=11, out_dtype=out_dtype, channels_last=channels_last, **kw))
                # only the Box-Muller differs (~2e-6 per unit radius); the output formula is shared
                scale = sigma / (min(std) if kw else 1.0)
                out_ulp = torch.finfo(vec.dtype).eps * 2 * float(scalar.float().abs().max())
                _same(vec, scalar, exact=False, atol=4e-6 * scale + out_ulp)
    for C in (2, 10, 33):
        gen = torch.Generator().manual_seed(C)
        logits = torch.randn(3 * 17, C, generator=gen).to(dtype)
        logits[::5, C - 1] = float("nan")
        logits[2::7] = 0.0  # ties go to the lowest index

        def votes():
            counts = torch.zeros(3, C, dtype=torch.int64)
            return ro.count_votes_(logits, counts)

        vec, scalar = _both(monkeypatch, votes)
        assert torch.equal(vec, scalar)
