"""Cost-model constants from measured times: where one path overtakes another, and the fits that
reproduce it. Shared by the crossover modes (benchmarks/crossover.py for the torch backend,
benchmarks/bench_gpu.py --crossover for the triton backend), which print the constants and write
them as JSON for lfma_kernels/ops' cost models."""
from __future__ import annotations

import json
import math
import os
import statistics
from typing import Optional, Sequence, Tuple

# (relation, K): ("~", K) crossed between two measured Ks (interpolated), ("<=", K) the second
# path was faster from the first K measured, (">", K) it never was up to the last one.
Crossover = Tuple[str, float]


def crossover_k(ks: Sequence[int], first: Sequence[Optional[float]], second: Sequence[Optional[float]]) -> Crossover:
    """The first K from which ``second`` is faster than ``first`` (times per K, None = not measured),
    interpolated geometrically between the two measured Ks around it."""
    prev = None
    for k, a, b in zip(ks, first, second):
        if a is None or b is None:
            continue
        if b < a:
            if prev is None:
                return "<=", float(k)
            (k0, d0), d1 = prev, math.log(a / b)
            t = d0 / (d0 - d1) if d0 != d1 else 0.0
            return "~", float(round(k0 * (k / k0) ** t))
        prev = (k, math.log(a / b))
    measured = [k for k, a, b in zip(ks, first, second) if a is not None and b is not None]
    return ">", float(measured[-1] if measured else ks[-1])


def describe(crossover: Crossover) -> str:
    relation, k = crossover
    return f"{relation}{k:.0f}" if relation == "~" else f"{relation} {k:.0f}"


def fit_nlogn(points: Sequence[Tuple[int, float]]) -> Tuple[float, float]:
    """Least-squares ``t = a + b * N log2 N`` through ``(N, t_ms)`` points; ``(a, b)`` in seconds,
    both clamped at 0 (a fit through noise must not make a path look free or negative)."""
    xs = [n * math.log2(n) for n, _ in points]
    ys = [t * 1e-3 for _, t in points]
    if len(points) < 2:
        return (ys[0] if ys else float("nan")), 0.0
    mx, my = statistics.mean(xs), statistics.mean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return max(my - b * mx, 0.0), max(b, 0.0)


def fit_power(points: Sequence[Tuple[int, float]], ref: int) -> Tuple[float, float]:
    """Least-squares ``c = c_ref * (N / ref) ** p`` through ``(N, c)`` points (in log space);
    ``(c_ref, p)``, p = 0 from a single point."""
    logs = [(math.log(n / ref), math.log(c)) for n, c in points if c > 0]
    if not logs:
        return float("nan"), 0.0
    mx, my = statistics.mean(x for x, _ in logs), statistics.mean(y for _, y in logs)
    sxx = sum((x - mx) ** 2 for x, _ in logs)
    p = sum((x - mx) * (y - my) for x, y in logs) / sxx if sxx else 0.0
    return math.exp(my - p * mx), p


def write_json(path: str, data: dict) -> None:
    """Write ``data`` as indented JSON (NaN as null: the file is read by other tools)."""
    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(clean(data), f, indent=2)
        f.write("\n")
