"""Sigma-overfitting of Gaussian augmentation and RLAT on the embedded digits (Kireev, Andriushchenko &
Flammarion, UAI 2022): natural training, Gaussian augmentation at one fixed sigma, Gaussian augmentation
with sigma ~ U(0, MAX) per sample (``--sigma-dist uniform:MAX``), fixed sigma = MAX, and RLAT, each trained with the demo's
settings (SmallCNN, SGD with the cyclic schedule, lr 0.05, batch 64, 144 training images held out, the
best epoch picked by clean accuracy for every method), then measured on the test set: clean accuracy,
``robustops.corruptions.corrupt(x, "gaussian_noise", s)`` for s = 1..5 (CIFAR-10-C's sigmas 0.04..0.10),
and plain additive noise N(0, sigma^2) clipped to [0, 1] at a sweep of sigmas (where sigma-overfitting
shows: a fixed-sigma model is best near its sigma).

    python benchmarks/sigma_overfitting.py                      # seeds 0, 1, 2; 30 epochs
    python benchmarks/sigma_overfitting.py --quick --no-csv     # one seed, 10 epochs (< 1 min)

Every row is printed and appended as it is measured (benchmarks/results/sigma_overfitting.csv); the
baseline (natural training) is printed beside each figure as the first row of each seed. CPU figures.
"""
from __future__ import annotations

import statistics

import torch

from robustops import corruptions, models
from robustops.cli.common import DIGITS_MODEL, split_holdout
from common import digits_setup, finish, fit_digits, parser

SWEEP = (0.05, 0.1, 0.2, 0.3, 0.5)


def specs(args):
    """key -> (method, options)."""
    return {"natural": ("natural", {}),
            f"gauss_fixed_{args.sigma:g}": ("gaussian", {"sigma": args.sigma}),
            f"gauss_fixed_{args.max:g}": ("gaussian", {"sigma": args.max}),
            f"gauss_uniform_{args.max:g}": ("gaussian", {"sigma": args.sigma, "sigma_dist": f"uniform:{args.max:g}"}),
            f"rlat_{args.rlat_eps:g}": ("rlat", {"rlat_eps": args.rlat_eps})}


@torch.no_grad()
def accuracies(model, loader, device) -> dict:
    """Clean, gaussian_noise s1..s5 and plain-noise sweep accuracies of the model on the loader."""
    hits, n, start = {}, 0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        idx = torch.arange(start, start + x.shape[0])
        start += x.shape[0]
        views = {"clean": x}
        views.update({f"gn_s{s}": corruptions.corrupt(x, "gaussian_noise", s, seed=0, indices=idx) for s in range(1, 6)})
        g = torch.Generator().manual_seed(1000 + start)
        for sig in SWEEP:
            views[f"noise_{sig:g}"] = (x + sig * torch.randn(x.shape, generator=g).to(device)).clamp(0, 1)
        for k, v in views.items():
            hits[k] = hits.get(k, 0) + (model(v).argmax(1) == y).sum().item()
        n += x.shape[0]
    out = {k: v / n for k, v in hits.items()}
    out["gn_mean"] = statistics.fmean(out[f"gn_s{s}"] for s in range(1, 6))
    return out


def main(argv=None):
    p = parser(__doc__, "sigma_overfitting.csv")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--sigma", type=float, default=0.25, help="the fixed-sigma model's sigma")
    p.add_argument("--max", type=float, default=0.5, help="the uniform model's MAX")
    p.add_argument("--rlat-eps", type=float, default=0.01,
                   help="RLAT's radius (the paper's CIFAR-10 0.08 is too large for the 8x8 digits' small_cnn)")
    p.add_argument("--quick", action="store_true", help="one seed, 10 epochs")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs = "0", 10
    args.eps = 0.0
    base, full_train, test_loader = digits_setup(args)
    cols = ["clean"] + [f"gn_s{s}" for s in range(1, 6)] + ["gn_mean"] + [f"noise_{s:g}" for s in SWEEP]
    print(f"device: {base['device']}; torch {torch.__version__}; {args.epochs} epochs; figures: accuracy "
          f"(natural training's beside it)")
    print(f"{'method':<20} {'seed':>4} " + " ".join(f"{c:>14}" for c in cols))
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        train_ds, val_ds = split_holdout(full_train, 144, seed)
        ref = None
        for key, (method, opts) in specs(args).items():
            torch.manual_seed(seed)
            model = models.get_model("small_cnn", **DIGITS_MODEL).to(args.device)
            _, secs = fit_digits(model, method, train_ds, val_ds, args, seed, select="clean_acc", **opts)
            model.eval()
            acc = accuracies(model, test_loader, args.device)
            ref = acc if ref is None else ref
            print(f"{key:<20} {seed:4d} " + " ".join(f"{acc[c]:6.3f} ({ref[c]:5.3f})" for c in cols)
                  + f"  {secs:5.1f}s", flush=True)
            row = dict(base, method=key, seed=seed, epochs=args.epochs, train_s=f"{secs:.2f}",
                       **{c: f"{acc[c]:.4f}" for c in cols})
            rows.append(row)
            finish(args, [row])
    print("\nmean over seeds:")
    for key in specs(args):
        sel = [r for r in rows if r["method"] == key]
        print(f"  {key:<20} " + " ".join(f"{c} {statistics.fmean(float(r[c]) for r in sel):.3f}" for c in cols))


if __name__ == "__main__":
    main()
