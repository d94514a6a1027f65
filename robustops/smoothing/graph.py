"""CUDA graphs for Smooth (``graph=True``): one forward batch of a single input's noisy copies
(``gaussian_noise`` with a device offset, the base classifier, ``count_votes_``) captured once and
replayed for every full batch of that input. On small models the launch overhead of the eager batch
(dozens of kernels) then costs nothing; the noise is exactly the eager stream's, because the captured
noise op reads its Philox offset from a device tensor and advances it by the rows it drew.

A graph is cached per (Philox key, batch size, input shape / dtype / layout, noise dtype); the key
is fixed for a run with a fixed seed (the CLI's default), so a run captures one graph per phase.
"""
from __future__ import annotations

import collections
import warnings
from typing import Optional

import torch

from .. import ops

__all__ = ["VoteGraphs"]


class _Runner:
    """Static buffers (the input, the offset, the counts) and the captured batch."""

    def __init__(self, smooth, x1: torch.Tensor, key: int, batch: int, noise_dtype, mean, std):
        self.smooth, self.key, self.batch, self.noise_dtype = smooth, key, batch, noise_dtype
        self.mean, self.std = mean, std  # the graph reads these tensors: keep them alive
        self.x = torch.empty_like(x1, memory_format=torch.preserve_format)
        self.x.copy_(x1)
        self.offset = torch.zeros((), dtype=torch.int64, device=x1.device)
        self.counts = torch.zeros(1, smooth.num_classes + 1, dtype=torch.int64, device=x1.device)  # + NaN votes
        self.graph: Optional[torch.cuda.CUDAGraph] = None

    def body(self, capturing: bool) -> None:
        s = self.smooth
        noise = ops.gaussian_noise(self.x, self.batch, s.sigma, seed=self.key, offset=self.offset, mean=self.mean,
                                   std=self.std, out_dtype=self.noise_dtype, channels_last=s.channels_last)
        ops.count_votes_(s.vote_logits(noise, cache=not capturing), self.counts)

    def capture(self) -> None:
        dev = self.x.device
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: lazy initialisation, cuDNN autotuning
                self.body(capturing=True)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.body(capturing=True)
        self.graph = graph

    def run(self, x1: torch.Tensor, first_row: int, replays: int, counts_row: torch.Tensor) -> None:
        """Replays for input x1 ([1, ...]) from noisy row first_row; adds the votes to counts_row."""
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

    def run(self, smooth, x1, key: int, batch: int, noise_dtype, mean, std, first_row: int, replays: int,
            counts_row) -> bool:
        """``replays`` full batches of input x1 through a graph; False where capture failed (the
        caller then runs them eagerly)."""
        cache_key = (key, batch, tuple(x1.shape), x1.dtype, x1.device, x1.stride(), noise_dtype)
        if cache_key in self.failed:
            return False
        runner = self.runners.get(cache_key)
        if runner is None:
            runner = _Runner(smooth, x1, key, batch, noise_dtype, mean, std)
            try:
                runner.capture()
            except Exception as e:  # noqa: BLE001 -- any capture failure falls back to eager
                self.failed.add(cache_key)
                warnings.warn(f"robustops Smooth: CUDA-graph capture failed for input shape {list(x1.shape)} "
                              f"({type(e).__name__}: {e}); certifying those batches eagerly", stacklevel=4)
                try:
                    torch.cuda.synchronize(x1.device)
                except RuntimeError:
                    pass
                return False
            self.runners[cache_key] = runner
            while len(self.runners) > self.max_graphs:
                self.runners.popitem(last=False)
        else:
            self.runners.move_to_end(cache_key)
        runner.run(x1, first_row, replays, counts_row)
        return True
