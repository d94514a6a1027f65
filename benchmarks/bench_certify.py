"""Randomized-smoothing CERTIFY: Cohen et al.'s per-input loop against robustops.smoothing, side by side,
with the model's forward-only bound; and the two smoothing ops alone against copy bandwidth.

- cohen: the loop of Cohen et al.'s `core.Smooth`, re-implemented here: per input and per batch,
  x.repeat(batch), randn_like * sigma, forward (a Normalize layer in front of the network), argmax,
  .cpu(), numpy bincount; one host sync per batch. fp32.
- robustops fp32 / bf16+channels_last: Smooth.certify on all images in one call: gaussian_noise writes
  the normalized noisy batch, count_votes_ counts on the device, one host sync per call.
- forward bound: the network alone (no noise, no counting, no normalization) on a ready batch of
  `batch` inputs in the same dtype / layout, times (N0 + N) / batch per image: what certification
  costs if everything but the forward pass were free.
- gaussian_noise / count_votes_ alone on large tensors, in GB/s and as a fraction of the copy
  bandwidth (read + write) of a large tensor copy measured in the same run; eager PyTorch beside them.

    python benchmarks/bench_certify.py                                   # GPU: N0=100, N=100000, batch 400
    python benchmarks/bench_certify.py --device cpu --N 300 --images 2   # CPU at a small N

Rows are appended to benchmarks/results/certify.csv with the device name and date.
"""
from __future__ import annotations

import copy
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # benchmarks/common.py and the source tree
import robustops as ro  # noqa: E402
from robustops import models, smoothing  # noqa: E402
from robustops.data import CIFAR10_MEAN, CIFAR10_STD  # noqa: E402
from common import bench, copy_bandwidth, finish, parser, setup  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ------------------------------------------------------------------------- Cohen et al.'s loop

def cohen_sample(model, x, num, batch_size, sigma, num_classes):
    """Votes of num noisy copies of one input x [C, H, W], Cohen et al.'s way."""
    counts = np.zeros(num_classes, dtype=np.int64)
    remaining = num
    with torch.no_grad():
        while remaining > 0:
            this = min(batch_size, remaining)
            remaining -= this
            batch = x.repeat((this, 1, 1, 1))
            noise = torch.randn_like(batch) * sigma
            predictions = model(batch + noise).argmax(1)
            counts += np.bincount(predictions.cpu().numpy(), minlength=num_classes)
    return counts


def cohen_certify(model, x, n0, n, alpha, batch_size, sigma, num_classes):
    """Cohen et al.'s CERTIFY of one input: (prediction, radius)."""
    c_a = int(cohen_sample(model, x, n0, batch_size, sigma, num_classes).argmax())
    n_a = int(cohen_sample(model, x, n, batch_size, sigma, num_classes)[c_a])
    p_a = float(smoothing.clopper_pearson_lower(n_a, n, alpha))
    if p_a < 0.5:
        return -1, 0.0
    from scipy.stats import norm

    return c_a, sigma * float(norm.ppf(p_a))


# ---------------------------------------------------------------------------------- helpers

def timed(fn, device: str, repeats: int) -> float:
    """Fastest wall seconds of fn() over repeats runs (each run is long: no event timing needed). The
    minimum, not the median: on a shared machine the noise only ever adds time."""
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def row(stamp, args, **kw):
    base = dict(**stamp, bench="", provider="", model=args.model, N0=args.N0, N=args.N,
                batch=args.batch, images=args.images, s_per_image="", vs_cohen="", vs_forward_bound="",
                gb_per_s="", fraction_of_copy="", copy_gb_per_s="")
    base.update(kw)
    return base


