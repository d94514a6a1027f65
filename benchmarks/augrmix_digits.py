"""AugRmixAT on the digits against natural training and PGD-AT, with the demo's settings (SmallCNN, SGD with
the cyclic schedule, lr 0.05, batch 64, 7 inner steps at --eps, 144 training images held out to pick the
best epoch by PGD-10 accuracy), for several seeds: clean accuracy, PGD-20 accuracy at --eps and the mean
accuracy over the common corruptions robustops.corruptions implements when it runs (every available one at
severities 1..5, seed 0; the column lists them). Natural training is the baseline every row is compared
with (the "vs natural" columns). Also draws AugMix / AugRmix views of a few digits (--picture).

    python benchmarks/augrmix_digits.py                         # 3 methods x seeds 0, 1, 2, 15 epochs
    python benchmarks/augrmix_digits.py --quick --no-csv        # 1 seed, 3 epochs, under a minute
    python benchmarks/augrmix_digits.py --methods augrmix --augrmix augmix_severity=1,augrmix_mode=linear
    python benchmarks/augrmix_digits.py --picture docs/augmix_digits.png --methods none

Appends the rows to benchmarks/results/augrmix_digits.csv as they finish. CPU figures; timings are wall
seconds of the fit, inflated by whatever else runs on the machine.
"""
from __future__ import annotations

import itertools
import statistics

import torch

from robustops import attacks, corruptions, models
from robustops.cli.common import DIGITS_MODEL, split_holdout
from robustops.train import augmix as am
from common import digits_setup, finish, fit_digits, parser

#: row -> (method, options)
METHODS = {"natural": ("natural", {}), "pgd": ("pgd", {}), "augrmix": ("augrmix", {})}


@torch.no_grad()
def corruption_accuracy(model, loader, device) -> tuple:
    """(mean accuracy over the available corruptions x severities 1..5, the corruption names)."""
    names = corruptions.available()
    accs = []
    for name, sev in itertools.product(names, corruptions.SEVERITIES):
        correct = n = 0
        start = 0
        for x, y in loader:
            idx = torch.arange(start, start + x.shape[0])
            xc = corruptions.corrupt(x.to(device), name, sev, seed=0, indices=idx)
            correct += (model(xc).argmax(1).cpu() == y).sum().item()
            n += x.shape[0]
            start += x.shape[0]
        accs.append(correct / n)
    return (statistics.fmean(accs) if accs else float("nan")), names


def parse_options(text: str) -> dict:
    """"k=v,k2=v2" -> {k: int, float or str}."""
    out = {}
    for item in filter(None, text.split(",")):
        k, _, v = item.partition("=")
        for cast in (int, float, str):
            try:
                out[k.strip()] = cast(v)
                break
            except ValueError:
                continue
    return out


def run_one(key: str, seed: int, args, train_ds, val_ds, test_loader) -> dict:
    method, opts = METHODS[key]
    if key == "augrmix":
        opts = {**opts, **parse_options(args.augrmix)}
    torch.manual_seed(seed)
    model = models.get_model("small_cnn", **DIGITS_MODEL).to(args.device)
    res, train_s = fit_digits(model, method, train_ds, val_ds, args, seed, **opts)
    model.eval()
    atk = attacks.PGD(model, eps=args.eps, steps=20, norm="linf", random_start=True, seed=seed)
    ev = attacks.robust_accuracy(model, test_loader, atk, device=args.device, progress=False)
    corr, names = corruption_accuracy(model, test_loader, args.device)
    return {"method": key, "options": ";".join(f"{k}={v}" for k, v in opts.items()), "epochs": args.epochs, "seed": seed, "eps": args.eps, "clean_acc": ev["clean_acc"],
            "robust_acc": ev["robust_acc"], "corruption_acc": corr, "corruptions": ";".join(names),
            "best_epoch": res.best_epoch, "train_s": train_s}


