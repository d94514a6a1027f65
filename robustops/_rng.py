"""The one home of randomness: seeds, independent sub-seeds, and the Philox counter layout of the
random ops, so that callers pick disjoint streams without restating the kernels' arithmetic.

Every random op (``random_init``, ``gaussian_noise``, ``langevin_step_``) draws from Philox4x32-10 keyed by a 63-bit
seed, with a 64-bit counter built from an ``offset`` and the element's logical index
(csrc/philox.h):

- ``random_init``: element e of sample b of a [B, D] batch uses counter
  ``(offset + b) * noise_counter_groups(D) + e // 4`` (L-inf uniform; L2 direction) and, for L2, sample
  b's radius uses counter ``offset + b`` of a separate stream. The offset counts samples: the draw of
  dataset sample n is the one at offset n, so any split of a dataset into batches, each drawn at the
  offset of its first sample, gives the same numbers.
- ``gaussian_noise``: noisy row s of D elements uses counters ``s * noise_counter_groups(D) + e // 4``,
  with ``s = offset + b * num + j``: its offset counts noisy rows.
- ``langevin_step_``: random_init's per-element layout (the offset counts samples) on its own stream
  (kStreamLangevin), so a Langevin step and a random start at the same (seed, offset) are independent.

Seeds: :func:`resolve_seed` turns ``None`` into a seed drawn from torch's default generator (so
``torch.manual_seed`` makes a run reproducible) and checks an int; :func:`derive_seed` gives the
independent key of sub-stream k (restart k, rank k, Monte-Carlo phase k) of a seed.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["SEED_BITS", "resolve_seed", "derive_seed", "noise_counter_groups", "process_generator"]

SEED_BITS = 63
_MASK63 = (1 << SEED_BITS) - 1
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def resolve_seed(seed: Optional[int], name: str = "seed") -> int:
    """The 63-bit Philox key for ``seed``: a seed drawn from torch's default CPU generator when it
    is None (torch.manual_seed governs it), else the int itself (masked to 63 bits)."""
    if seed is None:
        if torch.compiler.is_compiling():
            raise ValueError(f"{name}=None draws a seed from torch's generator on the host, which torch.compile "
                             f"cannot trace; pass {name} as an int (e.g. one drawn outside the compiled function)")
        return int(torch.randint(0, 2 ** 62, (1,), dtype=torch.int64).item())
    if isinstance(seed, bool) or not isinstance(seed, int) and not _is_numpy_int(seed):
        raise TypeError(f"{name} must be an int or None, got {type(seed).__name__}")
    return int(seed) & _MASK63


def _is_numpy_int(v) -> bool:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with torch
        return False
    return isinstance(v, np.integer)


def derive_seed(seed: int, k: int) -> int:
    """Key of sub-stream k of ``seed``: ``seed`` itself for k = 0, else splitmix64's finalizer of
    ``seed + k * golden ratio``, so nearby seeds and nearby k give unrelated keys."""
    if k == 0:
        return seed & _MASK63
    z = (seed + k * _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & _MASK63


def noise_counter_groups(sample_numel: int) -> int:
    """Philox counters that ``gaussian_noise`` reserves per noisy row of ``sample_numel`` elements:
    ceil(D / 4) (each counter yields four 32-bit words)."""
    return (int(sample_numel) + 3) // 4


def process_generator(seed: Optional[int], rank: int = 0) -> torch.Generator:
    """A CPU generator for the seeds one process hands to the random ops during training: from
    (seed, rank), so ranks draw different streams and a run is reproducible from its seed (seed
    None: drawn from torch's default generator). Its state goes into checkpoints."""
    base = resolve_seed(seed)
    return torch.Generator().manual_seed((base * 1_000_003 + 7919 * int(rank)) & ((1 << 62) - 1))
