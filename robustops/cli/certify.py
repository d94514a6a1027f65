"""`robustops certify` and `robustops predict`: randomized smoothing (Cohen et al.'s CERTIFY and
PREDICT) over a dataset, written row by row in Cohen et al.'s TSV formats (certify: idx label predict
radius correct time; predict: idx label predict correct time); `certify --method ibp`: the
deterministic L-inf radius of interval bound propagation (robustops.bounds) in the same TSV; `certify --threat
learned --perturbation-model CKPT`: smoothing over the latent offsets of a learned perturbation set
(robustops.smoothing.LatentSmooth), the radius column then holding certified latent L2 radii. An
interrupted run resumes with no lost and no duplicated rows, torchrun processes work on disjoint shards
in part files that rank 0 merges, and the finished TSV comes with a JSON summary (and, for certify, a
plot on request).

This module holds the flags and the driver shared by every mode; each mode is one Certifier
(robustops.cli.certifiers), chosen once per run; the TSV is a robustops.cli.rows.ResultsFile."""
from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import sys

from . import certifiers
from .certifiers import DECISION_LETTERS, HEADERS, Certifier, Checkpoint, Inputs, Rows, Settings  # noqa: F401
from .common import (
    CLIError,
    add_common,
    agree,
    alias,
    check_writable,
    checkpoint_meta,
    distributed,
    exclusive,
    fraction,
    load_data,
    model_classes,
    model_dims,
    require_min,
    run_setup,
)
from .rows import ResultsFile, RowWriter

HELP = ("certification: randomized smoothing (Cohen et al.'s CERTIFY; --sequential: as few samples as each input "
        "needs) or a bound: IBP, CROWN, CROWN-IBP or the best of IBP and CROWN (--method ibp|crown|crown-ibp|best)")

TSV_HEADER = HEADERS["certify"]


def add_arguments(p: argparse.ArgumentParser, mode: str = "certify") -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--checkpoint", required=True,
                   help="model file: a robustops checkpoint (robustops train / save_checkpoint), a state dict "
                        "(give --model), Cohen et al.'s released checkpoints, a TorchScript or a torch.export file")
    alias(g, "--ckpt", dest="checkpoint")
    g.add_argument("--model", default=None, help="model name for a raw state dict (small_cnn, preact_resnet18, "
                                                 "resnet20, resnet110, ...)")
    g.add_argument("--data", default="digits",
                   help='"digits" (embedded), a .npz file, "cifar10:DIR" or "imagefolder:DIR"; read from local '
                        "disk, never downloaded")
    alias(g, "--dataset", dest="data")
    g.add_argument("--split", default="test", choices=["train", "test"])
    g.add_argument("--normalize", default="auto", choices=("auto", "data", "none"),
                   help="input normalization fused into the noise: auto = the checkpoint's mean/std or the "
                        "model's leading Normalize layer (else none); data = the dataset's statistics")
    if mode == "certify":
        _add_method_arguments(p)
    g = p.add_argument_group("threat model")
    g.add_argument("--threat", default="norm", choices=certifiers.choices("threat"),
                   help="norm: smoothing over pixel noise (L2 radii of the image); learned: smoothing over the latent "
                        "offsets u of a learned perturbation set, h(u) = f(member(x, u)), certified at u = 0 (latent "
                        "L2 radii: no member of the set within that latent radius changes the smoothed prediction)")
    g.add_argument("--perturbation-model", default=None, metavar="CKPT",
                   help="--threat learned: the perturbation model's checkpoint (robustops.perturbation."
                        "load_perturbation_model); --sigma is then the latent noise level (None: the latent_sigma "
                        "a learned_noise checkpoint records, else the smallest sigma at which --n samples at --alpha "
                        "certify the set's radius eps, smoothing.sigma_for_radius)")
    g.add_argument("--sigma-dissent", type=fraction("sigma-dissent"), default=None, metavar="F",
                   help="--threat learned without --sigma: the fraction of the n votes that may go to other classes "
                        "while r = eps is still certified (default 0.01; 0: the reference's rule, all n votes)")
    g = p.add_argument_group("CERTIFY (Cohen et al. 2019)" if mode == "certify" else "PREDICT (Cohen et al. 2019)")
    g.add_argument("--sigma", type=fraction("sigma"), default=None,
                   help="noise level (None: the sigma the checkpoint was trained with)")
    if mode == "certify":
        g.add_argument("--n0", type=int, default=None, help="selection samples per input (None: 100; with "
                       "--sequential 50, the sequential modes' default)")
        alias(g, "--N0", dest="n0", type=int)
    g.add_argument("--n", "--num-samples", dest="n", type=int, default=100_000, help="estimation samples per input "
                   "(--num-samples: the spelling torchrun accepts)")
    alias(g, "--N", dest="n", type=int)
    g.add_argument("--alpha", type=fraction("alpha"), default=0.001, help="failure probability")
    g.add_argument("--batch-size", type=int, default=1000,
                   help="noisy samples per forward pass (--method ibp: inputs per bound pass)")
    alias(g, "--batch", dest="batch_size", type=int)
    g.add_argument("--skip", type=int, default=1, help="every skip-th input")
    g.add_argument("--max-samples", dest="max", type=int, default=-1, help="stop before input index max (-1: all)")
    alias(g, "--max", dest="max", type=int)
    g.add_argument("--inputs-per-call", type=int, default=None,
                   help="inputs handled together between host syncs and row writes (None: enough for about 4 "
                        "forward passes)")
    g = p.add_argument_group("output")
    columns = HEADERS[mode].replace("\t", " ") + (" (--sequential: and samples decisions)" if mode == "certify" else "")
    g.add_argument("-o", "--out", required=True, help=f"TSV with columns {columns} (a JSON summary goes beside it)")
    alias(g, "--outfile", dest="out")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted run: keep the complete rows of -o, do the rest (refused when a "
                        "setting that changes the rows differs from the run's)")
    g.add_argument("--force", action="store_true",
                   help="replace an existing -o (without --resume or --force an existing result is kept and the "
                        "run refuses to start)")
    if mode == "certify":
        g.add_argument("--plot", default=None,
                       help="also write certified accuracy against radius to this PNG (and a PDF beside it)")
    g = p.add_argument_group("execution")
    g.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"), help="autocast of the base classifier")
    alias(g, "--autocast", dest="amp", choices=("none", "bf16", "fp16"))
    g.add_argument("--channels-last", action="store_true", help="channels_last noisy batches and model")
    g.add_argument("--graph", action="store_true", help="replay full single-input batches from a CUDA graph "
                                                         "(CUDA only; same votes, no launch overhead)")
    add_common(g)


