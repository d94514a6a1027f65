"""Where does DALE-PD's robust accuracy on digits come from? The demo's DALE-PD row against variants that
each change one thing, and PGD-7 AT, with the demo's settings (SmallCNN, SGD with the cyclic schedule,
lr 0.05, batch 64, eps 0.2, 7 inner steps, 144 training images held out to pick the best epoch by PGD-10
accuracy), for several seeds; then clean and PGD-20 accuracy (eps 0.2, random start) on the digits test
split and the range the dual variable nu took (its start and its value at every epoch end).

    python benchmarks/dale_ablation.py --threads 1                    # 8 variants x seeds 0, 1, 2, 30 epochs
    python benchmarks/dale_ablation.py --epochs 10 --variants dale_pd,pgd --seeds 0 --no-csv

Variants (VARIANTS): dale_pd (the demo row: Laplace sign chain, noise 0.001, log(1 - p_y), nu from 1.0,
margin 0.1, dual step 0.001 per minibatch); noise0 (langevin_noise 0: a PGD chain on log(1 - p_y) from
x + 0.001 N(0, I)); ce (the chain ascends the cross-entropy); gaussian (noise added after the sign, advbench's
primal-dual form); fixed_nu (method dale, nu fixed at 1.2, about where dale_pd's nu ends); epoch_dual (one
dual step per epoch with the epoch's mean clean loss, dual step scaled by the batches per epoch so that nu
can move as far); no_clean (method dale with nu 0 and noise 0: the noiseless chain alone, no clean-loss
term, so what is left between it and pgd is the start x + 0.001 N(0, I) against PGD's uniform start in the
ball); pgd (PGD-7 AT, the demo's row). Appends the rows to benchmarks/results/dale_ablation.csv.
CPU figures; the comparison does not depend on the device.
"""
from __future__ import annotations

import itertools
import math
import statistics

import torch

from robustops import attacks, models
from robustops.cli.common import DIGITS_MODEL, split_holdout
from common import digits_setup, finish, fit_digits, parser

#: variant -> (method, options); "epoch_dual"'s dual step is filled in per run (batches per epoch x 0.001)
VARIANTS = {"dale_pd": ("dale_pd", {}),
            "noise0": ("dale_pd", {"langevin_noise": 0.0}),
            "ce": ("dale_pd", {"langevin_objective": "ce"}),
            "gaussian": ("dale_pd", {"langevin_form": "gaussian"}),
            "fixed_nu": ("dale", {"nu": 1.2}),
            "epoch_dual": ("dale_pd", {"dual_update": "epoch"}),
            "no_clean": ("dale", {"nu": 0.0, "langevin_noise": 0.0}),
            "pgd": ("pgd", {})}


def run_one(key: str, seed: int, args, train_ds, val_ds, test_loader) -> dict:
    method, opts = VARIANTS[key]
    opts = dict(opts)
    torch.manual_seed(seed)
    model = models.get_model("small_cnn", **DIGITS_MODEL).to(args.device)
    if opts.get("dual_update") == "epoch":
        opts["dual_lr"] = 0.001 * math.ceil(len(train_ds) / 64)  # per-minibatch value x the batches per epoch
    res, train_s = fit_digits(model, method, train_ds, val_ds, args, seed, **opts)
    model.eval()
    atk = attacks.PGD(model, eps=args.eps, steps=args.attack_steps, norm="linf", random_start=True, seed=seed)
    ev = attacks.robust_accuracy(model, test_loader, atk, device=args.device, progress=False)
    nus = [r["nu"] for r in res.history if "nu" in r]
    if method.startswith("dale"):
        nus.append(float(res.config.nu))
    return {"variant": key, "method": method, "options": ";".join(f"{k}={v}" for k, v in opts.items()),
            "epochs": args.epochs, "seed": seed, "eps": args.eps, "attack_steps": args.attack_steps,
            "clean_acc": ev["clean_acc"], "robust_acc": ev["robust_acc"],
            "nu_min": min(nus) if nus else float("nan"), "nu_max": max(nus) if nus else float("nan"),
            "best_epoch": res.best_epoch, "train_s": train_s}


def _mean_std(vals):
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summary(rows, keys) -> list:
    """Markdown rows: variant, clean and PGD acc (mean +- std over seeds, %), nu's range over all seeds."""
    out = []
    for key in keys:
        sel = [r for r in rows if r["variant"] == key]
        c, sc = _mean_std([100 * r["clean_acc"] for r in sel])
        a, sa = _mean_std([100 * r["robust_acc"] for r in sel])
        lo, hi = min(r["nu_min"] for r in sel), max(r["nu_max"] for r in sel)
        nu = "-" if math.isnan(lo) else f"{lo:.2f}-{hi:.2f}"
        out.append(f"| {key} | {c:.1f} +- {sc:.1f} | {a:.1f} +- {sa:.1f} | {nu} | {len(sel)} |")
    return out


def main(argv=None):
    p = parser(__doc__, "dale_ablation.csv")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--eps", type=float, default=0.2)
    p.add_argument("--attack-steps", type=int, default=20)
    args = p.parse_args(argv)
    keys = args.variants.split(",")
    bad = [k for k in keys if k not in VARIANTS]
    if bad:
        p.error(f"--variants must be a comma-separated list of {', '.join(VARIANTS)}; got {', '.join(bad)}")
    base, full_train, test_loader = digits_setup(args)
    rows = []
    print(f"device: {base['device']}; torch {torch.__version__}; eps {args.eps}, {args.epochs} epochs, "
          f"PGD-{args.attack_steps}")
    print(f"{'variant':<11} {'seed':>4} {'clean':>7} {'PGD':>7} {'nu range':>11} {'train':>7}")
    seeds = [int(s) for s in args.seeds.split(",")]
    splits = {seed: split_holdout(full_train, 144, seed) for seed in seeds}  # the demo's 144 held out
    for seed, key in itertools.product(seeds, keys):
        r = run_one(key, seed, args, *splits[seed], test_loader)
        rows.append(r)
        print(f"{key:<11} {seed:4d} {r['clean_acc']:7.4f} {r['robust_acc']:7.4f} "
              f"{r['nu_min']:5.2f}-{r['nu_max']:<5.2f} {r['train_s']:6.1f}s", flush=True)
    print(f"\n| variant | clean acc % | PGD-{args.attack_steps} acc % | nu range | seeds |")
    print("|---|---:|---:|---:|---:|")
    print("\n".join(summary(rows, keys)))
    finish(args, [dict(base, **{k: (f"{v:.5g}" if isinstance(v, float) else v) for k, v in r.items()}) for r in rows])


if __name__ == "__main__":
    main()
