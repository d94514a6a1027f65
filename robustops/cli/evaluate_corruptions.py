"""`robustops evaluate --suite corruptions`: accuracy and calibration (ECE) of a model under common
corruptions (robustops.corruptions.evaluation), per corruption and severity, per family and on average,
with the mCE relative to a baseline (--baseline: a checkpoint, or the JSON of a finished corruptions
run), one resumable row per (corruption, severity) in the shared results file (rows.py: --resume keeps
the finished rows, --force replaces the result once the new one is done; torchrun ranks share the rows),
a JSON and a Markdown summary and a heat map (OUT.png, corruption x severity). A --baseline checkpoint's
rows are rows of the same file, shared, written and resumed alike: their keys are BASELINE_KEYS + the
model's key of the same (corruption, severity).

The corrupted images are generated (deterministic per --seed and sample index), or read from a local
CIFAR-10-C directory with --data cifar10c:DIR (its <corruption>.npy arrays), the clean images then
coming from --clean-data (e.g. cifar10:DIR, the CIFAR-10 test set CIFAR-10-C was made from)."""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys

from .attack import input_transform
from .attack_rows import claim, finish
from .common import CLIError, check_writable, distributed, fmt_pct, load_data, model_classes, require_min, setup_run
from .rows import ResultsFile, RowWriter

__all__ = ["add_arguments", "refuse_corruption_flags", "check_shared_flags", "run", "markdown", "ATTACK_FLAGS",
           "BASELINE_KEYS"]

#: The attack suites' flags and their defaults: given with --suite corruptions, they are refused.
ATTACK_FLAGS = {"eps": None, "norm": None, "version": "standard", "steps": None, "n_queries": 5000,
                "n_target_classes": 9, "restarts": None, "masking_threshold": 0.05}
#: This suite's flags and their defaults: given with an attack suite, they are refused.
CORRUPTION_FLAGS = {"corruptions": None, "severities": None, "baseline": None, "clean_data": None}

_FIELDS = (str, int, int, int, float, float)  # how each TSV field after the key parses
#: added to the key of a row of a --baseline checkpoint (the model's keys are below it: row_key)
BASELINE_KEYS = 1000


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("--suite corruptions (common corruptions instead of attacks)")
    g.add_argument("--corruptions", default=None, metavar="LIST",
                   help="comma-separated corruption names, families (noise, blur, weather, digital), 'benchmark' "
                        "(the 15 of CIFAR-10-C), 'extra' or 'all' (None: benchmark)")
    g.add_argument("--severities", default=None, metavar="S,S,...", help="severities in 1..5 (None: 1,2,3,4,5)")
    g.add_argument("--baseline", default=None, metavar="FILE",
                   help="the baseline of the mCE: a robustops checkpoint (evaluated here on the same corruptions, "
                        "without --mean/--std) or the OUT.json of a finished --suite corruptions run")
    g.add_argument("--clean-data", default=None, metavar="SPEC",
                   help="with --data cifar10c:DIR: the clean test images CIFAR-10-C was made from (cifar10:DIR)")


def refuse_corruption_flags(args) -> None:
    """CLIError when a flag of --suite corruptions is given with an attack suite."""
    given = [f"--{k.replace('_', '-')}" for k, v in CORRUPTION_FLAGS.items() if getattr(args, k) != v]
    if given:
        raise CLIError(f"{', '.join(given)}: only with --suite corruptions (the attack suite {args.suite} takes none)")
    if args.data.lower().startswith("cifar10c:"):
        raise CLIError("--data cifar10c:DIR holds corrupted images: use it with --suite corruptions")


def _severities(text):
    if text is None:
        return (1, 2, 3, 4, 5)
    try:
        sev = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        sev = ()
    if not sev or any(s not in range(1, 6) for s in sev) or len(set(sev)) != len(sev):
        raise CLIError(f"--severities {text!r}: expected distinct integers in 1..5 separated by commas, e.g. 1,3,5")
    return sev


def _check_flags(args):
    """(corruption names, severities) after refusing the attack flags and bad values."""
    from ..corruptions import check_names

    given = [f"--{k.replace('_', '-')}" for k, v in ATTACK_FLAGS.items() if getattr(args, k) != v]
    if given:
        raise CLIError(f"{', '.join(given)}: --suite corruptions applies common corruptions, not an attack; drop "
                       f"{'them' if len(given) > 1 else 'it'}")
    require_min(n=(args.n, 1), batch_size=(args.batch_size, 1))
    check_shared_flags(args)
    try:
        names = check_names([v for v in args.corruptions.split(",") if v.strip()] if args.corruptions else None)
    except ValueError as e:
        raise CLIError(f"--{e}") from None
    return names, _severities(args.severities)


