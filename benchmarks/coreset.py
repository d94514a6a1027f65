"""Adversarial coreset selection (robustops.train.coreset; Dolatabadi et al. 2022/2023) against full PGD-7 AT
on the embedded digits with the demo's settings (SmallCNN, SGD with the cyclic schedule, lr 0.05, batch 64,
eps 0.2, 7 inner steps, 30 epochs, 144 training images held out to pick the best epoch by PGD-10 accuracy):
full PGD-7 AT, then PGD-7 AT on coresets of fraction 0.5 chosen by CRAIG, GradMatch and uniform random
selection (warm start kappa 0.6, a new coreset every 5 coreset epochs), and "full-matched": full-data PGD-7 AT
at the coreset runs' training budget, round(W + (T - K) * frac) epochs (robustops.train.coreset.CoresetPlan: W
warm-start epochs on the full data, T - K coreset epochs on frac of it; 15 epochs for T = 30, 30 for T = 60), so
it takes the same optimizer steps as the coreset runs up to the per-epoch rounding of the subset's batches
(digits, T = 30: 315 against 9 * 21 + 12 * 11 = 321) and the same training epoch-equivalents as `random`; CRAIG
and GradMatch spend their selection passes on top (one epoch-equivalent each). Its learning-rate schedule spans
its own shorter run, as the coreset runs' spans theirs. It separates what selection loses from what halving
the optimizer steps of an unconverged 30-epoch run loses. For each run: training wall time
(selection included, validation excluded), epoch-equivalents, and on the digits test split clean accuracy,
PGD-20 accuracy (random start) and APGD-CE + APGD-T accuracy (robustops.evaluate, suite "apgd": AutoAttack's
two gradient stages). The issue's targets are printed beside each coreset row: time <= 0.6x full,
robust >= full - 3 points, clean >= full - 2.5 points (robust: the APGD figure). Rows are appended to
benchmarks/results/coreset.csv as each run ends.

    python benchmarks/coreset.py --threads 1                # 5 runs x seed 0, 30 epochs (a few minutes on a CPU)
    python benchmarks/coreset.py --quick --no-csv           # 4 epochs, 120 test images: under a minute
    python benchmarks/coreset.py --threads 1 --seeds 0,1,2  # 5 runs x 3 seeds, then a mean +- sd summary
    python benchmarks/coreset.py --threads 1 --epochs 60 --runs full,craig,random   # the longer schedule

Timings on a shared machine are inflated and noisy; compare ratios measured in one run.
"""
from __future__ import annotations

import math
import statistics

import torch
from torch.utils.data import DataLoader

import robustops
from robustops import attacks, models, train
from robustops.cli.common import DIGITS_MODEL, split_holdout
from robustops.data import get_dataset
from robustops.train.coreset import CoresetPlan
from common import finish, parser, setup

RUNS = ("full", "full-matched", "craig", "gradmatch", "random")


def matched_epochs(args) -> int:
    """Full-data epochs with the coreset runs' training budget: W + (T - K) * frac, rounded (module docstring)."""
    plan = CoresetPlan(args.epochs, args.frac, args.every, args.warmup)
    return max(1, int(round(plan.full + plan.subset * args.frac)))


