"""`robustops demo --section objectives`: adversarial training that uses more than the label (issue 28).

Rows (``ROWS``, trained by the demo's row machinery with the demo's epochs, eps, steps, learning rate
and seed): PGD-7 AT and TRADES (the baselines), stylized max-margin AT (``sat``, Naseer et al. 2022),
InfoAT (``infoat``, Xu et al. 2022), J-SIGR (``jsigr``, Liu et al. 2022) and PGD-7 AT with
out-of-distribution images trained toward the uniform label (Lee et al. 2021: ``ood_data``, the
generated digits-OOD set, half of every batch, at PGD-7 AT's number of optimizer steps: ``row_options``). Columns: clean, PGD-20 and AutoAttack
accuracy at the demo's eps (the main table's), and transfer accuracy: PGD-20 examples crafted on a
separately trained source model (--objectives-source, seeded --seed + 1) evaluated on each row's model.
The issue's targets are judged on the printed figures, never assumed. Writes OUT/objectives/results.json."""
from __future__ import annotations

import argparse
import os
from typing import Dict, List

from .common import fmt_pct, parse_rows, write_summary

__all__ = ["SECTION", "ROWS", "add_arguments", "check_arguments", "row_options", "source_model", "targets",
           "table", "run_section"]

SECTION = "objectives"
#: row -> (method, options of train.fit)
ROWS: Dict[str, tuple] = {
    "pgd": ("pgd", {}),
    "trades": ("trades", {}),
    "sat": ("sat", {}),
    "infoat": ("infoat", {}),
    "jsigr": ("jsigr", {}),
    "pgd+ood": ("pgd", {"ood_data": "digits-ood", "ood_ratio": 0.5}),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The section's flags (epochs, eps, steps, learning rate, seed and threads are the demo's)."""
    g = p.add_argument_group("--section objectives")
    g.add_argument("--objectives-rows", default=",".join(ROWS),
                   help=f"comma-separated rows of the objectives section (default: {','.join(ROWS)})")
    g.add_argument("--objectives-source", default="pgd", choices=["pgd", "natural"],
                   help="the transfer attacks' source model: trained with this method, seed --seed + 1")


def check_arguments(args) -> List[str]:
    """The section's rows, checked (a clear error naming the flag otherwise)."""
    return parse_rows(args.objectives_rows, ROWS, "--objectives-rows")


def row_options(args, key: str):
    """(method, options) of a section row. The OOD row keeps PGD-7 AT's number of optimizer steps: a batch
    of --batch-size holds (1 - ratio) of it in digits, so an epoch over the digits takes 1 / (1 - ratio)
    times the steps, and the row trains round(epochs (1 - ratio)) epochs."""
    method, opts = ROWS[key]
    opts = dict(opts)
    if "ood_ratio" in opts:
        opts["epochs"] = max(1, round(args.epochs * (1.0 - opts["ood_ratio"])))
    return method, opts


def source_model(args, data, dev):
    """The transfer attacks' source: a SmallCNN trained with --objectives-source on the demo's training
    split and settings, seeded --seed + 1 (a different initialisation and batch order from every row)."""
    import torch
    from torch.utils.data import DataLoader

    from .. import models, train
    from .common import DIGITS_MODEL

    torch.manual_seed(args.seed + 1)
    model = models.get_model("small_cnn", **DIGITS_MODEL).to(dev)
    loader = DataLoader(data.train_ds, batch_size=args.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(args.seed + 1))
    train.fit(model, loader, args.objectives_source, epochs=args.epochs, eps=args.eps, steps=args.steps, lr=args.lr,
              seed=args.seed + 1, progress=False, verbose=False, device=dev, threads=args.threads)
    return model.eval()