def check_shared_flags(args) -> None:
    """The checks of the flags every suite of `robustops evaluate` shares: --mean/--std/--normalize and
    -o/--resume/--force."""
    if (args.mean is None) != (args.std is None):
        raise CLIError("--mean and --std go together: give both")
    if args.mean is not None and args.normalize:
        raise CLIError("--normalize uses the dataset's mean/std: drop it or --mean/--std")
    if args.std is not None and min(args.std) <= 0:
        raise CLIError(f"--std must be > 0, got {args.std}")
    if args.out:
        check_writable(args.out, "--out")
        if args.resume and args.force:
            raise CLIError("--resume continues a result and --force replaces it: give one of them")
    elif args.resume:
        raise CLIError("--resume continues the rows of --out: give --out")


def _data(args, names):
    """(clean dataset, info, corrupted: None or (name, severity) -> Dataset) of --data / --clean-data."""
    from ..corruptions import available

    if not args.data.lower().startswith("cifar10c:"):
        if args.clean_data is not None:
            raise CLIError("--clean-data goes with --data cifar10c:DIR (generated corruptions use --data itself)")
        missing = [c for c in names if c not in available()]
        if missing:
            raise CLIError(f"--corruptions: not implemented in this robustops: {', '.join(missing)} (implemented: "
                           f"{', '.join(available())}); --data cifar10c:DIR reads the released arrays instead")
        ds, info = load_data(args.data, args.split, validate=False)
        return ds, info, None
    root = os.path.expanduser(args.data.split(":", 1)[1])
    if args.clean_data is None:
        raise CLIError("--data cifar10c:DIR: give the clean test images with --clean-data (e.g. cifar10:DIR): "
                       "CIFAR-10-C holds only corrupted ones")
    if args.split != "test":
        raise CLIError("--data cifar10c:DIR was made from the test set: drop --split train")
    if not os.path.isdir(root):
        raise CLIError(f"--data cifar10c:{root}: no such directory")
    missing = [c for c in names if not os.path.isfile(os.path.join(root, c + ".npy"))]
    if missing:
        raise CLIError(f"--data cifar10c:{root}: no {', '.join(c + '.npy' for c in missing)}; choose --corruptions "
                       f"among the files there")
    try:
        from ..corruptions.cifar10c import CifarC
    except ImportError as e:
        raise CLIError(f"--data cifar10c:DIR: this robustops cannot read CIFAR-10-C ({e})") from None
    ds, info = load_data(args.clean_data, "test", flag="--clean-data", validate=False)
    return ds, info, lambda name, severity: CifarC(root, name, severity)


def _settings(args, names, sev, baseline) -> dict:
    keys = ("model", "data", "clean_data", "split", "n", "suite", "amp", "normalize", "mean", "std", "seed",
            "batch_size", "weights_prefix")
    out = {k: getattr(args, k) for k in keys}
    # a baseline checkpoint's rows are in the file (a JSON baseline writes none: not compared)
    out["baseline_checkpoint"] = os.path.abspath(args.baseline) if isinstance(baseline, tuple) else None
    out.update(corruptions=list(names), severities=list(sev), checkpoint=args.checkpoint and os.path.abspath(
        args.checkpoint), weights=args.weights and os.path.abspath(args.weights))
    return out


def _line(row: dict) -> str:
    # repr: floats written exactly, so a resumed run's summary is that of an uninterrupted one
    return "\t".join(str(row[k]) if k in ("key", "corruption", "severity", "n", "correct") else repr(float(row[k]))
                     for k in ("key", "corruption", "severity", "n", "correct", "accuracy", "ece"))


def _parse(line: str) -> dict:
    f = line.split("\t")
    return {"key": int(f[0]), "corruption": f[1], "severity": int(f[2]), "n": int(f[3]), "correct": int(f[4]),
            "accuracy": float(f[5]), "ece": float(f[6])}


def _stored(results) -> dict:
    """{key: row} of the complete rows in the TSV and the part files."""
    rows = {}
    if results is None:
        return rows
    for p in [results.path] + results.part_files():
        for idx, line in results.read(p)[0].items():
            rows.setdefault(idx, _parse(line))
    return rows


