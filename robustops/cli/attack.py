"""`robustops attack`: clean and robust accuracy of a checkpoint under PGD / FGSM / APGD-CE / APGD-DLR /
APGD-T or AutoAttack (--suite autoattack: APGD-CE, APGD-T, FAB-T and Square, robustops.attacks.suites, the
suite `robustops evaluate` runs too), or under latent PGD in a learned perturbation set (--threat learned),
per-sample results as a TSV, a robust-accuracy-against-eps sweep, inputs sharded over torchrun processes."""
from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os

from .common import (
    CLIError,
    Renamed,
    add_common,
    alias,
    check_writable,
    checkpoint_meta,
    distributed,
    fraction,
    fractions,
    load_data,
    model_classes,
    require_min,
    setup_run,
    write_summary,
)
from .attack_rows import (
    RESULT_COLUMNS,
    claim,
    columns_for,
    describe,
    evaluate_rows,
    finish,
    result_rows,
    results_file,
    save_results,
    suite_report,
)

__all__ = ["add_arguments", "run", "threat_model", "input_transform", "RESULT_COLUMNS", "result_rows", "save_results", "results_file"]

HELP = "robust accuracy of a checkpoint under PGD / FGSM / APGD / an AutoAttack-style suite"

ATTACKS = ("pgd", "fgsm", "apgd-ce", "apgd-dlr", "apgd-t")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="model file: a robustops checkpoint, a raw state dict "
                   "(with --model), a TorchScript or a torch.export file")
    p.add_argument("--model", default=None, help="model name for a raw state dict (small_cnn, preact_resnet18, "
                   "resnet20, resnet110, ...)")
    p.add_argument("--data", default="digits", help='"digits" (embedded), a .npz file, "cifar10:DIR" or '
                   '"imagefolder:DIR"')
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--threat", default="norm", choices=["norm", "learned"],
                   help="norm: the --norm ball around each image; learned: a learned perturbation set (the latent "
                        "L2 ball of radius --eps of --perturbation-model, attacked with latent PGD)")
    p.add_argument("--perturbation-model", default=None, metavar="CKPT",
                   help="--threat learned: the perturbation model's checkpoint (a conditional VAE; read by "
                        "robustops.perturbation.load_perturbation_model)")
    p.add_argument("--norm", default=None, choices=["linf", "l2"],
                   help="threat model (None: the checkpoint's, else linf)")
    p.add_argument("--eps", type=fraction("eps"), default=None,
                   help="radius, e.g. 0.1 or 8/255 (None: the eps the checkpoint was trained with, else 8/255 for "
                        "linf and 0.5 for l2; --threat learned: the latent radius, None: the perturbation "
                        "model's)")
    p.add_argument("--eps-sweep", type=fractions("eps"), default=None, metavar="EPS,EPS,...",
                   help="robust accuracy at each of these radii (e.g. 0,1/255,2/255,4/255,8/255): a table, and with "
                        "-o a CSV, a plot (PNG and PDF) and a JSON summary")
    p.add_argument("--step-size", dest="alpha", type=fraction("step size"), default=None,
                   help="step size (None: 2.5 * eps / steps; FGSM eps)")
    p.add_argument("--alpha", action=Renamed, new="--step-size", why="is the step size here")
    p.add_argument("--attack", default="pgd", choices=ATTACKS,
                   help="pgd, fgsm (one step of size eps), apgd-ce / apgd-dlr (Auto-PGD, Croce & Hein 2020) or "
                        "apgd-t (targeted DLR over the top classes)")
    p.add_argument("--fgsm", dest="attack", action="store_const", const="fgsm", help=argparse.SUPPRESS)
    p.add_argument("--suite", default=None, choices=["autoattack"],
                   help="autoattack: AutoAttack (Croce & Hein 2020), the --version's attacks in turn, each on the "
                        "inputs the earlier ones left robust (standard: APGD-CE, APGD-T, FAB-T, Square), with a "
                        "warning when later attacks find much the gradient attacks missed (masked gradients). "
                        "Its rows depend on --batch-size (batches lie on a fixed grid of indices), not on the "
                        "number of processes or a resume; `robustops evaluate` runs the same suites")
    p.add_argument("--version", default="standard", choices=["standard", "plus", "rand"],
                   help="--suite autoattack: AutoAttack's version (plus: more restarts and the untargeted attacks; "
                        "rand: APGD-CE and APGD-DLR with 20 EOT passes, for randomized defenses)")
    p.add_argument("--n-queries", type=int, default=5000, help="--suite autoattack: Square's query budget")
    p.add_argument("--steps", type=int, default=None, help="iterations (None: 10 for pgd, 100 for apgd-* and --suite)")
    p.add_argument("--restarts", type=int, default=None, help="random starts (None: 1; with --suite the version's: "
                   "1, or 5 for plus)")
    p.add_argument("--n-target-classes", type=int, default=9, help="apgd-t: target classes per sample (capped at "
                   "classes - 1)")
    p.add_argument("--loss", default="ce", choices=["ce", "dlr"], help="pgd / fgsm objective")
    p.add_argument("--no-random-start", dest="random_start", action="store_false")
    p.add_argument("--batch-size", type=int, default=256, help="images per attacked batch")
    alias(p, "--batch", dest="batch_size", type=int)
    p.add_argument("--max-samples", dest="max", type=int, default=None, help="attack only the first MAX samples")
    alias(p, "--max", dest="max", type=int)
    p.add_argument("-o", "--out", default=None,
                   help="per-sample results TSV (with --eps-sweep: the sweep's CSV), written when the attack has "
                        "run, with a JSON summary beside it")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out (once this run has finished; until then the old one stays)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run: keep the complete rows of --out, attack the rest (refused "
                        "when a setting that changes the rows differs from the run's)")
    p.add_argument("--early-stop", action="store_true", help="samples that are fooled leave the batch")
    p.add_argument("--graph", action="store_true", help="CUDA-graph replay of the attack iteration (CUDA only; pgd "
                   "and fgsm)")
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"], help="autocast of the model's forward")
    alias(p, "--dtype", dest="amp", choices=["float32", "none", "bfloat16", "bf16", "float16", "fp16"])
    p.add_argument("--normalize", action="store_true", help="the model takes inputs normalized with the "
                   "dataset's mean/std: the attack normalizes in front of it")
    add_common(p, workers=False)