def _add_method_arguments(p: argparse.ArgumentParser) -> None:
    """certify's --method and the flags of each mode (Certifier.add_arguments)."""
    g = p.add_argument_group("method")
    g.add_argument("--method", default="smoothing", choices=certifiers.choices("method"),
                   help="smoothing: L2 radii of the smoothed classifier (randomized smoothing); ibp: L-inf radii "
                        "of the classifier itself, proven by interval bound propagation; crown / crown-ibp: by CROWN / CROWN-IBP linear relaxation "
                        "(robustops.crown); best: the larger of IBP's and CROWN's margin bounds")
    for cls in certifiers.CERTIFIERS:  # each mode's own flags
        cls.add_arguments(p)


def run(args, mode: str = "certify") -> int:
    """`robustops certify` (mode "certify") or `robustops predict` ("predict"): the mode chosen once from
    the flags (robustops.cli.certifiers.choose) certifies every selected input into the TSV -o; args is
    only read."""
    certifier = certifiers.choose(args, mode)
    dataset, info, s = _load(args, certifier)
    threads, progress = run_setup(args, sample_numel=math.prod(info["input_shape"]))
    final = certifier.results(args.out)
    results = final.aside() if args.force else final  # --force: the old result stays until this one is done
    # gloo: the ranks only meet at barriers, possibly after days of work (hence the timeout).
    with distributed(args.device, backend="gloo", timeout=datetime.timedelta(days=7)) as d, \
            contextlib.ExitStack() as stack:
        error = None
        if d.rank == 0:
            try:
                stack.enter_context(exclusive(args.out + ".lock", f"-o {args.out}"))
                final.prepare(certifier.settings(args, s), resume=args.resume, force=args.force, command=mode,
                              other_kind=_other_kind)
            except CLIError as e:
                error = str(e)
        agree(d, error)
        try:
            _run(args, mode, certifier, s, results, dataset, info, progress, d)
        except Exception:
            results.discard_empty(d.rank)  # a run that failed before its first row leaves no files
            raise
        if d.rank == 0:
            _finish(args, mode, certifier, s, results, info, threads, final)
        d.barrier()
    return 0


def _load(args, certifier: Certifier):
    """Everything validated before any output is touched: (dataset, info, the mode's settings)."""
    from .. import models as romodels

    require_min(n0=(getattr(args, "n0", None), 1), n=(args.n, 1), batch_size=(args.batch_size, 1),
                skip=(args.skip, 1), workers=(args.workers, 0), inputs_per_call=(args.inputs_per_call, 1))
    require_min(max_samples=(None if args.max == -1 else args.max, 1))  # -1: all
    if not 0.0 < args.alpha < 1.0:
        raise CLIError(f"--alpha must be in (0, 1), got {args.alpha}")
    if args.sigma is not None and not 0.0 < args.sigma < math.inf:
        raise CLIError(f"--sigma must be a finite number > 0, got {args.sigma}")
    certifier.check_flags(args)
    if args.resume and args.force:
        raise CLIError("--resume continues a result and --force replaces it: give one of them")
    check_writable(args.out, "-o")
    if getattr(args, "plot", None):
        check_writable(args.plot, "--plot")
    dataset, info = load_data(args.data, args.split, validate=False)  # its class count is the model's
    kwargs = model_dims(info) if args.model else {}
    try:
        if args.model:
            kwargs.update(_stored_classes(args.checkpoint))
        model = romodels.load_model(args.checkpoint, name=args.model, **kwargs)
    except (FileNotFoundError, ValueError, TypeError, RuntimeError) as e:
        raise CLIError(f"--checkpoint {args.checkpoint!r}: {e}") from None
    info = model_classes(model, dataset, info, args.data, args.split)
    ckpt = Checkpoint(model, checkpoint_meta(args.checkpoint, model), dataset, info)
    return dataset, info, certifier.check(args, ckpt)