def _evaluate(args, d, models, dataset, info, corrupted, todo, results):
    """This rank's share of the rows todo ((key, corruption, severity): the model's, or with a key from
    BASELINE_KEYS on the baseline checkpoint's, models[1], without --mean/--std), each written as soon as it
    is done; returns them."""
    import torch

    from ..corruptions import evaluation

    mean, std, amp = (args.mean, args.std, input_transform(args, info)[2]) if args.mean is not None \
        else input_transform(args, info)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    mine = todo[d.rank::d.world]
    out = results.open_part(d.rank) if results is not None else None
    writer = RowWriter(out, len(mine), "corruptions", bool(args.progress) and d.rank == 0,
                       lines="evaluate" if d.rank == 0 else None, unit="row")
    rows = []
    try:
        for key, c, s in mine:
            base = key >= BASELINE_KEYS
            try:
                row = evaluation.evaluate_row(models[base], dataset, c, s, seed=args.seed, batch_size=args.batch_size,
                                              device=d.device, mean=None if base else mean, std=None if base else std,
                                              dtype=dtype, corrupted=corrupted, n=args.n)
            except (ValueError, FileNotFoundError) as e:
                raise CLIError(f"{'--baseline ' if base else ''}{c} severity {s}: {e}") from None
            row["key"] = key
            if out is not None:
                writer.write(_line(row))
            rows.append(row)
            writer.tick(1)
    finally:
        writer.close()
        if out is not None:
            out.close()
    return rows


def _gather(d, rows):
    if not d.distributed:
        return rows
    import torch.distributed as dist

    parts = [None] * d.world
    dist.all_gather_object(parts, rows)
    return [r for part in parts for r in part]


def run(args, load_model) -> int:
    """The command with the parsed flags; load_model(args) -> (model, metadata): evaluate's model flags."""
    names, sev = _check_flags(args)
    dataset, info, corrupted = _data(args, names)
    if len(info["input_shape"]) != 3:
        raise CLIError(f"--suite corruptions corrupts images [C, H, W]; --data {args.data} holds samples of shape "
                       f"{list(info['input_shape'])}")
    model, _ = load_model(args)
    info = model_classes(model, dataset, info, args.clean_data or args.data, args.split)
    setup_run(args, sample_numel=math.prod(info["input_shape"]))
    from ..corruptions.evaluation import ROW_FIELDS, row_key

    final = ResultsFile(args.out, "\t".join(ROW_FIELDS), _FIELDS) if args.out else None
    results = final.aside() if final is not None and args.force else final
    baseline = _read_baseline(args.baseline)
    with distributed(args.device) as d, contextlib.ExitStack() as stack:
        claim(d, stack, args.out, final, _settings(args, names, sev, baseline), "evaluate", resume=args.resume,
              force=args.force)
        models = [model.to(d.device).eval()]
        keys = [(row_key(c, s), c, s) for c, s in [("clean", 0)] + [(c, s) for c in names for s in sev]]
        if isinstance(baseline, tuple):
            models.append(baseline[1].to(d.device).eval())
            keys += [(BASELINE_KEYS + k, c, s) for k, c, s in keys]
        stored = _stored(results)
        d.barrier()  # every rank has read the part files before any is reopened
        todo = [k for k in keys if k[0] not in stored]
        try:
            new = _gather(d, _evaluate(args, d, models, dataset, info, corrupted, todo, results))
        except Exception:
            if results is not None:
                results.discard_empty(d.rank)
            raise
        d.barrier()
        if d.rank == 0:
            rows = [_parse(line) for line in results.merge()] if results is not None else \
                list(stored.values()) + new
            mine = [r for r in rows if r["key"] < BASELINE_KEYS]
            base = baseline and _baseline_result(args, baseline, [r for r in rows if r["key"] >= BASELINE_KEYS],
                                                 names, sev)
            _report(args, info, names, sev, mine, base, results, final)
    return 0