def targets(by: Dict[str, dict]) -> List[str]:
    """The issue's targets judged on the rows' figures: sat and infoat robust >= PGD-7 AT (AutoAttack when
    measured, else PGD-20) at clean within 1 point; jsigr the best transfer accuracy of the table; OOD data
    raising clean and robust accuracy over PGD-7 AT."""
    if "pgd" not in by:
        return []
    base = by["pgd"]
    key = "aa_acc" if base.get("aa_acc") is not None else "robust_acc"
    what = "AutoAttack" if key == "aa_acc" else "PGD-20"
    lines = []
    for m in ("sat", "infoat"):
        if m in by:
            r = by[m]
            rob = r[key] >= base[key]
            clean = r["clean_acc"] >= base["clean_acc"] - 0.01
            lines.append(f"target {m}: {what} >= PGD-7 AT: {'met' if rob else 'MISSED'} ({fmt_pct(r[key])} vs "
                         f"{fmt_pct(base[key])}); clean within 1 point: {'met' if clean else 'MISSED'} "
                         f"({fmt_pct(r['clean_acc'])} vs {fmt_pct(base['clean_acc'])})")
    if "jsigr" in by:
        best = max(by.values(), key=lambda r: r["transfer_acc"])
        ok = by["jsigr"]["transfer_acc"] >= best["transfer_acc"]
        lines.append(f"target jsigr: best transfer accuracy of the table: {'met' if ok else 'MISSED'} "
                     f"({fmt_pct(by['jsigr']['transfer_acc'])}; best {best['label']} {fmt_pct(best['transfer_acc'])})")
    if "pgd+ood" in by:
        r = by["pgd+ood"]
        ok = r["clean_acc"] > base["clean_acc"] and r[key] > base[key]
        lines.append(f"target OOD data: clean and {what} above PGD-7 AT: {'met' if ok else 'MISSED'} "
                     f"({fmt_pct(r['clean_acc'])} / {fmt_pct(r[key])} vs {fmt_pct(base['clean_acc'])} / "
                     f"{fmt_pct(base[key])})")
    return lines


def table(rows: List[dict], args) -> List[str]:
    """The section's Markdown table, one line per row."""
    head = ["row", "clean", f"PGD-{args.attack_steps} (eps {args.eps:g})", "AutoAttack",
            f"transfer PGD-20 from {args.objectives_source}", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        aa = "-" if r.get("aa_acc") is None else fmt_pct(r["aa_acc"])
        lines.append("| " + " | ".join([r["label"], fmt_pct(r["clean_acc"]), fmt_pct(r["robust_acc"]), aa,
                                        fmt_pct(r["transfer_acc"]), f"{r['train_time_s']:.1f}"]) + " |")
    return lines


def run_section(args, data, rows: List[dict], dev) -> List[str]:
    """Transfer-attacks every trained row from a separately trained source model, prints the table and
    the target lines, writes OUT/objectives/results.json."""
    from .. import attacks

    source = source_model(args, data, dev)
    for r in rows:
        pgd = attacks.PGD(source, eps=args.eps, steps=20, norm="linf", random_start=True, seed=args.seed)
        r["transfer_acc"] = attacks.robust_accuracy(r["model"], data.test_loader, attacks.Transfer(r["model"], pgd),
                                                    device=dev, progress=False)["robust_acc"]
    by = {r["method"]: r for r in rows}
    head = (f"digits, SmallCNN, {args.epochs} epochs, L-inf eps {args.eps:g}; transfer: PGD-20 on a "
            f"{args.objectives_source} source model trained with seed {args.seed + 1}")
    lines = [head, ""] + table(rows, args) + [""] + targets(by)
    print("\n" + "\n".join(lines), flush=True)
    out = os.path.join(args.out, SECTION)
    os.makedirs(out, exist_ok=True)
    keep = ("method", "label", "clean_acc", "robust_acc", "aa_acc", "transfer_acc", "train_time_s", "epochs_run",
            "best_epoch")
    summary = write_summary(os.path.join(out, "results.json"), {
        "command": "demo --section objectives", "seed": args.seed, "epochs": args.epochs, "eps": args.eps,
        "source": args.objectives_source, "table": lines, "rows": [{k: r.get(k) for k in keep} for r in rows]})
    print(f"\nwrote {summary}")
    return lines
