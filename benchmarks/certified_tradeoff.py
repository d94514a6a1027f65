"""Does adaptive certified training (acert, Nurlanov et al. 2023) beat its paper's baseline, FastIBP (fastibp,
Shi et al. 2021), at equal clean accuracy? The accuracy-robustness tradeoff of both on the embedded digits,
with the reference settings of the issue (the ACERT authors' way of training and reporting):

- both methods at several constant kappa (the weight of the clean loss, the tradeoff knob of both) and seeds;
- the papers' optimiser: Adam (--lr, default 1e-3: the papers' 5e-4 is for 160 CIFAR-10 epochs), the
  one-cycle LR policy, the gradient norm clipped at 10; training eps = the test eps (eps_scale 1, as Shi et al.);
  the same smooth eps ramp for both (warm-up 5% of training, ramp 50%: fastibp's defaults, so that the two
  differ only in the loss);
- Shi et al.'s IBP initialisation for both: fastibp draws it itself; acert gets it from
  ``fastibp.ibp_init`` before training (the ACERT authors' code starts from it; the method itself does not
  re-initialise). FastIBP's warm-up regularisers are fastibp's only (acert has no option for them);
- BatchNorm rule "clean" and acert's radius search on the training-mode network (``radius_mode="train"``), the
  methods' defaults and the authors' choices (no effect on the BatchNorm-free SmallCNN);
- --val-size training images held out (seeded) and the checkpoint selected by ``select="acceps"`` =
  sqrt(clean acc x ACR / eps), the authors' rule (fit's validation: radii capped at eps on a grid of eps/16);
- on the 360 test images: clean accuracy, the IBP-certified ACR with radii capped at the training eps, reported
  as a share of eps (ACR / eps, in [0, 1]), and the certified accuracy at eps.

    python benchmarks/certified_tradeoff.py --threads 1          # SmallCNN, eps 0.1, kappa 0, 0.25, 0.5, 0.8; seeds 0-2
    python benchmarks/certified_tradeoff.py --model cnn7 --eps 0.02 --epochs 6 --kappas 0 --seeds 0 --threads 1

Prints one row per run and the tradeoff per method (mean over seeds), appends the rows to
benchmarks/results/certified_tradeoff.csv (settings "reference"; the rows of the earlier ibp-vs-acert study
with uncapped radii are marked "legacy" there) and draws certified_tradeoff.png (ACR / eps against clean
accuracy, one line per method) beside it from the SmallCNN rows. CPU figures; the comparison does not depend
on the device.
"""
from __future__ import annotations

import os
import statistics
import time

import torch
from torch.utils.data import DataLoader, Subset

from robustops import models, train
from robustops.cli.common import split_holdout
from robustops.plotting import outside_legend
from robustops.data import get_dataset
from robustops.train.evaluation import capped_radii
from robustops.train.methods.fastibp import ibp_init
from common import RESULTS, finish, parser, setup

METHODS = ("fastibp", "acert")
MODELS = {"smallcnn": lambda: models.SmallCNN(1, 10, 8), "cnn7": lambda: models.CNN7(1, 10, 8)}


def reference_settings(method: str, kappa: float, args) -> dict:
    """fit's keyword arguments for one run with the reference settings (see the module docstring)."""
    return dict(epochs=args.epochs, eps=args.eps, kappa=kappa, optimizer="adam", lr=args.lr, schedule="onecycle",
                grad_clip=10.0, eps_scale=1.0, warmup=0.05, ramp=0.5, eps_schedule="smooth", bn="clean",
                select="acceps", **({"radius_mode": "train"} if method == "acert" else {}))


def run_one(method: str, kappa: float, seed: int, args, data) -> dict:
    """Train one model (the seed draws the split, the initialisation and the batches), select its epoch by
    acceps on the held-out images, and measure it on the test images."""
    train_ds, x_test, y_test = data
    torch.manual_seed(seed)
    model = MODELS[args.model]()
    if method == "acert":
        ibp_init(model, torch.Generator().manual_seed(seed))
    fit_ds, val_ds = split_holdout(train_ds, args.val_size, seed)
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(fit_ds, batch_size=args.batch, shuffle=True, generator=g)
    val_loader = DataLoader(val_ds, batch_size=256)
    t0 = time.perf_counter()
    res = train.fit(model, loader, method, val_loader=val_loader, seed=seed, progress=False, verbose=False,
                    device=args.device, threads=args.threads, **reference_settings(method, kappa, args))
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        correct = (model(x_test).argmax(1) == y_test).cpu()
    radius = capped_radii(model, x_test, y_test, args.eps).cpu()
    return {"model": args.model, "method": method, "kappa": kappa, "seed": seed, "eps": args.eps,
            "epochs": args.epochs, "best_epoch": res.best_epoch, "clean_acc": float(correct.double().mean()),
            "acr_share": float(radius.mean()) / args.eps, "cert_acc_eps": float((radius >= args.eps).double().mean()),
            "train_s": seconds}