def main(argv=None):
    p = parser(__doc__, "certify.csv")
    p.add_argument("--model", default="resnet110", help="a robustops.models name (random weights; default resnet110)")
    p.add_argument("--N0", type=int, default=100)
    p.add_argument("--N", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=400)
    p.add_argument("--images", type=int, default=2, help="CIFAR-sized inputs certified per provider (default 2)")
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per certify figure, interleaved across "
                                                           "providers (the fastest counts; default 3)")
    p.add_argument("--modes", default="fp32,bf16_cl", help="robustops modes: fp32, bf16_cl (bf16 autocast + "
                                                          "channels_last)")
    p.add_argument("--no-cohen", action="store_true", help="skip the (slow) Cohen baseline")
    p.add_argument("--no-ops", action="store_true", help="skip the op bandwidth figures")
    p.add_argument("--op-elems", type=int, default=None,
                   help="elements of the noisy output in the op benchmark (default 2^26 GPU, 2^23 CPU)")
    args = p.parse_args(argv)
    dev = args.device
    stamp = setup(args)
    torch.manual_seed(0)
    bw = copy_bandwidth(dev)
    print(f"device: {stamp['device']}; copy bandwidth (read + write): {bw / 1e9:.1f} GB/s; torch {torch.__version__}")
    print(f"model {args.model} (random weights), N0 {args.N0}, N {args.N}, batch {args.batch}, "
          f"{args.images} images, sigma {args.sigma}")
    rows = []
    C = 10
    net = models.get_model(args.model, num_classes=C).to(dev).eval()
    full = nn.Sequential(models.Normalize(CIFAR10_MEAN, CIFAR10_STD), net).to(dev).eval()
    x = torch.rand(args.images, 3, 32, 32, device=dev)
    per_image = (args.N0 + args.N) / args.batch  # forward passes per image

    # Providers of a figure in seconds per image, timed in turn in every repeat (interleaved, so that a
    # change in the machine's load hits them alike); the fastest repeat counts.
    modes = args.modes.split(",")
    providers = {}
    for mode in modes:
        cl = mode == "bf16_cl"
        m = copy.deepcopy(net)
        xb = torch.rand(args.batch, 3, 32, 32, device=dev)
        if cl:
            m = m.to(memory_format=torch.channels_last)
            xb = xb.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)

        def fwd(m=m, xb=xb, cl=cl):
            with torch.inference_mode(), torch.autocast(dev.split(":")[0], dtype=torch.bfloat16, enabled=cl):
                m(xb)
        fwd()
        # One forward pass of a full batch, scaled to the passes an image needs.
        providers[f"forward_bound_{mode}"] = (lambda fwd=fwd: timed(fwd, dev, 3) * per_image)
    if not args.no_cohen:
        cohen_certify(full, x[0], 2, args.batch, args.alpha, args.batch, args.sigma, C)  # warm-up

        def cohen():
            for i in range(args.images):
                cohen_certify(full, x[i], args.N0, args.N, args.alpha, args.batch, args.sigma, C)
        providers["cohen_fp32"] = lambda: timed(cohen, dev, 1) / args.images
    for mode in modes:
        cl = mode == "bf16_cl"
        smooth = smoothing.Smooth(copy.deepcopy(net), C, args.sigma, mean=CIFAR10_MEAN, std=CIFAR10_STD,
                                  autocast="bf16" if cl else None, channels_last=cl)
        smooth.certify(x, 2, args.batch, args.alpha, args.batch, seed=0)  # warm-up
        providers[f"robustops_{mode}"] = (lambda smooth=smooth: timed(
            lambda: smooth.certify(x, args.N0, args.N, args.alpha, args.batch, seed=1), dev, 1) / args.images)
    best = {k: float("inf") for k in providers}
    for _ in range(args.repeats):
        for k, fn in providers.items():
            best[k] = min(best[k], fn())
    t_cohen = best.get("cohen_fp32")
    for k, t in best.items():
        mode = k.split("_", 1)[1] if k.startswith("robustops_") else None
        bound = best.get(f"forward_bound_{mode}") if mode else (best.get("forward_bound_fp32")
                                                                 if k == "cohen_fp32" else None)
        notes = []
        if bound and not k.startswith("forward_bound"):
            notes.append(f"{t / bound:.3f}x its forward bound")
        if t_cohen and k.startswith("robustops"):
            notes.append(f"{t_cohen / t:.2f}x faster than Cohen")
        print(f"{k:>26}: {t:9.3f} s/image" + (f"  ({', '.join(notes)})" if notes else ""))
        rows.append(row(stamp, args, bench="certify", provider=k, s_per_image=round(t, 5),
                        vs_cohen=round(t_cohen / t, 3) if t_cohen and not k.startswith("forward_bound") else "",
                        vs_forward_bound=round(t / bound, 4) if bound and not k.startswith("forward_bound") else ""))

    # the ops alone
    if not args.no_ops:
        elems = args.op_elems or (1 << 26 if dev.startswith("cuda") else 1 << 23)
        D = 3 * 32 * 32
        num = max(1, elems // D)
        xs = torch.rand(1, 3, 32, 32, device=dev)
        mean, std = list(CIFAR10_MEAN), list(CIFAR10_STD)
        mean_t = torch.tensor(mean, device=dev).view(1, 3, 1, 1)
        std_t = torch.tensor(std, device=dev).view(1, 3, 1, 1)
        R = elems // C
        counts = torch.zeros(1, C, dtype=torch.int64, device=dev)
        print(f"{'op':>26} {'provider':>10} {'time':>11} {'GB/s':>8} {'of copy':>8}")

        def time_op(op, dtype, providers, nbytes, rows_per_call):
            for prov, fn in providers.items():
                t = bench(fn, dev, min_time=0.5)
                dt = str(dtype).split(".")[-1]
                print(f"{op + ' ' + dt:>26} {prov:>10} {t * 1e3:9.3f}ms {nbytes / t / 1e9:8.1f} {nbytes / t / bw:8.1%}")
                rows.append(row(stamp, args, bench="op", provider=f"{op.rstrip('_')}_{dt}_{prov}",
                                N0="", N="", batch=rows_per_call, images=1, gb_per_s=round(nbytes / t / 1e9, 2),
                                fraction_of_copy=round(nbytes / t / bw, 4), copy_gb_per_s=round(bw / 1e9, 2)))

        for out_dtype in (torch.float32, torch.bfloat16):
            def eager_noise(out_dtype=out_dtype):
                b = xs.repeat((num, 1, 1, 1))
                return ((b + torch.randn_like(b) * args.sigma - mean_t) / std_t).to(out_dtype)
            # Bytes: the noisy output written plus the (tiny) input read.
            time_op("gaussian_noise", out_dtype, {
                "eager": eager_noise,
                "robustops": lambda out_dtype=out_dtype: ro.gaussian_noise(xs, num, args.sigma, seed=0, mean=mean,
                                                                            std=std, out_dtype=out_dtype),
            }, num * D * torch.finfo(out_dtype).bits // 8 + xs.numel() * 4, num)
            logits = torch.randn(R, C, device=dev).to(out_dtype)
            # Bytes: the logits read (the counts are tiny).
            time_op("count_votes_", out_dtype, {
                "eager": lambda logits=logits: counts.add_(torch.bincount(logits.argmax(1), minlength=C)),
                "robustops": lambda logits=logits: ro.count_votes_(logits, counts),
            }, logits.numel() * logits.element_size(), R)
    finish(args, rows)


if __name__ == "__main__":
    main()
