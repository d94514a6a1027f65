"""Generative AT (method ``denoise``: a denoiser + discriminator in front of the classifier, Kinfu & Vidal
2022) against PGD-7 AT on the digits, with the demo's settings (SmallCNN, SGD with the cyclic schedule, lr
0.05, batch 64, eps 0.2, 7 inner steps, 144 training images held out to pick the best epoch by PGD-10
accuracy); then clean, PGD-20 (random start) and APGD-CE (100 steps) accuracy at eps 0.2 on the digits test
split, every attack white-box through the whole model (for ``denoise``: through the denoiser too).

    python benchmarks/denoise.py --threads 1                  # 30 epochs, seeds 0, 1
    python benchmarks/denoise.py --quick                      # < 1 min: 5 epochs at eps 0.1, seed 0, APGD 20 steps

Variants: pgd (PGD-7 AT of SmallCNN, the baseline), denoise (generative AT of denoised_small_cnn, the
method's defaults), pgd_denoised (PGD-7 AT of the same denoised_small_cnn pipeline: what the extra layers
give without the reconstruction and GAN terms).

Each row is appended to benchmarks/results/denoise.csv as soon as it is measured (with the date, torch and
the device); the baseline (PGD-7 AT) is printed beside each figure. Times are wall seconds of training on a
shared machine: read the ratio, not the seconds.
"""
from __future__ import annotations

import torch

from robustops import attacks, models
from robustops.cli.common import DIGITS_MODEL, split_holdout
from common import digits_setup, finish, fit_digits, parser

#: variant -> (method, model name, options)
VARIANTS = {"pgd": ("pgd", "small_cnn", {}),
            "denoise": ("denoise", "denoised_small_cnn", {}),
            # the capacity control: PGD-7 AT of the same pipeline, no reconstruction / GAN terms
            "pgd_denoised": ("pgd", "denoised_small_cnn", {})}


def run_one(key: str, seed: int, args, train_ds, val_ds, test_loader) -> dict:
    method, name, opts = VARIANTS[key]
    torch.manual_seed(seed)
    model = models.get_model(name, **DIGITS_MODEL).to(args.device)
    res, train_s = fit_digits(model, method, train_ds, val_ds, args, seed, **opts)
    model.eval()
    pgd = attacks.PGD(model, eps=args.eps, steps=20, norm="linf", random_start=True, seed=seed)
    ev = attacks.robust_accuracy(model, test_loader, pgd, device=args.device, progress=False)
    apgd = attacks.APGD(model, eps=args.eps, steps=args.apgd_steps, norm="linf", loss="ce", seed=seed)
    ev_a = attacks.robust_accuracy(model, test_loader, apgd, device=args.device, progress=False)
    last = res.history[-1]
    return {"variant": key, "method": method, "model": name, "epochs": args.epochs, "seed": seed, "eps": args.eps,
            "clean_acc": ev["clean_acc"], "pgd20_acc": ev["robust_acc"], "apgd_ce_acc": ev_a["robust_acc"],
            "apgd_steps": args.apgd_steps, "rec_loss": last.get("rec_loss", float("nan")),
            "best_epoch": res.best_epoch, "train_s": train_s}


def main(argv=None):
    p = parser(__doc__, "denoise.csv")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated; pgd (the baseline) first")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--eps", type=float, default=0.2)
    p.add_argument("--apgd-steps", type=int, default=100)
    p.add_argument("--quick", action="store_true", help="pgd and denoise, 5 epochs at eps 0.1, seed 0, APGD 20 steps "
                   "(< 1 min)")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.eps, args.seeds, args.apgd_steps, args.variants = 5, 0.1, "0", 20, "pgd,denoise"
    keys = args.variants.split(",")
    if any(k not in VARIANTS for k in keys):
        p.error(f"--variants must be a comma-separated list of {', '.join(VARIANTS)}; got {args.variants}")
    base, full_train, test_loader = digits_setup(args)
    print(f"device: {base['device']}; torch {torch.__version__}; eps {args.eps}, {args.epochs} epochs; "
          f"PGD-20 and APGD-CE-{args.apgd_steps} through the whole model")
    print(f"{'variant':<12} {'seed':>4} {'clean':>15} {'PGD-20':>15} {'APGD-CE':>15} {'train s':>15}")
    for seed in (int(s) for s in args.seeds.split(",")):
        train_ds, val_ds = split_holdout(full_train, 144, seed)  # the demo's 144 held out
        ref = None
        for key in keys:
            r = run_one(key, seed, args, train_ds, val_ds, test_loader)
            ref = ref or r  # the first variant is the baseline (pgd by default)
            cells = [f"{r[k]:.4f} ({ref[k]:.4f})" for k in ("clean_acc", "pgd20_acc", "apgd_ce_acc")]
            print(f"{key:<12} {seed:4d} {cells[0]:>15} {cells[1]:>15} {cells[2]:>15} "
                  f"{r['train_s']:6.1f} ({r['train_s'] / ref['train_s']:.2f}x)", flush=True)
            finish(args, [dict(base, **{k: (f"{v:.5g}" if isinstance(v, float) else v) for k, v in r.items()})])
    print(f"(in parentheses: {keys[0]}, the baseline, same seed)")


if __name__ == "__main__":
    main()
