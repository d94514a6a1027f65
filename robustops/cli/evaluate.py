"""`robustops evaluate`: robust accuracy of any model under an attack suite (AutoAttack by default, in its
standard, plus or rand version; or APGD, PGD, FAB or Square alone): per-input rows through the shared
results file (resumable, sharded over torchrun processes with the rows of one process), AutoAttack's
per-stage log, the masking check, and a JSON and a Markdown summary.

The model: a robustops checkpoint (--checkpoint; its training eps and norm are the defaults), or any
model: --model package.module:factory (called without arguments; returns an nn.Module) with
--weights FILE (a state dict, or a dict holding one under "state_dict" / "model"; --weights-prefix
strips a key prefix such as "module."), the input normalisation given by --mean/--std (or --normalize
for the dataset's) when it is not inside the model. --suite corruptions measures common corruptions
instead of attacks (cli/evaluate_corruptions.py)."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import os

from . import evaluate_corruptions, evaluate_threat
from .attack import input_transform, threat_model
from .attack_rows import claim, columns_for, evaluate_rows, finish, results_file, suite_report
from .common import (
    CLIError,
    add_common,
    check_model_accepts,
    alias,
    checkpoint_meta,
    distributed,
    fmt_pct,
    fraction,
    load_data,
    model_classes,
    require_min,
    setup_run,
)

HELP = ("robust accuracy of any model under AutoAttack (standard / plus / rand) or one attack, or its accuracy "
        "under common corruptions (--suite corruptions) or beyond the L_p ball (--threat iwd|jstm), resumable")

SUITES = ("autoattack", "apgd", "pgd", "fab", "square", "corruptions")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model flags (--checkpoint, --model, --weights, --weights-prefix, --mean / --std, --normalize) that
    :func:`load_model_flags` reads; `evaluate` and `robustify` share them."""
    src = p.add_argument_group("the model (one of --checkpoint, --model with --weights)")
    src.add_argument("--checkpoint", default=None, help="a robustops checkpoint, a raw state dict (with --model NAME), "
                     "a TorchScript or a torch.export file")
    src.add_argument("--model", default=None, metavar="NAME|MODULE:FACTORY",
                     help="a robustops model name (small_cnn, preact_resnet18, ...) for a raw state dict, or "
                          "package.module:factory, a function of no arguments that builds your nn.Module")
    src.add_argument("--weights", default=None, metavar="FILE",
                     help="the state dict for --model (a dict of tensors, or one under 'state_dict' / 'model')")
    src.add_argument("--weights-prefix", default=None, metavar="PREFIX",
                     help="strip this prefix from the weights' keys (e.g. 'module.' of a DataParallel model)")
    src.add_argument("--mean", type=_floats("--mean"), default=None, metavar="M,M,M",
                     help="per-channel mean the model's input is normalized with (the attack works on [0, 1] pixels "
                          "and normalizes in front of the model); with --std")
    src.add_argument("--std", type=_floats("--std"), default=None, metavar="S,S,S", help="per-channel std; with --mean")
    src.add_argument("--normalize", action="store_true", help="normalize with the dataset's mean/std")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--data", default="digits", help='"digits" (embedded), a .npz file, "cifar10:DIR" or '
                   '"imagefolder:DIR"; with --suite corruptions also "cifar10c:DIR" (CIFAR-10-C\'s arrays)')
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--n", "--max-samples", dest="n", type=int, default=None,
                   help="evaluate the first N inputs (None: all; under torchrun spell it --max-samples)")
    p.add_argument("--suite", default="autoattack", choices=SUITES,
                   help="autoattack (the --version's attacks in turn), apgd (APGD-CE then APGD-T), pgd, fab (FAB-T), "
                        "square, or corruptions (common corruptions: accuracy per corruption and severity, ECE, mCE)")
    p.add_argument("--version", default="standard", choices=["standard", "plus", "rand"],
                   help="AutoAttack's version: standard (APGD-CE, APGD-T, FAB-T, Square), plus (5 restarts, the "
                        "untargeted APGD-DLR and FAB too), rand (APGD-CE, APGD-DLR with 20 EOT passes, for "
                        "randomized defenses)")
    p.add_argument("--norm", default=None, choices=["linf", "l2"], help="threat model (None: the checkpoint's, "
                   "else linf)")
    p.add_argument("--eps", type=fraction("eps"), default=None, help="radius, e.g. 8/255 (None: the checkpoint's "
                   "training eps, else 8/255 for linf and 0.5 for l2)")
    p.add_argument("--steps", type=int, default=None, help="iterations of APGD / FAB (None: 100; pgd and --threat iwd / jstm: 10)")
    p.add_argument("--n-queries", type=int, default=5000, help="Square's query budget")
    p.add_argument("--n-target-classes", type=int, default=9, help="targets of APGD-T / FAB-T (capped at classes - 1)")
    p.add_argument("--restarts", type=int, default=None, help="restarts (None: the version's, 1 or 5 for plus)")
    p.add_argument("--masking-threshold", type=fraction("masking threshold"), default=0.05,
                   help="warn of masked gradients when a later attack breaks more than this share of the inputs "
                        "the earlier ones left robust")
    p.add_argument("--transfer-from", default=None, metavar="CHECKPOINT",
                   help="a transfer attack: craft the suite's adversarial examples on this source model (a robustops "
                        "checkpoint, TorchScript or torch.export file) and evaluate them on the model")
    p.add_argument("--batch-size", type=int, default=256, help="inputs per batch (the rows depend on it)")
    alias(p, "--batch", dest="batch_size", type=int)
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"], help="autocast of the model's forward")
    p.add_argument("-o", "--out", default=None, help="per-input rows (TSV), with OUT.json and OUT.md summaries")
    p.add_argument("--force", action="store_true", help="replace an existing --out once this run has finished")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run: keep its rows, attack the "
                   "rest (refused when a setting that changes the rows differs)")
    evaluate_corruptions.add_arguments(p)
    evaluate_threat.add_arguments(p)
    add_common(p, workers=False)


