"""`robustops robustify`: preemptive robustification (Moon et al. 2022, ``robustops.robustify``) of a data
set's images for a model, then the comparison of the robustified images with the originals: clean
accuracy, robust accuracy under the adversary's attacks (--suites, at --eps-adv) and, with --sigma, the
smoothed classifier's certified radii before and after.

The model and the data as `robustops evaluate` takes them (a checkpoint, or --model package.module:factory
with --weights). Per-image rows (-o OUT, a TSV: the label protected, whether the inner attack failed
before / after, the losses, the distance moved) and the robustified images of each batch are written as
the batches finish, so an interrupted run continues with --resume; at the end OUT.npz holds x, x_pre and
the labels, OUT.json the summary (the table's figures)."""
from __future__ import annotations

import argparse
import contextlib
import math
import os

from . import evaluate_corruptions
from .attack import input_transform
from .attack_rows import claim, finish
from .common import (CLIError, add_common, distributed, fmt_pct, fraction, load_data, model_classes,
                     require_min, setup_run)
from .evaluate import add_model_arguments, load_model_flags
from .rows import ResultsFile, RowWriter

HELP = ("preemptively robustify images for a model (Moon et al. 2022) and compare them with the originals under "
        "attacks and smoothing certification, resumable")

COLUMNS = ("idx", "label", "protected", "robust_start", "robust", "loss_start", "loss", "distance")
FIELDS = (int, int, int, int, float, float, float)
SUITE_NAMES = ("pgd", "apgd", "autoattack", "fab", "square")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--data", default="digits", help='"digits" (embedded), a .npz file, "cifar10:DIR" or '
                   '"imagefolder:DIR"')
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--n", "--max-samples", dest="n", type=int, default=None, help="robustify the first N inputs (None: all)")
    p.add_argument("--norm", default=None, choices=["linf", "l2"],
                   help="the norm of both budgets (default: l2 with --sigma, which needs it, else linf)")
    p.add_argument("--eps-pre", type=fraction("eps-pre"), default=None,
                   help="the user's budget (None: --eps-adv, as the paper sets them)")
    p.add_argument("--eps-adv", type=fraction("eps-adv"), default=0.2,
                   help="the adversary's budget (the digits demo's 0.2 L-inf; the paper's CIFAR-10: 8/255)")
    p.add_argument("--steps", type=int, default=20, help="outer (robustification) steps")
    p.add_argument("--inner-steps", type=int, default=10, help="the inner adversary's PGD steps")
    p.add_argument("--keep", default="last", choices=["last", "best"],
                   help="the iterate kept: the last, or the one whose inner attack reached the lowest loss")
    p.add_argument("--sigma", type=float, default=None,
                   help="robustify the smoothed classifier at this noise level, and certify before / after "
                   "(L2 budgets: the certified radius's norm)")
    p.add_argument("--noise-samples", type=int, default=8, help="noise draws per estimate of the smoothed loss")
    p.add_argument("--suites", default="pgd,autoattack",
                   help=f"the adversary's attacks, comma-separated, each of {', '.join(SUITE_NAMES)} ('' for none)")
    p.add_argument("--attack-steps", type=int, default=None, help="the evaluation attacks' steps (None: theirs)")
    p.add_argument("--n0", type=int, default=100, help="CERTIFY's selection samples (with --sigma)")
    p.add_argument("--n-certify", type=int, default=1000, help="CERTIFY's estimation samples (with --sigma)")
    p.add_argument("--alpha", type=float, default=0.001, help="CERTIFY's failure probability (with --sigma)")
    p.add_argument("--batch-size", type=int, default=256, help="images robustified together (the rows depend on it)")
    p.add_argument("-o", "--out", default=None, help="per-image rows (TSV), with OUT.npz (images) and OUT.json")
    p.add_argument("--force", action="store_true", help="replace an existing --out once this run has finished")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run: keep its batches, "
                   "robustify the rest (refused when a setting that changes the rows differs)")
    add_common(p, workers=False)


def _suites(spec: str) -> tuple:
    names = tuple(s.strip() for s in spec.split(",") if s.strip())
    bad = [s for s in names if s not in SUITE_NAMES]
    if bad:
        raise CLIError(f"--suites: unknown {', '.join(bad)}; expected a comma-separated list of "
                       f"{', '.join(SUITE_NAMES)}")
    return names


