"""`robustops demo --section autoattack`: AutoAttack (standard) at its published budgets on the demo's
natural and PGD-7 AT digits models, stage by stage, and the masking check at work on a model whose
gradients are masked (the natural model behind an input rounding to 1/255 steps): APGD leaves it
looking robust, Square breaks it, the warning fires. A table per model, a picture of the robust
accuracy after each stage, results.json. Called by ``robustops demo``; its arguments are the demo's."""
from __future__ import annotations

import os
import time
from typing import List

from .common import fmt_pct, write_summary

__all__ = ["SECTION", "round_input", "run_section", "budgets"]

SECTION = "autoattack"


def budgets(args, section: bool) -> tuple:
    """(APGD iterations, FAB iterations, Square queries): the flags when given, else AutoAttack's own
    (100, 100, 5000) in this section and the main table's smaller ones (50, 10, 300). ``robustops demo``
    resolves both before it runs (args.aa_section_budget; args.aa_steps / aa_fab_steps / aa_queries)."""
    full = (100, 100, 5000) if section else (50, 10, 300)
    given = (args.aa_steps, args.aa_fab_steps, args.aa_queries)
    return tuple(f if g is None else g for g, f in zip(given, full))


def round_input(net):
    """net behind an input rounded to 1/255 steps: its input gradient is zero everywhere, a textbook case
    of masked gradients (the predictions of 8-bit images are unchanged). The section's masked model."""
    import torch

    class RoundInput(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(torch.round(x * 255) / 255)

    return RoundInput()


def _evaluate(args, name: str, model, data, dev, budget) -> dict:
    from ..attacks.suites import Suite

    steps, fab_steps, queries = budget
    t0 = time.perf_counter()
    suite = Suite(model, args.eps, "linf", steps=steps, fab_steps=fab_steps, n_queries=queries, seed=args.seed)
    res = suite.run(data.test_loader, device=dev, progress=False)
    out = {"model": name, "attacks": suite.describe(), "clean_acc": res["clean_acc"], "robust_acc": res["robust_acc"],
           "stages": res["stages"], "warnings": res["warnings"], "seconds": time.perf_counter() - t0}
    return out


def _table(r: dict, n: int, eps: float) -> List[str]:
    lines = [f"AutoAttack (standard) on the {r['model']} model: {r['attacks']}, L-inf eps {eps:g}, {n} test images, "
             f"{r['seconds']:.1f}s", "| stage | broken | robust accuracy |", "|---|---:|---:|",
             f"| clean | - | {fmt_pct(r['clean_acc'])} |"]
    lines += [f"| {s['label']} | {s['broken']} | {fmt_pct(s['robust_acc'])} |" for s in r["stages"]]
    lines += [f"warning: {w}" for w in r["warnings"]] or ["masking check: no warning"]
    return lines


def run_section(args, data, rows, dev) -> List[str]:
    """The section on the demo's trained rows (natural and PGD-7 AT, models in eval mode): prints the
    tables, writes OUT/autoattack/ (results.json, stages.png/.pdf). Returns the printed lines."""
    from ..plotting import plot_curve

    budget = args.aa_section_budget
    by_method = {r["method"]: r for r in rows}
    models = [(by_method[m]["label"], by_method[m]["model"]) for m in ("natural", "pgd") if m in by_method]
    if "natural" in by_method:
        models.append((f"{by_method['natural']['label']} behind a 1/255 input rounding (masked gradients)",
                       round_input(by_method["natural"]["model"]).eval()))
    results, lines = [], []
    n = len(data.test_ds)
    for name, model in models:
        r = _evaluate(args, name, model, data, dev, budget)
        results.append(r)
        table = _table(r, n, args.eps)
        print("\n" + "\n".join(table), flush=True)
        lines += [""] + table
    out = os.path.join(args.out, SECTION)
    os.makedirs(out, exist_ok=True)
    curves = {r["model"]: [r["clean_acc"]] + [s["robust_acc"] for s in r["stages"]] for r in results}
    labels = ["clean"] + [s["label"] for s in results[0]["stages"]] if results else []
    plots = plot_curve(os.path.join(out, "stages.png"), list(range(len(labels))), curves,
                       xlabel="after the stage", ylabel="robust accuracy", xticklabels=labels, title=f"digits, AutoAttack (standard), L-inf eps {args.eps:g}")
    summary = write_summary(os.path.join(out, "results.json"), {"command": "demo --section autoattack",
                                                                "eps": args.eps, "seed": args.seed,
                                                                "budget": dict(zip(("steps", "fab_steps", "queries"),
                                                                                   budget)), "models": results})
    print(f"\nwrote {', '.join(plots + [summary])}")
    return lines
