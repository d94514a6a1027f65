"""`robustops generate`: proxy data for training. Fits a class-conditional generator (a Gaussian mixture
per class in PCA space, robustops.proxy) on the training split of --data, writes N samples and their
labels as a .npz (arrays x, y) with a JSON summary beside it (OUT.json), and optionally scores the
samples' distance to the real data by robust discrimination (--score). --score-of scores an existing
.npz instead of generating one."""
from __future__ import annotations

import argparse
import os
import time

from .common import CLIError, add_common, check_writable, fractions, load_data, pick_device, require_min, \
    setup_run, write_summary

HELP = "generate class-conditional proxy data (PCA + Gaussian mixtures) and score it by robust discrimination"

_EPS = "0,1/32,1/16,1/8,1/4"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="digits",
                   help='the real data whose training split the generator fits (and --score compares against): '
                        '"digits", a .npz file, cifar10:DIR or imagefolder:DIR')
    p.add_argument("--n", "--num-samples", dest="n", type=int, default=20000, help="samples to generate")
    p.add_argument("-o", "--out", default=None, help="the generated data (.npz with x, y; a JSON summary goes to "
                                                     "OUT.json); required unless --score-of")
    p.add_argument("--components", type=int, default=4, help="Gaussian mixture components per class")
    p.add_argument("--pca-dim", type=int, default=24, help="PCA dimensions the mixtures live in")
    p.add_argument("--score", action="store_true",
                   help="also measure robust discrimination (real vs generated: robust accuracy of a PGD-trained "
                        "binary classifier per eps and its area ARC; lower = closer to the real data)")
    p.add_argument("--score-of", default=None, metavar="NPZ",
                   help="score this existing .npz (x, y) against --data instead of generating")
    p.add_argument("--score-eps", type=fractions("--score-eps"), default=_EPS,
                   help="L-inf budgets of the score, increasing, comma-separated")
    p.add_argument("--score-epochs", type=int, default=10, help="training epochs of each discriminator")
    p.add_argument("--score-samples", type=int, default=None,
                   help="at most this many samples per source in the score (None: the real training split's size)")
    p.add_argument("--summary", default=None,
                   help="JSON summary path (default: OUT.json when generating; none with --score-of)")
    add_common(p, workers=False)


def _tensors(ds):
    import torch
    from torch.utils.data import TensorDataset

    if isinstance(ds, TensorDataset):
        return ds.tensors[0], ds.tensors[1]
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([it[0] for it in items]), torch.as_tensor([int(it[1]) for it in items])


def _print_score(s: dict) -> None:
    cells = "  ".join(f"{e:.4g}: {a:.3f}" for e, a in zip(s["eps"], s["robust_acc"]))
    e50 = "-" if s["eps50"] is None else f"{s['eps50']:.4g}"
    print(f"robust discrimination (held-out robust accuracy by eps)  {cells}")
    print(f"ARC {s['arc']:.4f}  ARC / eps range {s['arc_norm']:.3f} (0.5 = indistinguishable)  eps50 {e50}")


def run(args) -> int:
    import torch

    from .. import proxy, train

    require_min(n=(args.n, 1), components=(args.components, 1), pca_dim=(args.pca_dim, 1),
                score_epochs=(args.score_epochs, 1), score_samples=(args.score_samples, 4))
    eps = sorted(set(args.score_eps))  # argparse parses the string default too
    if len(eps) < 2 or min(eps) < 0:
        raise CLIError(f"--score-eps needs at least two distinct budgets >= 0, got {args.score_eps}")
    if args.score_of is None and args.out is None:
        raise CLIError("-o/--out is required (the .npz to write), unless --score-of names one to score")
    if args.score_of is not None and args.out is not None:
        raise CLIError("--score-of scores an existing file and writes none; drop -o/--out (use --summary for "
                       "the JSON summary)")
    summary_path = args.summary if args.summary is not None else (args.out + ".json" if args.out else None)
    if args.out is not None:
        if not args.out.endswith(".npz"):
            raise CLIError(f"-o/--out {args.out!r}: give a .npz file name")
        check_writable(args.out, "-o/--out")
    if summary_path is not None:
        check_writable(summary_path, "--summary")
    ds, info = load_data(args.data, "train")
    x, y = _tensors(ds)
    setup_run(args, int(x[0].numel()))
    dev = pick_device(args.device)
    record = {"command": "generate", "data": args.data, "real_train_samples": int(x.shape[0]),
              "image_shape": list(x.shape[1:]), "num_classes": int(info["num_classes"]), "seed": args.seed}
    if args.score_of is not None:
        try:
            gx, gy = proxy.load_generated(args.score_of, tuple(x.shape[1:]), int(info["num_classes"]))
        except (FileNotFoundError, ValueError) as e:
            raise CLIError(f"--score-of: {e}") from None
        record.update({"command": "generate --score-of", "scored": os.path.abspath(args.score_of),
                       "samples": int(gx.shape[0])})
    else:
        t0 = time.perf_counter()
        try:
            gen = proxy.fit_generator(x, y, components=args.components, pca_dim=args.pca_dim, seed=args.seed)
        except ValueError as e:
            raise CLIError(f"--pca-dim / --components: {e}") from None
        gx, gy = gen.save(args.out, args.n, seed=args.seed)
        dt = time.perf_counter() - t0
        counts = torch.bincount(gy, minlength=int(info["num_classes"])).tolist()
        record.update({"out": os.path.abspath(args.out), "samples": args.n, "components": args.components,
                       "pca_dim": args.pca_dim, "class_counts": counts, "time_s": dt})
        print(f"wrote {args.out}: {args.n} samples of {len(counts)} classes, shape {list(gx.shape[1:])} "
              f"(PCA {args.pca_dim} dims, {args.components} components per class) in {dt:.1f}s")
    if args.score or args.score_of is not None:
        t0 = time.perf_counter()
        s = train.robust_discrimination(x, gx, eps, epochs=args.score_epochs, max_samples=args.score_samples,
                                        seed=args.seed, device=dev, threads=args.threads)
        s["time_s"] = time.perf_counter() - t0
        record["score"] = s
        _print_score(s)
    if summary_path is not None:
        write_summary(summary_path, record)
        print(f"summary: {summary_path}")
    return 0
