"""The one smoothing pass: noise -> forward -> NaN column -> vote count, shared by ``Smooth.certify`` /
``predict``, the sequential engine (``stream``) and the CUDA-graph runner (``graph``).

A forward batch is a list of *pieces*: ``take`` consecutive noisy samples of one input (row
``source`` of x) under one Philox key, starting at noisy row ``first``, whose votes go to row
``count_row`` of the count table. A batch is two launches whatever the number of pieces: one noise
launch and one vote count. One piece: ``gaussian_noise`` (its offset may be a device tensor, the form a
CUDA graph replays) and ``count_votes_`` into one count row. Several: ``gaussian_noise_rows`` with a
per-row table (input, key, noisy row; the numbers ``gaussian_noise`` draws for that key and row) and
``count_votes_segments_`` with the table's count-row column, uploaded to the device in one copy. So the
votes do not depend on how the samples were cut into pieces.

The Monte-Carlo phases are defined here once: each draws under its own key (``phase_seed``), so that
their draws are independent.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch

from .. import _rng, ops

__all__ = ["SELECTION", "ESTIMATION", "PREDICTION", "phase_seed", "Piece", "VoteSampler", "with_nan_column",
           "piece_tables"]

SELECTION, ESTIMATION, PREDICTION = 0, 1, 2


def phase_seed(seed: int, phase: int) -> int:
    """The Philox key of a Monte-Carlo phase (SELECTION, ESTIMATION, PREDICTION) of a run with seed."""
    return _rng.derive_seed(seed, phase + 1)


class Piece(NamedTuple):
    """``take`` noisy samples of x[source] from noisy row ``first`` of Philox key ``key``, counted in
    row ``count_row``. ``first`` may be a one-element int64 device tensor for a lone piece (advanced by
    ``take``: the CUDA-graph form)."""
    source: int
    key: int
    first: Union[int, torch.Tensor]
    take: int
    count_row: int


def with_nan_column(logits: torch.Tensor) -> torch.Tensor:
    """[R, C + 1]: a row whose logits hold a NaN becomes -inf everywhere but +inf in column C, so the vote
    count (whose argmax, like torch's, lets a NaN win) counts it in column C, for no class. The fills are
    Python scalars: a 0-dim device tensor as masked_fill's value is read with .item(), a host sync."""
    bad = torch.isnan(logits).any(1, keepdim=True)
    nan_col = torch.where(bad, float("inf"), float("-inf")).to(logits.dtype)
    return torch.cat([logits.masked_fill(bad, float("-inf")), nan_col], dim=1)


def piece_tables(pieces: Sequence[Piece]) -> torch.Tensor:
    """int64 [4, R] on the host: per noisy row its input (row of x), Philox key, noisy-row number and
    count row, R = the pieces' samples in order."""
    take = np.array([p.take for p in pieces], dtype=np.int64)
    start = np.cumsum(take) - take

    def rep(k):
        return np.repeat(np.array([p[k] for p in pieces], dtype=np.int64), take)
    within = np.arange(int(take.sum()), dtype=np.int64) - np.repeat(start, take)
    return torch.from_numpy(np.stack([rep(0), rep(1), rep(2) + within, rep(4)]))


Forward = Callable[[torch.Tensor, Callable[[], torch.Tensor]], torch.Tensor]


class VoteSampler:
    """One smoothing pass with a fixed noise setting. forward(batch, sources) -> logits [R, num_classes]
    runs the base classifier; ``sources()`` gives, on the device, the input row of x of each noisy row
    (for per-input context; built only when called). mean / std: per-channel tensors on the device or
    None. The noisy batch is written in ``noise_dtype`` (None: x's dtype)."""

    def __init__(self, *, sigma: float, forward: Forward, noise_dtype: Optional[torch.dtype] = None,
                 channels_last: bool = False, mean: Optional[torch.Tensor] = None,
                 std: Optional[torch.Tensor] = None):
        self.sigma, self.forward, self.noise_dtype = sigma, forward, noise_dtype
        self.channels_last, self.mean, self.std = channels_last, mean, std

    def run(self, x: torch.Tensor, pieces: Sequence[Piece], counts: torch.Tensor) -> None:
        """Adds the votes of the pieces' noisy samples of x [B, ...] to counts [S, C + 1] (column C: NaN
        logits) on x's device: two launches around the forward, no host synchronization."""
        noise_kw = dict(mean=self.mean, std=self.std, out_dtype=self.noise_dtype or x.dtype,
                        channels_last=self.channels_last)
        if len(pieces) == 1:
            p = pieces[0]
            batch = ops.gaussian_noise(x[p.source:p.source + 1], p.take, self.sigma, seed=p.key, offset=p.first,
                                       **noise_kw)
            logits = self.forward(batch, lambda: torch.full((p.take,), p.source, dtype=torch.int64, device=x.device))
            ops.count_votes_(with_nan_column(logits), counts[p.count_row:p.count_row + 1])
            return
        table = piece_tables(pieces)
        if x.device.type == "cuda":  # pinned, so the copy is asynchronous (no sync, the host runs on)
            table = table.pin_memory().to(x.device, non_blocking=True)
        else:
            table = table.to(x.device)
        batch = ops.gaussian_noise_rows(x, table[0], table[1], table[2], self.sigma, **noise_kw)
        logits = self.forward(batch, lambda: table[0])
        ops.count_votes_segments_(with_nan_column(logits), table[3], counts)