def picture(path: str, n: int = 8, seed: int = 0) -> None:
    """Rows: n test digits, their AugMix views (linear), AugRmix box views (mask) and random-mode views."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from robustops.data import load_digits

    x = load_digits("test").tensors[0][:n]
    g = torch.Generator().manual_seed(seed)
    rows = {"clean": x, "AugMix (linear)": am.augmix(x, g), "AugRmix (mask)": am.augmix(x, g, mode="mask"),
            "AugRmix (random)": am.augmix(x, g, mode="random")}
    fig = Figure(figsize=(n * 0.8 + 1.6, len(rows) * 0.85), dpi=150)
    FigureCanvasAgg(fig)
    for r, (label, imgs) in enumerate(rows.items()):
        for c in range(n):
            ax = fig.add_subplot(len(rows), n, r * n + c + 1)
            ax.imshow(imgs[c, 0].numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=6, rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path, format="png")
    print(f"wrote {path}")


def _mean_std(vals):
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summary(rows, keys) -> list:
    """Markdown rows: method, clean / PGD / corruption accuracy (mean +- std over seeds, %) and the
    corruption accuracy's difference to natural training's (the baseline)."""
    base = [100 * r["corruption_acc"] for r in rows if r["method"] == "natural"]
    ref = statistics.fmean(base) if base else float("nan")
    out = []
    for key in keys:
        sel = [r for r in rows if r["method"] == key]
        if not sel:
            continue
        (c, sc), (a, sa), (k, sk) = (_mean_std([100 * r[col] for r in sel])
                                     for col in ("clean_acc", "robust_acc", "corruption_acc"))
        out.append(f"| {key} | {c:.1f} +- {sc:.1f} | {a:.1f} +- {sa:.1f} | {k:.1f} +- {sk:.1f} | {k - ref:+.1f} | "
                   f"{len(sel)} |")
    return out


def main(argv=None):
    p = parser(__doc__, "augrmix_digits.csv")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated rows, or none")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--eps", type=float, default=0.1, help="the threat model of pgd / augrmix and of the PGD-20 column")
    p.add_argument("--quick", action="store_true", help="seed 0, 3 epochs")
    p.add_argument("--augrmix", default="", help="hyperparameters of the augrmix row, e.g. augmix_severity=1,js_weight=1")
    p.add_argument("--picture", default=None, help="also draw AugMix / AugRmix views of digits to this PNG")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs = "0", 3
    keys = [] if args.methods == "none" else args.methods.split(",")
    bad = [k for k in keys if k not in METHODS]
    if bad:
        p.error(f"--methods must be a comma-separated list of {', '.join(METHODS)} (or none); got {', '.join(bad)}")
    if args.picture:
        picture(args.picture)
    if not keys:
        return
    base, full_train, test_loader = digits_setup(args)
    print(f"device: {base['device']}; torch {torch.__version__}; eps {args.eps}, {args.epochs} epochs, PGD-20; "
          f"corruptions: {', '.join(corruptions.available())} x severities 1..5 (baseline: natural)")
    print(f"{'method':<9} {'seed':>4} {'clean':>7} {'PGD':>7} {'corr':>7} {'train':>7}")
    seeds = [int(s) for s in args.seeds.split(",")]
    splits = {seed: split_holdout(full_train, 144, seed) for seed in seeds}
    rows = []
    for seed, key in itertools.product(seeds, keys):
        r = run_one(key, seed, args, *splits[seed], test_loader)
        rows.append(r)
        print(f"{key:<9} {seed:4d} {r['clean_acc']:7.4f} {r['robust_acc']:7.4f} {r['corruption_acc']:7.4f} "
              f"{r['train_s']:6.1f}s", flush=True)
        finish(args, [dict(base, **{k: (f"{v:.5g}" if isinstance(v, float) else v) for k, v in r.items()})])
    print("\n| method | clean acc % | PGD-20 acc % | corruption acc % | vs natural | seeds |")
    print("|---|---:|---:|---:|---:|---:|")
    print("\n".join(summary(rows, keys)))


if __name__ == "__main__":
    main()
