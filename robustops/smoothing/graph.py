"""CUDA graphs for Smooth (``graph=True``): one forward batch of a single input's noisy copies (the
one smoothing pass of robustops.smoothing.votes with a device offset: ``gaussian_noise`` reading its
Philox offset from a device tensor, the base classifier, ``count_votes_``) captured once and replayed
for every full batch of that input. On small models the launch overhead of the eager batch (dozens of
kernels) then costs nothing; the noise is exactly the eager stream's, because the captured noise op
reads its Philox offset from a device tensor and advances it by the rows it drew.

Capture runs on a side stream of the data's device, with that device current (a graph captured on
another device's stream would hold none of the data's kernels), and is checked once: a replay must
advance the offset by the batch's rows, or the graph is empty and the batches run eagerly.

A graph is cached under everything it closes over (``cache_key``): the Philox key, the batch size, the
input's shape / dtype / layout / device, sigma, the normalisation, the autocast dtype, channels_last,
num_classes, and the classifier's identity, modes and parameter / buffer storage (a re-allocated model
must not replay a graph that reads the old weights). The key is fixed for a run with a fixed seed (the
CLI's default), so a run captures one graph per phase.
"""
from __future__ import annotations

import collections
import warnings
from typing import Optional

import torch

from .._cuda import streams_kept
from .votes import Piece

__all__ = ["VoteGraphs", "cache_key", "model_fingerprint"]


def _tensor_key(t: torch.Tensor) -> tuple:
    """A tensor by its storage: address, dtype, shape, strides, device (what a captured kernel reads)."""
    return t.data_ptr(), t.dtype, tuple(t.shape), t.stride(), t.device


def model_fingerprint(model) -> tuple:
    """What a captured forward closes over in the classifier: its identity, and for an nn.Module its
    modules' train / eval modes and every parameter's and buffer's storage. In-place updates (an
    optimizer step) keep the storage, and the graph reads the new values; a re-allocation changes it."""
    if not isinstance(model, torch.nn.Module):
        return (id(model),)
    modes = tuple(m.training for m in model.modules())
    tensors = tuple(_tensor_key(t) for t in list(model.parameters()) + list(model.buffers()))
    return id(model), modes, tensors


def _values(t) -> tuple:
    """A small host tensor (mean / std) by value; a device one by storage and version (no sync)."""
    if t is None:
        return ()
    if t.device.type == "cpu":
        return tuple(t.flatten().tolist())
    return _tensor_key(t) + (t._version,)


def cache_key(smooth, x1: torch.Tensor, key: int, batch: int, model: tuple) -> tuple:
    """The cache key of the graph of one batch of x1's noisy copies under Philox key ``key``: everything
    the captured pass bakes in. model: model_fingerprint(smooth.base_classifier)."""
    norm = smooth.normalize
    norm_key = None if norm is None else (_values(norm.mean), _values(norm.std))
    return (key, batch, tuple(x1.shape), x1.stride(), x1.dtype, x1.device, float(smooth.sigma), norm_key,
            smooth.autocast, bool(smooth.channels_last), smooth.num_classes, model)


class _Runner:
    """Static buffers (the input, the offset, the counts) and the captured batch."""

    def __init__(self, smooth, x1: torch.Tensor, key: int, batch: int):
        self.key, self.batch = key, batch
        # mean / std live in the sampler: the graph reads those tensors, and the runner keeps them alive
        self.sampler = smooth.vote_sampler(x1.device, cache=False)
        self.x = torch.empty_like(x1, memory_format=torch.preserve_format)
        self.x.copy_(x1)
        self.offset = torch.zeros((), dtype=torch.int64, device=x1.device)
        self.counts = torch.zeros(1, smooth.num_classes + 1, dtype=torch.int64, device=x1.device)  # + NaN votes
        self.graph: Optional[torch.cuda.CUDAGraph] = None

    def body(self) -> None:
        self.sampler.run(self.x, [Piece(0, self.key, self.offset, self.batch, 0)], self.counts)

    def capture(self) -> None:
        dev = self.x.device
        # streams_kept: a failed capture leaves torch.cuda.graph's stream current; the caller's comes back
        with streams_kept(dev) as previous, torch.cuda.device(dev):
            side = torch.cuda.Stream(device=dev)
            side.wait_stream(previous)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up: lazy initialisation, cuDNN autotuning
                    self.body()
            with torch.cuda.graph(graph, stream=side):
                self.body()
        previous.wait_stream(side)
        with torch.cuda.device(dev):
            self.graph = graph
            self._check_not_empty()

    def _check_not_empty(self) -> None:
        """One replay must draw the batch's rows (the offset advances by them): a graph captured without
        the data's kernels would silently count nothing. One host read per capture."""
        self.offset.zero_()
        self.graph.replay()
        advanced = int(self.offset)
        self.counts.zero_()
        if advanced != self.batch:
            self.graph = None
            raise RuntimeError(f"the captured graph is empty or incomplete: a replay drew {advanced} noisy rows, "
                               f"expected {self.batch}")

    def run(self, x1: torch.Tensor, first_row: int, replays: int, counts_row: torch.Tensor) -> None:
        """Replays for input x1 ([1, ...]) from noisy row first_row; adds the votes to counts_row."""
        with torch.cuda.device(self.x.device):
            self.x.copy_(x1)
            self.offset.fill_(first_row)
            self.counts.zero_()
            for _ in range(replays):
                self.graph.replay()
            counts_row.add_(self.counts)


class VoteGraphs:
    """The captured batches of one Smooth, most recently used last, at most ``max_graphs``."""

    def __init__(self, max_graphs: int = 4):
        self.max_graphs = max_graphs
        self.runners = collections.OrderedDict()
        self.failed = set()

    def run(self, smooth, x1, key: int, batch: int, first_row: int, replays: int, counts_row, model: tuple) -> bool:
        """``replays`` full batches of input x1 through a graph; False where capture failed (the
        caller then runs them eagerly). model: model_fingerprint(smooth.base_classifier)."""
        ck = cache_key(smooth, x1, key, batch, model)
        if ck in self.failed:
            return False
        runner = self.runners.get(ck)
        if runner is None:
            runner = _Runner(smooth, x1, key, batch)
            try:
                runner.capture()
            except Exception as e:  # noqa: BLE001 -- any capture failure falls back to eager
                self.failed.add(ck)
                warnings.warn(f"robustops Smooth: CUDA-graph capture failed for input shape {list(x1.shape)} "
                              f"({type(e).__name__}: {e}); certifying those batches eagerly", stacklevel=4)
                try:
                    torch.cuda.synchronize(x1.device)
                except RuntimeError:
                    pass
                return False
            self.runners[ck] = runner
            while len(self.runners) > self.max_graphs:
                self.runners.popitem(last=False)
        else:
            self.runners.move_to_end(ck)
        runner.run(x1, first_row, replays, counts_row)
        return True