def _floats(flag: str):
    def parse(s: str):
        try:
            vals = [float(v) for v in s.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {flag} {s!r}: expected comma-separated numbers") from None
        if not vals:
            raise argparse.ArgumentTypeError(f"invalid {flag} {s!r}: expected comma-separated numbers")
        return vals

    return parse


def load_user_model(spec: str, weights, prefix=None):
    """The nn.Module that package.module:factory() builds, with the state dict of weights (keys with
    prefix stripped) loaded strictly; CLIError naming the flag on any failure."""
    import torch

    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise CLIError(f"--model {spec!r}: cannot import {attr!r} from {module_name!r} ({e})") from None
    try:
        model = factory()
    except Exception as e:  # noqa: BLE001 - the user's code: name it and stop
        raise CLIError(f"--model {spec!r}: {attr}() failed: {type(e).__name__}: {e}") from None
    if not isinstance(model, torch.nn.Module):
        raise CLIError(f"--model {spec!r}: {attr}() must return a torch.nn.Module, got {type(model).__name__}")
    if weights is not None:
        state = _state_dict(weights, prefix)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise CLIError(f"--weights {weights!r} does not fit --model {spec!r}: {' '.join(first[:3])[:400]} "
                           f"(--weights-prefix strips a key prefix)") from None
    return model.eval()


def _state_dict(path: str, prefix):
    import torch

    if not os.path.isfile(path):
        raise CLIError(f"--weights {path!r}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CLIError(f"--weights {path!r}: not a state dict readable with torch.load(weights_only=True) ({e})") \
            from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CLIError(f"--weights {path!r}: expected a state dict (names -> tensors)")
    if prefix:
        if not any(k.startswith(prefix) for k in obj):
            raise CLIError(f"--weights-prefix {prefix!r}: no key of {path!r} starts with it")
        obj = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in obj.items()}
    return obj


def load_model_flags(args):
    """(model, the checkpoint's metadata) from --checkpoint / --model / --weights (also --suite corruptions')."""
    from .. import models

    user = args.model is not None and ":" in args.model
    if args.checkpoint is None and not user and args.weights is None:
        raise CLIError("give the model: --checkpoint FILE, or --model package.module:factory [--weights FILE]")
    if args.checkpoint is not None and (user or args.weights is not None):
        raise CLIError("--checkpoint loads a whole model: drop --weights and --model package.module:factory, or "
                       "drop --checkpoint")
    if args.weights_prefix is not None and args.weights is None:
        raise CLIError("--weights-prefix strips a prefix from --weights' keys: give --weights")
    if user:
        return load_user_model(args.model, args.weights, args.weights_prefix), {}
    path = args.checkpoint or args.weights
    try:
        model = models.load_model(path, name=args.model)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as e:
        flag = "--checkpoint" if args.checkpoint else "--weights"
        raise CLIError(str(e) if str(e).startswith("--") else f"{flag} {path!r}: {e}") from None
    return model, checkpoint_meta(path, model)


def _load(args):
    require_min(n=(args.n, 1), steps=(args.steps, 1), n_queries=(args.n_queries, 1), restarts=(args.restarts, 1),
                n_target_classes=(args.n_target_classes, 1), batch_size=(args.batch_size, 1))
    evaluate_corruptions.check_shared_flags(args)
    if args.eps is not None and not 0.0 < args.eps < math.inf:
        raise CLIError(f"--eps must be a finite number > 0, got {args.eps}")
    if not 0.0 <= args.masking_threshold <= 1.0:
        raise CLIError(f"--masking-threshold must be in [0, 1], got {args.masking_threshold}")
    if args.version != "standard" and args.suite != "autoattack":
        raise CLIError(f"--version is AutoAttack's; --suite {args.suite} has none")
    dataset, info = load_data(args.data, args.split, validate=False)
    model, meta = load_model_flags(args)
    info = model_classes(model, dataset, info, args.data, args.split)
    norm, eps, source = evaluate_threat.threat(args) if args.threat != "lp" else threat_model(args, meta)
    return model, dataset, info, norm, eps, source


def _suite(args, model, info, norm, eps, source=None):
    """The suite on model; with a source model (--transfer-from), built on the source and transferred to model.
    --threat iwd / jstm: the IWD or the JSTM attack (cli/evaluate_threat.py)."""
    from ..attacks.suites import Suite

    if args.mean is not None:
        mean, std, amp = args.mean, args.std, input_transform(args, info)[2]
    else:
        mean, std, amp = input_transform(args, info)
    if args.threat != "lp":
        return evaluate_threat.ThreatSuite(model, eps, args, mean, std, amp, device=next(model.parameters()).device)
    suite = Suite(model if source is None else source, eps, norm, args.suite, args.version, steps=args.steps,
                  n_queries=args.n_queries,
                  n_target_classes=min(args.n_target_classes, max(int(info["num_classes"]) - 1, 1)),
                  restarts=args.restarts, seed=args.seed, mean=mean, std=std, dtype=amp,
                  masking_threshold=args.masking_threshold)
    return suite if source is None else suite.transfer_to(model, mean, std, amp)


def load_source(args, info):
    """The source model of --transfer-from (None without it); CLIError naming the flag when it cannot be
    loaded or does not fit the data."""
    if args.transfer_from is None:
        return None
    from .. import models

    try:
        source = models.load_model(args.transfer_from)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as e:
        raise CLIError(f"--transfer-from {args.transfer_from!r}: {e}") from None
    import torch

    got = check_model_accepts(source, dict(info, num_classes=0), torch.device("cpu"), flag="--transfer-from")
    if int(got) != int(info["num_classes"]):
        raise CLIError(f"--transfer-from {args.transfer_from!r}: the source model has {got} classes, the model "
                       f"{info['num_classes']}")
    return source


def _settings(args, norm, eps) -> dict:
    keys = ("model", "data", "split", "suite", "version", "steps", "n_queries", "n_target_classes", "restarts",
            "amp", "normalize", "mean", "std", "seed", "batch_size", "weights_prefix")
    out = {k: getattr(args, k) for k in keys}
    out.update(norm=norm, eps=eps, checkpoint=args.checkpoint and os.path.abspath(args.checkpoint),
               weights=args.weights and os.path.abspath(args.weights))
    if args.transfer_from is not None:  # only then: the settings of earlier runs' files stay as they were
        out["transfer_from"] = os.path.abspath(args.transfer_from)
    if args.threat != "lp":  # likewise
        out.update(evaluate_threat.settings(args))
    return out


def run(args) -> int:
    from ..attacks.suites import suite_names

    if args.suite == "corruptions":
        if args.transfer_from is not None:
            raise CLIError("--transfer-from crafts adversarial examples on a source model: use an attack suite "
                           "(--suite pgd, apgd, autoattack, ...), not corruptions")
        return evaluate_corruptions.run(args, load_model_flags)
    evaluate_corruptions.refuse_corruption_flags(args)
    evaluate_threat.check(args)
    model, dataset, info, norm, eps, source = _load(args)
    src_model = load_source(args, info)
    setup_run(args, sample_numel=math.prod(info["input_shape"]))
    names = (args.threat,) if args.threat != "lp" else suite_names(args.suite, args.version)
    final = results_file(args.out, columns_for(names)) if args.out else None
    results = final.aside() if final is not None and args.force else final
    stop = len(dataset) if args.n is None else min(args.n, len(dataset))
    with distributed(args.device) as d, contextlib.ExitStack() as stack:
        claim(d, stack, args.out, final, _settings(args, norm, eps), "evaluate", resume=args.resume, force=args.force)
        model = model.to(d.device)
        suite = _suite(args, model, info, norm, eps, None if src_model is None else src_model.to(d.device))
        try:
            _, stats = evaluate_rows(d, dataset, stop, lambda: suite.attacks, names, batch_size=args.batch_size,
                                     progress=args.progress, command="evaluate", results=results, grid=True)
        except Exception:
            if results is not None:
                results.discard_empty(d.rank)
            raise
        if d.rank == 0:
            _report(args, info, norm, eps, source, d, stats, suite, results, final)
    return 0


def _report(args, info, norm, eps, source, d, stats, suite, results, final) -> None:
    n, clean, robust, elapsed = stats[:4]
    what = suite.describe()
    title = "AutoAttack (" + args.version + ")" if args.suite == "autoattack" else args.suite
    title = f"{args.threat.upper()} attack" if args.threat != "lp" else title
    if args.transfer_from is not None:
        title = f"transfer {title} from {os.path.basename(args.transfer_from)}"
    print(f"{title}: {what}, {norm} eps={eps:.6g} (from {source}) on {info['name']}/{args.split} ({n} inputs, "
          f"{d.world} rank{'s' if d.world > 1 else ''}, {d.device.type}, {elapsed:.1f}s)")
    stages, warnings = suite_report(suite.names, stats, args.masking_threshold)
    print(f"clean_acc {clean / max(n, 1):.4f}  robust_acc {robust / max(n, 1):.4f}  n {n}  clean_correct {clean}  "
          f"robust_correct {robust}")
    if results is None:
        return
    record = {"command": "evaluate", "suite": args.threat if args.threat != "lp" else args.suite, "version": args.version, "attacks": list(suite.names),
              "description": what, "transfer_from": args.transfer_from and os.path.abspath(args.transfer_from),
              "norm": norm, "eps": eps, "eps_source": source, "data": args.data,
              "split": args.split, "n": n, "clean_acc": clean / max(n, 1), "robust_acc": robust / max(n, 1),
              "stages": stages, "warnings": warnings, "seconds": elapsed, "results": os.path.abspath(args.out)}
    md = markdown(title, what, norm, eps, info, args.split, record)
    with open(args.out + ".md", "w") as fh:
        fh.write(md)
    print(f"per-input rows: {args.out}; summary: {finish(results, final, record)}, {args.out}.md")


def markdown(title: str, what: str, norm: str, eps: float, info: dict, split: str, record: dict) -> str:
    """The run's summary as Markdown: a line, AutoAttack's per-stage table, the warnings."""
    n = record["n"]
    lines = [f"# {title} on {info['name']}/{split}", "", f"{what}; {norm} eps = {eps:.6g}; {n} inputs.", "",
             "| stage | broken | robust | robust accuracy |", "|---|---:|---:|---:|",
             f"| clean | - | {round(record['clean_acc'] * n)} | {fmt_pct(record['clean_acc'])} |"]
    for r in record["stages"] or [{"label": what, "broken": round((record["clean_acc"] - record["robust_acc"]) * n),
                                   "robust": round(record["robust_acc"] * n), "robust_acc": record["robust_acc"]}]:
        lines.append(f"| {r['label']} | {r['broken']} | {r['robust']} | {fmt_pct(r['robust_acc'])} |")
    lines += [""] + [f"**Warning:** {w}" for w in record["warnings"]]
    return "\n".join(lines) + "\n"
