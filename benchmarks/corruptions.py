"""Time per image of every registered corruption (``robustops.corruptions.corrupt``, batched: CPU, and
CUDA when present) beside the reference library, ``imagecorruptions`` (numpy / OpenCV / numba, one image
per call), on 32 x 32 colour images (upsampled digits on random backgrounds, 8-bit levels).

The baseline is printed beside each figure: reference microseconds per image, ours per image, and the
ratio (reference / ours: > 1 means ours is faster). Caveats: imagecorruptions carries ImageNet-C's
constants, ours CIFAR-10-C's, so where a constant sets the work (glass blur's passes and move range,
motion blur's kernel length, zoom blur's number of zooms) the two do different amounts of it; the
reference's first call (numba's compile of glass blur) is left out of its timing. Each row is appended
to benchmarks/results/corruptions.csv as soon as it is measured (unless --no-csv).

    python benchmarks/corruptions.py --quick      # severity 3, batch 64: under a minute on 2 CPU cores
    python benchmarks/corruptions.py              # severities 1, 3, 5, batch 512
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from common import append_csv, bench, parser, setup

import robustops.corruptions as C
from robustops.data import load_digits


def images(n: int) -> torch.Tensor:
    """n smooth 32 x 32 colour images on 8-bit levels."""
    d = load_digits("test").tensors[0]
    d = d[torch.arange(n) % d.shape[0]].float()
    g = torch.Generator().manual_seed(0)
    up = F.interpolate(d, size=32, mode="bilinear", align_corners=False)
    fg, bg = torch.rand(n, 3, 1, 1, generator=g), torch.rand(n, 3, 1, 1, generator=g)
    return torch.round((bg + (fg - bg) * up).clamp(0, 1) * 255) / 255


def reference_us(name: str, severity: int, imgs: list, min_time: float) -> float:
    """imagecorruptions' microseconds per image (median over passes of the list), after one warm-up call."""
    from imagecorruptions import corrupt

    corrupt(imgs[0], corruption_name=name, severity=severity)
    times = []
    while sum(times) < min_time or len(times) < 3:
        t0 = time.perf_counter()
        for im in imgs:
            corrupt(im, corruption_name=name, severity=severity)
        times.append((time.perf_counter() - t0) / len(imgs))
    return float(np.median(times)) * 1e6


def main() -> None:
    p = parser(__doc__, "corruptions.csv")
    p.set_defaults(threads=1)
    p.add_argument("--quick", action="store_true", help="severity 3 only, batch 64, short timings (< 1 min)")
    p.add_argument("--batch", type=int, default=None, help="images per corrupt() call (default 512; quick 64)")
    args = p.parse_args()
    stamp = setup(args)
    batch = args.batch or (64 if args.quick else 512)
    severities = (3,) if args.quick else (1, 3, 5)
    min_time = 0.2 if args.quick else 1.0
    x = images(batch)
    imgs = list(np.uint8(np.round(x[:8 if args.quick else 32].permute(0, 2, 3, 1).numpy() * 255)))
    devices = ["cpu"] + ([str(args.device)] if str(args.device).startswith("cuda") else [])
    try:
        import imagecorruptions  # noqa: F401
        have_ref = True
    except ImportError:
        have_ref = False
        print("imagecorruptions is not installed: reference column left empty")
    print(f"{'corruption':18s} sev  {'reference us/img':>16s}  " + "  ".join(f"{d + ' us/img':>14s}  {'ratio':>6s}"
                                                                            for d in devices))
    for name in C.available():
        try:
            C.corrupt(x[:1], name, 1)
        except ImportError as e:        # kornia's corruptions where it is not installed (the GPU machine)
            print(f"{name:18s} skipped: {e}", flush=True)
            continue
        for s in severities:
            ref = reference_us(name, s, imgs, min_time) if have_ref else float("nan")
            row = dict(stamp, corruption=name, severity=s, batch=batch, reference_us=round(ref, 2))
            cells = []
            for dev in devices:
                xd = x.to(dev)
                t = bench(lambda: C.corrupt(xd, name, s), dev, min_time=min_time, warmup=1)
                us = t / batch * 1e6
                row[f"ours_{dev.split(':')[0]}_us"] = round(us, 3)
                cells.append(f"{us:14.2f}  {ref / us:6.1f}")
            print(f"{name:18s} {s:3d}  {ref:16.1f}  " + "  ".join(cells), flush=True)
            if not args.no_csv:
                append_csv(args.csv, [row])


if __name__ == "__main__":
    main()
