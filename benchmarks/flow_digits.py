"""The normalising flow (``robustops.perturbation.Flow``, ``perturbation train --kind flow``) on the 8x8
digits: held-out bits/dim after training with ``fit_perturbation`` (the CLI's defaults: depth 4, hidden 64,
15 epochs, lr 5e-3 with cosine annealing, batch 64, 17 levels of dequantisation: the digits' pixels are
k/16), beside two baselines measured on the same test split: the uniform model (log2 17 bits/dim) and
independent pixels (a categorical distribution over the 17 levels per pixel, fitted on the training
split with add-one smoothing), which a density model that learns any dependence between pixels beats.

    python benchmarks/flow_digits.py                     # depth 4, hidden 64 for 15 and 40 epochs
    python benchmarks/flow_digits.py --quick             # < 1 min: depth 2, hidden 16, 3 epochs

Each row is appended to benchmarks/results/flow_digits.csv as soon as it is measured. Training times are
wall seconds on a shared machine.
"""
from __future__ import annotations

import math
import time

import torch
from torch.utils.data import DataLoader

from robustops import perturbation
from robustops.data import load_digits
from common import append_csv, digits_setup, parser

LEVELS = 17  # the digits' pixel values k / 16


def independent_pixels_bpd(train_x: torch.Tensor, test_x: torch.Tensor) -> float:
    """Bits/dim of the test images under a categorical distribution per pixel over the 17 levels (add-one
    smoothing), fitted on the training images: the discrete likelihood, no dequantisation needed."""
    tr = (train_x * (LEVELS - 1)).round().long().flatten(1)
    te = (test_x * (LEVELS - 1)).round().long().flatten(1)
    counts = torch.ones(tr.shape[1], LEVELS).scatter_add_(1, tr.t(), torch.ones(tr.t().shape))
    p = counts / counts.sum(1, keepdim=True)
    return -torch.log2(p.gather(1, te.t())).mean().item()


def run_one(depth: int, hidden: int, epochs: int, seed: int, args, train_ds, test_x) -> dict:
    torch.manual_seed(seed)
    flow = perturbation.Flow(depth=depth, hidden=hidden, bins=LEVELS)
    loader = DataLoader(train_ds, batch_size=64, shuffle=True, drop_last=True)
    t0 = time.perf_counter()
    perturbation.fit_perturbation(flow, loader, epochs, 5e-3, schedule="cosine", device=args.device,
                                  progress=False, seed=seed)
    seconds = time.perf_counter() - t0
    g = torch.Generator(device=args.device).manual_seed(seed)
    with torch.no_grad():
        bpd = flow.bits_per_dim(test_x.to(args.device), g).mean().item()
    return {"depth": depth, "hidden": hidden, "epochs": epochs, "seed": seed, "held_out_bpd": round(bpd, 4),
            "train_seconds": round(seconds, 1), "parameters": sum(p.numel() for p in flow.parameters())}


def main() -> None:
    p = parser(__doc__, "flow_digits.csv")
    p.add_argument("--configs", default="4x64x15,4x64x40", help="DEPTHxHIDDENxEPOCHS, comma-separated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="depth 2, hidden 16, 3 epochs (< 1 min)")
    args = p.parse_args()
    base, train_ds, _ = digits_setup(args)
    test_x = load_digits("test").tensors[0]
    uniform = math.log2(LEVELS)
    indep = independent_pixels_bpd(load_digits("train").tensors[0], test_x)
    print(f"baselines (held-out bits/dim): uniform {uniform:.4f}, independent pixels {indep:.4f}", flush=True)
    configs = "2x16x3" if args.quick else args.configs
    for spec in configs.split(","):
        depth, hidden, epochs = (int(v) for v in spec.lower().split("x"))
        row = run_one(depth, hidden, epochs, args.seed, args, train_ds, test_x)
        row.update(base, uniform_bpd=round(uniform, 4), independent_pixels_bpd=round(indep, 4))
        print(f"flow depth {depth} hidden {hidden} {epochs} epochs: held-out {row['held_out_bpd']:.4f} bits/dim "
              f"(uniform {uniform:.4f}, independent pixels {indep:.4f}); {row['train_seconds']:.1f} s", flush=True)
        if not args.no_csv:
            append_csv(args.csv, [row])


if __name__ == "__main__":
    main()
