"""The timing helpers of every benchmark script: the median of repeated runs of one function
(:func:`median_ms`), and several functions timed round-robin on a quiet machine, for comparisons
whose ratios matter: every round's times (:func:`interleaved_rounds`), their medians
(:func:`interleaved_ms`) and the median of per-round ratios (:func:`paired_ratio`)."""
from __future__ import annotations

import os
import random
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

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


def _system_cpu_s() -> Tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat (Linux)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values) - idle) / tick, sum(values) / tick


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def other_load(fn: Callable[[], object]) -> Tuple[object, float]:
    """Run ``fn``; return its result and the fraction of the machine's CPU time that other
    processes used meanwhile (0 when /proc/stat is not there)."""
    try:
        busy0, total0 = _system_cpu_s()
    except OSError:
        return fn(), 0.0
    own0 = _own_cpu_s()
    result = fn()
    busy1, total1 = _system_cpu_s()
    others = (busy1 - busy0) - (_own_cpu_s() - own0)
    return result, max(0.0, others) / max(total1 - total0, 1e-9)


def wait_for_quiet(max_wait_s: float, threshold: float = 0.1) -> bool:
    """Wait (up to ``max_wait_s``) until other processes use under ``threshold`` of the CPUs."""
    deadline = time.time() + max_wait_s
    while True:
        _, load = other_load(lambda: time.sleep(0.5))
        if load < threshold:
            return True
        if time.time() > deadline:
            return False
        time.sleep(2.0)


def interleaved_ms(fns: Dict[str, Callable[[], object]], **kwargs) -> Dict[str, float]:
    """Median ms of each function over the rounds of :func:`interleaved_rounds` (same arguments)."""
    return {name: statistics.median(t) for name, t in interleaved_rounds(fns, **kwargs).items()}


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """The median over rounds of ``num[i] / den[i]``: both timed in the same round, so the machine's
    drift between rounds (other tenants, clock changes) cancels, which a ratio of two medians, each
    taken over every round, does not guarantee."""
    return statistics.median(a / b for a, b in zip(num, den))


def interleaved_rounds(fns: Dict[str, Callable[[], object]], *, rounds: int, warmup: int = 2,
                       min_time_s: float = 0.0, tries: int = 4, max_wait_s: float = 120.0,
                       noisy: Optional[List[str]] = None, label: str = "",
                       sync: Optional[Callable[[], None]] = None) -> Dict[str, List[float]]:
    """Each function's ms in every round, timed round-robin: ``rounds`` rounds (more while under
    ``min_time_s``), one call of every function per round, in a random order each round.

    On a shared machine, other processes' load distorts the medians badly (OpenMP threads wait
    whole scheduler slices for a descheduled peer), so the measurement waits for a quiet machine
    and is repeated (up to ``tries`` times) while others used over 10% of the CPUs; a result
    still measured under load is reported in ``noisy``. ``sync`` (torch.cuda.synchronize on a
    GPU) runs after every call, inside the timed region."""
    names = list(fns)
    sync = sync or (lambda: None)

    def measure() -> Dict[str, List[float]]:
        for _ in range(warmup):
            for name in names:
                fns[name]()
        sync()
        times: Dict[str, List[float]] = {name: [] for name in names}
        start_all, r = time.perf_counter(), 0
        order_rng = random.Random(0)
        while r < rounds or time.perf_counter() - start_all < min_time_s:
            # A fresh order every round: with a fixed or rotating order each function would always
            # follow the same predecessor and inherit its effect on the caches.
            order = order_rng.sample(names, len(names))
            for name in order:
                start = time.perf_counter()
                fns[name]()
                sync()
                times[name].append((time.perf_counter() - start) * 1e3)
            r += 1
        return times

    for attempt in range(tries):
        wait_for_quiet(max_wait_s)
        result, load = other_load(measure)
        if load < 0.1:
            return result
        print(f"  {label}: other processes used {load:.0%} of the CPUs; measuring again", file=sys.stderr)
    if noisy is not None:
        noisy.append(f"{label} (other processes used {load:.0%} of the CPUs)")
    return result