def _check_flags(args) -> tuple:
    require_min(n=(args.n, 1), steps=(args.steps, 1), inner_steps=(args.inner_steps, 1),
                noise_samples=(args.noise_samples, 1), n0=(args.n0, 1), n_certify=(args.n_certify, 1),
                batch_size=(args.batch_size, 1), attack_steps=(args.attack_steps, 1))
    evaluate_corruptions.check_shared_flags(args)
    for flag, v in (("--eps-adv", args.eps_adv), ("--eps-pre", args.eps_pre)):
        if v is not None and not 0.0 <= v < math.inf:
            raise CLIError(f"{flag} must be a finite number >= 0, got {v}")
    if args.eps_adv == 0:
        raise CLIError("--eps-adv must be > 0: the adversary's budget")
    if args.sigma is not None and not 0.0 < args.sigma < math.inf:
        raise CLIError(f"--sigma must be a finite number > 0, got {args.sigma}")
    if not 0.0 < args.alpha < 1.0:
        raise CLIError(f"--alpha must be in (0, 1), got {args.alpha}")
    if args.sigma is not None and args.norm == "linf":
        raise CLIError("--norm linf: --sigma robustifies and certifies the smoothed classifier in L2 (its certified "
                       "radius's norm); leave --norm out or give --norm l2")
    args.norm = args.norm or ("linf" if args.sigma is None else "l2")
    return _suites(args.suites)


def _settings(args, eps_pre: float) -> dict:
    keys = ("model", "data", "split", "norm", "eps_adv", "steps", "inner_steps", "keep", "sigma", "noise_samples",
            "normalize", "mean", "std", "seed", "batch_size", "weights_prefix")
    out = {k: getattr(args, k) for k in keys}
    out.update(eps_pre=eps_pre, checkpoint=args.checkpoint and os.path.abspath(args.checkpoint),
               weights=args.weights and os.path.abspath(args.weights))
    return out


def _images_dir(results) -> str:
    return results.path + ".images"


def _batch_path(folder: str, start: int) -> str:
    return os.path.join(folder, f"{start:09d}.npz")


def _save_batch(path: str, x_pre, protected) -> None:
    """A batch's robustified images, written atomically (a kill leaves the old file or none)."""
    import numpy as np

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}.npz"
    np.savez(tmp, x_pre=x_pre.cpu().numpy(), protected=protected.cpu().numpy())
    os.replace(tmp, path)


def _columns(r) -> list:
    """The result's per-image columns of a row, each moved to the CPU once (not one sync per value)."""
    return [c.cpu().tolist() for c in (r.labels, r.robust_start, r.robust, r.loss_start, r.loss, r.distance)]


def _row(i: int, label: int, cols: list, k: int) -> str:
    protected, robust_start, robust, loss_start, loss, dist = (c[k] for c in cols)
    return "\t".join([str(i), str(label), str(int(protected)), str(int(robust_start)), str(int(robust)),
                      f"{loss_start:.6g}", f"{loss:.6g}", f"{dist:.6g}"])


def _robustify_batches(args, model, dataset, stop, eps_pre, mean, std, device, results) -> tuple:
    """Robustifies the batches not yet done (all of them without results); returns (x, x_pre, y, protected)
    of the first stop images, on the CPU."""
    import numpy as np
    import torch

    from ..preemptive import robustify

    done = results.done() if results is not None else set()
    folder = _images_dir(results) if results is not None else None
    out = results.open_part(0) if results is not None else None
    starts = list(range(0, stop, args.batch_size))
    writer = RowWriter(out, stop, "robustify", bool(args.progress), lines="robustify", unit="image")
    xs, pres, ys, prots = [], [], [], []
    try:
        for s in starts:
            idx = list(range(s, min(s + args.batch_size, stop)))
            x = torch.stack([dataset[i][0] for i in idx])
            y = torch.tensor([int(dataset[i][1]) for i in idx])
            path = None if folder is None else _batch_path(folder, s)
            if path is not None and set(idx) <= done and os.path.exists(path):
                saved = np.load(path)
                xs.append(x), ys.append(y)
                pres.append(torch.from_numpy(saved["x_pre"])), prots.append(torch.from_numpy(saved["protected"]))
                writer.tick(len(idx))
                continue
            r = robustify(model, x.to(device), eps_pre, args.eps_adv, norm=args.norm, steps=args.steps,
                          inner_steps=args.inner_steps, keep=args.keep, smooth=args.sigma,
                          noise_samples=args.noise_samples, seed=args.seed, offset=s, mean=mean, std=std)
            if path is not None:
                _save_batch(path, r.x_pre, r.labels)
            if out is not None:
                cols, labels = _columns(r), y.tolist()
                for k, i in enumerate(idx):
                    writer.write(_row(i, labels[k], cols, k))
            writer.tick(len(idx))
            xs.append(x), ys.append(y), pres.append(r.x_pre.cpu()), prots.append(r.labels.cpu())
    finally:
        writer.close()
        if out is not None:
            out.close()
    return torch.cat(xs), torch.cat(pres), torch.cat(ys), torch.cat(prots)


