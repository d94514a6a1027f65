"""Real CIFAR-10-C (Hendrycks & Dietterich 2019, https://zenodo.org/record/2535967) read from a local
directory in the release's layout; never downloads. Shared with ``robustops.perturbation.cifar_c`` (the
layout, the severity check, the array checks)."""
from __future__ import annotations

import os
from typing import Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .base import ALL, SEVERITIES, check_severity

__all__ = ["CIFAR10C_CORRUPTIONS", "LAYOUT", "CifarC", "check_severities", "check_release_dir", "load_release_labels",
           "load_release_array"]

#: the 15 benchmark corruptions and the 4 extra ones of the CIFAR-10-C release, by file name
CIFAR10C_CORRUPTIONS = ALL
LAYOUT = ("the CIFAR-10-C layout: <root>/<corruption>.npy, uint8 [5 * N, 32, 32, 3] (severities 1..5 stacked, "
          "N = 10000 test images each, in the CIFAR-10 test order) and <root>/labels.npy [5 * N]; from "
          "https://zenodo.org/record/2535967 (CIFAR-10-C.tar), extracted")


def check_severities(severities) -> Tuple[int, ...]:
    """A non-empty sequence of distinct ints in 1..5 as a tuple, else a ValueError naming it."""
    try:
        sev = tuple(int(s) for s in severities)
    except (TypeError, ValueError):
        raise ValueError(f"severities must be a list of ints in 1..5, got {severities!r}") from None
    if not sev or any(s not in SEVERITIES for s in sev) or len(set(sev)) != len(sev) \
            or any(float(a) != b for a, b in zip(severities, sev)):
        raise ValueError(f"severities must be distinct ints in 1..5, got {severities!r}")
    return sev


def check_release_dir(root) -> str:
    """root as a str, after checking that it is a directory holding labels.npy (FileNotFoundError
    naming what is missing and the expected layout)."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"CIFAR-10-C directory {root!r} does not exist: give the directory with {LAYOUT}")
    if not os.path.isfile(os.path.join(root, "labels.npy")):
        raise FileNotFoundError(f"no labels.npy in the CIFAR-10-C directory {root!r}: expected {LAYOUT}")
    return root


def load_release_labels(root: str) -> np.ndarray:
    """labels.npy of root, memory-mapped: [5 N] (ValueError on another shape)."""
    path = os.path.join(root, "labels.npy")
    labels = np.load(path, mmap_mode="r")
    if labels.ndim != 1 or labels.shape[0] == 0 or labels.shape[0] % 5:
        raise ValueError(f"{path} must hold labels [5 * N] (severities 1..5 stacked), got shape {list(labels.shape)}")
    return labels


def load_release_array(root: str, corruption: str, n: int) -> np.ndarray:
    """<root>/<corruption>.npy memory-mapped, checked to be uint8 [5 n, 32, 32, 3] (FileNotFoundError if
    absent, naming the files present; ValueError on a wrong dtype or shape)."""
    path = os.path.join(root, corruption + ".npy")
    if not os.path.isfile(path):
        present = sorted(f[:-4] for f in os.listdir(root) if f.endswith(".npy") and f != "labels.npy")
        raise FileNotFoundError(f"CIFAR-10-C directory {root!r}: no {corruption}.npy (it holds "
                                f"{', '.join(present) or 'none'}); expected {LAYOUT}")
    a = np.load(path, mmap_mode="r")
    if a.dtype != np.uint8 or a.shape != (5 * n, 32, 32, 3):
        raise ValueError(f"{path} must be uint8 [5 * N, 32, 32, 3] = [{5 * n}, 32, 32, 3], got {a.dtype} {list(a.shape)}")
    return a


class CifarC(Dataset):
    """One corruption at one severity of CIFAR-10-C: items (float32 Tensor[3, 32, 32] in [0, 1], int
    label), item j being test image j of the release's severity block.

    root: the extracted release directory (``<corruption>.npy`` and ``labels.npy``, see LAYOUT);
    corruption: a file name of CIFAR10C_CORRUPTIONS (or any ``<name>.npy`` of root); severity: 1..5.
    The array is memory-mapped and read per item."""

    def __init__(self, root, corruption: str, severity: int):
        if not isinstance(corruption, str) or not corruption or os.sep in corruption:
            raise ValueError(f"corruption must be a file name of the release, e.g. one of {CIFAR10C_CORRUPTIONS}, "
                             f"got {corruption!r}")
        self.severity = check_severity(severity)
        self.root = check_release_dir(root)
        labels = load_release_labels(self.root)
        self.n = labels.shape[0] // 5
        self.array = load_release_array(self.root, corruption, self.n)
        self.corruption = corruption
        self.labels = labels[(self.severity - 1) * self.n:self.severity * self.n]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, j: int):
        if isinstance(j, bool) or not isinstance(j, (int, np.integer)) or not -self.n <= j < self.n:
            raise IndexError(f"index {j!r} out of range for CifarC of length {self.n}")
        j = int(j) % self.n
        row = np.asarray(self.array[(self.severity - 1) * self.n + j], dtype=np.float32) / 255.0
        return torch.from_numpy(row).permute(2, 0, 1).contiguous(), int(self.labels[j])

    def __repr__(self) -> str:
        return f"CifarC(root={self.root!r}, corruption={self.corruption!r}, severity={self.severity}, n={self.n})"