def _attacks(args) -> tuple:
    """The attacks this run applies in order (one, or a suite's)."""
    if not args.suite:
        return (args.attack,)
    from ..attacks.suites import suite_names

    return suite_names(args.suite, args.version)


def input_transform(args, info) -> tuple:
    """(mean, std, amp) of the attack: --normalize's dataset statistics and the --amp autocast name."""
    mean = std = None
    if args.normalize:
        if info.get("mean") is None:
            raise CLIError(f"--normalize: dataset {info['name']} has no mean/std")
        mean, std = info["mean"], info["std"]
    return mean, std, {"float32": "none", "bfloat16": "bf16", "float16": "fp16"}.get(args.amp, args.amp)


def _suite(args, model, info, norm: str, eps: float):
    """--suite's attacks (robustops.attacks.suites.Suite), seeded from --seed like a single process."""
    from ..attacks.suites import Suite

    mean, std, amp = input_transform(args, info)
    return Suite(model, eps, norm, args.suite, args.version, steps=args.steps, n_queries=args.n_queries,
                 n_target_classes=min(args.n_target_classes, max(int(info["num_classes"]) - 1, 1)),
                 restarts=args.restarts, seed=args.seed, mean=mean, std=std, dtype=amp)


def _steps(args, name: str) -> int:
    return args.steps if args.steps is not None else (10 if name in ("pgd", "fgsm") else 100)


def _attack(args, model, info, norm: str, eps: float, name: str, pmodel=None):
    """The attack of this run (one of a suite). Every torchrun rank uses the seed of a single process
    (derive_seed(seed, 0)), and robust_accuracy keys each input's random start by its global index (the
    offset of a batch of consecutive indices): each input is attacked the same way whatever the number
    of processes, the batching or a resume (a batched model's figures may differ in their last digits)."""
    from .. import _rng, attacks

    mean, std, amp = input_transform(args, info)
    restarts = 1 if args.restarts is None else args.restarts
    if pmodel is not None:
        return attacks.LatentPGD(model, pmodel, eps=eps, alpha=args.alpha, steps=_steps(args, name),
                                 restarts=restarts, random_start=args.random_start, early_stop=args.early_stop,
                                 loss=args.loss, seed=_rng.derive_seed(args.seed, 0), dtype=amp, mean=mean,
                                 std=std)
    common = dict(norm=norm, mean=mean, std=std, early_stop=args.early_stop, seed=_rng.derive_seed(args.seed, 0),
                  dtype=amp, restarts=restarts)
    if name.startswith("apgd"):
        if name == "apgd-t":
            return attacks.APGDT(model, eps=eps, steps=_steps(args, name), n_target_classes=min(
                args.n_target_classes, max(int(info["num_classes"]) - 1, 1)), **common)
        return attacks.APGD(model, eps=eps, steps=_steps(args, name), loss=name[5:], **common)
    common.update(loss=args.loss, graph=args.graph, random_start=args.random_start)
    if name == "fgsm":
        return attacks.FGSM(model, eps=eps, alpha=args.alpha, **common)
    return attacks.PGD(model, eps=eps, alpha=args.alpha, steps=_steps(args, name), **common)


