"""Attack-budget schedules on the digits (Kinfu & Vidal 2022): PGD-7 AT with the constant budget (the
baseline) against the linear, curriculum and adaptive schedules (``budget_schedule``), with the demo's
settings (SmallCNN, SGD with the cyclic schedule, lr 0.05, batch 64, eps 0.2, 7 inner steps, 144
training images held out to pick the best epoch by PGD-10 accuracy), then clean and PGD-20 accuracy
(random start) on the digits test split at several test budgets, since the paper's claim is robustness
to attacks of variable budget. Each row is printed beside the constant baseline of its seed and
appended to benchmarks/results/budget_schedules.csv as soon as it is done.

    python benchmarks/budget_schedules.py --threads 1                 # 4 schedules x seeds 0, 1, 2, 30 epochs
    python benchmarks/budget_schedules.py --quick                     # constant / curriculum / adaptive, 3 epochs, eps 0.2

CPU figures; the comparison does not depend on the device.
"""
from __future__ import annotations

import itertools
import time

import torch
from torch.utils.data import DataLoader

from robustops import attacks, models, train
from robustops.cli.common import DIGITS_MODEL, split_holdout
from common import digits_setup, finish, parser

SCHEDULES = ("constant", "linear", "curriculum", "adaptive")


def run_one(schedule: str, seed: int, args, train_ds, val_ds, test_loader) -> dict:
    torch.manual_seed(seed)
    model = models.get_model("small_cnn", **DIGITS_MODEL).to(args.device)
    loader = DataLoader(train_ds, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    t0 = time.perf_counter()
    train.fit(model, loader, "pgd", val_loader=DataLoader(val_ds, batch_size=256, shuffle=False),
              epochs=args.epochs, eps=args.eps, steps=7, lr=0.05, seed=seed, val_steps=10, progress=False,
              verbose=False, device=args.device, threads=args.threads, budget_schedule=schedule,
              budget_every=max(1, args.epochs // 3))
    row = {"schedule": schedule, "epochs": args.epochs, "seed": seed, "eps": args.eps,
           "train_s": time.perf_counter() - t0}
    model.eval()
    for e in args.test_eps:
        atk = attacks.PGD(model, eps=e, steps=20, norm="linf", random_start=True, seed=seed)
        ev = attacks.robust_accuracy(model, test_loader, atk, device=args.device, progress=False)
        row["clean_acc"] = ev["clean_acc"]
        row[f"pgd20_{e:g}"] = ev["robust_acc"]
    return row


def main(argv=None):
    p = parser(__doc__, "budget_schedules.csv")
    for flag, kind, default, what in (("--schedules", str, ",".join(SCHEDULES), "comma-separated, constant first"),
                                      ("--seeds", str, "0,1,2", "comma-separated"),
                                      ("--epochs", int, 30, "training epochs"),
                                      ("--eps", float, 0.2, "training budget"),
                                      ("--test-eps", str, "0.1,0.2,0.3", "comma-separated PGD-20 test budgets")):
        p.add_argument(flag, type=kind, default=default, help=what)
    p.add_argument("--quick", action="store_true", help="constant, curriculum, adaptive; seed 0; 3 epochs; test eps 0.2")
    args = p.parse_args(argv)
    if args.quick:
        args.schedules, args.seeds, args.epochs, args.test_eps = "constant,curriculum,adaptive", "0", 3, "0.2"
    keys = args.schedules.split(",")
    bad = [k for k in keys if k not in SCHEDULES]
    if bad or keys[0] != "constant":
        p.error(f"--schedules: a comma-separated list of {', '.join(SCHEDULES)} starting with constant (the "
                f"baseline); got {args.schedules}")
    args.test_eps = [float(v) for v in args.test_eps.split(",")]
    base, full_train, test_loader = digits_setup(args)
    print(f"device: {base['device']}; torch {torch.__version__}; PGD-7 AT, eps {args.eps}, {args.epochs} epochs; "
          f"test PGD-20 at eps {', '.join(f'{e:g}' for e in args.test_eps)}; (constant baseline of the seed)")
    baseline = {}
    for seed, key in itertools.product([int(s) for s in args.seeds.split(",")], keys):
        r = run_one(key, seed, args, *split_holdout(full_train, 144, seed), test_loader)
        b = baseline.setdefault(seed, r)
        cols = ["clean_acc"] + [f"pgd20_{e:g}" for e in args.test_eps]
        figs = "  ".join(f"{c} {r[c]:.4f} ({b[c]:.4f})" for c in cols)
        print(f"{key:<10} seed {seed}  {figs}  train {r['train_s']:.1f}s ({b['train_s']:.1f}s)", flush=True)
        finish(args, [dict(base, **{k: (f"{v:.5g}" if isinstance(v, float) else v) for k, v in r.items()})])


if __name__ == "__main__":
    main()
