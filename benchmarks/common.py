"""What the benchmark scripts share: their common flags (``parser``), setting up the device and
threads (``setup``), median timings, the device's measured copy bandwidth (the memory-bound limit
every figure is compared with), and CSV output (``finish``: rows stamped with the date, torch and
the device, appended to benchmarks/results/<name>.csv; ``benchmarks/plot.py`` draws them)."""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def bench(fn, device: str, min_time: float = 0.5, warmup: int = 3, max_reps: int = 2000) -> float:
    """Median seconds per call of fn() (CUDA: timed with events)."""
    for _ in range(warmup):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        times = []
        total = 0.0
        while total < min_time and len(times) < max_reps:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            t = s.elapsed_time(e) / 1e3
            times.append(t)
            total += t
        return statistics.median(times)
    times = []
    total = 0.0
    while (total < min_time and len(times) < max_reps) or len(times) < 3:
        t0 = time.perf_counter()
        fn()
        t = time.perf_counter() - t0
        times.append(t)
        total += t
    return statistics.median(times)


def copy_bandwidth(device: str, nbytes: int | None = None) -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read plus bytes written."""
    if nbytes is None:
        nbytes = 1 << 30 if device.startswith("cuda") else 1 << 27
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), device, min_time=0.5)
    return 2 * nbytes / t


def parser(doc: str, csv_name: str) -> argparse.ArgumentParser:
    """An argument parser with the flags every benchmark has: --device, --threads, --csv, --no-csv."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--csv", default=csv_name, help=f"file under benchmarks/results (default {csv_name})")
    p.add_argument("--no-csv", action="store_true", help="print only, append nothing")
    return p


def setup(args) -> dict:
    """Applies --threads and returns the stamp every row of this run carries (date, torch, device)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "device": device_name(str(args.device))}


def digits_setup(args):
    """The digits benchmarks' set-up: one thread unless --threads says otherwise (8x8 inputs: more threads
    only cost time), the device (:func:`setup`), the digits training split and a test loader (batches of
    360). Returns (setup's dict, the training dataset, the test loader)."""
    from torch.utils.data import DataLoader

    from robustops.data import get_dataset

    args.threads = args.threads or 1
    base = setup(args)
    test_loader = DataLoader(get_dataset("digits", "test")[0], batch_size=360, shuffle=False)
    return base, get_dataset("digits", "train")[0], test_loader


def append_csv(name: str, rows: list[dict]) -> str:
    """Appends rows to results/<name>; a file whose header lacks some of the rows' columns is
    rewritten with the union of the columns first, so earlier rows are never misaligned."""
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, name)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    old_rows: list[dict] = []
    if os.path.exists(path):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            old_fields = list(reader.fieldnames or [])
            if set(fields) <= set(old_fields):
                fields = old_fields
            else:
                old_rows = list(reader)
                fields = old_fields + [k for k in fields if k not in old_fields]
    if old_rows or not os.path.exists(path):
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(old_rows)
    with open(path, "a", newline="") as f:
        csv.DictWriter(f, fieldnames=fields).writerows(rows)
    return path


def finish(args, rows: list[dict]) -> None:
    """Appends the run's rows to its CSV (unless --no-csv) and says where."""
    if rows and not args.no_csv:
        path = append_csv(args.csv, rows)
        print(f"appended {len(rows)} rows to {path}")


