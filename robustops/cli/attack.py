"""`robustops attack`: clean and robust accuracy of a checkpoint under PGD / FGSM / APGD-CE / APGD-DLR /
APGD-T or the AutoAttack-style suite (APGD-CE then APGD-T on what survives), or under latent PGD in a
learned perturbation set (--threat learned), per-sample results as a TSV, a robust-accuracy-against-eps
sweep, inputs sharded over torchrun processes."""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os

from .common import (
    CLIError,
    Renamed,
    add_common,
    agree,
    alias,
    check_writable,
    checkpoint_meta,
    distributed,
    exclusive,
    fraction,
    fractions,
    load_data,
    model_classes,
    require_min,
    setup_run,
    write_summary,
)
from .rows import ResultsFile

HELP = "robust accuracy of a checkpoint under PGD / FGSM / APGD / an AutoAttack-style suite"

#: Columns of the per-sample TSV, in order (target only for targeted attacks, attack only for --suite).
RESULT_COLUMNS = ("index", "label", "clean_pred", "adv_pred", "clean_correct", "robust_correct", "success",
                  "success_step", "restart", "linf", "l2", "latent_l2", "target", "attack")

ATTACKS = ("pgd", "fgsm", "apgd-ce", "apgd-dlr", "apgd-t")

#: --suite name -> the attacks it runs in order, each on the samples that all earlier ones left robust.
#: AutoAttack's standard suite is APGD-CE, APGD-T, FAB-T and Square; FAB-T and Square are not in
#: robustops, so this suite's robust accuracy is an upper bound of AutoAttack's.
SUITES = {"autoattack": ("apgd-ce", "apgd-t")}
SUITE_MISSING = {"autoattack": ("FAB-T", "Square")}


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
    p.add_argument("--suite", default=None, choices=sorted(SUITES),
                   help="autoattack: APGD-CE, then APGD-T on the samples it left robust (FAB-T and Square are "
                        "not implemented: the robust accuracy is an upper bound of AutoAttack's). Its rows depend "
                        "on --batch-size and the number of processes: APGD-T's random starts in a batch are keyed "
                        "by the index of the batch's first survivor")
    p.add_argument("--steps", type=int, default=None, help="iterations (None: 10 for pgd, 100 for apgd-* and --suite)")
    p.add_argument("--restarts", type=int, default=1)
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


def result_rows(samples: dict) -> list:
    """robust_accuracy's per-sample tensors as a list of row dicts (TSV-ready values)."""
    cols = [c for c in RESULT_COLUMNS if c in samples]
    data = [samples[c].tolist() for c in cols]
    rows = []
    for vals in zip(*data):
        row = {}
        for c, v in zip(cols, vals):
            row[c] = int(v) if isinstance(v, bool) else (f"{v:.6g}" if isinstance(v, float) else v)
        rows.append(row)
    return rows


def save_results(path: str, samples_or_rows) -> str:
    """Writes per-sample results (robust_accuracy's "samples" dict, or a list of row dicts) as a TSV
    sorted by index, with a header line, atomically (a robustops.cli.rows.ResultsFile). Returns path."""
    rows = result_rows(samples_or_rows) if isinstance(samples_or_rows, dict) else list(samples_or_rows)
    rows.sort(key=lambda r: int(r["index"]))
    cols = [c for c in RESULT_COLUMNS if rows and c in rows[0]] or list(RESULT_COLUMNS[:-1])
    ResultsFile(path, "\t".join(cols)).write("\t".join("" if r[c] is None else str(r[c]) for c in cols) for r in rows)
    return path


def _attacks(args) -> tuple:
    """The attacks this run applies in order (one, or a suite's)."""
    return SUITES[args.suite] if args.suite else (args.attack,)


def _steps(args, name: str) -> int:
    return args.steps if args.steps is not None else (10 if name in ("pgd", "fgsm") else 100)


