"""J-SIGR (Liu et al. 2022) on the digits beside PGD-7 AT and natural training, with the demo's settings
(SmallCNN, SGD with the cyclic schedule, lr 0.05, batch 64, 7 inner steps at --eps, 144 training images held
out to pick the best epoch by PGD-10 accuracy): clean accuracy, white-box PGD-20 accuracy at --eps, and
transfer accuracy: PGD-20 examples crafted on separately trained source models (a natural and a PGD-7 AT
SmallCNN, trained with seed + 100) evaluated on each row's model (``robustops.evaluate(transfer_from=...)``).
PGD-7 AT is the baseline printed beside every row ("vs PGD-AT" columns). The paper's claim: J-SIGR is more
robust than adversarial training to transferred attacks.

    python benchmarks/jsigr_digits.py                          # seeds 0, 1; 30 epochs
    python benchmarks/jsigr_digits.py --quick --no-csv         # seed 0, 2 epochs, under a minute
    python benchmarks/jsigr_digits.py --picture docs/jsigr_saliency.png

Appends the rows to benchmarks/results/jsigr_digits.csv as they finish. CPU figures; timings are wall seconds
of the fit, inflated by whatever else runs on the machine.
"""
from __future__ import annotations

import itertools
import statistics

import torch

import robustops as ro
from robustops import attacks, models
from robustops.cli.common import DIGITS_MODEL, split_holdout
from robustops.plotting import plot_image_grid
from robustops.train.jacobian import input_saliency
from common import digits_setup, finish, fit_digits, parser

#: row -> (method, options)
METHODS = {"natural": ("natural", {}), "pgd": ("pgd", {}), "jsigr": ("jsigr", {}),
           # both regularisers on top of adversarial training: the cross-entropy on the PGD-7 input
           "jsigr_adv": ("jsigr", {"jsigr_adv": 1.0}),
           # ten times the default weights of both regularisers
           "jsigr_x10": ("jsigr", {"jsigr_lambda_j": 0.1, "jsigr_lambda_s": 10.0})}
SOURCES = ("natural", "pgd")


def train(key: str, seed: int, args, train_ds, val_ds):
    method, opts = METHODS[key]
    torch.manual_seed(seed)
    model = models.get_model("small_cnn", **DIGITS_MODEL).to(args.device)
    res, train_s = fit_digits(model, method, train_ds, val_ds, args, seed, **opts)
    return model.eval(), res, train_s


def test_tensors(test_loader, device):
    xs, ys = zip(*[(x, y) for x, y in test_loader])
    return torch.cat(xs).to(device), torch.cat(ys).to(device)


def measure(model, data, sources: dict, args, seed: int) -> dict:
    """clean and PGD-20 accuracy, and the PGD-20 transfer accuracy from each source model."""
    opts = dict(suite="pgd", eps=args.eps, steps=20, seed=seed, progress=False, keep_adv=False, device=args.device)
    white = ro.evaluate(model, data, **opts)
    out = {"clean_acc": white["clean_acc"], "robust_acc": white["robust_acc"]}
    for name, src in sources.items():
        out[f"transfer_{name}"] = ro.evaluate(model, data, transfer_from=src, **opts)["robust_acc"]
    return out


def picture(path: str, targets: dict, data, eps: float, n: int = 8) -> None:
    """Rows: n test digits, then for each model its input-gradient saliency at the clean digit and at its own
    PGD-20 adversarial example."""
    x, y = data[0][:n], data[1][:n]
    rows = {"digit": x[:, 0].cpu()}
    for label, model in targets.items():
        x_adv = attacks.PGD(model, eps=eps, steps=20, seed=0)(x, y)
        rows[f"{label}: clean saliency"] = input_saliency(model, x, y).cpu()
        rows[f"{label}: adversarial"] = input_saliency(model, x_adv, y).cpu()
    cmaps = {k: "magma" for k in rows if k != "digit"}
    print("wrote " + ", ".join(plot_image_grid(path, rows, f"|grad_x CE|: PGD-7 AT vs J-SIGR (linf eps {eps:g}, "
                                                      "PGD-20 adversarial examples)", cmaps)))


