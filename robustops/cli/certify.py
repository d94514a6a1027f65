"""`robustops certify` and `robustops predict`: randomized smoothing (Cohen et al.'s CERTIFY and
PREDICT) over a dataset, written row by row in Cohen et al.'s TSV formats (certify: idx label predict
radius correct time; predict: idx label predict correct time); `certify --method ibp`: the
deterministic L-inf radius of interval bound propagation (robustops.bounds) in the same TSV; `certify --threat
learned --perturbation-model CKPT`: smoothing over the latent offsets of a learned perturbation set
(robustops.smoothing.LatentSmooth), the radius column then holding certified latent L2 radii. An
interrupted run resumes with no lost and no duplicated rows, torchrun processes work on disjoint shards
in part files that rank 0 merges, and the finished TSV comes with a JSON summary (and, for certify, a
plot on request)."""
from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import json
import math
import os
import sys
import time
import warnings
from typing import Dict, List, Optional, Tuple

from .common import (
    CLIError,
    add_common,
    agree,
    alias,
    check_model_accepts,
    check_writable,
    checkpoint_meta,
    distributed,
    exclusive,
    fraction,
    load_data,
    require_min,
    setup_run,
    write_summary,
)

HELP = ("certification: randomized smoothing (Cohen et al.'s CERTIFY; --sequential: as few samples as each input "
        "needs) or interval bound propagation (--method ibp)")

HEADERS = {"certify": "idx\tlabel\tpredict\tradius\tcorrect\ttime", "predict": "idx\tlabel\tpredict\tcorrect\ttime",
           "sequential": "idx\tlabel\tpredict\tradius\tcorrect\ttime\tsamples\tdecisions"}
TSV_HEADER = HEADERS["certify"]
# The decisions column of --sequential: one letter per radius (sequential.CERTIFIED / NOT_CERTIFIED / ABSTAINED),
# "-" in full-radius mode.
DECISION_LETTERS = {1: "c", 0: "n", -1: "a"}


def _decisions(field: str) -> str:
    if field != "-" and not (field and set(field) <= set(DECISION_LETTERS.values())):
        raise ValueError(f"not a decisions field: {field!r}")
    return field


# How each field after idx of a complete row parses, by the row's width: predict, certify, certify --sequential.
ROW_FIELDS = {5: (int, int, int, float), 6: (int, int, float, int, float),
              8: (int, int, float, int, float, int, _decisions)}


def _parse_row(line: str) -> Optional[int]:
    """The idx of a complete row of any of the TSVs (5 fields: predict; 6: certify; 8: certify
    --sequential), or None."""
    f = line.split("\t")
    parsers = ROW_FIELDS.get(len(f))
    if parsers is None:
        return None
    try:
        for parse, field in zip(parsers, f[1:]):
            parse(field)
        return int(f[0])
    except ValueError:
        return None


def _read_tsv(path: str, header: str = TSV_HEADER) -> Tuple[Dict[int, str], int]:
    """The complete rows of a certify TSV ({idx: line}) and the length in bytes of the valid prefix
    (header and complete rows; 0 when even the header is incomplete). A row cut short by a kill, and
    anything after it, is not valid."""
    if not os.path.exists(path):
        return {}, 0
    with open(path, "rb") as fh:
        data = fh.read()
    head = (header + "\n").encode()
    if not data.startswith(head):
        if head.startswith(data):
            return {}, 0  # killed while writing the header
        raise ValueError(f"{path!r} exists but is not a robustops TSV of this kind (its first line is not "
                         f"{header!r}); remove it or choose another -o")
    rows: Dict[int, str] = {}
    valid = len(head)
    lines = data[len(head):].split(b"\n")
    for raw in lines[:-1]:  # the last piece has no newline: empty or a partial row
        try:
            line = raw.decode()
        except UnicodeDecodeError:
            break
        idx = _parse_row(line)
        if idx is None or line.count("\t") != header.count("\t"):  # a row of another kind of TSV is not valid
            break
        rows.setdefault(idx, line)
        valid += len(raw) + 1
    return rows, valid


def _part_path(outfile: str, rank: int) -> str:
    return f"{outfile}.rank{rank}.part"


def _part_files(outfile: str) -> List[str]:
    return sorted(glob.glob(glob.escape(outfile) + ".rank*.part"))


def _open_rows_file(path: str, header: str):
    """A part file opened for appending rows: what is there is kept up to its last complete row.
    Returns the file handle."""
    valid = _read_tsv(path, header)[1]
    if valid:
        with open(path, "r+b") as fh:
            fh.truncate(valid)
        return open(path, "a", buffering=1)
    fh = open(path, "w", buffering=1)
    fh.write(header + "\n")
    fh.flush()
    return fh