def _attack(args, model, info, norm: str, eps: float, name: str, pmodel=None):
    """The attack of this run (one of a suite). Every torchrun rank uses the seed of a single process
    (derive_seed(seed, 0)), and robust_accuracy keys each input's random start by its global index (the
    offset of a batch of consecutive indices): each input is attacked the same way whatever the number
    of processes, the batching or a resume (a batched model's figures may differ in their last digits)."""
    from .. import _rng, attacks

    mean = std = None
    if args.normalize:
        if info.get("mean") is None:
            raise CLIError(f"--normalize: dataset {info['name']} has no mean/std")
        mean, std = info["mean"], info["std"]
    amp = {"float32": "none", "bfloat16": "bf16", "float16": "fp16"}.get(args.amp, args.amp)
    if pmodel is not None:
        return attacks.LatentPGD(model, pmodel, eps=eps, alpha=args.alpha, steps=_steps(args, name),
                                 restarts=args.restarts, random_start=args.random_start, early_stop=args.early_stop,
                                 loss=args.loss, seed=_rng.derive_seed(args.seed, 0), dtype=amp, mean=mean,
                                 std=std)
    common = dict(norm=norm, mean=mean, std=std, early_stop=args.early_stop, seed=_rng.derive_seed(args.seed, 0),
                  dtype=amp, restarts=args.restarts)
    if name.startswith("apgd"):
        if name == "apgd-t":
            return attacks.APGDT(model, eps=eps, steps=_steps(args, name), n_target_classes=min(
                args.n_target_classes, max(int(info["num_classes"]) - 1, 1)), **common)
        return attacks.APGD(model, eps=eps, steps=_steps(args, name), loss=name[5:], **common)
    common.update(loss=args.loss, graph=args.graph, random_start=args.random_start)
    if name == "fgsm":
        return attacks.FGSM(model, eps=eps, alpha=args.alpha, **common)
    return attacks.PGD(model, eps=eps, alpha=args.alpha, steps=_steps(args, name), **common)


def _gather(d, rows, seconds: float):
    """Rank 0 receives every rank's rows and the slowest rank's seconds."""
    import torch.distributed as dist

    gathered = [None] * d.world if d.rank == 0 else None
    dist.gather_object((rows, seconds), gathered, dst=0)
    if d.rank != 0:
        return rows, seconds
    return [r for part_rows, _ in gathered for r in part_rows], max(t for _, t in gathered)


def _threat_model(args, meta: dict):
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
                max_samples=(args.max, 1))
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
    norm, eps, source = _threat_model(args, checkpoint_meta(args.checkpoint, model))
    return model, dataset, info, norm, eps, source, None


def _columns(args) -> list:
    """The TSV's columns of this run (robust_accuracy's per-sample columns for its attacks)."""
    names = _attacks(args)
    extra = {"latent_l2": args.threat == "learned", "target": False, "attack": len(names) > 1}  # targets: chosen inside
    return [c for c in RESULT_COLUMNS if extra.get(c, True)]


def results_file(path: str, columns) -> ResultsFile:
    """attack's per-sample TSV at path with these columns, as the shared results file (rows, lock, resume)."""
    parse = {"linf": float, "l2": float, "latent_l2": float, "attack": str}
    return ResultsFile(path, "\t".join(columns), [parse.get(c, int) for c in columns[1:]])


def _batches(dataset, todo: list, size: int):
    """(x, y, indices) batches of at most size inputs of dataset, each of consecutive indices (its random
    starts are then keyed by each input's global index)."""
    import torch
    from torch.utils.data import default_collate

    run: list = []
    for i in todo + [None]:
        if run and (i is None or i != run[-1] + 1 or len(run) == size):
            x, y = default_collate([dataset[j][:2] for j in run])
            yield x, torch.as_tensor(y), torch.tensor(run)
            run = []
        if i is not None:
            run.append(i)


