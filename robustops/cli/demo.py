"""`robustops demo`: the main job on the embedded digits data: train several methods, evaluate clean
and PGD accuracy, certify the models trained for smoothing, print and write a comparison table."""
from __future__ import annotations

import argparse
import csv
import math
import os
import time

import torch

from .. import attacks, models, smoothing, train
from .. import data as rodata
from .common import CLIError, add_common, parse_fraction, pick_device, require_min, split_holdout
from .train import add_method_flags, method_hparams

HELP = ("train natural / PGD / free / Gaussian models on the embedded digits data, evaluate and certify "
        "them, print a comparison table")

DEMO_METHODS = ("natural", "pgd", "free", "gaussian")
DIGITS_MODEL = {"num_classes": 10, "in_channels": 1, "input_size": 8}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--methods", default=",".join(DEMO_METHODS),
                   help=f"comma-separated training methods (default {','.join(DEMO_METHODS)}; "
                        f"any of {', '.join(train.METHODS)})")
    p.add_argument("--epochs", type=int, default=30,
                   help="epochs per method (default 30; free: counted in forward/backward passes, so the data are "
                        "traversed ceil(epochs/m) times)")
    p.add_argument("--eps", type=parse_fraction, default=0.2,
                   help="L-inf budget for training and the attack (default 0.2)")
    p.add_argument("--steps", type=int, default=7, help="PGD-AT / TRADES inner steps (default 7)")
    add_method_flags(p, defaults={"m": 4, "sigma": 0.25})
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate of the cyclic schedule (default 0.05)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--val-size", type=int, default=144,
                   help="training images held out to pick each method's best epoch (default 144; 0: last epoch)")
    p.add_argument("--attack-steps", type=int, default=20, help="steps of the evaluation PGD attack (default 20)")
    p.add_argument("--n0", type=int, default=100, help="CERTIFY selection samples (default 100)")
    p.add_argument("--n", type=int, default=2000, help="CERTIFY estimation samples (default 2000)")
    p.add_argument("--alpha", type=float, default=0.001, help="CERTIFY failure probability (default 0.001)")
    p.add_argument("--certify-max", type=int, default=None, help="certify only the first N test images (default all)")
    p.add_argument("--certify-batch", type=int, default=2000, help="noisy samples per forward pass (default 2000)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default 1: the digits models are too small to gain from more)")
    add_common(p)


def _fmt_pct(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}%"


def _max_radius(sigma: float, n: int, alpha: float) -> float:
    """sigma * Phi^-1(pA_lower) when all n samples vote for the class: pA_lower = alpha^(1/n)."""
    from scipy.stats import norm

    return float(sigma * norm.ppf(alpha ** (1.0 / n)))


def run(args) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in train.METHODS]
    if bad or not methods:
        raise CLIError(f"--methods must be a comma-separated list of {', '.join(train.METHODS)}; got {args.methods!r}")
    require_min(epochs=(args.epochs, 1), steps=(args.steps, 1), m=(args.m, 1), batch_size=(args.batch_size, 1),
                attack_steps=(args.attack_steps, 1), n0=(args.n0, 1), n=(args.n, 1),
                certify_batch=(args.certify_batch, 1), val_size=(args.val_size, 0), threads=(args.threads, 1))
    if not args.eps >= 0:
        raise CLIError(f"--eps must be >= 0, got {args.eps}")
    if not args.sigma > 0:
        raise CLIError(f"--sigma must be > 0, got {args.sigma}")
    if not 0 < args.alpha < 1:
        raise CLIError(f"--alpha must be in (0, 1), got {args.alpha}")
    dev = pick_device(args.device)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads if args.threads is not None else 1)
    try:
        return _demo(args, methods, dev)
    finally:
        torch.set_num_threads(old_threads)


class _Data:
    """The digits splits and loaders of the demo."""

    def __init__(self, args):
        from torch.utils.data import DataLoader

        self.train_ds, _ = rodata.get_dataset("digits", "train")
        self.test_ds, _ = rodata.get_dataset("digits", "test")
        self.val_loader = None
        if args.val_size > 0:
            self.train_ds, val_ds = split_holdout(self.train_ds, args.val_size, args.seed)
            self.val_loader = DataLoader(val_ds, batch_size=256, shuffle=False)
        self.test_loader = DataLoader(self.test_ds, batch_size=360, shuffle=False)
        self.x_test, self.y_test = self.test_ds.tensors
        n = len(self.test_ds)
        self.k = n if args.certify_max is None else max(1, min(args.certify_max, n))

    def train_loader(self, args):
        from torch.utils.data import DataLoader

        return DataLoader(self.train_ds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers)


def _train_and_evaluate(args, method: str, data: _Data, dev) -> dict:
    torch.manual_seed(args.seed)
    model = models.get_model("small_cnn", **DIGITS_MODEL).to(dev)
    hp = dict(epochs=args.epochs, eps=args.eps, steps=args.steps, lr=args.lr, seed=args.seed, val_steps=10,
              **method_hparams(args))
    res = train.fit(model, data.train_loader(args), method, val_loader=data.val_loader,
                    out_dir=os.path.join(args.out, method), progress=args.progress, verbose=False, device=dev,
                    model_name="small_cnn", model_kwargs=dict(DIGITS_MODEL), extra={"data": "digits"}, **hp)
    model.eval()
    atk = attacks.PGD(model, eps=args.eps, steps=args.attack_steps, norm="linf", random_start=True, seed=args.seed)
    ev = attacks.robust_accuracy(model, data.test_loader, atk, device=dev, progress=False)
    row = {"method": method, "label": res.config.method_class.label(res.config), "clean_acc": ev["clean_acc"],
           "robust_acc": ev["robust_acc"], "acr": None, "train_time_s": res.train_time,
           "epochs_run": res.epochs_run, "best_epoch": res.best_epoch, "model": model,
           "sigma": res.config.noise_sigma}
    if row["sigma"] is not None:
        _certify(args, row, data, dev)
    return row


