"""CUDA-graph replay of the engine's iteration: one forward, one backward to the input, the fused
projection (and the step recording) captured once over static buffers and replayed ``steps``
times, so a PGD step costs one graph launch instead of dozens of kernel launches.

Only the engine's public surface is used: :meth:`Engine.gradient`, :meth:`Engine.score`,
:meth:`Engine.step_`, ``Engine.success``, ``Engine.capturing`` and :class:`Recorder`.

The capture runs on a side stream of the data's GPU, under ``torch.cuda.device`` of it: a capture
stream of another device records none of the data's kernels (they run once, eagerly, on their own
device's stream) and leaves an empty graph whose replays would return the random start. So each
capture is checked by one replay that must advance a device-side marker.
"""
from __future__ import annotations

import collections
import warnings
from typing import Callable, Optional

import torch
import torch.nn as nn

from .._cuda import streams_kept
from .engine import Engine, Recorder

__all__ = ["GraphRunner", "GraphCache", "EmptyGraphError"]


class EmptyGraphError(RuntimeError):
    """A captured graph whose replay did not run the captured work on the data's device."""


class GraphRunner:
    """One engine iteration captured into a CUDA graph over static buffers x (clean), xa (iterate),
    y (a tensor or a tuple of tensors), eps[B], alpha[B] and, when recording, a Recorder and the
    step counter. Replaying the graph advances xa by one step; :meth:`load` copies new inputs in."""

    def __init__(self, engine: Engine, module: Optional[nn.Module], x, y, record: bool):
        self.engine = engine
        self.module = module
        B, dev = x.shape[0], x.device
        self.device = dev
        self.x = torch.empty_like(x, memory_format=torch.preserve_format)
        self.xa = torch.empty_like(x, memory_format=torch.preserve_format)
        self.y = tuple(None if t is None else torch.empty_like(t) for t in y) if isinstance(y, tuple) \
            else torch.empty_like(y)
        self.eps = torch.empty(B, dtype=torch.float32, device=dev)
        self.alpha = torch.empty(B, dtype=torch.float32, device=dev)
        self.recorder = Recorder(self.xa) if record else None
        self.k = torch.zeros((), dtype=torch.int64, device=dev)
        # Advanced once by every replay: the proof that the graph holds the data device's kernels.
        self.marker = torch.zeros((), dtype=torch.int64, device=dev)
        self.graph = None

    def load(self, x, xa0, y, eps, alpha) -> None:
        self.x.copy_(x)
        self.xa.copy_(xa0)
        if isinstance(y, tuple):
            for dst, src in zip(self.y, y):
                if dst is not None:
                    dst.copy_(src)
        else:
            self.y.copy_(y)
        self.eps.copy_(eps if isinstance(eps, torch.Tensor) else torch.full_like(self.eps, float(eps)))
        self.alpha.copy_(alpha if isinstance(alpha, torch.Tensor) else torch.full_like(self.alpha, float(alpha)))
        if self.recorder is not None:
            self.recorder.reset()
            self.k.zero_()

    def iteration(self) -> None:
        eng = self.engine
        g, logits, obj = eng.gradient(self.xa, self.y)
        if self.recorder is not None:
            self.recorder.update(self.k, self.xa, logits, eng.score(logits, self.y, obj), eng.success(logits, self.y))
            self.k.add_(1)
        eng.step_(self.xa, self.x, g, self.eps, self.alpha)

    def capture(self) -> None:
        """Warm-up, capture and one checking replay, on a side stream of the data's device; the
        model's buffers, the iterate and the recorder are put back as they were either way, and so
        are the current device and streams. Raises EmptyGraphError when the replay ran nothing."""
        dev = self.device
        # Warm-up iterations run for real: the model's buffers (batch-norm statistics in train mode)
        # and the loaded inputs are put back as they were, whether capture succeeds or not.
        saved_buffers = [(b, b.detach().clone()) for b in self.module.buffers()] if self.module is not None else []
        saved_xa = self.xa.clone(memory_format=torch.preserve_format)
        current = torch.cuda.current_stream(dev)  # the caller's stream on the data's device
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(current)
        self.engine.capturing = True
        try:
            with streams_kept(dev), torch.cuda.device(dev):
                self._capture(side, current, saved_buffers, saved_xa)
        finally:
            # After the streams are back: these copies must be ordered before the caller's next kernels.
            self.engine.capturing = False
            current.wait_stream(side)
            self._restore(saved_buffers, saved_xa)

    def _capture(self, side, current, saved_buffers, saved_xa) -> None:
        with torch.cuda.stream(side):
            for _ in range(3):
                self.iteration()
        current.wait_stream(side)
        self._restore(saved_buffers, saved_xa)
        side.wait_stream(current)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            self.iteration()
            self.marker.add_(1)
        self._check_replay(graph)
        self.graph = graph

    def _check_replay(self, graph) -> None:
        """One replay (of the real iteration: _restore undoes it) must advance the marker on the
        data's device; one host sync per capture."""
        self.marker.zero_()
        graph.replay()
        ran = int(self.marker)
        if ran != 1:
            raise EmptyGraphError(f"the captured CUDA graph did not run on {self.device} (its replay advanced the "
                                  f"marker by {ran}, expected 1): captured on another device's stream?")

    def _restore(self, saved_buffers, saved_xa) -> None:
        with torch.no_grad():
            for b, v in saved_buffers:
                b.copy_(v)
            self.xa.copy_(saved_xa)
            if self.recorder is not None:
                self.recorder.reset()
                self.k.zero_()

    def replay(self, steps: int, check_every: int = 0, skip: Optional[torch.Tensor] = None):
        """steps replays (stopping early, checked every check_every steps, once every sample has
        succeeded or is in skip); returns (a copy of the iterate, the recorder or None). A replay
        runs on the current stream of the capture's device (CUDAGraph.replay's device guard)."""
        for k in range(steps):
            self.graph.replay()
            if check_every and self.recorder is not None and (k + 1) % check_every == 0 and k + 1 < steps:
                done = self.recorder.step >= 0
                if skip is not None:
                    done = done | skip
                if bool(done.all()):
                    break
        return self.xa.clone(memory_format=torch.preserve_format), self.recorder