def _merge(outfile: str, header: str) -> List[str]:
    """Rows of outfile and of every rank's part file, one per idx, sorted by idx, written atomically to
    outfile; part files are removed. Returns the rows."""
    rows = _read_tsv(outfile, header)[0]
    parts = _part_files(outfile)
    for p in parts:
        for idx, line in _read_tsv(p, header)[0].items():
            rows.setdefault(idx, line)
    lines = [rows[i] for i in sorted(rows)]
    tmp = f"{outfile}.tmp.{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(header + "\n")
        for line in lines:
            fh.write(line + "\n")
    os.replace(tmp, outfile)
    for p in parts:
        os.remove(p)
    return lines


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
    g.add_argument("--threat", default="norm", choices=("norm", "learned"),
                   help="norm: smoothing over pixel noise (L2 radii of the image); learned: smoothing over the latent "
                        "offsets u of a learned perturbation set, h(u) = f(member(x, u)), certified at u = 0 (latent "
                        "L2 radii: no member of the set within that latent radius changes the smoothed prediction)")
    g.add_argument("--perturbation-model", default=None, metavar="CKPT",
                   help="--threat learned: the perturbation model's checkpoint (robustops.perturbation."
                        "load_perturbation_model); --sigma is then the latent noise level")
    g = p.add_argument_group("CERTIFY (Cohen et al. 2019)" if mode == "certify" else "PREDICT (Cohen et al. 2019)")
    g.add_argument("--sigma", type=fraction("sigma"), default=None,
                   help="noise level (None: the sigma the checkpoint was trained with)")
    if mode == "certify":
        g.add_argument("--n0", type=int, default=100, help="selection samples per input")
        alias(g, "--N0", dest="n0", type=int)
    g.add_argument("--n", type=int, default=100_000, help="estimation samples per input")
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
    """certify's --method, the options of --method ibp and of --sequential."""
    g = p.add_argument_group("method")
    g.add_argument("--method", default="smoothing", choices=("smoothing", "ibp"),
                   help="smoothing: L2 radii of the smoothed classifier (randomized smoothing); ibp: L-inf radii "
                        "of the classifier itself, proven by interval bound propagation")
    g = p.add_argument_group("--method ibp (deterministic, L-inf)")
    g.add_argument("--eps-max", type=fraction("eps-max"), default=None,
                   help="largest radius searched (None: the eps the checkpoint was trained with)")
    g.add_argument("--tol", type=fraction("tol"), default=1e-3,
                   help="radius resolution: a grid step 2^floor(log2(tol)) <= tol")
    _add_sequential_arguments(p)


def _add_sequential_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("--sequential (randomized smoothing with as few samples as each input needs)")
    g.add_argument("--sequential", action="store_true",
                   help="sequential certification (Smooth.certify_radius / certify_radii / certify_sequential): each "
                        "input draws estimation samples up to looks at --n-min, 2 --n-min, ... --n and stops as soon "
                        "as a confidence sequence decides; --n is then the most estimation samples per input. TSV "
                        "columns " + HEADERS["sequential"].replace("\t", " "))
    g.add_argument("--radius", type=fraction("radius"), default=None,
                   help="fixed-radius mode: is each input certified at this L2 radius?")
    g.add_argument("--radii", default=None, metavar="R1,R2,...",
                   help="grid mode: decide each of these L2 radii (comma-separated, >= 0); the radius column holds "
                        "the largest certified one, the decisions column one letter per radius (c certified, n not "
                        "certified, a abstained)")
    g.add_argument("--precision", type=fraction("precision"), default=None,
                   help="full-radius mode (neither --radius nor --radii): the largest certified radius, to this "
                        "precision (None: 0.05)")
    g.add_argument("--test", default=None, choices=("betting", "cp"),
                   help="the confidence sequence: cp (Clopper-Pearson at each look, alpha split over the looks; "
                        "None: cp, as in the Smooth methods) or betting (anytime-valid, by betting)")
    g.add_argument("--n-min", type=int, default=None, help="estimation samples at the first look (None: 100)")
    g.add_argument("--beta", type=fraction("beta"), default=None,
                   help="error of a 'not certified' stop (None: --alpha); it never makes a certificate wrong")
    g.add_argument("--max-active", type=int, default=None,
                   help="inputs in flight at once (None: enough to fill the forward passes)")


# Settings that change the rows: a resumed run must have the same ones (stored beside the TSV).
ROW_SETTINGS = ("checkpoint", "model", "data", "split", "normalize", "sigma", "n0", "n", "alpha", "seed", "amp")
LEARNED_ROW_SETTINGS = ROW_SETTINGS + ("threat", "perturbation_model")
IBP_ROW_SETTINGS = ("method", "checkpoint", "model", "data", "split", "normalize", "eps_max", "tol")
SEQUENTIAL_ROW_SETTINGS = ROW_SETTINGS + ("sequential", "radius", "radii", "precision", "test", "n_min", "beta")
SEQUENTIAL_ONLY = ("radius", "radii", "precision", "test", "n_min", "beta", "max_active")


def _method(args) -> str:
    return getattr(args, "method", "smoothing")


def _threat(args) -> str:
    return getattr(args, "threat", "norm")


def _sequential(args) -> bool:
    return bool(getattr(args, "sequential", False))


def _grid(args) -> Optional[List[float]]:
    """--sequential: the radii to decide ([--radius] or --radii), None in full-radius mode."""
    return [args.radius] if args.radius is not None else args.radii


def _header(args, mode: str) -> str:
    """The TSV header of the run: certify's, predict's, or certify --sequential's."""
    return HEADERS["sequential"] if _sequential(args) else HEADERS[mode]


def _row_settings(args) -> tuple:
    if _method(args) == "ibp":
        return IBP_ROW_SETTINGS
    if _threat(args) == "learned":
        return LEARNED_ROW_SETTINGS
    return SEQUENTIAL_ROW_SETTINGS if _sequential(args) else ROW_SETTINGS


