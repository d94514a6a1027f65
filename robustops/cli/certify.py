"""`robustops certify`: randomized-smoothing certification (Cohen et al.'s CERTIFY) of a dataset,
written row by row to Cohen et al.'s TSV (idx label predict radius correct time); an interrupted run
resumes with no lost and no duplicated rows, and torchrun processes certify disjoint shards into
part files that rank 0 merges."""
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

import numpy as np
import torch

from .. import data as rodata
from .. import models as romodels
from ..smoothing import STANDARD_RADII, Smooth, acr, certified_accuracy, plot_certified_accuracy
from .common import (CLIError, add_common, agree, check_model_accepts, check_writable, distributed, exclusive,
                     load_data, require_min)

HELP = "randomized-smoothing certification (Cohen et al.'s CERTIFY)"

TSV_HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime"


def _parse_row(line: str) -> Optional[int]:
    """The idx of a complete TSV row, or None if the line is not one."""
    f = line.split("\t")
    if len(f) != 6:
        return None
    try:
        int(f[1]), int(f[2]), float(f[3]), int(f[4]), float(f[5])
        return int(f[0])
    except ValueError:
        return None


def _read_tsv(path: str) -> Tuple[Dict[int, str], int]:
    """The complete rows of a certify TSV ({idx: line}) and the length in bytes of the valid prefix
    (header and complete rows; 0 when even the header is incomplete). A row cut short by a kill, and
    anything after it, is not valid."""
    if not os.path.exists(path):
        return {}, 0
    with open(path, "rb") as fh:
        data = fh.read()
    head = (TSV_HEADER + "\n").encode()
    if not data.startswith(head):
        if head.startswith(data):
            return {}, 0  # killed while writing the header
        raise ValueError(f"{path!r} exists but is not a robustops certify TSV (its first line is not "
                         f"{TSV_HEADER!r}); remove it or choose another --outfile")
    rows: Dict[int, str] = {}
    valid = len(head)
    lines = data[len(head):].split(b"\n")
    for raw in lines[:-1]:  # the last piece has no newline: empty or a partial row
        try:
            line = raw.decode()
        except UnicodeDecodeError:
            break
        idx = _parse_row(line)
        if idx is None:
            break
        rows.setdefault(idx, line)
        valid += len(raw) + 1
    return rows, valid


def _part_path(outfile: str, rank: int) -> str:
    return f"{outfile}.rank{rank}.part"


def _part_files(outfile: str) -> List[str]:
    return sorted(glob.glob(glob.escape(outfile) + ".rank*.part"))


def _open_rows_file(path: str, resume: bool):
    """A TSV opened for appending rows: with resume, what is there is kept up to its last complete
    row; otherwise it starts empty. Returns the file handle."""
    valid = _read_tsv(path)[1] if resume else 0
    if valid:
        with open(path, "r+b") as fh:
            fh.truncate(valid)
        return open(path, "a", buffering=1)
    fh = open(path, "w", buffering=1)
    fh.write(TSV_HEADER + "\n")
    fh.flush()
    return fh


def _merge(outfile: str) -> List[str]:
    """Rows of outfile and of every rank's part file, one per idx, sorted by idx, written atomically to
    outfile; part files are removed. Returns the rows."""
    rows = _read_tsv(outfile)[0]
    parts = _part_files(outfile)
    for p in parts:
        for idx, line in _read_tsv(p)[0].items():
            rows.setdefault(idx, line)
    lines = [rows[i] for i in sorted(rows)]
    tmp = f"{outfile}.tmp.{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(TSV_HEADER + "\n")
        for line in lines:
            fh.write(line + "\n")
    os.replace(tmp, outfile)
    for p in parts:
        os.remove(p)
    return lines


