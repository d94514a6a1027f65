"""Run files shared by every trainer (classifiers in train/fit.py, perturbation models in
perturbation.py): atomic checkpoint writes, the per-epoch CSV log and where a resume reads from.
Imports no robustops module."""
from __future__ import annotations

import csv
import os
from typing import Any, Dict, List, Optional, Sequence

import torch

__all__ = ["atomic_save", "write_csv_log", "resume_path"]


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file beside path, then rename: a crash never leaves half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
