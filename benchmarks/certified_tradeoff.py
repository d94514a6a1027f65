"""Does adaptive certified training (acert) beat IBP training (ibp) at equal clean accuracy? The
accuracy-robustness tradeoff of both on the embedded digits: each trained at several kappa (the weight
of the clean loss, the tradeoff knob of both methods) and seeds with the demo's settings (SmallCNN,
L-inf eps 0.2, 30 epochs, SGD with the cyclic schedule, lr 0.05, batch 64), then clean accuracy and
the IBP-certified ACR (L-inf, radii searched up to --eps-max) on the 360 test images.

    python benchmarks/certified_tradeoff.py                  # kappa 0, 0.25, 0.5, 0.75, 0.9; seeds 0, 1
    python benchmarks/certified_tradeoff.py --kappas 0.5 --seeds 0 --no-csv

Prints one row per run and the tradeoff per method (mean over seeds), appends the rows to
benchmarks/results/certified_tradeoff.csv and draws certified_tradeoff.png (ACR against clean
accuracy, one line per method) beside it. CPU figures; the comparison does not depend on the device.
"""
from __future__ import annotations

import os
import statistics
import time

import torch
from torch.utils.data import DataLoader

from robustops import bounds, models, smoothing, train
from robustops.plotting import outside_legend
from robustops.data import get_dataset
from common import RESULTS, finish, parser, setup


def run_one(method: str, kappa: float, seed: int, args, train_ds, x_test, y_test) -> dict:
    torch.manual_seed(seed)
    model = models.SmallCNN(1, 10, 8)
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(train_ds, batch_size=64, shuffle=True, generator=g)
    t0 = time.perf_counter()
    train.fit(model, loader, method, epochs=args.epochs, eps=0.2, lr=0.05, seed=seed, kappa=kappa, progress=False,
              verbose=False, device=args.device)
    seconds = time.perf_counter() - t0
    model.eval()
    res = bounds.certified_radius(model, x_test, eps_max=args.eps_max, tol=1e-3)
    correct = (res.prediction.cpu() == y_test).numpy()
    radius = res.radius.cpu().numpy()
    acc = smoothing.certified_accuracy(radius, correct, [0.1, 0.2])
    return {"method": method, "kappa": kappa, "seed": seed, "clean_acc": float(correct.mean()),
            "ibp_acr": smoothing.acr(radius, correct), "cert_acc_0.1": float(acc[0]), "cert_acc_0.2": float(acc[1]),
            "train_s": seconds}


def main(argv=None):
    p = parser(__doc__, "certified_tradeoff.csv")
    p.add_argument("--kappas", default="0,0.25,0.5,0.75,0.9")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--eps-max", type=float, default=0.4, help="largest L-inf radius of the IBP certification")
    args = p.parse_args(argv)
    if args.threads is None:
        args.threads = 1  # 8x8 inputs: more threads only cost time
    base = setup(args)
    train_ds, _ = get_dataset("digits", "train")
    test_ds, _ = get_dataset("digits", "test")
    x_test, y_test = test_ds.tensors
    x_test = x_test.to(args.device)
    rows = []
    print(f"device: {base['device']}; torch {torch.__version__}")
    print(f"{'method':<7} {'kappa':>5} {'seed':>4} {'clean':>7} {'IBP ACR':>8} {'cert@0.1':>9} {'cert@0.2':>9} "
          f"{'train':>7}")
    for kappa in (float(k) for k in args.kappas.split(",")):
        for method in ("ibp", "acert"):
            for seed in (int(s) for s in args.seeds.split(",")):
                r = run_one(method, kappa, seed, args, train_ds, x_test, y_test)
                rows.append(dict(base, **{k: (f"{v:.5g}" if isinstance(v, float) else v) for k, v in r.items()}))
                print(f"{method:<7} {kappa:5.2f} {seed:4d} {r['clean_acc']:7.4f} {r['ibp_acr']:8.4f} "
                      f"{r['cert_acc_0.1']:9.4f} {r['cert_acc_0.2']:9.4f} {r['train_s']:6.1f}s", flush=True)
    print("\nmean over seeds (clean accuracy, IBP ACR):")
    curves = {}
    for method in ("ibp", "acert"):
        pts = []
        for kappa in sorted({float(r["kappa"]) for r in rows}):
            sel = [r for r in rows if r["method"] == method and float(r["kappa"]) == kappa]
            c = statistics.fmean(float(r["clean_acc"]) for r in sel)
            a = statistics.fmean(float(r["ibp_acr"]) for r in sel)
            pts.append((c, a, kappa))
            print(f"  {method:<6} kappa {kappa:4.2f}: clean {c:.4f}  ACR {a:.4f}")
        curves[method] = sorted(pts)
    finish(args, rows)
    if not args.no_csv:
        plot_tradeoff(curves, os.path.join(RESULTS, "certified_tradeoff.png"))


def plot_tradeoff(curves, path):
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
    ax.set_ylabel("IBP-certified ACR (L-inf)")
    ax.set_title("digits: accuracy-robustness tradeoff (labels: kappa)")
    ax.grid(alpha=0.3)
    outside_legend(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=300)
    print(f"plot -> {path}")


if __name__ == "__main__":
    main()