def threat_model(args, meta: dict):
    """(norm, eps, where eps came from): the flags win, then the checkpoint's training threat model."""
    norm = args.norm or (meta.get("norm") if meta.get("norm") in ("linf", "l2") else None) or "linf"
    if args.eps is not None:
        return norm, args.eps, "--eps"
    if isinstance(meta.get("eps"), (int, float)) and meta.get("norm", norm) == norm and meta.get("method") not in (
            None, "natural", "gaussian"):
        return norm, float(meta["eps"]), f"the checkpoint ({meta.get('method')} training)"
    return norm, (8 / 255 if norm == "linf" else 0.5), f"the default for {norm}"


def _check_learned(args) -> None:
    """The options --threat learned takes (latent PGD: one attack, eager, in the latent ball)."""
    if args.perturbation_model is None:
        raise CLIError("--threat learned needs --perturbation-model CKPT (a perturbation model checkpoint)")
    for bad, flag in [(args.suite, f"--suite {args.suite}"), (args.attack != "pgd", f"--attack {args.attack}"),
                      (args.graph, "--graph"), (args.norm, f"--norm {args.norm}")]:
        if bad:
            raise CLIError(f"{flag}: --threat learned runs latent PGD in the perturbation model's latent L2 ball; "
                           f"drop {flag.split()[0]}")
    if not os.path.isfile(args.perturbation_model):
        raise CLIError(f"--perturbation-model {args.perturbation_model!r}: no such file")


def _load_perturbation_model(args):
    """(the perturbation model on the CPU, eps, where eps came from) for --threat learned: --eps, else
    the "eps" the perturbation model's checkpoint holds."""
    import torch

    from .. import perturbation

    loader = getattr(perturbation, "load_perturbation_model", None)
    if loader is None:
        raise CLIError("--perturbation-model: this robustops has no perturbation-model loader "
                       "(robustops.perturbation.load_perturbation_model)")
    try:
        pmodel = perturbation.check_perturbation_model(loader(args.perturbation_model, torch.device("cpu")))
    except (ValueError, TypeError, KeyError, RuntimeError, FileNotFoundError) as e:
        raise CLIError(f"--perturbation-model {args.perturbation_model!r}: {e}") from None
    if args.eps is not None:
        return pmodel, args.eps, "--eps"
    eps = getattr(pmodel, "eps", None)
    if not isinstance(eps, (int, float)):
        try:
            ck = torch.load(args.perturbation_model, map_location="cpu", weights_only=True)
        except Exception:  # a format the loader reads but a plain dict load does not: no eps there
            ck = None
        eps = ck.get("eps") if isinstance(ck, dict) else None
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 <= float(eps) < math.inf:
        raise CLIError(f"--perturbation-model {args.perturbation_model!r} stores no latent radius (eps): give --eps")
    return pmodel, float(eps), "the perturbation model"


