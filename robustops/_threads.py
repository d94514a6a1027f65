"""How many CPU threads torch gets: one rule for the command line (every command's ``--threads``
default) and the Python API (``train.fit(..., threads=None)``).

The rule: the physical cores this process may run on, divided among the torchrun processes of the
machine (``LOCAL_WORLD_SIZE``), at most 8; and 1 for inputs under 1024 values per sample (the 8x8
digits), whose small convolutions gain nothing from more threads and lose time to their
synchronisation (a PGD epoch on digits: 1.6 s on one thread against 9.8 s on torch's default)."""
from __future__ import annotations

import os
from typing import Optional, Union

__all__ = ["physical_cores", "default_threads", "resolve_threads", "MAX_THREADS", "SMALL_INPUT"]

#: The most threads the rule gives one process.
MAX_THREADS = 8
#: Inputs with fewer values per sample than this get one thread.
SMALL_INPUT = 1024


def physical_cores() -> int:
    """Physical cores this process may run on (hyperthread siblings counted once)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for c in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list") as fh:
                cores.add(fh.read().strip())
        except OSError:
            cores.add(str(c))
    return max(1, len(cores))


def default_threads(sample_numel: Optional[int] = None, cores: Optional[int] = None) -> int:
    """The rule (see the module's docstring): the thread count for samples of ``sample_numel`` values
    (None: unknown, the cores' share) on ``cores`` physical cores (None: :func:`physical_cores`)."""
    if sample_numel is not None and sample_numel < SMALL_INPUT:
        return 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cores = physical_cores() if cores is None else cores
    return max(1, min(MAX_THREADS, cores // max(local, 1)))


def resolve_threads(threads: Union[None, int, str], sample_numel: Optional[int] = None) -> Optional[int]:
    """What a ``threads`` setting asks for: None -> the rule's count for ``sample_numel``; an int >= 1
    -> that many; 0 or "keep" -> None (leave torch's setting alone). ValueError for anything else."""
    if threads is None:
        return default_threads(sample_numel)
    if threads == "keep" or (isinstance(threads, int) and not isinstance(threads, bool) and threads == 0):
        return None
    if isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1:
        return threads
    raise ValueError(f"threads must be None (the rule: 1 for inputs under {SMALL_INPUT} values, else the physical "
                     f"cores, at most {MAX_THREADS}), an int >= 1, or 0 / 'keep' (torch's setting); got {threads!r}")
