"""Adversarial coreset selection (robustops.train.coreset; Dolatabadi et al. 2022/2023) against full PGD-7 AT
on the embedded digits with the demo's settings (SmallCNN, SGD with the cyclic schedule, lr 0.05, batch 64,
eps 0.2, 7 inner steps, 30 epochs, 144 training images held out to pick the best epoch by PGD-10 accuracy):
full PGD-7 AT, then PGD-7 AT on coresets of fraction 0.5 chosen by CRAIG, GradMatch and uniform random
selection (warm start kappa 0.6, a new coreset every 5 coreset epochs). For each run: training wall time
(selection included, validation excluded), epoch-equivalents, and on the digits test split clean accuracy,
PGD-20 accuracy (random start) and APGD-CE + APGD-T accuracy (robustops.evaluate, suite "apgd": AutoAttack's
two gradient stages). The issue's targets are printed beside each coreset row: time <= 0.6x full,
robust >= full - 3 points, clean >= full - 2.5 points (robust: the APGD figure). Rows are appended to
benchmarks/results/coreset.csv as each run ends.

    python benchmarks/coreset.py --threads 1                # 4 runs x seed 0, 30 epochs (a few minutes on a CPU)
    python benchmarks/coreset.py --quick --no-csv           # 4 epochs, 120 test images: under a minute

Timings on a shared machine are inflated and noisy; compare ratios measured in one run.
"""
from __future__ import annotations

import time

import torch
from torch.utils.data import DataLoader

import robustops
from robustops import attacks, models, train
from robustops.cli.common import DIGITS_MODEL, split_holdout
from robustops.data import get_dataset
from common import finish, parser, setup

RUNS = ("full", "craig", "gradmatch", "random")


def run_one(key: str, seed: int, args, train_ds, val_ds, test_ds) -> dict:
    torch.manual_seed(seed)
    model = models.get_model("small_cnn", **DIGITS_MODEL).to(args.device)
    loader = DataLoader(train_ds, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    opts = {} if key == "full" else dict(coreset=key, coreset_frac=args.frac, coreset_every=args.every,
                                          coreset_warmup=args.warmup)
    res = train.fit(model, loader, "pgd", val_loader=DataLoader(val_ds, batch_size=256, shuffle=False),
                    epochs=args.epochs, eps=args.eps, steps=7, lr=0.05, seed=seed, val_steps=10, progress=False,
                    verbose=False, device=args.device, threads=args.threads, **opts)
    model.eval()
    n = args.test_n
    test_loader = DataLoader(torch.utils.data.Subset(test_ds, range(min(n, len(test_ds)))), batch_size=360)
    atk = attacks.PGD(model, eps=args.eps, steps=20, norm="linf", random_start=True, seed=seed)
    pgd = attacks.robust_accuracy(model, test_loader, atk, device=args.device, progress=False)
    aa = robustops.evaluate(model, test_loader, suite="apgd", eps=args.eps, steps=args.apgd_steps, seed=seed,
                            device=args.device, progress=False, keep_adv=False)
    last = res.history[-1]
    return {"run": key, "seed": seed, "epochs": args.epochs, "passes": res.epochs_run, "eps": args.eps,
            "frac": 1.0 if key == "full" else args.frac, "equiv_epochs": last["equiv_epochs"],
            "select_s": sum(r.get("select_time", 0.0) for r in res.history), "train_s": res.train_time,
            "clean_acc": pgd["clean_acc"], "pgd20_acc": pgd["robust_acc"], "apgd_acc": aa["robust_acc"],
            "best_epoch": res.best_epoch}


def main(argv=None):
    p = parser(__doc__, "coreset.csv")
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {', '.join(RUNS)}")
    # the demo's epochs and eps; the coreset fraction of the target, a selection every 5 coreset epochs
    for flag, kind, default in (("--epochs", int, 30), ("--eps", float, 0.2), ("--frac", float, 0.5),
                                ("--every", int, 5), ("--seeds", str, "0")):
        p.add_argument(flag, type=kind, default=default)
    p.add_argument("--warmup", type=float, default=0.6, help="the warm start's kappa")
    p.add_argument("--test-n", type=int, default=360, help="test images evaluated")
    p.add_argument("--apgd-steps", type=int, default=100)
    p.add_argument("--quick", action="store_true", help="4 epochs, 120 test images, APGD 20 steps")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.test_n, args.apgd_steps = 4, 120, 20
    args.threads = args.threads or 1  # 8x8 inputs: more threads only cost time
    keys = args.runs.split(",")
    if set(keys) - set(RUNS):
        p.error(f"--runs must be a comma-separated list of {', '.join(RUNS)}; got {args.runs}")
    base = setup(args)
    full_train, test_ds = (get_dataset("digits", split)[0] for split in ("train", "test"))
    print(f"device: {base['device']}; torch {torch.__version__}; eps {args.eps}, {args.epochs} epochs, coreset "
          f"fraction {args.frac}, every {args.every}, kappa {args.warmup}")
    print(f"{'run':<10} {'seed':>4} {'passes':>6} {'equiv':>6} {'train s':>8} {'select s':>8} {'clean':>7} "
          f"{'PGD-20':>7} {'APGD':>7}   targets vs full (time <= 0.6x, APGD >= -3, clean >= -2.5)")
    for seed in [int(s) for s in args.seeds.split(",")]:
        train_ds, val_ds = split_holdout(full_train, 144, seed)  # the demo's 144 held out
        ref = None
        for key in keys:
            r = run_one(key, seed, args, train_ds, val_ds, test_ds)
            if key == "full":
                ref = r
            note = ""
            if ref is not None and key != "full":
                t, da, dc = r["train_s"] / ref["train_s"], 100 * (r["apgd_acc"] - ref["apgd_acc"]), \
                    100 * (r["clean_acc"] - ref["clean_acc"])
                r.update(time_ratio=t, d_apgd=da, d_clean=dc)
                note = (f"   time {t:.2f}x {'ok' if t <= 0.6 else 'MISS'}, APGD {da:+.1f} "
                        f"{'ok' if da >= -3 else 'MISS'}, clean {dc:+.1f} {'ok' if dc >= -2.5 else 'MISS'}")
            print(f"{key:<10} {seed:4d} {r['passes']:6d} {r['equiv_epochs']:6.1f} {r['train_s']:8.1f} "
                  f"{r['select_s']:8.1f} {r['clean_acc']:7.4f} {r['pgd20_acc']:7.4f} {r['apgd_acc']:7.4f}{note}",
                  flush=True)
            finish(args, [dict(base, **{k: (f"{v:.5g}" if isinstance(v, float) else v) for k, v in r.items()})])


if __name__ == "__main__":
    main()