def _load(args):
    """Everything checked before the attack runs: (model, dataset, info, norm, eps, its source, the
    perturbation model or None); norm is "learned" for --threat learned."""
    from .. import models

    require_min(steps=(args.steps if args.steps is not None else 1, 1), restarts=(args.restarts, 1),
                batch_size=(args.batch_size, 1), n_target_classes=(args.n_target_classes, 1),
                max_samples=(args.max, 1), n_queries=(args.n_queries, 1))
    if not args.suite and (args.version != "standard" or args.n_queries != 5000):
        raise CLIError("--version and --n-queries are for --suite autoattack; add --suite autoattack or drop them")
    names = _attacks(args)
    if args.threat == "learned":
        _check_learned(args)
    elif args.perturbation_model is not None:
        raise CLIError("--perturbation-model is for --threat learned; add --threat learned or drop it")
    if args.suite and args.attack != "pgd":
        raise CLIError(f"--suite {args.suite} runs its own attacks ({', '.join(names)}); drop --attack {args.attack}")
    if args.graph and any(n.startswith("apgd") for n in names):
        raise CLIError("--graph replays pgd / fgsm iterations only; APGD runs eagerly")
    if args.alpha is not None and any(n.startswith("apgd") for n in names):
        raise CLIError("--step-size: APGD chooses its own step sizes (2 * eps, halved at its checkpoints)")
    for flag, v in [("--eps", args.eps), ("--step-size", args.alpha)] + [("--eps-sweep", e) for e in
                                                                         (args.eps_sweep or [])]:
        if v is not None and not 0.0 <= v < math.inf:
            raise CLIError(f"{flag} must be a finite number >= 0, got {v}")
    if args.out:
        check_writable(args.out, "--out")
        if args.resume and (args.force or args.eps_sweep):
            raise CLIError("--resume continues a result and --force replaces it: give one of them" if args.force
                           else "--resume: an --eps-sweep is not resumable; --force replaces its CSV")
        if os.path.exists(args.out) and not (args.force or args.resume):
            raise CLIError(f"--out {args.out} already exists; --resume continues it, --force replaces it")
    if args.resume and not args.out:
        raise CLIError("--resume continues the rows of --out: give --out")
    dataset, info = load_data(args.data, args.split, validate=False)  # its class count is the model's
    try:
        model = models.load_model(args.checkpoint, name=args.model)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as e:
        raise CLIError(str(e) if str(e).startswith("--") else f"--checkpoint {args.checkpoint!r}: {e}") from None
    info = model_classes(model, dataset, info, args.data, args.split)
    if args.threat == "learned":
        pmodel, eps, source = _load_perturbation_model(args)
        return model, dataset, info, "learned", eps, source, pmodel
    norm, eps, source = threat_model(args, checkpoint_meta(args.checkpoint, model))
    return model, dataset, info, norm, eps, source, None


def _columns(args) -> list:
    """The TSV's columns of this run (robust_accuracy's per-sample columns for its attacks)."""
    names = _attacks(args)
    return columns_for(names, latent=args.threat == "learned")


def _evaluate(args, model, dataset, info, norm, eps, d, pmodel=None, results=None):
    """(rows, stats) of this run over every selected input (attack_rows.evaluate_rows)."""
    stop = len(dataset) if args.max is None else min(max(args.max, 0), len(dataset))
    names = _attacks(args)
    if args.suite:
        make = lambda: _suite(args, model, info, norm, eps).attacks  # noqa: E731
    else:
        make = lambda: [_attack(args, model, info, norm, eps, names[0], pmodel)]  # noqa: E731
    return evaluate_rows(d, dataset, stop, make, names, batch_size=args.batch_size, progress=args.progress,
                         command="attack", results=results, grid=bool(args.suite))


def run(args) -> int:
    model, dataset, info, norm, eps, source, pmodel = _load(args)
    setup_run(args, sample_numel=math.prod(info["input_shape"]))
    final = results_file(args.out, _columns(args)) if args.out and not args.eps_sweep else None
    results = final.aside() if final is not None and args.force else final  # --force: replaced when done
    with distributed(args.device) as d, contextlib.ExitStack() as stack:
        claim(d, stack, args.out, final, _settings(args, norm, eps), "attack", resume=args.resume, force=args.force)
        model = model.to(d.device)
        if pmodel is not None:
            pmodel = pmodel.to(d.device)
        if args.eps_sweep:
            table = []
            for e in args.eps_sweep:
                _, stats = _evaluate(args, model, dataset, info, norm, e, d, pmodel)
                table.append((e, stats))
                if d.rank == 0:
                    n, clean, robust, elapsed = stats[:4]
                    print(f"eps {e:.6g}: robust_acc {robust / max(n, 1):.4f} (clean {clean / max(n, 1):.4f}, n {n}, "
                          f"{elapsed:.1f}s)", flush=True)
            if d.rank == 0:
                _report_sweep(args, info, norm, table)
            return 0
        try:
            _, stats = _evaluate(args, model, dataset, info, norm, eps, d, pmodel, results)
        except Exception:
            if results is not None:
                results.discard_empty(d.rank)  # failed before its first row: no files left
            raise
        if d.rank == 0:
            _report(args, info, norm, eps, source, d, stats, results, final)
    return 0