def _checkpoint_meta(path: str, model) -> dict:
    """Entries of a robustops checkpoint besides the weights (mean, std, sigma, ...), if it is one."""
    if isinstance(model, (torch.jit.ScriptModule, torch.fx.GraphModule)):
        return {}
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - not a plain checkpoint: no metadata
        return {}
    if not isinstance(obj, dict):
        return {}
    meta = {k: v for k, v in obj.items() if k in ("mean", "std", "sigma", "method", "model")}
    config = obj.get("config")
    if isinstance(config, dict) and "params" not in config and meta.get("method") != "gaussian":
        meta.pop("sigma", None)  # training checkpoints before the method registry stored a sigma for every method
    return meta


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--checkpoint", "--ckpt", required=True,
                   help="model file: a robustops checkpoint (robustops train / save_checkpoint), a state dict "
                        "(give --model), a TorchScript or a torch.export file")
    g.add_argument("--model", default=None, help="model name for a raw state dict (small_cnn, preact_resnet18, "
                                                 "resnet20, resnet110, ...)")
    g.add_argument("--data", "--dataset", default="digits",
                   help='"digits" (embedded), a .npz file, "cifar10:DIR" or "imagefolder:DIR"; read from local '
                        "disk, never downloaded (default digits)")
    g.add_argument("--split", default="test", help="train or test (default test)")
    g.add_argument("--normalize", default="auto", choices=("auto", "data", "none"),
                   help="input normalization fused into the noise: auto = the checkpoint's mean/std or the "
                        "model's leading Normalize layer (else none); data = the dataset's statistics")
    g = p.add_argument_group("CERTIFY (Cohen et al. 2019)")
    g.add_argument("--sigma", type=float, default=None,
                   help="noise level (default: the sigma the checkpoint was trained with)")
    g.add_argument("--N0", type=int, default=100, help="selection samples per input (default 100)")
    g.add_argument("--N", type=int, default=100_000, help="estimation samples per input (default 100000)")
    g.add_argument("--alpha", type=float, default=0.001, help="failure probability (default 0.001)")
    g.add_argument("--batch", type=int, default=1000, help="noisy samples per forward pass (default 1000)")
    g.add_argument("--skip", type=int, default=1, help="certify every skip-th input (default 1)")
    g.add_argument("--max", type=int, default=-1, help="stop before input index max (default: all)")
    g.add_argument("--inputs-per-call", type=int, default=None,
                   help="inputs certified together between host syncs and row writes (default: enough for "
                        "about 4 forward passes)")
    g = p.add_argument_group("output")
    g.add_argument("--outfile", "-o", required=True, help="TSV with columns idx label predict radius correct time")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted run: keep the complete rows of --outfile, certify the rest "
                        "(refused when a setting that changes the rows differs from the run's)")
    g.add_argument("--force", action="store_true",
                   help="replace an existing --outfile (without --resume or --force an existing result is kept "
                        "and the run refuses to start)")
    g.add_argument("--plot", default=None, help="also write certified accuracy against radius to this PNG")
    g = p.add_argument_group("execution")
    g.add_argument("--amp", "--autocast", dest="amp", default="none", choices=("none", "bf16", "fp16"),
                   help="autocast dtype of the base classifier (default none)")
    g.add_argument("--channels-last", action="store_true", help="channels_last noisy batches and model")
    g.add_argument("--graph", action="store_true", help="replay full single-input batches from a CUDA graph "
                                                         "(CUDA only; same votes, no launch overhead)")
    add_common(g)


# Settings that change the rows: a resumed run must have the same ones (stored beside the TSV).
ROW_SETTINGS = ("checkpoint", "model", "data", "split", "normalize", "sigma", "N0", "N", "alpha", "seed", "amp")


def _settings(args, sigma: float) -> dict:
    out = {k: getattr(args, k) for k in ROW_SETTINGS}
    out["checkpoint"] = os.path.abspath(args.checkpoint)
    out["sigma"] = float(sigma)
    return out


def _load(args):
    """Everything validated before any output is touched: (dataset, info, model, sigma, mean, std)."""
    require_min(N0=(args.N0, 1), N=(args.N, 1), batch=(args.batch, 1), skip=(args.skip, 1), workers=(args.workers, 0),
                inputs_per_call=(args.inputs_per_call, 1))
    if not 0.0 < args.alpha < 1.0:
        raise CLIError(f"--alpha must be in (0, 1), got {args.alpha}")
    if args.sigma is not None and not 0.0 < args.sigma < math.inf:
        raise CLIError(f"--sigma must be a finite number > 0, got {args.sigma}")
    if args.resume and args.force:
        raise CLIError("--resume continues a result and --force replaces it: give one of them")
    check_writable(args.outfile, "--outfile")
    if args.plot:
        check_writable(args.plot, "--plot")
    dataset, info = load_data(args.data, args.split)
    C, H, W = info["input_shape"]
    kwargs = {"num_classes": int(info["num_classes"]), "in_channels": C, "input_size": H} if args.model else {}
    try:
        model = romodels.load_model(args.checkpoint, name=args.model, **kwargs)
    except (FileNotFoundError, ValueError, TypeError, RuntimeError) as e:
        raise CLIError(f"--checkpoint {args.checkpoint!r}: {e}") from None
    meta = _checkpoint_meta(args.checkpoint, model)
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
    return dataset, info, model, float(sigma), mean, std