def _stored_classes(path: str) -> dict:
    """{"num_classes": the rows of the last 2-D weight} of a state dict (--model: its classifier's width),
    or {} (the model's default) when the file holds none: the class count comes from the weights, never
    from the data."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - TorchScript / export files: load_model reads them
        return {}
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else {}
    weights = [v for k, v in state.items() if str(k).endswith("weight") and getattr(v, "dim", lambda: 0)() == 2] \
        if isinstance(state, dict) else []
    return {"num_classes": int(weights[-1].shape[0])} if weights else {}


def _other_kind(old: dict, new: dict):
    """How the run of settings `old` differs in kind from `new` (method, threat model, --sequential): the
    middle of the refusal of --resume, or None."""
    for key, default, what in (("method", "smoothing", "method"), ("threat", "norm", "threat model")):
        if old.get(key, default) != new.get(key, default):
            return f"with --{key} {old.get(key, default)}, not {new.get(key, default)}; use the same {what}"
    if bool(old.get("sequential")) != bool(new.get("sequential")):
        return "with --sequential; resume it with --sequential" if old.get("sequential") else \
            "without --sequential; resume it without"
    return None


def _run(args, mode: str, certifier: Certifier, s: Settings, results: ResultsFile, dataset, info, progress: bool,
         d) -> None:
    """This rank's rows: the selected inputs that no part file or TSV holds yet, sharded over the ranks,
    each written to the rank's part file as soon as it is done; what went wrong is reported at the end."""
    from .. import data as rodata

    stop = len(dataset) if args.max is None or args.max < 0 else min(args.max, len(dataset))
    selected = list(range(0, stop, args.skip))
    done = results.done()  # rows from a run with any number of processes
    mine = [i for i in (rodata.shard(selected, d.rank, d.world) if d.world > 1 else selected) if i not in done]
    d.barrier()  # everyone has read the part files before any is truncated
    s.model.to(d.device)  # load_model returns it in eval mode (exported programs refuse .eval())
    step = certifier.step(args, s, info, d.device)
    if d.rank == 0:
        print(f"robustops {mode}: {info['name']} {args.split} ({len(selected)} inputs, {len(selected) - len(done)} to "
              f"go), {certifier.describe(args, s)}, {d.world} process(es) on {d.device}", flush=True)
    # Rows go to this rank's part file as they are done; the TSV itself is written (atomically) only
    # when the run completes, merged from the part files.
    out = results.open_part(d.rank)
    try:
        writer = RowWriter(out, len(mine), mode, progress and d.rank == 0, lines=mode if d.rank == 0 else None)
        rows = Rows(writer)
        try:
            certifier.run(args, s, step, Inputs(dataset, mine, args.workers, d.device), rows)
        finally:
            writer.close()
    finally:
        out.close()
    who, issues = f"rank {d.rank}: " if d.world > 1 else "", rows.issues
    if issues["nan_inputs"]:
        print(f"robustops {mode}: warning: {who}{issues['nan_inputs']} input(s) had noisy samples with NaN logits "
              f"({issues['nan_votes']} samples, counted as votes for no class)", file=sys.stderr)
    if issues["nonfinite_inputs"]:
        print(f"robustops {mode}: warning: {who}{issues['nonfinite_inputs']} input(s) held NaN / Inf values and "
              f"abstained", file=sys.stderr)
    d.barrier()


def _finish(args, mode: str, certifier: Certifier, s: Settings, results: ResultsFile, info, threads: int,
            final: ResultsFile) -> None:
    """Rank 0, after every rank's rows: the merged TSV, the table, the summary (and plot); a --force run's
    result (written aside) then replaces the old one."""
    lines = results.merge()
    print(f"{len(lines)} inputs {'certified' if mode == 'certify' else 'predicted'} -> {args.out}")
    summary = certifier.summary(args, s, [line.split("\t") for line in lines], info, threads)
    results.add_summary(summary)
    if results is not final:
        results.replace(final)
    print(f"summary -> {final.settings_path}")