def _settings(args, sigma: Optional[float]) -> dict:
    out = {k: getattr(args, k, None) for k in _row_settings(args)}
    out["checkpoint"] = os.path.abspath(args.checkpoint)
    if _method(args) == "ibp":
        out["eps_max"] = float(args.eps_max)
    else:
        out["sigma"] = float(sigma)
    if _threat(args) == "learned":
        out["perturbation_model"] = os.path.abspath(args.perturbation_model)
    return out


def _load(args):
    """Everything validated before any output is touched: (dataset, info, model, sigma, mean, std)."""
    import torch

    from .. import models as romodels

    require_min(n0=(getattr(args, "n0", None), 1), n=(args.n, 1), batch_size=(args.batch_size, 1),
                skip=(args.skip, 1), workers=(args.workers, 0), inputs_per_call=(args.inputs_per_call, 1))
    if not 0.0 < args.alpha < 1.0:
        raise CLIError(f"--alpha must be in (0, 1), got {args.alpha}")
    if args.sigma is not None and not 0.0 < args.sigma < math.inf:
        raise CLIError(f"--sigma must be a finite number > 0, got {args.sigma}")
    _check_sequential(args)
    if args.resume and args.force:
        raise CLIError("--resume continues a result and --force replaces it: give one of them")
    check_writable(args.out, "-o")
    if getattr(args, "plot", None):
        check_writable(args.plot, "--plot")
    dataset, info = load_data(args.data, args.split)
    C, H, W = info["input_shape"]
    kwargs = {"num_classes": int(info["num_classes"]), "in_channels": C, "input_size": H} if args.model else {}
    try:
        model = romodels.load_model(args.checkpoint, name=args.model, **kwargs)
    except (FileNotFoundError, ValueError, TypeError, RuntimeError) as e:
        raise CLIError(f"--checkpoint {args.checkpoint!r}: {e}") from None
    meta = checkpoint_meta(args.checkpoint, model)
    if _method(args) == "ibp":
        if _threat(args) != "norm" or getattr(args, "perturbation_model", None) is not None:
            raise CLIError("--method ibp certifies L-inf boxes of the image: --threat learned / --perturbation-model "
                           "are for randomized smoothing")
        return _load_ibp(args, dataset, info, model, meta)
    if _threat(args) == "learned":
        _check_learned(args)
    elif getattr(args, "perturbation_model", None) is not None:
        raise CLIError("--perturbation-model is for --threat learned")
    sigma = args.sigma if args.sigma is not None else meta.get("sigma")
    if sigma is None:
        raise CLIError("--sigma is required (the checkpoint does not say which noise level it was trained with)")
    if not 0.0 < sigma < math.inf:
        raise CLIError(f"--sigma must be a finite number > 0, got {sigma}")
    mean = std = None
    if args.normalize == "auto":
        if meta.get("mean") is not None and meta.get("std") is not None:
            mean, std = list(meta["mean"]), list(meta["std"])
        else:
            model, mean, std = romodels.split_normalize(model)
    elif args.normalize == "data":
        mean, std = info.get("mean"), info.get("std")
    check_model_accepts(model, info, torch.device("cpu"))
    if _threat(args) == "learned":
        _check_members(args, dataset, info)
    return dataset, info, model, float(sigma), mean, std


def _check_sequential(args) -> None:
    """The options of --sequential (refused without it), resolved: args.radii becomes a list of floats, and
    test, n_min, beta and (full-radius mode) precision get their defaults (those of the Smooth methods)."""
    given = [f"--{k.replace('_', '-')}" for k in SEQUENTIAL_ONLY if getattr(args, k, None) is not None]
    if not _sequential(args):
        if given:
            raise CLIError(f"{' / '.join(given)}: only with --sequential (sequential certification)")
        return
    for flag, other in (("--method ibp", _method(args) == "ibp"), ("--threat learned", _threat(args) == "learned"),
                        ("--graph", args.graph), ("--inputs-per-call", args.inputs_per_call is not None)):
        if other:
            raise CLIError(f"--sequential is not supported with {flag} (it refills the eager forward passes of "
                           f"randomized smoothing of the image, input by input)")
    if args.radius is not None and args.radii is not None:
        raise CLIError("--radius and --radii exclude each other: --radius R decides one radius, --radii R1,R2,... "
                       "a grid")
    if args.radius is not None and not 0.0 <= args.radius < math.inf:
        raise CLIError(f"--radius must be a finite number >= 0, got {args.radius}")
    if args.radii is not None:
        args.radii = _parse_radii(args.radii)
    from ..smoothing.sequential import DEFAULT_N_MIN, DEFAULT_PRECISION, DEFAULT_TEST  # (--help stays torch-free)

    grid = _grid(args)
    if grid is not None and args.precision is not None:
        raise CLIError("--precision is for full-radius mode; --radius / --radii decide given radii")
    if args.radius is not None and getattr(args, "plot", None):
        raise CLIError("--plot draws certified accuracy against radius: use --radii (a grid) or full-radius mode, "
                       "not one --radius")
    args.precision = DEFAULT_PRECISION if grid is None and args.precision is None else args.precision
    if grid is None and not 0.0 < args.precision < math.inf:
        raise CLIError(f"--precision must be a finite number > 0, got {args.precision}")
    args.test = args.test or DEFAULT_TEST  # the defaults of Smooth.certify_radius / certify_radii / ...
    args.n_min = DEFAULT_N_MIN if args.n_min is None else args.n_min
    require_min(n_min=(args.n_min, 1), max_active=(args.max_active, 1))
    if args.n_min > args.n:
        raise CLIError(f"--n-min ({args.n_min}) must be <= --n ({args.n}, the most estimation samples per input)")
    args.beta = args.alpha if args.beta is None else args.beta
    if not 0.0 < args.beta < 1.0:
        raise CLIError(f"--beta must be in (0, 1), got {args.beta}")


