"""CUDA stream and device bookkeeping shared by the CUDA-graph runners (attacks/graph.py,
smoothing/graph.py). Imports no robustops module."""
from __future__ import annotations

import contextlib

import torch

__all__ = ["streams_kept"]


@contextlib.contextmanager
def streams_kept(device: torch.device):
    """Puts back the current device and the current streams of it and of ``device`` on exit, even
    when a capture fails: ``torch.cuda.graph`` leaves its capture stream current when capture_end
    raises, and every later kernel of the process would then go to that stream."""
    prev_device = torch.cuda.current_device()
    prev_here = torch.cuda.current_stream(prev_device)
    prev_there = torch.cuda.current_stream(device)
    try:
        yield prev_there
    finally:
        torch.cuda.set_stream(prev_there)
        torch.cuda.set_stream(prev_here)  # set_stream also makes the stream's device current
        torch.cuda.set_device(prev_device)