def fit_classifier(model, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float = 2e-3, batch: int = 64):
    """A quick classifier for a benchmark: Adam at lr on shuffled minibatches of (x, y) (already on the
    model's device) for epochs passes; returns the model in eval mode."""
    import torch.nn.functional as F

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], device=x.device)
        for i in range(0, x.shape[0], batch):
            b = perm[i:i + batch]
            loss = F.cross_entropy(model(x[b]), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


def fit_digits(model, method: str, train_ds, val_ds, args, seed: int, **opts):
    """The demo's digits training for a benchmark: ``train.fit`` with SGD (cyclic schedule, lr 0.05), batch 64
    shuffled by the seed, 7 inner steps at args.eps for args.epochs epochs, the best epoch picked by PGD-10
    accuracy on val_ds. Returns (FitResult, wall seconds of the fit)."""
    from torch.utils.data import DataLoader

    from robustops import train

    loader = DataLoader(train_ds, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    t0 = time.perf_counter()
    res = train.fit(model, loader, method, val_loader=DataLoader(val_ds, batch_size=256, shuffle=False),
                    epochs=args.epochs, eps=args.eps, steps=7, lr=0.05, seed=seed, val_steps=10, progress=False,
                    verbose=False, device=args.device, threads=args.threads, **opts)
    return res, time.perf_counter() - t0


def digits_variant_runs(p: argparse.ArgumentParser, args, variants, run_one, baseline: str = "pgd"):
    """Runs run_one(key, seed, args, train_ds, val_ds, test_loader) -> row for every seed of args.seeds and
    every key of args.variants (checked against ``variants``: a p.error naming them otherwise), each on the
    demo's split (144 training images held out); prints each row's clean and robust accuracy beside the
    baseline variant's of the same seed and appends it to the CSV as soon as it ends. Returns the rows."""
    keys = args.variants.split(",")
    unknown = [k for k in keys if k not in variants]
    if unknown:
        p.error(f"--variants must be a comma-separated list of {', '.join(variants)}; got {', '.join(unknown)}")
    from robustops.cli.common import split_holdout

    stamp, full_train, test_loader = digits_setup(args)
    print(f"device: {stamp['device']}; torch {torch.__version__}; baseline: {baseline}")
    rows: list[dict] = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        train_ds, val_ds = split_holdout(full_train, 144, seed)
        for key in keys:
            row = run_one(key, seed, args, train_ds, val_ds, test_loader)
            rows.append(row)
            ref = next((q for q in rows if q["variant"] == baseline and q["seed"] == seed), None)
            beside = "" if ref is None or key == baseline else \
                f"  ({baseline}: {ref['clean_acc']:.4f} {ref['robust_acc']:.4f})"
            print(f"{key:<11} seed {seed} clean {row['clean_acc']:.4f} robust {row['robust_acc']:.4f} "
                  f"{row.get('train_s', 0.0):6.1f}s{beside}", flush=True)
            finish(args, [dict(stamp, **{k: (f"{v:.5g}" if isinstance(v, float) else v) for k, v in row.items()})])
    return rows


def add_digits_flags(p: argparse.ArgumentParser, variants, seeds: str = "0,1") -> None:
    """The flags of a digits comparison (:func:`digits_variant_runs`): --variants, --seeds, --epochs (the
    demo's 30), --eps (0.2), --attack-steps (PGD-20 at test time)."""
    p.add_argument("--variants", default=",".join(variants), help=f"comma-separated, of {', '.join(variants)}")
    p.add_argument("--seeds", default=seeds)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--eps", type=float, default=0.2)
    p.add_argument("--attack-steps", type=int, default=20)


def pgd_accuracy(model, test_loader, args, seed: int, steps: int = 20) -> dict:
    """robust_accuracy of the model (put in eval mode) under L-inf PGD-steps at args.eps with a random start
    seeded by seed: {"clean_acc", "robust_acc", "n"}."""
    from robustops import attacks

    model.eval()
    atk = attacks.PGD(model, eps=args.eps, steps=steps, norm="linf", random_start=True, seed=seed)
    return attacks.robust_accuracy(model, test_loader, atk, device=args.device, progress=False)


def digits_row(key: str, method: str, opts: dict, seed: int, args, train_ds, val_ds, test_loader) -> dict:
    """One variant of a digits comparison (:func:`digits_variant_runs`'s run_one): a SmallCNN trained with
    ``method`` and ``opts`` by :func:`fit_digits`, scored by clean and PGD-args.attack_steps accuracy."""
    from robustops import models
    from robustops.cli.common import DIGITS_MODEL

    torch.manual_seed(seed)
    model = models.get_model("small_cnn", **DIGITS_MODEL).to(args.device)
    res, train_s = fit_digits(model, method, train_ds, val_ds, args, seed, **opts)
    ev = pgd_accuracy(model, test_loader, args, seed, steps=args.attack_steps)
    return {"variant": key, "method": method, "options": ";".join(f"{k}={v}" for k, v in opts.items()),
            "epochs": args.epochs, "seed": seed, "eps": args.eps, "attack_steps": args.attack_steps,
            "clean_acc": ev["clean_acc"], "robust_acc": ev["robust_acc"], "best_epoch": res.best_epoch,
            "train_s": train_s}


def section_rows(section: str, seed: int, out: str, epochs: int, rows_flag: str, rows: str) -> list:
    """One `robustops demo --section SECTION` run (in a subprocess of this Python) at ``seed`` with its rows
    ``rows`` (given by ``rows_flag``); the rows of its OUT/SECTION/results.json."""
    import json
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "robustops", "demo", "--section", section, "--seed", str(seed), "--out", out,
           "--epochs", str(epochs), rows_flag, rows, "--no-progress"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(out, section, "results.json")) as fh:
        return json.load(fh)["rows"]


def seed_means(rows: list, cols) -> dict:
    """Rows of several seeds (each with "row", "label" and the columns cols) -> {row: {"label", "n", and per
    column its mean over the seeds that measured it (None when none did) and "<column>_sd"}}."""
    import statistics

    by: dict = {}
    for r in rows:
        by.setdefault(r["row"], []).append(r)
    out = {}
    for k, v in by.items():
        m = {"label": v[0]["label"], "n": len(v), "row": k}
        for c in cols:
            vals = [r[c] for r in v if r.get(c) is not None]
            m[c] = statistics.mean(vals) if vals else None
            m[c + "_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out[k] = m
    return out


def seed_table(means: dict, cols, names, baseline: str, baseline_label: str, percent=None) -> list:
    """The Markdown table of :func:`seed_means`: mean (sd over seeds) [gap to the baseline row] per column;
    ``percent`` (default all) the columns shown as percentages (the others with 3 decimals)."""
    base = means.get(baseline)
    percent = set(cols) if percent is None else set(percent)
    out = ["| row | seeds | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(cols)]
    for k, r in means.items():
        cells = []
        for c in cols:
            if r[c] is None:
                cells.append("-")
                continue
            f, fmt = (100.0, "{:.1f}") if c in percent else (1.0, "{:.3f}")
            cell = f"{fmt.format(f * r[c])} ({fmt.format(f * r[c + '_sd'])})"
            if base is not None and k != baseline and base[c] is not None:
                cell += " [" + ("{:+.1f}" if c in percent else "{:+.3f}").format(f * (r[c] - base[c])) + "]"
            cells.append(cell)
        out.append(f"| {r['label']} | {r['n']} | " + " | ".join(cells) + " |")
    return out + ["", f"mean (sd over seeds) [gap to {baseline_label}]; accuracies in %"]
