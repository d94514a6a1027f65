"""OOD data for robustness on the digits (Lee et al., ICLR 2021, OAT: out-of-distribution images trained
toward the uniform label, attacked too), beside PGD-7 AT at the same number of optimizer steps.

The demo's settings (SmallCNN, SGD lr 0.05 cyclic, batch 64, eps 0.2, 7 inner steps, best epoch by PGD-10 on
144 held-out training images). Configurations:

- ``PGD-AT``: 30 epochs of 64 digits per batch (the baseline);
- ``+ OOD``: batches of 64 with a fraction r (``--ood-ratio``, default 0.5) of generated OOD images
  (``digits-ood``), round(30 (1 - r)) epochs: about the same number of optimizer steps and the same batch
  size as the baseline (the official code's protocol at r = 1/2: half the batch OOD, half the epochs);
- ``+ OOD (2x batch)``: 64 digits + round(64 / (1 - r)) - 64 OOD images per batch, 30 epochs: the same
  steps and the same digits per step as the baseline (1 / (1 - r) times its forward / backward work).

Measured on the digits test split (360 images): clean accuracy and PGD-20 accuracy (random start, step
2.5 eps / 20). Each row is printed beside the baseline of its seed and appended to
benchmarks/results/ood_digits.csv when it ends.

    python benchmarks/ood_digits.py                 # seeds 0, 1
    python benchmarks/ood_digits.py --quick         # seed 0, 2 epochs (1 for + OOD): < 1 min, checks it runs
"""
from __future__ import annotations

import statistics
import time

import torch
from torch.utils.data import DataLoader, Subset

from robustops import models, train
from robustops.cli.common import DIGITS_MODEL
from common import append_csv, digits_setup, parser

CONFIGS = ("PGD-AT", "+ OOD", "+ OOD (2x batch)")


def run_one(name: str, seed: int, args, train_ds, val_ds, test_loader) -> dict:
    """One training run of a configuration and its test row."""
    r = args.ood_ratio
    epochs = max(1, round(args.epochs * (1 - r))) if name == "+ OOD" else args.epochs
    batch = round(64 / (1 - r)) if "2x" in name else 64
    ood = {} if name == "PGD-AT" else {"ood_data": args.ood_data, "ood_ratio": r, "ood_weight": args.ood_weight}
    torch.manual_seed(seed)
    model = models.get_model("small_cnn", **DIGITS_MODEL).to(args.device)
    loader = DataLoader(train_ds, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(seed))
    t0 = time.perf_counter()
    res = train.fit(model, loader, "pgd", val_loader=DataLoader(val_ds, batch_size=256), epochs=epochs, eps=args.eps,
                    steps=7, lr=0.05, seed=seed, val_steps=10, progress=False, verbose=False, device=args.device,
                    threads=args.threads, **ood)
    cfg = train.FitConfig.make("pgd", eps=args.eps, steps=7, val_steps=20)
    m = train.evaluate(model, test_loader, cfg, device=args.device)
    # the OOD loader's epoch: one pass over the digits, half a batch of them per step
    steps = res.epochs_run * (len(train_ds) // (batch - int(r * batch + 0.5)) if ood else len(loader))
    return {"config": name, "label": res.config.label, "seed": seed, "epochs": epochs, "batch": batch,
            "eps": args.eps, "ood_ratio": r if ood else "", "ood_weight": args.ood_weight if ood else "", "opt_steps": steps,
            "clean": m["clean_acc"], "pgd20": m["robust_acc"], "best_epoch": res.best_epoch,
            "train_s": res.train_time, "wall_s": time.perf_counter() - t0}


def main(argv=None):
    p = parser(__doc__, "ood_digits.csv")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--eps", type=float, default=0.2)
    p.add_argument("--ood-data", default="digits-ood")
    p.add_argument("--ood-weight", type=float, default=1.0)
    p.add_argument("--ood-ratio", type=float, default=0.5)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs = "0", 2
    base, train_full, test_loader = digits_setup(args)
    n = len(train_full)
    train_ds, val_ds = Subset(train_full, range(n - 144)), Subset(train_full, range(n - 144, n))
    rows, ref = [], {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in args.configs.split(","):
            r = {**base, **run_one(name, seed, args, train_ds, val_ds, test_loader)}
            ref.setdefault(seed, r)
            b = ref[seed]
            print(f"seed {seed} {name:<18} clean {r['clean']:.4f} PGD-20 {r['pgd20']:.4f}   "
                  f"(PGD-AT: clean {b['clean']:.4f} PGD-20 {b['pgd20']:.4f})  steps {r['opt_steps']}  "
                  f"{r['train_s']:.0f}s", flush=True)
            rows.append(r)
            if not args.no_csv:
                append_csv(args.csv, [r])
    print()
    for name in args.configs.split(","):
        rs = [r for r in rows if r["config"] == name]
        if rs:
            sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
            c, g = [r["clean"] for r in rs], [r["pgd20"] for r in rs]
            print(f"{name:<18} clean {100 * statistics.mean(c):.1f} ({100 * sd(c):.1f})  "
                  f"PGD-20 {100 * statistics.mean(g):.1f} ({100 * sd(g):.1f})  n={len(rs)}")


if __name__ == "__main__":
    main()
