"""Does training for randomized smoothing beyond Gaussian noise certify more than Gaussian noise on the
embedded digits? Each method trained at the same sigma with the demo's settings (SmallCNN, SGD with the
cyclic schedule, lr 0.05, batch 64, 144 training images held out to pick the best epoch by accuracy under
noise, sigma 0.25; MACER with the demo row's options), for several seeds, then CERTIFY (Cohen et al.:
n0 100, n 1000, alpha 0.001) on the first --images test images and the ACR of the smoothed model.

    python benchmarks/smoothing_training.py --threads 1            # 5 methods x seeds 0, 1, 2
    python benchmarks/smoothing_training.py --methods gaussian,macer_paper --seeds 0 --no-csv

Method keys: a registered method (its defaults), or one of SPECS (a method with options). Prints one row
per run and mean +- std (over seeds) of ACR and clean smoothed accuracy per method, and appends the rows to
benchmarks/results/smoothing_training.csv. CPU figures; the comparison does not depend on the device.
"""
from __future__ import annotations

import statistics
import time

import torch
from torch.utils.data import DataLoader

from robustops import models, smoothing, train
from robustops.cli.common import DIGITS_MODEL, split_holdout
from robustops.cli.demo import ROW_SPECS
from robustops.data import get_dataset
from common import finish, parser, setup

#: keys with options: key -> (method, options). "macer" is the demo row; "macer_paper" the paper's CIFAR-10
#: settings (k 16, lambda 12, gamma 8, beta 16, no warm-up); "macer_deferred" Jeong et al.'s MNIST re-run
#: (k 16, lambda 16, the radius term deferred for the first third of training: 10 of 30 epochs here);
#: "consistency_paper" the paper's lambda 20 at 0.25.
SPECS = {"macer": ROW_SPECS["macer"],
         "macer_paper": ("macer", {"noise_copies": 16, "macer_lambda": 12.0, "macer_warmup": 0}),
         "macer_deferred": ("macer", {"noise_copies": 16, "macer_lambda": 16.0, "macer_warmup": 10}),
         "consistency_paper": ("consistency", {"consistency_lambda": 20.0})}


def run_one(key: str, seed: int, args, train_ds, val_ds, x_test, y_test) -> dict:
    method, opts = SPECS.get(key, (key, {}))
    torch.manual_seed(seed)
    model = models.get_model("small_cnn", **DIGITS_MODEL).to(args.device)
    loader = DataLoader(train_ds, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    val_loader = DataLoader(val_ds, batch_size=256, shuffle=False)
    t0 = time.perf_counter()
    res = train.fit(model, loader, method, val_loader=val_loader, epochs=args.epochs, lr=0.05, seed=seed,
                    val_steps=10, sigma=args.sigma, progress=False, verbose=False, device=args.device,
                    threads=args.threads, **opts)
    train_s = time.perf_counter() - t0
    model.eval()
    t0 = time.perf_counter()
    cert = smoothing.Smooth(model, 10, args.sigma).certify(x_test, n0=args.n0, n=args.n, alpha=args.alpha,
                                                            batch_size=2000, seed=seed)
    cert_s = time.perf_counter() - t0
    correct = (cert.prediction.cpu() == y_test).numpy()
    radius = cert.radius.cpu().numpy()
    acc = smoothing.certified_accuracy(radius, correct, [0.25, 0.5])
    return {"method": key, "sigma": args.sigma, "epochs": args.epochs, "seed": seed, "images": len(y_test),
            "n": args.n, "acr": smoothing.acr(radius, correct), "clean_acc": float(correct.mean()),
            "cert_acc_0.25": float(acc[0]), "cert_acc_0.5": float(acc[1]), "best_epoch": res.best_epoch,
            "train_s": train_s, "certify_s": cert_s}


def _digits(images: int, device):
    """The digits training split and the first ``images`` test images (on device) with their labels."""
    x_test, y_test = get_dataset("digits", "test")[0].tensors
    return get_dataset("digits", "train")[0], x_test[:images].to(device), y_test[:images]


def _mean_std(vals):
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def main(argv=None):
    p = parser(__doc__, "smoothing_training.csv")
    p.add_argument("--methods", default="gaussian,consistency,macer,smoothadv,smoothmix")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--images", type=int, default=360, help="test images to certify (the first N)")
    p.add_argument("--n0", type=int, default=100)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--alpha", type=float, default=0.001)
    args = p.parse_args(argv)
    args.threads = args.threads or 1  # 8x8 inputs: more threads only cost time
    base = setup(args)
    full_train, x_test, y_test = _digits(args.images, args.device)
    rows = []
    print(f"device: {base['device']}; torch {torch.__version__}; sigma {args.sigma}, {args.epochs} epochs, "
          f"{len(y_test)} images, n {args.n}")
    print(f"{'method':<18} {'seed':>4} {'ACR':>7} {'clean':>7} {'cert@.25':>8} {'cert@.5':>8} {'train':>7} {'cert':>6}")
    for seed in (int(s) for s in args.seeds.split(",")):
        train_ds, val_ds = split_holdout(full_train, 144, seed)
        for key in args.methods.split(","):
            r = run_one(key, seed, args, train_ds, val_ds, x_test, y_test)
            rows.append(dict(base, **{k: (f"{v:.5g}" if isinstance(v, float) else v) for k, v in r.items()}))
            print(f"{key:<18} {seed:4d} {r['acr']:7.4f} {r['clean_acc']:7.4f} {r['cert_acc_0.25']:8.4f} "
                  f"{r['cert_acc_0.5']:8.4f} {r['train_s']:6.1f}s {r['certify_s']:5.1f}s", flush=True)
    print("\nmean +- std over seeds:")
    for key in args.methods.split(","):
        sel = [r for r in rows if r["method"] == key]
        a, sa = _mean_std([float(r["acr"]) for r in sel])
        c, sc = _mean_std([float(r["clean_acc"]) for r in sel])
        print(f"  {key:<18} ACR {a:.3f} +- {sa:.3f}   clean {c:.3f} +- {sc:.3f}   ({len(sel)} seeds)")
    finish(args, rows)


if __name__ == "__main__":
    main()