def _read_baseline(path):
    """None, the JSON result of a finished corruptions run, or ("checkpoint", the model): a checkpoint is
    loaded now, so that a bad one fails before the run rather than after it."""
    if path is None:
        return None
    if not os.path.isfile(path):
        raise CLIError(f"--baseline {path!r}: no such file")
    try:
        with open(path) as fh:
            obj = json.load(fh)
    except (ValueError, UnicodeDecodeError):
        from .. import models

        try:
            return ("checkpoint", models.load_model(path))
        except (ValueError, FileNotFoundError, KeyError, RuntimeError, OSError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise CLIError(f"--baseline {path!r}: neither a corruptions result (JSON) nor a checkpoint ({first})") \
                from None
    if not isinstance(obj, dict) or obj.get("suite") != "corruptions" or "accuracy" not in obj:
        raise CLIError(f"--baseline {path!r}: a JSON file, but not the summary of a robustops evaluate --suite "
                       f"corruptions run (OUT.json)")
    return obj


def _baseline_result(args, baseline, rows, names, sev):
    """The baseline's result: read, or (a checkpoint) summarized from its rows (evaluated like the model's,
    without --mean/--std)."""
    if not isinstance(baseline, tuple):
        mine = {"data": args.data, "split": args.split, "max_samples": args.n, "seed": args.seed}
        for key, value in mine.items():
            if key in baseline and baseline[key] != value:
                print(f"robustops evaluate: warning: --baseline {args.baseline}: evaluated with {key} "
                      f"{baseline[key]!r}, this run with {value!r}: the mCE compares different images",
                      file=sys.stderr)
        return baseline
    from ..corruptions.evaluation import summarize

    return summarize(rows, names, sev)


def _report(args, info, names, sev, rows, base, results, final) -> None:
    from ..corruptions.evaluation import mce, plot_heatmap, summarize

    res = summarize(rows, names, sev)
    record = {"command": "evaluate", "suite": "corruptions", "data": args.data, "clean_data": args.clean_data,
              "split": args.split, "max_samples": args.n, "seed": args.seed, **res}
    if base is not None:
        try:
            record["baseline"] = {"file": os.path.abspath(args.baseline), **mce(res, base)}
        except ValueError as e:
            raise CLIError(f"--baseline {args.baseline}: {e}") from None
    over = "the 15 benchmark corruptions" if res["mean_over"] == "benchmark" else f"{len(names)} corruptions"
    print(f"corruptions on {info['name']}/{args.split} ({res['n']} inputs, severities {','.join(map(str, sev))}): "
          f"clean_acc {res['clean_acc']:.4f}  mean_corruption_acc {res['mean_corruption_acc']:.4f} (over {over})  "
          f"clean_ece {res['clean_ece']:.4f}  corruption_ece {res['corruption_ece']:.4f}")
    print("per family: " + ", ".join(f"{f} {v:.4f}" for f, v in res["per_family"].items()))
    if "baseline" in record:
        b = record["baseline"]
        print(f"mCE {b['mce']:.4f}{_left_out(b['undefined_ce'])}  relative mCE {b['relative_mce']:.4f}"
              f"{_left_out(b['undefined_relative'])} (baseline {args.baseline})")
    if results is None:
        return
    record["heatmap"] = plot_heatmap(res, args.out + ".png")[0]
    record["results"] = os.path.abspath(args.out)
    with open(args.out + ".md", "w") as fh:
        fh.write(markdown(record, info))
    print(f"per-row results: {args.out}; summary: {finish(results, final, record)}, {args.out}.md; heat map: "
          f"{record['heatmap']}")


def _left_out(names) -> str:
    return f" (undefined for {', '.join(names)}: left out of this mean)" if names else ""


def markdown(record: dict, info: dict) -> str:
    """The summary as Markdown: the headline figures, the per-family accuracies, the mCE, then the
    accuracy per corruption and severity."""
    sev = record["severities"]
    over = "the 15 benchmark corruptions" if record["mean_over"] == "benchmark" else "the corruptions run"
    lines = [f"# Common corruptions on {info['name']}/{record['split']}", "",
             f"{record['n']} inputs; clean accuracy {fmt_pct(record['clean_acc'])} (ECE {record['clean_ece']:.4f}); "
             f"mean corruption accuracy {fmt_pct(record['mean_corruption_acc'])} over {over} (mean ECE "
             f"{record['corruption_ece']:.4f}).", "",
             "| family | accuracy |", "|---|---:|"]
    lines += [f"| {f} | {fmt_pct(v)} |" for f, v in record["per_family"].items()]
    if "baseline" in record:
        b = record["baseline"]
        lines += ["", f"mCE {100 * b['mce']:.1f}%{_left_out(b.get('undefined_ce'))}, relative mCE "
                      f"{100 * b['relative_mce']:.1f}%{_left_out(b.get('undefined_relative'))} against "
                      f"{os.path.basename(b['file'])}."]
    lines += ["", "| corruption | " + " | ".join(f"s{s}" for s in sev) + " | mean | ECE |",
              "|---|" + "---:|" * (len(sev) + 2)]
    for c in record["corruptions"]:
        accs = " | ".join(fmt_pct(record["accuracy"][c][s]) for s in sev)
        ece = sum(record["ece"][c][s] for s in sev) / len(sev)
        lines.append(f"| {c} | {accs} | {fmt_pct(record['per_corruption'][c])} | {ece:.4f} |")
    return "\n".join(lines) + "\n"