def _evaluate(args, model, dataset, info, norm, eps, d, pmodel=None, results=None):
    """(rows, [n, clean, robust, seconds, robust after each attack...]) on rank 0, over every selected
    input: this rank's contiguous share of the inputs still to do is attacked a batch at a time, its
    rows appended to its part file of results (when given, else gathered), rank 0 merging them."""
    import time

    from .. import attacks
    from .. import data as rodata
    from .rows import RowWriter

    stop = len(dataset) if args.max is None else min(max(args.max, 0), len(dataset))
    done = results.done() if results is not None else set()
    todo = [i for i in range(stop) if i not in done]
    share = -(-len(todo) // d.world)
    mine = todo[d.rank * share:(d.rank + 1) * share]
    d.barrier()  # everyone has read the part files before any is truncated
    names = _attacks(args)
    try:
        chosen = [_attack(args, model, info, norm, eps, name, pmodel) for name in names]
    except (ValueError, TypeError) as e:
        raise CLIError(str(e)) from None
    out = results.open_part(d.rank) if results is not None else None
    writer = RowWriter(out, len(mine), "+".join(names), args.progress and d.rank == 0,
                       lines="attack" if d.rank == 0 else None)
    rows, t0 = [], time.perf_counter()
    try:
        for batch in _batches(rodata.IndexedDataset(dataset), mine, args.batch_size):
            res = attacks.robust_accuracy(model, [batch], chosen if len(chosen) > 1 else chosen[0], device=d.device,
                                          progress=False)
            part = result_rows(res["samples"])
            for row in part:
                if len(names) > 1:
                    row["attack"] = names[int(row["attack"])]
                if out is not None:
                    writer.write("\t".join(str(row[c]) for c in results.header.split("\t")))
            rows += part
            writer.tick(len(part))
    finally:
        writer.close()
        if out is not None:
            out.close()
    seconds = time.perf_counter() - t0
    if d.distributed:
        rows, seconds = _gather(d, rows, seconds)
    d.barrier()
    if d.rank == 0 and results is not None:
        header = results.header.split("\t")
        rows = [dict(zip(header, line.split("\t"))) for line in results.merge()]
    return rows, _stats(rows, names, seconds)


def _stats(rows, names, seconds: float) -> list:
    """[n, clean, robust, seconds, robust after each attack of a suite...] of rows (TSV fields or values)."""
    stats = [len(rows), sum(int(r["clean_correct"]) for r in rows), sum(int(r["robust_correct"]) for r in rows),
             seconds]
    if len(names) > 1:  # robust after attack k: robust in the end, or broken only by a later attack
        pos = {name: k for k, name in enumerate(names)}
        stats += [sum(int(r["robust_correct"]) or int(int(r["clean_correct"]) and pos[r["attack"]] > k) for r in rows)
                  for k in range(len(names))]
    return stats


def run(args) -> int:
    model, dataset, info, norm, eps, source, pmodel = _load(args)
    setup_run(args, sample_numel=math.prod(info["input_shape"]))
    final = results_file(args.out, _columns(args)) if args.out and not args.eps_sweep else None
    results = final.aside() if final is not None and args.force else final  # --force: replaced when done
    with distributed(args.device) as d, contextlib.ExitStack() as stack:
        error = None
        if d.rank == 0 and args.out:
            try:
                stack.enter_context(exclusive(args.out + ".lock", f"--out {args.out}"))
                if final is not None:
                    final.prepare(_settings(args, norm, eps), resume=args.resume, force=args.force, command="attack",
                                  other_kind=lambda old, new: None)
                elif os.path.exists(args.out) and not args.force:
                    raise CLIError(f"--out {args.out} already exists; --force replaces it")
            except CLIError as e:
                error = str(e)
        agree(d, error)
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
            "random_start", "early_stop", "amp", "normalize", "seed")
    out = {k: getattr(args, k) for k in keys}
    out.update(checkpoint=os.path.abspath(args.checkpoint), norm=norm, eps=eps, step_size=args.alpha,
               perturbation_model=args.perturbation_model and os.path.abspath(args.perturbation_model))
    return out


def _describe(args, norm: str) -> str:
    label = {"pgd": "PGD", "fgsm": "FGSM", "apgd-ce": "APGD-CE", "apgd-dlr": "APGD-DLR", "apgd-t": "APGD-T"}
    if norm == "learned":
        return f"latent PGD-{_steps(args, 'pgd')}"
    parts = [label[n] if n == "fgsm" else f"{label[n]}-{_steps(args, n)}" for n in _attacks(args)]
    return " + ".join(parts)


def _report(args, info, norm, eps, source, d, stats, results, final) -> None:
    n, clean, robust, elapsed = stats[:4]
    what = _describe(args, norm)
    print(f"{what} {norm} eps={eps:.6g} (from {source}) restarts={args.restarts} on {info['name']}/{args.split} "
          f"({n} samples, {d.world} rank{'s' if d.world > 1 else ''}, {d.device.type}, {elapsed:.1f}s)")
    names = _attacks(args)
    stages = {}
    if len(names) > 1:
        stages = {name: stats[4 + k] / max(n, 1) for k, name in enumerate(names)}
        print("robust accuracy after each attack: " + ", ".join(f"{k} {v:.4f}" for k, v in stages.items()))
        print(f"not run: {', '.join(SUITE_MISSING[args.suite])} (not in robustops); this robust accuracy is an upper "
              f"bound of full AutoAttack's")
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
            record.update(robust_acc_after=stages, not_run=list(SUITE_MISSING[args.suite]))
        with open(results.settings_path) as fh:
            stored = json.load(fh)  # the settings a --resume checks
        write_summary(results.settings_path, {**record, **stored})
        if results is not final:
            results.replace(final)
        print(f"per-sample results: {args.out}; summary: {final.settings_path}")


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