def load_data(args):
    """(training set, test inputs, test labels), cut to --train-size / --test-size when given."""
    train_ds, _ = get_dataset("digits", "train")
    test_ds, _ = get_dataset("digits", "test")
    if args.train_size:
        train_ds = Subset(train_ds, range(min(args.train_size, len(train_ds))))
    x_test, y_test = test_ds.tensors
    if args.test_size:
        x_test, y_test = x_test[:args.test_size], y_test[:args.test_size]
    return train_ds, x_test.to(args.device), y_test.to(args.device)


def summarise(rows) -> dict:
    """{method: [(clean acc, ACR / eps, cert acc at eps, kappa), ...]}: means over the seeds, by kappa."""
    curves = {}
    for method in METHODS:
        pts = []
        for kappa in sorted({float(r["kappa"]) for r in rows}):
            sel = [r for r in rows if r["method"] == method and float(r["kappa"]) == kappa]
            if sel:
                pts.append(tuple(statistics.fmean(float(r[k]) for r in sel)
                                 for k in ("clean_acc", "acr_share", "cert_acc_eps")) + (kappa,))
        if pts:
            curves[method] = pts
    return curves


def main(argv=None):
    p = parser(__doc__, "certified_tradeoff.csv")
    p.add_argument("--model", default="smallcnn", choices=sorted(MODELS))
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of fastibp,acert")
    p.add_argument("--kappas", default="0,0.25,0.5,0.8")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--eps", type=float, default=0.1, help="L-inf training and certification eps")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's peak learning rate (one-cycle)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--val-size", type=int, default=144, help="training images held out for the acceps selection")
    p.add_argument("--train-size", type=int, default=0, help="use only the first N training images (0: all)")
    p.add_argument("--test-size", type=int, default=0, help="use only the first N test images (0: all 360)")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"--methods: expected a comma-separated subset of {','.join(METHODS)}, got {','.join(bad)}")
    if args.threads is None:
        args.threads = 1  # 8x8 inputs: more threads only cost time
    base = dict(setup(args), settings="reference")
    data = load_data(args)
    rows = []
    print(f"device: {base['device']}; torch {torch.__version__}; {args.model}, eps {args.eps}, {args.epochs} epochs")
    print(f"{'method':<8} {'kappa':>5} {'seed':>4} {'best':>4} {'clean':>7} {'ACR/eps':>8} {'cert@eps':>9} {'train':>7}")
    for kappa in (float(k) for k in args.kappas.split(",")):
        for method in methods:
            for seed in (int(s) for s in args.seeds.split(",")):
                r = run_one(method, kappa, seed, args, data)
                rows.append(dict(base, **{k: (f"{v:.5g}" if isinstance(v, float) else v) for k, v in r.items()}))
                print(f"{method:<8} {kappa:5.2f} {seed:4d} {r['best_epoch'] or 0:4d} {r['clean_acc']:7.4f} "
                      f"{r['acr_share']:8.4f} {r['cert_acc_eps']:9.4f} {r['train_s']:6.1f}s", flush=True)
    curves = summarise(rows)
    print("\nmean over seeds (clean accuracy, ACR / eps with radii capped at eps, certified accuracy at eps):")
    for method, pts in curves.items():
        for c, a, ca, kappa in pts:
            print(f"  {method:<8} kappa {kappa:4.2f}: clean {c:.4f}  ACR/eps {a:.4f}  cert {ca:.4f}")
    finish(args, rows)
    if not args.no_csv and args.model == "smallcnn":
        plot_tradeoff({m: sorted((c, a, k) for c, a, _, k in pts) for m, pts in curves.items()},
                      os.path.join(RESULTS, "certified_tradeoff.png"))
    return rows


def plot_tradeoff(curves, path):
    """curves: {method: [(clean acc, ACR / eps, kappa), ...]} drawn as one line per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    for method, pts in curves.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        for c, a, k in pts:
            ax.annotate(f"{k:g}", (c, a), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("clean accuracy")
    ax.set_ylabel("IBP ACR / eps (radii capped at eps)")
    ax.set_title("digits: accuracy-robustness tradeoff (labels: kappa)")
    ax.grid(alpha=0.3)
    outside_legend(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=300)
    print(f"plot -> {path}")


if __name__ == "__main__":
    main()