def _certify(args, row: dict, data: _Data, dev) -> None:
    """Certifies the first k test images with the row's model smoothed at its training sigma."""
    k = data.k
    t0 = time.perf_counter()
    smooth = smoothing.Smooth(row["model"], 10, row["sigma"])
    cert = smooth.certify(data.x_test[:k].to(dev), n0=args.n0, n=args.n, alpha=args.alpha,
                          batch_size=args.certify_batch, seed=args.seed)
    t_cert = time.perf_counter() - t0
    correct = (cert.prediction == data.y_test[:k]).numpy()
    radius = cert.radius.numpy()
    row.update(acr=smoothing.acr(radius, correct), certify_time_s=t_cert, radius=radius, correct=correct)
    with open(os.path.join(args.out, f"certify_{row['method']}.tsv"), "w") as fh:
        fh.write("idx\tlabel\tpredict\tradius\tcorrect\ttime\n")
        for i in range(k):
            fh.write(f"{i}\t{int(data.y_test[i])}\t{int(cert.prediction[i])}\t{radius[i]:.4g}\t"
                     f"{int(correct[i])}\t{t_cert / k:.4f}\n")


def _table(args, rows) -> list:
    header = ["method", "clean acc", f"PGD-{args.attack_steps} acc (eps={args.eps:g})",
              f"ACR (sigma={args.sigma:g})", "train time"]
    table = [[r["label"], _fmt_pct(r["clean_acc"]), _fmt_pct(r["robust_acc"]),
              "-" if r["acr"] is None else f"{r['acr']:.3f}", f"{r['train_time_s']:.1f} s"] for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(header)]
    md = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
          "|" + "|".join(("-" * (w + 1) + ":") if i else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|"]
    md += ["| " + " | ".join((c.ljust(w) if i == 0 else c.rjust(w)) for i, (c, w) in enumerate(zip(t, widths))) + " |"
           for t in table]
    return md


def _write_outputs(args, rows, md, certified) -> list:
    with open(os.path.join(args.out, "results.md"), "w") as fh:
        fh.write("\n".join(md) + "\n")
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "label", "clean_acc", "robust_acc", "eps", "attack_steps", "acr", "sigma",
                    "train_time_s", "epochs_run", "best_epoch"])
        for r in rows:
            w.writerow([r["method"], r["label"], f"{r['clean_acc']:.4f}", f"{r['robust_acc']:.4f}", args.eps,
                        args.attack_steps, "" if r["acr"] is None else f"{r['acr']:.4f}", args.sigma,
                        f"{r['train_time_s']:.2f}", r["epochs_run"], r["best_epoch"]])
    outputs = ["results.md", "results.csv"]
    if certified:
        smoothing.plot_certified_accuracy(os.path.join(args.out, "certified_accuracy.png"), certified,
                                          title=f"digits, randomized smoothing (n={args.n}, alpha={args.alpha:g})")
        outputs += ["certified_accuracy.png"] + [f"certify_{r['method']}.tsv" for r in rows if r["acr"] is not None]
    return outputs


def _demo(args, methods, dev) -> int:
    os.makedirs(args.out, exist_ok=True)
    data = _Data(args)
    print(f"robustops demo: digits 8x8 ({len(data.train_ds)} train, {args.val_size} validation, "
          f"{len(data.test_ds)} test), SmallCNN, {args.epochs} epochs, L-inf eps {args.eps:g}, on {dev} "
          f"({torch.get_num_threads()} thread(s))", flush=True)
    rows = []
    t_start = time.perf_counter()
    for method in methods:
        row = _train_and_evaluate(args, method, data, dev)
        rows.append(row)
        extra = (f", ACR {row['acr']:.3f} ({data.k} images, n={args.n}, certified in {row['certify_time_s']:.1f}s)"
                 if row["acr"] is not None else "")
        print(f"  {row['label']:<28} clean {_fmt_pct(row['clean_acc']):>6}  PGD-{args.attack_steps} "
              f"{_fmt_pct(row['robust_acc']):>6}{extra}  (trained {row['train_time_s']:.1f}s)", flush=True)
    md = _table(args, rows)
    print()
    print("\n".join(md))
    radii = [0.0, 0.25, 0.5, 0.75, 1.0]
    certified = {r["label"]: (r["radius"], r["correct"]) for r in rows if r["acr"] is not None}
    for r in rows:
        if r["acr"] is None:
            continue
        accs = smoothing.certified_accuracy(r["radius"], r["correct"], radii)
        print(f"\ncertified accuracy of the smoothed {r['label']} model (n0={args.n0}, n={args.n}, "
              f"alpha={args.alpha:g}): " + ", ".join(f"r={x:g}: {_fmt_pct(float(a))}" for x, a in zip(radii, accs))
              + f" (the largest radius n={args.n} samples can certify is "
                f"{_max_radius(r['sigma'], args.n, args.alpha):.2f})")
    outputs = _write_outputs(args, rows, md, certified)
    print(f"\nwrote {', '.join(os.path.join(args.out, o) for o in outputs)} and one checkpoint directory per method "
          f"({time.perf_counter() - t_start:.0f} s in all)")
    return 0