class GraphCache:
    """The captured runners of one attack, most recently used last, at most ``max_graphs``; a key
    whose capture failed is remembered and runs eagerly."""

    def __init__(self, max_graphs: int = 3):
        self.max_graphs = max_graphs
        self.runners = collections.OrderedDict()
        self.failed = set()

    def loop(self, engine: Engine, module: Optional[nn.Module], key, steps: int, early_exit: bool) -> Callable:
        """A ``loop`` for :meth:`Engine.run`: the graph's replay, or None (the eager loop) where
        capture failed."""

        def run(x, xa0, y, eps, alpha, record, skip):
            full_key = key + (record,)
            runner = self._runner(engine, module, full_key, x, xa0, y, eps, alpha, record)
            if runner is None:
                return None
            runner.load(x, xa0, y, eps, alpha)
            return runner.replay(steps, check_every=4 if early_exit else 0, skip=skip)

        return run

    def _runner(self, engine, module, key, x, xa0, y, eps, alpha, record) -> Optional[GraphRunner]:
        if key in self.failed:
            return None
        runner = self.runners.get(key)
        if runner is not None:
            self.runners.move_to_end(key)
            return runner
        try:
            runner = GraphRunner(engine, module, x, y, record)
            runner.load(x, xa0, y, eps, alpha)
            runner.capture()
        except Exception as e:  # noqa: BLE001 -- any capture failure falls back to eager
            self.failed.add(key)
            warnings.warn(f"robustops PGD: CUDA-graph capture failed for input shape {list(x.shape)} "
                          f"({type(e).__name__}: {e}); using the eager path for it", stacklevel=5)
            try:
                torch.cuda.synchronize(x.device)
            except RuntimeError:
                pass
            return None
        self.runners[key] = runner
        while len(self.runners) > self.max_graphs:
            self.runners.popitem(last=False)
        return runner
