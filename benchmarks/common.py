"""Shared timing helpers for the benchmark scripts: median timings, the device's measured copy
bandwidth (the memory-bound limit every figure is compared with), and CSV output."""
from __future__ import annotations

import csv
import datetime
import os
import platform
import statistics
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def bench(fn, device: str, min_time: float = 0.5, warmup: int = 3, max_reps: int = 2000) -> float:
    """Median seconds per call of fn() (CUDA: timed with events)."""
    for _ in range(warmup):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        times = []
        total = 0.0
        while total < min_time and len(times) < max_reps:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            t = s.elapsed_time(e) / 1e3
            times.append(t)
            total += t
        return statistics.median(times)
    times = []
    total = 0.0
    while (total < min_time and len(times) < max_reps) or len(times) < 3:
        t0 = time.perf_counter()
        fn()
        t = time.perf_counter() - t0
        times.append(t)
        total += t
    return statistics.median(times)


def copy_bandwidth(device: str, nbytes: int | None = None) -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read plus bytes written."""
    if nbytes is None:
        nbytes = 1 << 30 if device.startswith("cuda") else 1 << 27
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), device, min_time=0.5)
    return 2 * nbytes / t


def append_csv(name: str, rows: list[dict]) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, name)
    new = not os.path.exists(path)
    fields = list(rows[0].keys())
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerows(rows)
    return path


def stamp() -> dict:
    return {"date": datetime.date.today().isoformat(), "torch": torch.__version__}