def run(args) -> int:
    dataset, info, model, sigma, mean, std = _load(args)
    # gloo: the ranks only meet at barriers, possibly after days of work (hence the timeout).
    with distributed(args.device, backend="gloo", timeout=datetime.timedelta(days=7)) as d, \
            contextlib.ExitStack() as stack:
        error = None
        if d.rank == 0:
            try:
                stack.enter_context(exclusive(args.outfile + ".lock", f"--outfile {args.outfile}"))
                _prepare_output(args, _settings(args, sigma))
            except CLIError as e:
                error = str(e)
        agree(d, error)
        return _certify_run(args, dataset, info, model, sigma, mean, std, d)


def _settings_path(outfile: str) -> str:
    return outfile + ".json"


def _prepare_output(args, settings: dict) -> None:
    """Rank 0, holding the output's lock: a fresh run refuses an existing result unless --force
    (then removes it); a resumed run must have the settings of the one it continues. Writes the
    settings file beside the TSV."""
    outfile, spath = args.outfile, _settings_path(args.outfile)
    existing = [p for p in [outfile, spath] + _part_files(outfile) if os.path.exists(p)]
    if args.resume:
        if os.path.exists(spath):
            with open(spath) as fh:
                try:
                    old = json.load(fh).get("settings", {})
                except ValueError:
                    raise CLIError(f"--resume: {spath} is not a robustops certify settings file") from None
            diff = [f"--{k} {old.get(k)!r} (now {settings[k]!r})" for k in ROW_SETTINGS if old.get(k) != settings[k]]
            if diff:
                raise CLIError(f"--resume: {outfile} was certified with other settings: {', '.join(diff)}; "
                               f"use the same settings, or another --outfile")
        elif existing:
            print(f"robustops certify: warning: {outfile} has no settings file ({spath}); resuming without "
                  f"checking that the settings match", file=sys.stderr)
        for p in [outfile] + _part_files(outfile):
            try:
                _read_tsv(p)
            except ValueError as e:
                raise CLIError(str(e)) from None
    elif existing and not args.force:
        names = ", ".join(os.path.basename(p) for p in existing)
        raise CLIError(f"--outfile {outfile} already holds a result ({names}); --resume continues it, --force "
                       f"replaces it")
    else:
        for p in existing:
            os.remove(p)
    tmp = f"{spath}.tmp.{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump({"format": "robustops.certify/1", "settings": settings}, fh, indent=1)
    os.replace(tmp, spath)


def _pending(args, outfile: str, selected: List[int], d) -> Tuple[set, List[int]]:
    """(indices already certified, this rank's indices still to certify): the rows of the merged TSV
    and of every rank's part file (from a run with any number of processes)."""
    done: set = set()
    for p in [outfile] + _part_files(outfile):
        done.update(_read_tsv(p)[0])
    mine = [i for i in (rodata.shard(selected, d.rank, d.world) if d.world > 1 else selected) if i not in done]
    d.barrier()  # everyone has read the part files before any is truncated
    return done, mine