def _cell(vals, ref: float) -> str:
    m = statistics.fmean(vals)
    s = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{m:.1f} +- {s:.1f} ({m - ref:+.1f})"


def summary(rows, keys) -> list:
    """Markdown rows: mean +- std over seeds (%) of each column, and the difference to PGD-AT's mean."""
    cols = ["clean_acc", "robust_acc"] + [f"transfer_{s}" for s in SOURCES]
    ref = {c: statistics.fmean([100 * r[c] for r in rows if r["method"] == "pgd"] or [float("nan")]) for c in cols}
    by_key = {k: [r for r in rows if r["method"] == k] for k in keys}
    return [f"| {k} | " + " | ".join(_cell([100 * r[c] for r in sel], ref[c]) for c in cols) + f" | {len(sel)} |"
            for k, sel in by_key.items() if sel]


#: the script's own flags: (flag, add_argument's keywords)
FLAGS = (("--methods", dict(default=",".join(METHODS), help="comma-separated rows (default: all)")),
         ("--seeds", dict(default="0,1", help="comma-separated seeds (the sources use seed + 100)")),
         ("--epochs", dict(type=int, default=30, help="epochs of every model (the demo's: 30)")),
         ("--eps", dict(type=float, default=0.2, help="the threat model of training and of every attack")),
         ("--quick", dict(action="store_true", help="seed 0, 2 epochs")),
         ("--picture", dict(default=None, help="also draw the saliency maps of the first seed's PGD-AT and J-SIGR "
                                               "models to this PNG")))


def main(argv=None):
    p = parser(__doc__, "jsigr_digits.csv")
    for flag, kw in FLAGS:
        p.add_argument(flag, **kw)
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs = "0", 2
    keys = args.methods.split(",")
    bad = [k for k in keys if k not in METHODS]
    if bad:
        p.error(f"--methods must be a comma-separated list of {', '.join(METHODS)}; got {', '.join(bad)}")
    base, full_train, test_loader = digits_setup(args)
    data = test_tensors(test_loader, args.device)
    print(f"device: {base['device']}; torch {torch.__version__}; eps {args.eps}, {args.epochs} epochs, PGD-20 white-box "
          f"and transferred from {', '.join(SOURCES)} sources (seed + 100); baseline: PGD-7 AT")
    print(f"{'method':<8} {'seed':>4} {'clean':>7} {'PGD-20':>7} " + " ".join(f"{'tr-' + s:>8}" for s in SOURCES)
          + f" {'train':>7}")
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        train_ds, val_ds = split_holdout(full_train, 144, seed)
        sources = {s: train(s, seed + 100, args, train_ds, val_ds)[0] for s in SOURCES}
        targets = {}
        for key in keys:
            model, res, train_s = train(key, seed, args, train_ds, val_ds)
            targets[key] = model
            r = {"method": key, "epochs": args.epochs, "seed": seed, "eps": args.eps,
                 **measure(model, data, sources, args, seed), "best_epoch": res.best_epoch, "train_s": train_s}
            rows.append(r)
            print(f"{key:<8} {seed:4d} {r['clean_acc']:7.4f} {r['robust_acc']:7.4f} "
                  + " ".join(f"{r['transfer_' + s]:8.4f}" for s in SOURCES) + f" {train_s:6.1f}s", flush=True)
            finish(args, [dict(base, **{k: (f"{v:.5g}" if isinstance(v, float) else v) for k, v in r.items()})])
        if args.picture and seed == int(args.seeds.split(",")[0]):
            picture(args.picture, {k: targets[k] for k in ("pgd", "jsigr") if k in targets}, data, args.eps)
    print("\n| method | clean acc % | PGD-20 acc % | transfer from natural % | transfer from PGD-AT % | seeds |")
    print("|---|---:|---:|---:|---:|---:|")
    print("\n".join(summary(rows, keys)))


if __name__ == "__main__":
    main()