def run(args) -> int:
    suites = _check_flags(args)
    dataset, info = load_data(args.data, args.split, validate=False)
    model, _meta = load_model_flags(args)
    info = model_classes(model, dataset, info, args.data, args.split)
    mean, std = (args.mean, args.std) if args.mean is not None else input_transform(argparse.Namespace(
        normalize=args.normalize, amp="none"), info)[:2]
    eps_pre = args.eps_adv if args.eps_pre is None else args.eps_pre
    setup_run(args, sample_numel=math.prod(info["input_shape"]))
    final = ResultsFile(args.out, "\t".join(COLUMNS), FIELDS) if args.out else None
    results = final.aside() if final is not None and args.force else final
    stop = len(dataset) if args.n is None else min(args.n, len(dataset))
    with distributed(args.device) as d, contextlib.ExitStack() as stack:
        if d.world > 1:
            raise CLIError("robustify runs in one process: start it without torchrun")
        claim(d, stack, args.out, final, _settings(args, eps_pre), "robustify", resume=args.resume, force=args.force)
        model = model.to(d.device).eval()
        try:
            x, x_pre, y, protected = _robustify_batches(args, model, dataset, stop, eps_pre, mean, std, d.device,
                                                        results)
        except Exception:
            if results is not None:
                results.discard_empty(0)
            raise
        record = _evaluate(args, model, x, x_pre, y, suites, mean, std, d.device)
        record.update(eps_pre=eps_pre, protected_matches_label=float((protected == y).float().mean()))
        _report(args, info, record, eps_pre)
        if results is not None:
            _finish_files(args, results, final, x, x_pre, y, protected, record)
    return 0


def _evaluate(args, model, x, x_pre, y, suites, mean, std, device) -> dict:
    from ..preemptive import distance, robustify_evaluation

    ev = robustify_evaluation(model, x.to(device), x_pre.to(device), y.to(device), args.eps_adv, norm=args.norm,
                              suites=suites, steps=args.attack_steps, smooth=args.sigma, n0=args.n0,
                              n=args.n_certify, alpha=args.alpha, seed=args.seed, mean=mean, std=std,
                              batch_size=args.batch_size)
    dist = distance(x_pre, x, args.norm)
    return {"command": "robustify", "n": int(x.shape[0]), "norm": args.norm, "eps_adv": args.eps_adv,
            "steps": args.steps, "inner_steps": args.inner_steps, "sigma": args.sigma, "suites": list(suites),
            "original": ev["original"], "robustified": ev["robustified"], "max_distance": float(dist.max())}


def _report(args, info, record, eps_pre) -> None:
    cols = ["clean_acc"] + [f"{s}_acc" for s in record["suites"]]
    if args.sigma is not None:
        cols += ["acr", "certified_acc_at_eps"]
    head = ["images"] + [c.replace("_acc", "") if c != "acr" else "ACR" for c in cols]
    print(f"robustify on {info['name']}/{args.split}: {record['n']} images, {args.norm} eps_pre={eps_pre:.6g}, "
          f"eps_adv={args.eps_adv:.6g}, {args.steps} outer x {args.inner_steps} inner steps"
          + (f", smoothed at sigma={args.sigma:g}" if args.sigma is not None else ""))
    print("  ".join(f"{h:>14}" for h in head))
    for key in ("original", "robustified"):
        row = record[key]
        vals = [f"{row[c]:.3f}" if c == "acr" else fmt_pct(row[c]) for c in cols]
        print("  ".join(f"{v:>14}" for v in [key] + vals))


def _finish_files(args, results, final, x, x_pre, y, protected, record) -> None:
    """OUT.npz (x, x_pre, labels, protected labels) and the summary beside the merged rows; the batch
    files removed."""
    import shutil

    import numpy as np

    results.merge()
    tmp = f"{args.out}.tmp.{os.getpid()}.npz"
    np.savez(tmp, x=x.numpy(), x_pre=x_pre.numpy(), labels=y.numpy(), protected=protected.numpy())
    os.replace(tmp, args.out + ".npz")
    shutil.rmtree(_images_dir(results), ignore_errors=True)
    record["images"] = os.path.abspath(args.out + ".npz")
    print(f"per-image rows: {args.out}; images: {args.out}.npz; summary: {finish(results, final, record)}")
