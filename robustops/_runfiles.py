"""Run files shared by every trainer (classifiers in train/fit.py, perturbation models in
perturbation/fit.py): atomic checkpoint writes, the per-epoch CSV log, where a resume reads from, and
the checks every resume makes (a readable checkpoint of the right kind, written with the same settings).
Imports no robustops module."""
from __future__ import annotations

import csv
import errno
import os
import shutil
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

__all__ = ["atomic_save", "disk_full", "write_csv_log", "resume_path", "read_checkpoint", "check_settings", "entry_digest",
           "seal_entries", "check_entries", "UNSEALED_ENTRIES"]

#: Checkpoint entries that seal_entries leaves out: the weights (which carry checksums of their own,
#: "sha256" / "train_sha256", checked by models.verify_checkpoint and the resume) and the entries'
#: checksums themselves.
UNSEALED_ENTRIES = ("state_dict", "sha256", "train_state_dict", "train_sha256", "entries_sha256")


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file beside path, then rename: a crash never leaves half a file, and a
    failed write (a full disk) leaves the previous file at path as it was. A write torch reports as its
    own RuntimeError ("PytorchStreamWriter failed writing file", "iostream error") is raised as an
    OSError naming path (ENOSPC when the disk is full), so callers handle it like any failed write."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:
            if not any(s in str(e) for s in ("PytorchStreamWriter", "iostream", "file write failed")):
                raise
            raise OSError(errno.ENOSPC if disk_full(path) else errno.EIO,
                          f"writing failed ({str(e).strip().splitlines()[0][:200]})", path) from e
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def disk_full(path: str, margin: int = 1 << 20) -> bool:
    """Whether the file system that holds path (or would hold it) has less than margin bytes free."""
    try:
        return shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free < margin
    except OSError:
        return False


def write_csv_log(path: str, history: List[Dict[str, Any]], columns: Sequence[str]) -> None:
    """The whole history as a CSV (one row per epoch, the given columns, floats to 6 digits), rewritten
    atomically after each epoch."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for row in history:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    os.replace(tmp, path)


def resume_path(resume, out_dir: Optional[str]) -> Optional[str]:
    """The checkpoint a run resumes from: None (resume False/None, or True with no out_dir/last.pt yet:
    start fresh), out_dir/last.pt for True, or the given file (a directory means its last.pt)."""
    if resume is None or resume is False:
        return None
    if resume is True:
        if out_dir is None:
            raise ValueError("resume=True needs out_dir (the run's directory holding last.pt)")
        p = os.path.join(out_dir, "last.pt")
        return p if os.path.exists(p) else None
    p = os.fspath(resume)
    if os.path.isdir(p):
        p = os.path.join(p, "last.pt")
    if not os.path.isfile(p):
        raise FileNotFoundError(f"resume: no checkpoint at {p!r}")
    return p


def read_checkpoint(path: str, fmt: str, kind: str, *, requires: Sequence[str] = (),
                    detail: bool = True) -> Dict[str, Any]:
    """The checkpoint a run resumes from, read on the CPU with weights_only=True. A ValueError when the
    file cannot be read (damaged; detail: the message names the error and what to do) or is not a
    ``kind`` (its "format" is not fmt, or it lacks one of the keys ``requires``)."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or corrupt file: any unpickling error
        if detail:
            raise ValueError(f"resume: cannot read {path!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                             f"the file is damaged: resume from another checkpoint or start afresh") from None
        raise ValueError(f"resume: cannot read {path!r} ({type(e).__name__}); the file is damaged") from None
    if not isinstance(ck, dict) or ck.get("format") != fmt or any(k not in ck for k in requires):
        raise ValueError(f"resume: {path!r} is not a {kind}")
    return ck


def check_settings(*pairs: Tuple[Mapping[str, Any], Mapping[str, Any]]) -> None:
    """A ValueError naming every setting a resumed run does not share with its checkpoint: pairs of
    (the checkpoint's settings, this run's), compared over this run's names, in their order."""
    diff = [f"{k}={old.get(k)!r} (now {v!r})" for old, new in pairs for k, v in new.items() if old.get(k) != v]
    if diff:
        raise ValueError("resume: the checkpoint was trained with different settings: " + ", ".join(diff))


def _feed(h, v) -> None:
    """A canonical, type-tagged encoding of a checkpoint value into the hash h: dicts in key order,
    floats exactly (float.hex), tensors by dtype, shape and bytes."""
    if v is None or isinstance(v, bool):
        h.update(f"<{v}>".encode())
    elif isinstance(v, (int, float, str)):
        h.update(f"{type(v).__name__}:{v.hex() if isinstance(v, float) else v};".encode())
    elif isinstance(v, torch.Tensor):
        t = v.detach().to("cpu").contiguous()
        h.update(f"tensor:{t.dtype}:{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(v, dict):
        h.update(f"dict:{len(v)}:".encode())
        for k in sorted(v, key=lambda k: (type(k).__name__, str(k))):
            _feed(h, k)
            _feed(h, v[k])
    elif isinstance(v, (list, tuple)):
        h.update(f"{type(v).__name__}:{len(v)}:".encode())
        for e in v:
            _feed(h, e)
    else:
        h.update(f"{type(v).__name__}:{v!r};".encode())


def entry_digest(value) -> str:
    """SHA-256 of one checkpoint entry (any nesting of dicts, lists, tuples, numbers, strings, None and
    tensors), independent of dict order."""
    import hashlib

    h = hashlib.sha256()
    _feed(h, value)
    return h.hexdigest()


def seal_entries(ckpt: Dict[str, Any]) -> Dict[str, Any]:
    """ckpt with "entries_sha256": {entry: entry_digest} for every entry but UNSEALED_ENTRIES (method,
    eps, norm, sigma, mean / std, model and model_kwargs, config, data, optimizer and RNG states, ...),
    so that a corrupted setting is refused on load (check_entries) as a corrupted weight is."""
    sealed = {k: entry_digest(v) for k, v in ckpt.items() if k not in UNSEALED_ENTRIES}
    return {**ckpt, "entries_sha256": sealed}


def check_entries(ckpt: Mapping[str, Any], path: str) -> None:
    """ValueError naming path and the first entry that does not match the checksums seal_entries stored
    (changed, missing, or not covered). Checkpoints without "entries_sha256" (written before it existed,
    whose checksum covers the weights only) pass, as they always did."""
    want = ckpt.get("entries_sha256")
    if want is None:
        return
    if not isinstance(want, dict):
        raise ValueError(f"{path!r} is corrupt: its 'entries_sha256' entry is not a table of checksums")
    have = [k for k in ckpt if k not in UNSEALED_ENTRIES]
    for k, digest in want.items():
        if k not in ckpt:
            raise ValueError(f"{path!r} is corrupt: its {k!r} entry is missing (the checksums stored with it "
                             f"cover one); use another copy or write the checkpoint again")
        if entry_digest(ckpt[k]) != digest:
            raise ValueError(f"{path!r} is corrupt: its {k!r} entry does not match the SHA-256 checksum stored "
                             f"with it; use another copy or write the checkpoint again")
    extra = [k for k in have if k not in want]
    if extra:
        raise ValueError(f"{path!r} is corrupt: its {extra[0]!r} entry is not covered by the checksums stored with "
                         f"it; use another copy or write the checkpoint again")