def run_one(key: str, seed: int, args, train_ds, val_ds, test_ds) -> dict:
    torch.manual_seed(seed)
    model = models.get_model("small_cnn", **DIGITS_MODEL).to(args.device)
    loader = DataLoader(train_ds, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    full = key.startswith("full")
    opts = {} if full else dict(coreset=key, coreset_frac=args.frac, coreset_every=args.every,
                                coreset_warmup=args.warmup)
    epochs = matched_epochs(args) if key == "full-matched" else args.epochs
    res = train.fit(model, loader, "pgd", val_loader=DataLoader(val_ds, batch_size=256, shuffle=False),
                    epochs=epochs, eps=args.eps, steps=7, lr=0.05, seed=seed, val_steps=10, progress=False,
                    verbose=False, device=args.device, threads=args.threads, **opts)
    model.eval()
    n = args.test_n
    test_loader = DataLoader(torch.utils.data.Subset(test_ds, range(min(n, len(test_ds)))), batch_size=360)
    atk = attacks.PGD(model, eps=args.eps, steps=20, norm="linf", random_start=True, seed=seed)
    pgd = attacks.robust_accuracy(model, test_loader, atk, device=args.device, progress=False)
    aa = robustops.evaluate(model, test_loader, suite="apgd", eps=args.eps, steps=args.apgd_steps, seed=seed,
                            device=args.device, progress=False, keep_adv=False)
    last = res.history[-1]
    # optimizer steps: a full epoch is len(loader) batches, a coreset epoch ceil(its subset's size / 64)
    steps = sum(math.ceil(r["coreset_size"] / 64) if r.get("coreset_size") else len(loader) for r in res.history)
    return {"run": key, "seed": seed, "epochs": args.epochs, "passes": res.epochs_run, "eps": args.eps,
            "frac": 1.0 if full else args.frac, "steps": steps, "equiv_epochs": last["equiv_epochs"],
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
    print(f"full-matched: {matched_epochs(args)} full-data epochs (the coreset runs' W + (T - K) * frac)")
    print(f"{'run':<12} {'seed':>4} {'passes':>6} {'steps':>5} {'equiv':>6} {'train s':>8} {'select s':>8} "
          f"{'clean':>7} {'PGD-20':>7} {'APGD':>7}   targets vs full (time <= 0.6x, APGD >= -3, clean >= -2.5)")
    done: dict = {}
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
            for other in ("full-matched", "random"):  # the same budget: what selection itself buys
                o = done.get((other, seed))
                if o is not None and key in ("craig", "gradmatch"):
                    note += f"; APGD vs {other} {100 * (r['apgd_acc'] - o['apgd_acc']):+.1f}"
            done[(key, seed)] = r
            print(f"{key:<12} {seed:4d} {r['passes']:6d} {r['steps']:5d} {r['equiv_epochs']:6.1f} {r['train_s']:8.1f} "
                  f"{r['select_s']:8.1f} {r['clean_acc']:7.4f} {r['pgd20_acc']:7.4f} {r['apgd_acc']:7.4f}{note}",
                  flush=True)
            finish(args, [dict(base, **{k: (f"{v:.5g}" if isinstance(v, float) else v) for k, v in r.items()})])
    summary(done, keys)


def mean_sd(values) -> str:
    """'mean +- sd' in points (sample sd; one value: no sd)."""
    v = [100 * x for x in values]
    return f"{statistics.mean(v):5.1f}" + (f" +- {statistics.stdev(v):4.1f}" if len(v) > 1 else "")


def summary(done: dict, keys) -> None:
    """Means over the seeds (+- the sample sd), and the paired APGD differences of the selection rules
    against random and full-matched (same seed, same budget) and against full."""
    seeds = sorted({s for _, s in done})
    if len(seeds) < 2:
        return
    print(f"\nmean +- sd over seeds {seeds} (clean / PGD-20 / APGD %, train s, time vs full):")
    for key in keys:
        rows = [done[(key, s)] for s in seeds if (key, s) in done]
        ratio = [r["time_ratio"] for r in rows if "time_ratio" in r]
        print(f"  {key:<12} {mean_sd(r['clean_acc'] for r in rows)} / {mean_sd(r['pgd20_acc'] for r in rows)} / "
              f"{mean_sd(r['apgd_acc'] for r in rows)}, {statistics.mean(r['train_s'] for r in rows):6.1f} s"
              + (f", x{statistics.mean(ratio):.2f}" if ratio else ""))
    for key in ("craig", "gradmatch", "random"):
        for other in ("random", "full-matched", "full"):
            pairs = [done[(key, s)]["apgd_acc"] - done[(other, s)]["apgd_acc"] for s in seeds
                     if (key, s) in done and (other, s) in done]
            if key != other and len(pairs) > 1:
                print(f"  APGD {key} - {other}: {mean_sd(pairs)} pts (per seed: "
                      f"{', '.join(f'{100 * d:+.1f}' for d in pairs)})")


if __name__ == "__main__":
    main()
