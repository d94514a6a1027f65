"""IWD adversarial training against PGD-AT on the digits (issue 29's target: ``iwd`` beats PGD-AT under
the IWD attack), with a natural model for scale.

Three runs per seed, the demo's settings (SmallCNN, SGD lr 0.05, batch 64, 7 inner steps, L-inf eps 0.2 for
PGD-AT and for the validation attack that picks the best epoch): ``natural``, ``pgd`` (PGD-AT) and ``iwd``
(training against the IWD attack at --iwd-eps). Each model is scored on the digits test split by its clean
accuracy, PGD-20 L-inf accuracy at eps 0.2, and IWD-attack accuracy (10 steps, 3x3 patches, exact OT) at each
budget of --iwd-attack-eps. Each row is printed beside the PGD-AT row of its seed and appended to
benchmarks/results/iwd_digits.csv when it ends.

    python benchmarks/iwd_digits.py                  # seeds 0, 1; the demo's 30 epochs
    python benchmarks/iwd_digits.py --quick          # seed 0, 1 epoch, 96 test images: < 1 min (checks it runs)

CPU figures (one thread); times are inflated when other jobs share the machine.
"""
from __future__ import annotations

import time

import torch
from torch.utils.data import DataLoader, Subset

from robustops import attacks, models
from robustops.cli.common import DIGITS_MODEL
from common import add_digits_flags, digits_variant_runs, fit_digits, parser, pgd_accuracy

VARIANTS = {"natural": ("natural", {}), "pgd": ("pgd", {}), "iwd": ("iwd", {})}


def iwd_accuracy(model, loader, eps: float, seed: int, device) -> float:
    """Robust accuracy under the IWD attack (10 steps, 3x3 patches, auto solver) at budget eps."""
    atk = attacks.IWDAttack(model, eps, steps=10, seed=seed)
    return attacks.robust_accuracy(model, loader, atk, device=device, progress=False)["robust_acc"]


def run_one(key: str, seed: int, args, train_ds, val_ds, test_loader) -> dict:
    method, opts = VARIANTS[key]
    if method == "iwd":
        opts = dict(opts, iwd_eps=args.iwd_eps)
    torch.manual_seed(seed)
    model = models.get_model("small_cnn", **DIGITS_MODEL).to(args.device)
    res, train_s = fit_digits(model, method, train_ds, val_ds, args, seed, **opts)
    model.eval()
    ev = pgd_accuracy(model, test_loader, args, seed, steps=args.attack_steps)
    row = {"variant": key, "method": method, "epochs": args.epochs, "seed": seed, "eps": args.eps,
           "iwd_eps": args.iwd_eps if method == "iwd" else "", "clean_acc": ev["clean_acc"],
           "robust_acc": ev["robust_acc"], "best_epoch": res.best_epoch, "train_s": train_s}
    t0 = time.perf_counter()
    for e in args.iwd_attack_eps:
        row[f"iwd_acc_{e:g}"] = iwd_accuracy(model, test_loader, e, seed, args.device)
    row["iwd_eval_s"] = time.perf_counter() - t0
    print("  " + "  ".join(f"IWD@{e:g} {row[f'iwd_acc_{e:g}']:.4f}" for e in args.iwd_attack_eps), flush=True)
    return row


def main() -> None:
    p = parser(__doc__, "iwd_digits.csv")
    add_digits_flags(p, VARIANTS)
    p.add_argument("--iwd-eps", type=float, default=0.2, help="the iwd method's training budget")
    p.add_argument("--iwd-attack-eps", type=lambda s: [float(v) for v in s.split(",")], default=[0.1, 0.2, 0.3],
                   help="comma-separated IWD budgets of the evaluation")
    p.add_argument("--quick", action="store_true", help="seed 0, 1 epoch, 96 test images")
    args = p.parse_args()
    if args.quick:
        args.seeds, args.epochs = "0", 1
        import common

        orig = common.digits_setup

        def small_setup(a):
            stamp, train_ds, loader = orig(a)
            return stamp, train_ds, DataLoader(Subset(loader.dataset, range(96)), batch_size=96)

        common.digits_setup = small_setup
    rows = digits_variant_runs(p, args, VARIANTS, run_one)
    print(f"\n{'variant':<9}{'clean':>8}{'PGD-20':>8}" + "".join(f"{'IWD@' + format(e, 'g'):>10}"
                                                              for e in args.iwd_attack_eps))
    for r in rows:
        print(f"{r['variant']:<9}{r['clean_acc']:>8.4f}{r['robust_acc']:>8.4f}"
              + "".join(f"{r[f'iwd_acc_{e:g}']:>10.4f}" for e in args.iwd_attack_eps))


if __name__ == "__main__":
    main()