def _settings(args, norm: str, eps: float) -> dict:
    """The settings that change the rows, stored beside the TSV (a resumed run must have the same)."""
    keys = ("model", "data", "split", "threat", "attack", "suite", "steps", "restarts", "n_target_classes", "loss",
            "random_start", "early_stop", "amp", "normalize", "seed") + (("version", "n_queries", "batch_size")
                                                                         if args.suite else ())
    out = {k: getattr(args, k) for k in keys}
    out.update(checkpoint=os.path.abspath(args.checkpoint), norm=norm, eps=eps, step_size=args.alpha,
               perturbation_model=args.perturbation_model and os.path.abspath(args.perturbation_model))
    return out


def _describe(args, norm: str) -> str:
    if norm == "learned":
        return f"latent PGD-{_steps(args, 'pgd')}"
    return describe(_attacks(args), lambda n: _steps(args, n), args.n_queries)


def _report(args, info, norm, eps, source, d, stats, results, final) -> None:
    n, clean, robust, elapsed = stats[:4]
    what = _describe(args, norm)
    print(f"{what} {norm} eps={eps:.6g} (from {source}) restarts={args.restarts} on {info['name']}/{args.split} "
          f"({n} samples, {d.world} rank{'s' if d.world > 1 else ''}, {d.device.type}, {elapsed:.1f}s)")
    names = _attacks(args)
    stages, warnings = suite_report(names, stats)
    print(f"clean_acc {clean / max(n, 1):.4f}  robust_acc {robust / max(n, 1):.4f}  n {n}  "
          f"clean_correct {clean}  robust_correct {robust}")
    if results is not None:
        record = {"command": "attack", "attack": what, "attacks": list(names), "norm": norm, "eps": eps,
                  "eps_source": source, "steps": {k: _steps(args, k) for k in names}, "restarts": args.restarts,
                  "checkpoint": os.path.abspath(args.checkpoint), "data": args.data, "split": args.split, "n": n,
                  "clean_acc": clean / max(n, 1), "robust_acc": robust / max(n, 1), "seconds": elapsed,
                  "threads": args.threads,
                  "results": os.path.abspath(args.out)}
        if "pgd" in names or "fgsm" in names:
            record["loss"] = args.loss
        if norm == "learned":
            record["perturbation_model"] = os.path.abspath(args.perturbation_model)
        if stages:
            record.update(robust_acc_after={r["attack"]: r["robust_acc"] for r in stages}, stages=stages,
                          version=args.version, warnings=warnings)
        print(f"per-sample results: {args.out}; summary: {finish(results, final, record)}")


def _report_sweep(args, info, norm, table) -> None:
    rows = [{"eps": e, "clean_acc": c / max(n, 1), "robust_acc": r / max(n, 1), "n": n, "seconds": t}
            for e, (n, c, r, t, *_) in table]
    print(f"\n{_describe(args, norm)} {norm} on {info['name']}/{args.split}")
    print("| eps | clean acc | robust acc |\n|---:|---:|---:|")
    for r in rows:
        print(f"| {r['eps']:.6g} | {r['clean_acc']:.4f} | {r['robust_acc']:.4f} |")
    if not args.out:
        return
    with open(args.out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    stem = os.path.splitext(args.out)[0]
    from ..plotting import plot_curve

    plots = plot_curve(stem, [r["eps"] for r in rows], {f"{_describe(args, norm)} ({rows[0]['n']} inputs)":
                                                       [r["robust_acc"] for r in rows]},
                       xlabel=f"eps ({norm})", ylabel="robust accuracy",
                       title=f"{info['name']}: robust accuracy against eps")
    summary = write_summary(args.out + ".json", {"command": "attack --eps-sweep", "attack": _describe(args, norm),
                                             "norm": norm, "checkpoint": os.path.abspath(args.checkpoint),
                                             "data": args.data, "split": args.split, "threads": args.threads,
                                             "sweep": rows})
    print(f"sweep: {args.out}, {', '.join(plots)}, {summary}")
