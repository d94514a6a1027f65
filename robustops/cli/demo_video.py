"""`robustops demo --section video`: adversarial training on videos. The tiny 3-D-conv ``video_cnn``
trained on the embedded moving digits ([B, T, C, H, W] = [B, 8, 1, 16, 16], ``data.load_moving_digits``)
naturally, with PGD-AT and with the attack-budget schedules of Kinfu & Vidal (CVPR-W 2022: curriculum,
the budget rising over training; adaptive, the budget drawn by the model's current adversarial loss;
``fit(..., budget_schedule=)``, :mod:`robustops.train.budget`). One table:
clean, PGD-20 and APGD-CE accuracy at the section's eps on the test videos, and the training time; a
CSV written row by row and results.json. Called by ``robustops demo``; its arguments are the demo's
(--seed, --lr, --batch-size, --val-size, --threads) plus those of :func:`add_arguments`."""
from __future__ import annotations

import argparse
import csv
import os
import time
from typing import List

from .common import CLIError, fmt_pct, fraction, parse_rows, require_min, split_holdout, write_summary

__all__ = ["SECTION", "ROWS", "add_arguments", "check_arguments", "train_row", "table", "run_section"]

SECTION = "video"
#: The section's rows: row name -> (training method, the extra keyword arguments of ``train.fit``).
ROWS = {"natural": ("natural", {}),
        "pgd": ("pgd", {}),
        "pgd+curriculum": ("pgd", {"budget_schedule": "curriculum"}),
        "pgd+adaptive": ("pgd", {"budget_schedule": "adaptive"})}
CSV_FIELDS = ("row", "method", "settings", "clean_acc", "pgd20_acc", "apgd_acc", "train_time_s", "epochs")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The section's flags (learning rate, batch size, validation size, seed and threads are the demo's)."""
    g = p.add_argument_group("--section video")
    g.add_argument("--video-rows", default=",".join(ROWS),
                   help=f"comma-separated rows of the video section (default: {','.join(ROWS)})")
    g.add_argument("--video-epochs", type=int, default=25, help="epochs per video model")
    g.add_argument("--video-eps", type=fraction("video-eps"), default=0.1,
                   help="L-inf budget of training and of the PGD-20 / APGD-CE evaluation (pixels in [0, 1])")
    g.add_argument("--video-steps", type=int, default=3, help="PGD-AT inner steps on the videos")
    g.add_argument("--video-apgd-steps", type=int, default=20, help="APGD-CE iterations of the evaluation")


def check_arguments(args) -> List[str]:
    """The section's rows, checked (a clear error naming the flag otherwise)."""
    rows = parse_rows(args.video_rows, ROWS, "--video-rows")
    require_min(video_epochs=(args.video_epochs, 1), video_steps=(args.video_steps, 1),
                video_apgd_steps=(args.video_apgd_steps, 1))
    if not 0 < args.video_eps < 1:
        raise CLIError(f"--video-eps must be in (0, 1), got {args.video_eps}")
    return rows


def _data(args):
    from torch.utils.data import DataLoader

    from .. import data as rodata

    train_ds, _ = rodata.get_dataset("moving_digits", "train")
    test_ds, _ = rodata.get_dataset("moving_digits", "test")
    val_loader = None
    if args.val_size > 0:
        train_ds, val_ds = split_holdout(train_ds, args.val_size, args.seed)
        val_loader = DataLoader(val_ds, batch_size=256, shuffle=False)
    return train_ds, val_loader, DataLoader(test_ds, batch_size=180, shuffle=False)


def train_row(args, name: str, train_ds, val_loader, test_loader, dev) -> dict:
    """Trains the row's video_cnn and evaluates it: clean, PGD-20 and APGD-CE accuracy on the test videos."""
    import torch
    from torch.utils.data import DataLoader

    from .. import attacks, models, train

    method, extra = ROWS[name]
    torch.manual_seed(args.seed)
    model = models.get_model("video_cnn").to(dev)
    loader = DataLoader(train_ds, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(
        args.seed))
    res = train.fit(model, loader, method, val_loader=val_loader, out_dir=os.path.join(args.out, SECTION, name),
                    progress=False, verbose=False, device=dev, model_name="video_cnn", extra={"data": "moving_digits"},
                    threads=args.threads, epochs=args.video_epochs, eps=args.video_eps, steps=args.video_steps,
                    lr=args.lr, seed=args.seed, val_steps=5, **extra)
    model.eval()
    pgd = attacks.PGD(model, eps=args.video_eps, steps=20, seed=args.seed)
    ev = attacks.robust_accuracy(model, test_loader, pgd, device=dev, progress=False)
    apgd = attacks.APGD(model, eps=args.video_eps, steps=args.video_apgd_steps, seed=args.seed)
    ea = attacks.robust_accuracy(model, test_loader, apgd, device=dev, progress=False)
    settings = ", ".join(f"{k}={v}" for k, v in extra.items()) or "-"
    return {"row": name, "method": method, "settings": settings, "clean_acc": ev["clean_acc"],
            "pgd20_acc": ev["robust_acc"], "apgd_acc": ea["robust_acc"], "train_time_s": res.train_time,
            "epochs": res.epochs_run}


def table(rows: List[dict], args) -> List[str]:
    """The section's table, one line per trained row."""
    head = (f"moving digits [B, 8, 1, 16, 16], video_cnn, {args.video_epochs} epochs, L-inf eps {args.video_eps:g} "
            f"(PGD-AT {args.video_steps} steps)")
    lines = [head, f"{'row':<16} {'clean':>7} {'PGD-20':>7} {'APGD-CE':>8} {'train s':>8}"]
    for r in rows:
        lines.append(f"{r['row']:<16} {fmt_pct(r['clean_acc']):>7} {fmt_pct(r['pgd20_acc']):>7} "
                     f"{fmt_pct(r['apgd_acc']):>8} {r['train_time_s']:>8.1f}")
    return lines


def run_section(args, dev) -> int:
    """Trains and evaluates every row, writes results.csv row by row
    and results.json under <out>/video, prints the table; returns the exit status (0)."""
    t_start = time.perf_counter()
    names = check_arguments(args)
    out = os.path.join(args.out, SECTION)
    os.makedirs(out, exist_ok=True)
    train_ds, val_loader, test_loader = _data(args)
    rows = []
    with open(os.path.join(out, "results.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        w.writeheader()
        for name in names:
            t0 = time.perf_counter()
            r = train_row(args, name, train_ds, val_loader, test_loader, dev)
            rows.append(r)
            w.writerow(r)
            fh.flush()
            print(f"video: {name} done in {time.perf_counter() - t0:.0f} s", flush=True)
    print("\n".join(table(rows, args)))
    write_summary(os.path.join(out, "results.json"), {"rows": rows, "eps": args.video_eps,
                                                      "epochs": args.video_epochs, "steps": args.video_steps})
    print(f"({time.perf_counter() - t_start:.0f} s in all)")
    return 0
