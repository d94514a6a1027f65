"""AdversarialAugment (method ``ada``, Calian et al. 2022) against natural training on the digits: the
corruption network is a CorruptionAE trained on the training images by reconstruction (``perturbation
train --kind autoencoder``'s fit); the classifiers use the demo's settings (SmallCNN, SGD with the cyclic
schedule, lr 0.05, batch 64, 144 training images held out to pick the best epoch by clean accuracy).
Measured on the digits test split: clean accuracy, the mean accuracy over every corruption that
``robustops.corruptions`` registers (severities 1..5; which ones is printed), and wall seconds of training.
Optionally (--figure PATH) a picture of AdA examples: inputs, the network's output, AdA examples at
several nu.

    python benchmarks/ada_digits.py --threads 1            # 15 epochs, seeds 0, 1
    python benchmarks/ada_digits.py --quick                # < 1 min: 4 epochs, seed 0

Each row is appended to benchmarks/results/ada_digits.csv as soon as it is measured; natural training (the
baseline) is printed beside each figure. Times are wall seconds on a shared machine: read the ratio.
"""
from __future__ import annotations

import time

import torch
from torch.utils.data import DataLoader

from robustops import corruptions, models, perturbation, train
from robustops.cli.common import DIGITS_MODEL, split_holdout
from robustops.train.methods.ada import WeightPerturbation, ada_examples
from common import digits_setup, finish, parser


def corruption_network(train_ds, epochs: int, seed: int, device):
    """A CorruptionAE trained by reconstruction on the training images (what `perturbation train --kind
    autoencoder` trains)."""
    torch.manual_seed(seed)
    net = perturbation.CorruptionAE(1, width=16)
    loader = DataLoader(train_ds, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    perturbation.fit_perturbation(net, loader, epochs, 2e-3, device=device, progress=False, seed=seed)
    return perturbation.corruption_network(net, device)


def corruption_accuracy(model, loader, device) -> float:
    """Mean accuracy over the registered corruptions and severities 1..5 (seed 0, dataset indices)."""
    accs = []
    for name in corruptions.available():
        for sev in corruptions.SEVERITIES:
            right = n = 0
            for i, (x, y) in enumerate(loader):
                idx = torch.arange(i * loader.batch_size, i * loader.batch_size + x.shape[0])
                xc = corruptions.corrupt(x.to(device), name, sev, seed=0, indices=idx)
                with torch.no_grad():
                    right += (model(xc).argmax(1) == y.to(device)).sum().item()
                n += x.shape[0]
            accs.append(right / n)
    return sum(accs) / len(accs)


def run_one(method: str, seed: int, args, train_ds, val_ds, test_loader, net) -> dict:
    torch.manual_seed(seed)
    model = models.get_model("small_cnn", **DIGITS_MODEL).to(args.device)
    opts = dict(perturbation_model=net, ada_nu=args.nu, ada_steps=args.steps) if method == "ada" else {}
    loader = DataLoader(train_ds, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    t0 = time.perf_counter()
    res = train.fit(model, loader, method, val_loader=DataLoader(val_ds, batch_size=256), epochs=args.epochs,
                    lr=0.05, seed=seed, select="clean_acc", progress=False, verbose=False, device=args.device,
                    threads=args.threads, **opts)
    train_s = time.perf_counter() - t0
    model.eval()
    right = sum((model(x.to(args.device)).argmax(1) == y.to(args.device)).sum().item() for x, y in test_loader)
    return {"method": method, "seed": seed, "epochs": args.epochs, "nu": args.nu if method == "ada" else "",
            "ada_steps": args.steps if method == "ada" else "", "clean_acc": right / len(test_loader.dataset),
            "corruption_acc": corruption_accuracy(model, test_loader, args.device),
            "corruptions": "+".join(corruptions.available()), "best_epoch": res.best_epoch, "train_s": train_s}


def figure(net, test_loader, path: str, nus, steps: int) -> None:
    """Rows: 8 test digits, the network's output, then AdA examples at each nu (against a fixed random
    linear classifier; the examples' look, not their effect on a trained model)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch.nn.functional as F

    x, y = next(iter(test_loader))
    x, y = x[:8], y[:8]
    torch.manual_seed(0)
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(x[0].numel(), 10)).to(x.device)
    loss = lambda xc, t: F.cross_entropy(clf(xc), t, reduction="sum")  # noqa: E731
    rows = [("input", x), ("c(x)", net(x).clamp(0, 1).detach())]
    rows += [(f"AdA nu={nu:g}", ada_examples(WeightPerturbation(net, nu), loss, x, y, steps, 0.5, seed=0))
             for nu in nus]
    fig, axes = plt.subplots(len(rows), 8, figsize=(8, 1.05 * len(rows)))
    for r, (label, imgs) in enumerate(rows):
        for c in range(8):
            ax = axes[r, c]
            ax.imshow(imgs[c, 0].cpu(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle("AdversarialAugment on the digits: weight-perturbed autoencoder outputs", fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"figure -> {path}")


def main(argv=None):
    p = parser(__doc__, "ada_digits.csv")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--ae-epochs", type=int, default=10, help="epochs of the corruption network's training")
    p.add_argument("--nu", type=float, default=0.02)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--figure", default=None, help="PNG of AdA examples (e.g. docs/ada_digits.png)")
    p.add_argument("--quick", action="store_true", help="4 epochs (autoencoder 3), seed 0 (< 1 min)")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.ae_epochs, args.seeds = 4, 3, "0"
    base, full_train, test_loader = digits_setup(args)
    print(f"device: {base['device']}; torch {torch.__version__}; {args.epochs} epochs; ada nu {args.nu}, "
          f"{args.steps} steps; corruptions: {', '.join(corruptions.available())} x severities 1-5")
    print(f"{'method':<8} {'seed':>4} {'clean':>15} {'corruption':>15} {'train s':>15}")
    for seed in (int(s) for s in args.seeds.split(",")):
        train_ds, val_ds = split_holdout(full_train, 144, seed)
        net = corruption_network(train_ds, args.ae_epochs, seed, args.device)
        if args.figure and seed == int(args.seeds.split(",")[0]):
            figure(net, test_loader, args.figure, (0.01, 0.02, 0.05, 0.1), args.steps)
        ref = None
        for method in ("natural", "ada"):
            r = run_one(method, seed, args, train_ds, val_ds, test_loader, net)
            ref = ref or r
            cells = [f"{r[k]:.4f} ({ref[k]:.4f})" for k in ("clean_acc", "corruption_acc")]
            print(f"{method:<8} {seed:4d} {cells[0]:>15} {cells[1]:>15} {r['train_s']:6.1f} "
                  f"({r['train_s'] / ref['train_s']:.2f}x)", flush=True)
            finish(args, [dict(base, **{k: (f"{v:.5g}" if isinstance(v, float) else v) for k, v in r.items()})])
    print("(in parentheses: natural training, the baseline, same seed)")


if __name__ == "__main__":
    main()