def _parse_radii(text: str) -> List[float]:
    """--radii "0.25,0.5,3/4": a non-empty list of finite floats >= 0."""
    try:
        radii = [fraction("radii")(v) for v in text.split(",")]
    except argparse.ArgumentTypeError:
        radii = []
    if not radii or not all(0.0 <= r < math.inf for r in radii):
        raise CLIError(f"--radii must be a comma-separated list of radii >= 0 like 0.25,0.5,0.75, got {text!r}")
    return radii


def _check_members(args, dataset, info) -> None:
    """The perturbation model takes the data's images and decodes images of their shape."""
    import torch

    from ..perturbation import member, prior_scale

    x = dataset[0][0].unsqueeze(0).float()
    try:
        with torch.no_grad():
            mu, scale = prior_scale(args.perturbation, x)
            member(args.perturbation, x, torch.zeros_like(mu), mu, scale)
    except (ValueError, RuntimeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CLIError(f"--perturbation-model does not fit the data's images {list(info['input_shape'])}: "
                       f"{first}") from None


def _check_learned(args) -> None:
    """--threat learned: the perturbation model's checkpoint loads (once here, before any output), and the
    options latent smoothing takes. Sets args.perturbation (the model, on the CPU)."""
    from ..perturbation import load_perturbation_model

    if args.perturbation_model is None:
        raise CLIError("--threat learned needs --perturbation-model CKPT (the learned perturbation set's checkpoint)")
    if args.sigma is None:
        raise CLIError("--threat learned needs --sigma: the latent noise level (the classifier's checkpoint "
                       "records pixel noise only)")
    for flag, given in (("--graph", args.graph), ("--channels-last", args.channels_last)):
        if given:
            raise CLIError(f"{flag} is not supported with --threat learned (the noise is on latent codes)")
    try:
        args.perturbation = load_perturbation_model(args.perturbation_model, "cpu")
    except (FileNotFoundError, ValueError) as e:
        raise CLIError(f"--perturbation-model: {e}") from None


def _load_ibp(args, dataset, info, model, meta):
    """--method ibp: the model with its normalisation in front (IBP propagates through it), eps_max,
    and a check that IBP supports every layer, before any output is touched."""
    import torch

    from .. import bounds
    from .. import models as romodels

    for flag, given in (("--sigma", args.sigma is not None), ("--graph", args.graph), ("--amp", args.amp != "none")):
        if given:
            raise CLIError(f"{flag} is a randomized-smoothing setting; --method ibp certifies the model itself (in "
                           f"float32)")
    if args.eps_max is None:
        eps = meta.get("eps")
        if not isinstance(eps, (int, float)) or meta.get("norm", "linf") != "linf" or not eps > 0:
            raise CLIError("--eps-max is required (the checkpoint does not say which L-inf eps it was trained with)")
        args.eps_max = float(eps)
    if not 0.0 < args.eps_max < math.inf:
        raise CLIError(f"--eps-max must be a finite number > 0, got {args.eps_max}")
    if not 0.0 < args.tol <= args.eps_max:
        raise CLIError(f"--tol must be > 0 and <= --eps-max ({args.eps_max:g}), got {args.tol}")
    mean = std = None
    if args.normalize == "auto" and meta.get("mean") is not None and meta.get("std") is not None:
        mean, std = list(meta["mean"]), list(meta["std"])
    elif args.normalize == "data":
        mean, std = info.get("mean"), info.get("std")
    if mean is not None:
        model = torch.nn.Sequential(romodels.Normalize(mean, std), model).eval()
    check_model_accepts(model, info, torch.device("cpu"))
    try:
        bounds.interval_bounds(model, dataset[0][0].unsqueeze(0).float(), 0.0)
    except bounds.UnsupportedLayerError as e:
        raise CLIError(f"--method ibp: {e}") from None
    return dataset, info, model, None, None, None


def run(args, mode: str = "certify") -> int:
    dataset, info, model, sigma, mean, std = _load(args)
    setup_run(args, sample_numel=math.prod(info["input_shape"]))
    # gloo: the ranks only meet at barriers, possibly after days of work (hence the timeout).
    with distributed(args.device, backend="gloo", timeout=datetime.timedelta(days=7)) as d, \
            contextlib.ExitStack() as stack:
        error = None
        if d.rank == 0:
            try:
                stack.enter_context(exclusive(args.out + ".lock", f"-o {args.out}"))
                _prepare_output(args, _settings(args, sigma), mode)
            except CLIError as e:
                error = str(e)
        agree(d, error)
        return _run(args, mode, dataset, info, model, sigma, mean, std, d)


def _settings_path(outfile: str) -> str:
    return outfile + ".json"


def _prepare_output(args, settings: dict, mode: str) -> None:
    """Rank 0, holding the output's lock: a fresh run refuses an existing result unless --force
    (then removes it); a resumed run must have the settings of the one it continues. Writes the
    settings file beside the TSV."""
    outfile, spath, header = args.out, _settings_path(args.out), _header(args, mode)
    existing = [p for p in [outfile, spath] + _part_files(outfile) if os.path.exists(p)]
    if args.resume:
        if os.path.exists(spath):
            with open(spath) as fh:
                try:
                    old = json.load(fh).get("settings", {})
                except ValueError:
                    raise CLIError(f"--resume: {spath} is not a robustops {mode} settings file") from None
            kind = _other_kind(old, settings)
            if kind:
                raise CLIError(f"--resume: {outfile} was made {kind}, or another -o")
            diff = [f"--{k.replace('_', '-')} {old.get(k)!r} (now {settings[k]!r})" for k in _row_settings(args)
                    if old.get(k) != settings[k]]
            if diff:
                raise CLIError(f"--resume: {outfile} was made with other settings: {', '.join(diff)}; "
                               f"use the same settings, or another -o")
        elif existing:
            print(f"robustops {mode}: warning: {outfile} has no settings file ({spath}); resuming without "
                  f"checking that the settings match", file=sys.stderr)
        for p in [outfile] + _part_files(outfile):
            try:
                _read_tsv(p, header)
            except ValueError as e:
                raise CLIError(str(e)) from None
    elif existing and not args.force:
        names = ", ".join(os.path.basename(p) for p in existing)
        raise CLIError(f"-o {outfile} already holds a result ({names}); --resume continues it, --force "
                       f"replaces it")
    else:
        for p in existing:
            os.remove(p)
    tmp = f"{spath}.tmp.{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump({"format": f"robustops.{mode}/1", "settings": settings}, fh, indent=1)
    os.replace(tmp, spath)


def _other_kind(old: dict, new: dict) -> Optional[str]:
    """How the run of settings `old` differs in kind from `new` (method, threat model, --sequential): the
    middle of _prepare_output's message, or None."""
    for key, default, what in (("method", "smoothing", "method"), ("threat", "norm", "threat model")):
        if old.get(key, default) != new.get(key, default):
            return f"with --{key} {old.get(key, default)}, not {new.get(key, default)}; use the same {what}"
    if bool(old.get("sequential")) != bool(new.get("sequential")):
        return "with --sequential; resume it with --sequential" if old.get("sequential") else \
            "without --sequential; resume it without"
    return None


def _pending(outfile: str, header: str, selected: List[int], d) -> Tuple[set, List[int]]:
    """(indices already certified, this rank's indices still to certify): the rows of the merged TSV
    and of every rank's part file (from a run with any number of processes)."""
    from .. import data as rodata

    done: set = set()
    for p in [outfile] + _part_files(outfile):
        done.update(_read_tsv(p, header)[0])
    mine = [i for i in (rodata.shard(selected, d.rank, d.world) if d.world > 1 else selected) if i not in done]
    d.barrier()  # everyone has read the part files before any is truncated
    return done, mine


class _RowWriter:
    """Rows to a part file as inputs are done (each flushed at once), the progress bar, and what went
    wrong on the way (issues: inputs with NaN votes, their total, non-finite inputs)."""

    def __init__(self, out, total: int, mode: str, show: bool):
        from tqdm.auto import tqdm

        self.out, self.done, self.correct = out, 0, 0
        self.bar = tqdm(total=total, desc=mode, unit="input", disable=not show, dynamic_ncols=True)
        self.issues = {"nan_inputs": 0, "nan_votes": 0, "nonfinite_inputs": 0}
        self.last = time.perf_counter()

    def row(self, idx: int, label: int, pred: int, radius: str, seconds: Optional[float], nan: int, finite: bool,
            extra: str = "") -> None:
        """The row idx label predict [radius] correct time [extra]: radius is "" or the field and its tab,
        extra "" or tabs and fields; seconds None: the wall time since the previous row."""
        now = time.perf_counter()
        seconds, self.last = now - self.last if seconds is None else seconds, now
        self.out.write(f"{idx}\t{label}\t{pred}\t{radius}{int(pred == label)}\t{seconds:.4f}{extra}\n")
        self.out.flush()
        self.done += 1
        self.correct += int(pred == label)
        self.issues["nan_inputs"] += int(nan > 0)
        self.issues["nan_votes"] += int(nan)
        self.issues["nonfinite_inputs"] += int(not finite)

    def tick(self, n: int) -> None:
        self.bar.update(n)
        self.bar.set_postfix(acc=f"{self.correct / max(self.done, 1):.3f}")


def _loader(args, dataset, mine: List[int], batch: Optional[int], device):
    """The inputs `mine` of dataset in order, batch at a time (None: one by one, unbatched)."""
    from torch.utils.data import DataLoader, Subset

    return DataLoader(Subset(dataset, mine), batch_size=batch, shuffle=False, num_workers=args.workers,
                      pin_memory=device.type == "cuda")


def _rows(args, mode: str, dataset, step, mine: List[int], out, k: Optional[int], device, show: bool) -> dict:
    """Certifies (or predicts) the inputs `mine` with step (see _batch_rows; --sequential: _stream_rows),
    writing one row per input to out as soon as it is done. Returns what went wrong on the way: inputs
    with NaN votes, their total, non-finite inputs."""
    w = _RowWriter(out, len(mine), mode, show)
    try:
        if _sequential(args):
            _stream_rows(args, dataset, step, mine, device, w)
        else:
            _batch_rows(args, mode, dataset, step, mine, k, device, w)
    finally:
        w.bar.close()
    return w.issues


def _batch_rows(args, mode: str, dataset, step, mine: List[int], k: int, device, w: _RowWriter) -> None:
    """The inputs `mine`, k per call of step(x, indices) -> (prediction, radius or None, NaN votes per
    input, finite-input flags); a row's time is its share of its call's."""
    import torch

    pos = 0
    for x, y in _loader(args, dataset, mine, k, device):
        ids = mine[pos:pos + x.shape[0]]
        pos += x.shape[0]
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():  # non-finite inputs: reported once, at the end
                warnings.simplefilter("ignore", UserWarning)
                prediction, radii, nan, finite = step(x.to(device, non_blocking=True), ids)
                prediction = prediction.cpu()
                radii = None if radii is None else radii.cpu()
        except ValueError as e:
            raise CLIError(str(e)) from None
        per_input = (time.perf_counter() - t0) / len(ids)
        nan, finite = nan.tolist(), finite.tolist()
        for j, idx in enumerate(ids):
            # IBP radii exactly (grid points and eps-max: certified accuracy at eps-max must read back
            # true); smoothing's radii to 6 digits
            radius = "" if mode != "certify" else (f"{float(radii[j])!r}\t" if radii.dtype == torch.float64
                                                   else f"{float(radii[j]):.6g}\t")
            w.row(idx, int(y[j]), int(prediction[j]), radius, per_input, nan[j], finite[j])
        w.tick(len(ids))


def _stream_rows(args, dataset, stream, mine: List[int], device, w: _RowWriter) -> None:
    """--sequential: the inputs `mine`, read lazily as stream (Smooth.certify_stream over (idx, x) pairs)
    takes them, a row per SequentialRecord as it comes (completion order), its time the wall time since
    the previous row. Grid radii are written exactly (certified accuracy at a grid radius must read back
    true), full-radius mode's to 6 digits."""
    labels: Dict[int, int] = {}

    def inputs():
        for idx, (x, y) in zip(mine, _loader(args, dataset, mine, None, device)):
            labels[idx] = int(y)
            yield idx, x

    grid = _grid(args) is not None
    try:
        for rec in stream(inputs()):
            radius = repr(float(rec.radius)) if grid else f"{rec.radius:.6g}"
            decisions = "".join(DECISION_LETTERS[int(c)] for c in rec.decisions) if grid else "-"
            w.row(rec.index, labels.pop(rec.index), rec.prediction, radius + "\t", None, rec.nan_votes, rec.finite,
                  f"\t{rec.samples}\t{decisions}")
            w.tick(1)
    except ValueError as e:
        raise CLIError(str(e)) from None


def _finish(args, mode: str, info, sigma: float) -> None:
    """Rank 0, after every rank's rows: the merged TSV, the table, the summary (and plot)."""
    import numpy as np

    lines = _merge(args.out, _header(args, mode))
    fields = [line.split("\t") for line in lines]
    summary = {"command": mode, "inputs": len(lines), "sigma": sigma, "n": args.n, "alpha": args.alpha,
               "tsv": os.path.abspath(args.out), "threads": args.threads}
    print(f"{len(lines)} inputs {'certified' if mode == 'certify' else 'predicted'} -> {args.out}")
    if _method(args) == "ibp":
        summary = _ibp_summary(args, info, fields)
    elif mode == "predict":
        correct = np.array([int(f[3]) for f in fields], dtype=bool)
        abstain = np.array([int(f[2]) == -1 for f in fields], dtype=bool)
        summary.update(accuracy=float(correct.mean()) if len(lines) else 0.0,
                       abstain_rate=float(abstain.mean()) if len(lines) else 0.0)
        print(f"accuracy {summary['accuracy']:.4f}  abstained {summary['abstain_rate']:.4f}")
    elif _sequential(args):
        _sequential_summary(args, info, sigma, fields, summary)
    else:
        _curve_summary(args, info, sigma, fields, summary)
    spath = _settings_path(args.out)
    with open(spath) as fh:
        record = json.load(fh)
    record["summary"] = summary
    write_summary(spath, record)
    print(f"summary -> {spath}")


def _ibp_summary(args, info, fields: List[List[str]]) -> dict:
    import numpy as np

    from ..smoothing import acr, certified_accuracy, plot_certified_accuracy

    radius = np.array([float(f[3]) for f in fields])
    correct = np.array([int(f[4]) for f in fields], dtype=bool)
    radii = sorted({0.0, args.eps_max / 8, args.eps_max / 4, args.eps_max / 2, args.eps_max})
    acc = certified_accuracy(radius, correct, radii)
    summary = {"command": "certify --method ibp", "inputs": len(fields), "eps_max": args.eps_max, "tol": args.tol,
               "norm": "linf", "tsv": os.path.abspath(args.out), "threads": args.threads,
               "acr": acr(radius, correct), "clean_accuracy": float(correct.mean()) if len(fields) else 0.0,
               "certified_accuracy": {f"{r:g}": float(a) for r, a in zip(radii, acc)}}
    print(f"ACR (L-inf) {summary['acr']:.4f}  clean accuracy {summary['clean_accuracy']:.4f}")
    print("certified accuracy: " + "  ".join(f"r={r:.4g}: {a:.3f}" for r, a in zip(radii, acc)))
    if args.plot:
        plot_certified_accuracy(args.plot, {"IBP": (radius, correct)}, max_radius=args.eps_max * 1.02,
                                title=f"{info['name']}: interval bound propagation", norm="L-inf")
        summary["plot"] = os.path.abspath(args.plot)
        print(f"plot -> {args.plot} (and .pdf)")
    return summary


def _radius_correct(fields: List[List[str]]):
    """The radius and correct columns of certify's TSVs (both kinds)."""
    import numpy as np

    return np.array([float(f[3]) for f in fields]), np.array([int(f[4]) for f in fields], dtype=bool)


def _curve_summary(args, info, sigma: float, fields: List[List[str]], summary: dict) -> None:
    """Randomized smoothing's certified radii (fixed n, or --sequential's full-radius mode): ACR, certified
    accuracy at the standard radii, the largest radius n samples can certify (and the plot)."""
    from ..smoothing import STANDARD_RADII, acr, certified_accuracy, largest_certifiable_radius

    radius, correct = _radius_correct(fields)
    acc = certified_accuracy(radius, correct, STANDARD_RADII)
    summary.update(n0=args.n0, acr=acr(radius, correct),
                   largest_certifiable_radius=largest_certifiable_radius(sigma, args.n, args.alpha),
                   certified_accuracy={f"{r:g}": float(a) for r, a in zip(STANDARD_RADII, acc)})
    if _threat(args) == "learned":  # radii and sigma are in the latent space of the perturbation model
        summary.update(threat="learned", radius="latent L2", perturbation_model=os.path.abspath(
            args.perturbation_model), perturbation_eps=getattr(args.perturbation, "eps", None))
    print(f"ACR {summary['acr']:.4f}")
    print("certified accuracy: " + "  ".join(f"r={r:g}: {a:.3f}" for r, a in zip(STANDARD_RADII, acc)))
    _plot(args, info, sigma, radius, correct, summary)


def _plot(args, info, sigma: float, radius, correct, summary: dict) -> None:
    """--plot of randomized smoothing: certified accuracy against radius, with the largest radius n
    samples can certify marked."""
    from ..smoothing import largest_certifiable_radius, plot_certified_accuracy

    if not args.plot:
        return
    label = f"sigma = {sigma:g}"
    n = f"sequential, n <= {args.n}" if _sequential(args) else f"n={args.n}"
    plot_certified_accuracy(args.plot, {label: (radius, correct)},
                            certifiable={label: largest_certifiable_radius(sigma, args.n, args.alpha)},
                            title=f"{info['name']}: {n}, alpha={args.alpha:g}",
                            norm="latent L2" if _threat(args) == "learned" else "L2")
    summary["plot"] = os.path.abspath(args.plot)
    print(f"plot -> {args.plot} (and .pdf)")


def _sequential_summary(args, info, sigma: float, fields: List[List[str]], summary: dict) -> None:
    """--sequential: the samples spent against fixed-n CERTIFY's n0 + n; per radius of the grid, certified
    accuracy and the counts of each decision (full-radius mode: as fixed-n certify)."""
    grid = _grid(args)
    mean = sum(int(f[6]) for f in fields) / len(fields) if fields else 0.0
    fixed = args.n0 + args.n
    what = "full-radius" if grid is None else "fixed-radius" if args.radius is not None else "grid"
    summary.update(sequential=True, mode=what, test=args.test, n0=args.n0, n_max=args.n, n_min=args.n_min,
                   beta=args.beta, mean_samples=mean, fixed_samples=fixed, sample_ratio=fixed / mean if mean else None)
    print(f"sequential {what} ({args.test}): {mean:.1f} samples per input on average, against n0 + n = {fixed}"
          + (f" ({fixed / mean:.2f}x)" if mean else ""))
    if grid is None:
        summary["precision"] = args.precision
        _curve_summary(args, info, sigma, fields, summary)
        return
    radius, correct = _radius_correct(fields)
    summary["radii"] = []
    for j, r in enumerate(grid):
        letters = [f[7][j] for f in fields]
        cert = float(sum(c == "c" and ok for c, ok in zip(letters, correct)) / len(fields)) if fields else 0.0
        counts = {name: letters.count(c) for c, name in (("c", "certified"), ("n", "not_certified"),
                                                         ("a", "abstained"))}
        summary["radii"].append({"radius": r, "certified_accuracy": cert, **counts})
        print(f"r={r:g}: certified accuracy {cert:.3f}  (" + ", ".join(f"{v} {k.replace('_', ' ')}"
                                                                       for k, v in counts.items()) + ")")
    _plot(args, info, sigma, radius, correct, summary)


def _smoothing_step(args, mode: str, info, model, sigma, mean, std, device):
    """step(x, indices) of randomized smoothing (see _batch_rows) and the inputs per call; --sequential:
    the stream of SequentialRecords of an iterable of (idx, x) pairs (see _stream_rows), and None."""
    from ..smoothing import LatentSmooth, Smooth

    if _threat(args) == "learned":
        smooth = LatentSmooth(model, args.perturbation.to(device), int(info["num_classes"]), sigma, mean=mean,
                              std=std, autocast=None if args.amp == "none" else args.amp, device=device)
    else:
        smooth = Smooth(model, int(info["num_classes"]), sigma, mean=mean, std=std,
                        autocast=None if args.amp == "none" else args.amp, channels_last=args.channels_last,
                        input_shape=tuple(info["input_shape"]), device=device, graph=args.graph)
    if _sequential(args):
        return (lambda pairs: smooth.certify_stream(
            pairs, args.alpha, args.batch_size, radii=_grid(args), precision=None if _grid(args) else args.precision,
            test=args.test, n0=args.n0, n_max=args.n, n_min=args.n_min, beta=args.beta, seed=args.seed,
            max_active=args.max_active)), None

    def step(x, ids):
        if mode == "certify":
            res = smooth.certify(x, args.n0, args.n, args.alpha, args.batch_size, seed=args.seed, indices=ids)
            return res.prediction, res.radius, res.nan_votes + res.selection_nan_votes, res.finite_input
        res = smooth.predict(x, args.n, args.alpha, args.batch_size, seed=args.seed, indices=ids, return_details=True)
        return res.prediction, None, res.nan_votes, res.finite_input

    per_input = (getattr(args, "n0", 0) or 0) + args.n
    return step, args.inputs_per_call or max(1, min(256, math.ceil(4 * args.batch_size / per_input)))


def _ibp_step(args, model):
    """step(x, indices) of --method ibp: the IBP radius of the predicted class (an input with NaN / Inf
    values abstains: prediction -1, radius 0), and the inputs per call."""
    import torch

    from .. import bounds

    def step(x, ids):
        finite = torch.isfinite(x.flatten(1)).all(1)
        res = bounds.certified_radius(model, torch.nan_to_num(x.float()), eps_max=args.eps_max, tol=args.tol)
        pred = torch.where(finite, res.prediction, torch.full_like(res.prediction, -1))
        radius = torch.where(finite, res.radius, torch.zeros_like(res.radius))
        return pred, radius, torch.zeros_like(pred), finite.cpu()

    return step, args.inputs_per_call or args.batch_size


def _banner(args, mode: str, info, sigma, k: Optional[int], to_go: str, d) -> None:
    """Rank 0's line on what the run does."""
    n0 = f"n0 {args.n0}, " if mode == "certify" else ""
    if _method(args) == "ibp":
        what = f"IBP, eps-max {args.eps_max:g}, tol {args.tol:g}, {k} inputs per pass"
    elif _sequential(args):
        grid = _grid(args)
        decide = f"precision {args.precision:g}" if grid is None else \
            ("radius " if args.radius is not None else "radii ") + ",".join(f"{r:g}" for r in grid)
        what = (f"sigma {sigma:g}, sequential ({decide}, test {args.test}), {n0}n {args.n_min}..{args.n}, alpha "
                f"{args.alpha:g}, beta {args.beta:g}, batch {args.batch_size}")
    else:
        what = f"sigma {sigma:g}, {n0}n {args.n}, alpha {args.alpha:g}, batch {args.batch_size}"
    if _threat(args) == "learned":
        what = f"latent smoothing in {args.perturbation_model}, " + what
    print(f"robustops {mode}: {info['name']} {args.split} ({to_go}), {what}, {d.world} process(es) on {d.device}",
          flush=True)


def _run(args, mode: str, dataset, info, model, sigma, mean, std, d) -> int:
    outfile, header = args.out, _header(args, mode)
    stop = len(dataset) if args.max is None or args.max < 0 else min(args.max, len(dataset))
    selected = list(range(0, stop, args.skip))
    done, mine = _pending(outfile, header, selected, d)
    model.to(d.device)  # load_model returns it in eval mode (exported programs refuse .eval())
    ibp = _method(args) == "ibp"
    step, k = _ibp_step(args, model) if ibp else _smoothing_step(args, mode, info, model, sigma, mean, std, d.device)
    if d.rank == 0:
        _banner(args, mode, info, sigma, k, f"{len(selected)} inputs, {len(selected) - len(done)} to go", d)
    # Rows go to this rank's part file as they are done; the TSV itself is written (atomically) only
    # when the run completes, merged from the part files.
    out = _open_rows_file(_part_path(outfile, d.rank), header)
    try:
        issues = _rows(args, mode, dataset, step, mine, out, k, d.device, args.progress and d.rank == 0)
    finally:
        out.close()
    who = f"rank {d.rank}: " if d.world > 1 else ""
    if issues["nan_inputs"]:
        print(f"robustops {mode}: warning: {who}{issues['nan_inputs']} input(s) had noisy samples with NaN logits "
              f"({issues['nan_votes']} samples, counted as votes for no class)", file=sys.stderr)
    if issues["nonfinite_inputs"]:
        print(f"robustops {mode}: warning: {who}{issues['nonfinite_inputs']} input(s) held NaN / Inf values and "
              f"abstained", file=sys.stderr)
    d.barrier()
    if d.rank == 0:
        _finish(args, mode, info, sigma)
    d.barrier()
    return 0
