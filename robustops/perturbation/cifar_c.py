"""CIFAR-10-C pairs (Hendrycks and Dietterich 2019's corrupted CIFAR-10 test set) read from a local
directory: pairs (a clean CIFAR-10 test image, one corrupted version of it), the data Wong and Kolter
(2021) learn their common-corruption sets from. Never downloads."""
from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ..corruptions.base import SEVERITIES
from ..corruptions.cifar10c import CIFAR10C_CORRUPTIONS, LAYOUT, check_release_dir, check_severities, \
    load_release_array
from ..data import load_cifar10

__all__ = ["CIFAR10C_CORRUPTIONS", "CIFAR10C_REFERENCE_TRAIN", "CIFAR10C_REFERENCE_HELD_OUT", "CifarCPairs"]

#: the 12 corruptions locuslab/perturbation_learning learns its CIFAR-10 sets on
#: (configs/cifar10_c_rectangle*.json, configs_robust/*.json) ...
CIFAR10C_REFERENCE_TRAIN = ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur", "snow", "frost", "fog",
                            "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression")
#: ... and the 3 benchmark corruptions it leaves out of them: the held-out (out-of-distribution) family
CIFAR10C_REFERENCE_HELD_OUT = ("gaussian_noise", "shot_noise", "impulse_noise")


class CifarCPairs(Dataset):
    """Pairs (x, x~, y) of CIFAR-10-C: x a clean CIFAR-10 test image (``robustops.data.load_cifar10``
    from ``cifar_root``), x~ its corrupted version at one severity, y the label; images float32
    [3, 32, 32] in [0, 1].

    root: the CIFAR-10-C directory (``<corruption>.npy`` and ``labels.npy``, see CIFAR10C_CORRUPTIONS);
    corruptions: the file names to use (default: every ``*.npy`` in root but labels.npy, sorted; e.g.
    CIFAR10C_REFERENCE_TRAIN to learn a set and CIFAR10C_REFERENCE_HELD_OUT to evaluate on held-out
    corruptions); severities: of 1..5. Item k is corruption k // (S N), severity (k // N) mod S, test
    image k mod N (``info(k)``). The corrupted arrays are memory-mapped, read per item. The labels of
    root must equal the clean test labels (the release stores the images in the test set's order), which
    the constructor checks."""

    def __init__(self, root: str, cifar_root: str, corruptions: Optional[Sequence[str]] = None,
                 severities: Sequence[int] = SEVERITIES):
        root = check_release_dir(root)
        labels_path = os.path.join(root, "labels.npy")
        present = sorted(f[:-4] for f in os.listdir(root) if f.endswith(".npy") and f != "labels.npy")
        if corruptions is None:
            corruptions = present
        elif isinstance(corruptions, str):
            corruptions = [c.strip() for c in corruptions.split(",")]
        corruptions = tuple(corruptions)
        missing = [c for c in corruptions if c not in present]
        if not corruptions or missing:
            raise FileNotFoundError(f"CIFAR-10-C directory {root!r}: no {', '.join(m + '.npy' for m in missing) or 'corruption files'}"
                                    f" (it holds {', '.join(present) or 'none'}); expected {LAYOUT}")
        self.severities = check_severities(severities)
        clean_x, clean_y = load_cifar10(cifar_root, "test").tensors
        n = clean_x.shape[0]
        labels = np.load(labels_path, mmap_mode="r")
        if labels.shape != (5 * n,):
            raise ValueError(f"{labels_path} must hold labels [5 * N] = [{5 * n}] (N = {n} clean test images), got "
                             f"shape {list(labels.shape)}")
        if not np.array_equal(np.asarray(labels[:n], dtype=np.int64), clean_y.numpy()):
            raise ValueError(f"{labels_path} does not match the CIFAR-10 test labels of {cifar_root!r}: the pairs "
                             f"need the clean test set the corruptions were made from, in its order")
        self.arrays = {}
        for c in corruptions:
            self.arrays[c] = load_release_array(root, c, n)
        self.root, self.corruptions, self.clean_x, self.labels, self.n_clean = root, corruptions, clean_x, clean_y, n

    def __len__(self) -> int:
        return len(self.corruptions) * len(self.severities) * self.n_clean

    def info(self, k: int) -> Tuple[str, int, int]:
        """(corruption, severity, clean test index) of item k."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not -len(self) <= k < len(self):
            raise IndexError(f"index {k!r} out of range for CifarCPairs of length {len(self)}")
        k = int(k) % len(self)
        n, s = self.n_clean, len(self.severities)
        return self.corruptions[k // (s * n)], self.severities[(k // n) % s], k % n

    def __getitem__(self, k: int):
        c, sev, j = self.info(k)
        row = np.asarray(self.arrays[c][(sev - 1) * self.n_clean + j], dtype=np.float32) / 255.0
        return self.clean_x[j], torch.from_numpy(row).permute(2, 0, 1).contiguous(), self.labels[j]

    def __repr__(self) -> str:
        return (f"CifarCPairs(root={self.root!r}, {len(self.corruptions)} corruptions, severities "
                f"{list(self.severities)}, n={len(self)})")
