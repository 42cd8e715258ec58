"""One timing helper for every benchmark script: warm up, then the median of repeated runs."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], *, repeats: int = 7, warmup: int = 3, device: str = "cpu",
              min_time_s: float = 0.0) -> float:
    """Median wall time of ``fn`` in milliseconds over ``repeats`` runs (at least ``min_time_s`` in all)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    start_all = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start_all < min_time_s:
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