def _certify_rows(args, dataset, smooth: Smooth, mine: List[int], out, k: int, device, show: bool) -> dict:
    """Certifies the inputs `mine`, k per call, writing one row per input as soon as it is done.
    Returns what went wrong on the way: inputs with NaN votes, their total, non-finite inputs."""
    from torch.utils.data import DataLoader, Subset
    from tqdm.auto import tqdm

    bar = tqdm(total=len(mine), desc="certify", unit="input", disable=not show, dynamic_ncols=True)
    try:
        loader = DataLoader(Subset(dataset, mine), batch_size=k, shuffle=False, num_workers=args.workers,
                            pin_memory=device.type == "cuda")
        n_done = n_correct = pos = 0
        issues = {"nan_inputs": 0, "nan_votes": 0, "nonfinite_inputs": 0}
        for x, y in loader:
            ids = mine[pos:pos + x.shape[0]]
            pos += x.shape[0]
            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings():  # non-finite inputs: reported once, at the end
                    warnings.simplefilter("ignore", UserWarning)
                    res = smooth.certify(x.to(device, non_blocking=True), args.N0, args.N, args.alpha, args.batch,
                                         seed=args.seed, indices=ids)
            except ValueError as e:
                raise CLIError(str(e)) from None
            per_input = (time.perf_counter() - t0) / len(ids)
            for j, idx in enumerate(ids):
                label, pred = int(y[j]), int(res.prediction[j])
                out.write(f"{idx}\t{label}\t{pred}\t{float(res.radius[j]):.6g}\t{int(pred == label)}\t"
                          f"{per_input:.4f}\n")
                out.flush()
                n_correct += int(pred == label)
            n_done += len(ids)
            nan = res.nan_votes + res.selection_nan_votes
            issues["nan_inputs"] += int((nan > 0).sum())
            issues["nan_votes"] += int(nan.sum())
            issues["nonfinite_inputs"] += int((~res.finite_input).sum())
            bar.update(len(ids))
            bar.set_postfix(acc=f"{n_correct / n_done:.3f}")
    finally:
        bar.close()
    return issues


def _summary(args, info, outfile: str, sigma: float) -> None:
    lines = _merge(outfile)
    radius = np.array([float(line.split("\t")[3]) for line in lines])
    correct = np.array([int(line.split("\t")[4]) for line in lines], dtype=bool)
    acc = certified_accuracy(radius, correct, STANDARD_RADII)
    print(f"{len(lines)} inputs certified -> {outfile}")
    print(f"ACR {acr(radius, correct):.4f}")
    print("certified accuracy: " + "  ".join(f"r={r:g}: {a:.3f}" for r, a in zip(STANDARD_RADII, acc)))
    if args.plot:
        plot_certified_accuracy(args.plot, {f"sigma = {sigma:g}": (radius, correct)},
                                title=f"{info['name']}: N={args.N}, alpha={args.alpha:g}")
        print(f"plot -> {args.plot}")


def _certify_run(args, dataset, info, model, sigma, mean, std, d) -> int:
    outfile = args.outfile
    stop = len(dataset) if args.max is None or args.max < 0 else min(args.max, len(dataset))
    selected = list(range(0, stop, args.skip))
    done, mine = _pending(args, outfile, selected, d)
    model.to(d.device)  # load_model returns it in eval mode (exported programs refuse .eval())
    smooth = Smooth(model, int(info["num_classes"]), sigma, mean=mean, std=std,
                    autocast=None if args.amp == "none" else args.amp, channels_last=args.channels_last,
                    input_shape=tuple(info["input_shape"]), device=d.device, graph=args.graph)
    k = args.inputs_per_call or max(1, min(256, math.ceil(4 * args.batch / (args.N0 + args.N))))
    if d.rank == 0:
        print(f"robustops certify: {info['name']} {args.split} ({len(selected)} inputs, {len(selected) - len(done)} "
              f"to go), sigma {sigma:g}, N0 {args.N0}, N {args.N}, alpha {args.alpha:g}, batch {args.batch}, "
              f"{d.world} process(es) on {d.device}", flush=True)
    # Rows go to this rank's part file as they are certified; the TSV itself is written (atomically)
    # only when the run completes, merged from the part files.
    out = _open_rows_file(_part_path(outfile, d.rank), resume=True)
    try:
        issues = _certify_rows(args, dataset, smooth, mine, out, k, d.device, args.progress and d.rank == 0)
    finally:
        out.close()
    who = f"rank {d.rank}: " if d.world > 1 else ""
    if issues["nan_inputs"]:
        print(f"robustops certify: warning: {who}{issues['nan_inputs']} input(s) had noisy samples with NaN logits "
              f"({issues['nan_votes']} samples, counted as votes for no class)", file=sys.stderr)
    if issues["nonfinite_inputs"]:
        print(f"robustops certify: warning: {who}{issues['nonfinite_inputs']} input(s) held NaN / Inf values and "
              f"abstained", file=sys.stderr)
    d.barrier()
    if d.rank == 0:
        _summary(args, info, outfile, sigma)
    d.barrier()
    return 0
