"""``lfma-calibrate`` / ``lfma_kernels.calibrate()``: measure this machine's cost constants for the planner.

The planner's choices (how a layer's backward gets ``dL/dcoeffs``, which algorithm a backend builds ``dW``
with, which delta path runs beside a quantized base or for a mixed batch) compare estimated seconds from
a cost table (:mod:`lfma_kernels.ops.planner`). The shipped CPU table was fitted on one AMD CPU and the
CUDA table is an estimate; this times the operations behind each constant on this machine's device,
fits them, and writes them where the planner reads them (:mod:`lfma_kernels.ops.calibration`); the C++
kernels' three algorithms get one factor each, their measured time over the shipped model's. The
constants it does not measure (the torch backend's FFT paths, dequantizing; triton's off a GPU) keep
the shipped table's ratios to the GEMM, scaled by this machine's GEMM speed. A fit more than 10x off
the shipped figure is clamped to that bound, with a warning (a loaded machine, or a broken kernel).
``--quick`` (~5 s on a 2-core CPU) times each operation for at least 0.25 s; the full run (~20 s)
for 1 s and at twice the tokens.

    lfma-calibrate                 # this machine's CPU
    lfma-calibrate --device cuda --quick
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import statistics
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["calibrate", "main"]

REFERENCE = (768, 768)  # the size the FFT constants are stated at (costs.torch_fft_s)


def _timer(device: torch.device, min_time_s: float) -> Callable[[Callable[[], object]], float]:
    """The median seconds of ``fn`` over at least 7 calls and ``min_time_s`` (differences of two such
    times are the fits' slopes: a few calls would leave them in the noise)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def seconds(fn: Callable[[], object]) -> float:
        fn()
        sync()
        times: List[float] = []
        begin = time.perf_counter()
        while len(times) < 7 or time.perf_counter() - begin < min_time_s:
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    return seconds


def _problem(shape, k: int, device: torch.device, seed: int = 0):
    import lfma_kernels as lfma
    gen = torch.Generator().manual_seed(seed)
    f = lfma.select_frequencies(torch.randn(shape, generator=gen), k)
    coeffs = torch.randn(k, 2, generator=gen).to(device)
    return coeffs, f.rows.to(device), f.cols.to(device)


def _measure(device: torch.device, quick: bool) -> Dict[str, object]:
    """The constants, in the planner's units (seconds per multiply-add, per point * log2(points), per
    (token, frequency) pair, per weight entry)."""
    from lfma_kernels.ops import calibration, costs, delta_kernels, dispatch, torch_kernels

    seconds = _timer(device, 0.25 if quick else 1.0)
    tokens = 512 if quick else 1024
    d_out, d_in = REFERENCE
    n = d_out * d_in
    x = torch.randn(tokens, d_in, device=device)
    g = torch.randn(tokens, d_out, device=device)
    w = torch.randn(d_out, d_in, device=device)
    out: Dict[str, object] = {}

    gemm = seconds(lambda: F.linear(x, w)) / (tokens * n)
    out["gemm_mac_s"] = gemm
    # One row: the pass over the weight that a GEMM of its own costs beyond its multiply-adds.
    out["weight_pass_s"] = seconds(lambda: F.linear(x[:1], w)) / n - gemm

    c176, r176, v176 = _problem(REFERENCE, 176, device)
    skinny = seconds(lambda: torch_kernels.coeff_grad_batch_gemm(x, g, r176, v176, REFERENCE, 12.0, torch.float32))
    out["batch_gemm_mac_s"] = skinny / costs.skinny_gemm_macs(tokens, 176, REFERENCE)

    # The fft batch path and the delta path's rows way cost, per the planner, row FFTs per token plus a
    # cost per (token, frequency): timed at two K on each backend's own kernels, the slope is the pair
    # cost and the intercept the row FFTs (the compiled backend's, which is what runs where it exists).
    # Far apart, and up to the large K where these paths compete with G: the compiled kernels add little per
    # frequency at small K (their entries stay in L1), so a pair of small K underestimates the slope there.
    ks = (176, 11796)
    problems = [_problem(REFERENCE, k, device, seed=k) for k in ks]
    row_work = costs.row_fft_work(tokens, REFERENCE)
    ways = {"default": (torch_kernels.coeff_grad_batch_fft, delta_kernels.delta_rows)}
    if dispatch.unavailable_reason("cpp") is None and device.type == "cpu":
        kernels = dispatch.kernels("cpp")
        ways["cpp"] = (kernels.coeff_grad_batch_fft, kernels.delta_rows)
    pairs: Dict[str, Dict[str, float]] = {"batch_pair_s": {}, "delta_pair_s": {}}
    for backend, (batch_fft, rows_way) in ways.items():
        batch = [seconds(lambda p=p: batch_fft(x, g, p[1], p[2], REFERENCE, 12.0, torch.float32)) for p in problems]
        delta = [seconds(lambda p=p: rows_way(x, p[0], p[1], p[2], REFERENCE, 12.0)) for p in problems]
        for name, times in (("batch_pair_s", batch), ("delta_pair_s", delta)):
            pairs[name][backend] = max(times[1] - times[0], 0.02 * times[1]) / (tokens * (ks[1] - ks[0]))
        out["row_fft_s"] = max(batch[0] - pairs["batch_pair_s"][backend] * tokens * ks[0], 0.0) / row_work
    out.update(pairs)
    if "cpp" in ways:
        out[calibration.CPP_ALGORITHM_SCALE] = _cpp_algorithms(seconds, quick)
    if device.type == "cuda" and dispatch.unavailable_reason("triton") is None:
        out.update(_triton(seconds, device))
    return out


def _cpp_algorithms(seconds, quick: bool) -> Dict[str, float]:
    """Each C++ algorithm's time, building dW and reading dL/dcoeffs from G at the reference shape, over what
    the shipped constants estimate for it (the geometric mean over K and the two directions): the factor the
    planner scales that algorithm's costs by on this machine. The K span the crossovers (separable against
    hybrid near K = 20-60, hybrid against the 2-D FFT near a few thousand), so the factors are fitted where
    the choice between two algorithms is made; the separable product is left out past K = 943, where it
    costs tens of times the others."""
    from lfma_kernels.ops import backends, calibration, cost_tables, cpp_ops
    from lfma_kernels.ops.decision import count_positions

    model, ops = backends.REGISTRY["cpp"], torch.ops.lfma_ext
    grad = torch.randn(REFERENCE)
    logs: Dict[str, List[float]] = {name: [] for name in calibration.CPP_ALGORITHMS}
    for k in (58, 5898) if quick else (58, 176, 943, 5898):
        c, r, v = _problem(REFERENCE, k, torch.device("cpu"), seed=k)
        positions = count_positions(r, v, REFERENCE)
        for gradient in (False, True):
            estimates = model.algorithm_costs(cost_tables.CPU, k, REFERENCE, positions, gradient=gradient)
            for name in calibration.CPP_ALGORITHMS:
                if name == "separable" and k > 943:
                    continue
                code = cpp_ops.ALGO_CODES[name]
                run = ((lambda: ops.coeff_grad(grad, r, v, 12.0, code)) if gradient else
                       (lambda: ops.delta_weight(c, r, v, *REFERENCE, 12.0, code)))
                logs[name].append(math.log(seconds(run) / estimates[name]))
    return {name: math.exp(statistics.mean(values)) for name, values in logs.items()}


def _triton(seconds, device: torch.device) -> Dict[str, float]:
    """The fused kernel's multiply-add time and the FFT path's fixed and per-point costs on this GPU."""
    import lfma_kernels as lfma
    from lfma_kernels.ops import planner

    fitted: Dict[str, float] = {}
    c, r, v = _problem(REFERENCE, 176, device)
    n = REFERENCE[0] * REFERENCE[1]
    with planner.force(dw="separable"):
        fitted["triton_mac_s"] = seconds(lambda: lfma.delta_weight(c, r, v, REFERENCE, 12.0, backend="triton")) / (
            2 * 176 * n)
    sizes = [REFERENCE, (2048, 2048)]
    times = []
    with planner.force(dw="fft"):
        for shape in sizes:
            cs, rs, vs = _problem(shape, 943, device)
            times.append(seconds(lambda: lfma.delta_weight(cs, rs, vs, shape, 12.0, backend="triton")))
    work = [s[0] * s[1] * math.log2(s[0] * s[1]) for s in sizes]
    slope = max((times[1] - times[0]) / (work[1] - work[0]), 0.0)
    fitted["triton_fft_s"] = slope
    fitted["triton_fft_fixed_s"] = max(times[0] - slope * work[0], 0.0)
    return fitted


def _bounded(constants: Dict[str, object], shipped, device_type: str) -> Dict[str, object]:
    """Each fit within 10x of the shipped figure (the shipped table's pair costs for backends it lacks: its
    default); outside, clamped to the bound with a warning."""
    clamped = []

    def bound(name: str, value: float, reference: Optional[float]) -> float:
        if reference is None or not reference > 0:
            return value
        low, high = reference / 10, reference * 10
        if not math.isfinite(value) or not low <= value <= high:
            clamped.append(f"{name} {value:.3g} (shipped {reference:.3g})")
            return min(max(value, low), high) if math.isfinite(value) else reference
        return value

    out: Dict[str, object] = {}
    for name, value in constants.items():
        reference = getattr(shipped, name, None)
        if isinstance(value, dict):  # per backend; or per cpp algorithm, a ratio to the shipped model (1)
            refs = reference or {}
            out[name] = {b: bound(f"{name}[{b}]", v, refs.get(b, refs.get("default", 1.0))) for b, v in value.items()}
        else:
            out[name] = bound(name, value, reference)
    if clamped:
        warnings.warn(f"lfma-calibrate ({device_type}): fits more than 10x off the shipped table were clamped to that "
                      f"bound: {', '.join(clamped)}; run it again on a quiet machine", UserWarning, stacklevel=3)
    return out


def calibrate(device: str = "cpu", *, quick: bool = False, path: Optional[str] = None) -> Dict[str, object]:
    """Time and fit this machine's cost constants for ``device`` (``"cpu"``, ``"cuda"`` or ``"cuda:N"``) and
    write them to the per-machine file the planner reads, which this process then uses too (unless
    ``LFMA_CALIBRATION=off``). ``path`` writes them there instead, a file the planner does not read
    (to keep or compare). Returns what was written, with its ``path``."""
    from lfma_kernels.ops import calibration, planner

    target = torch.device(device)
    if target.type not in ("cpu", "cuda"):
        raise ValueError(f"calibrate: device must be 'cpu' or 'cuda', got {device!r}")
    if target.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"calibrate(device={device!r}): no CUDA GPU is available")
    start = time.perf_counter()
    with torch.no_grad(), (torch.cuda.device(target) if target.type == "cuda" else contextlib.nullcontext()):
        constants = _bounded(_measure(target, quick), planner.TABLES[target.type], target.type)
        key = calibration.machine_key(target.type)
    data = {"format": calibration.FORMAT, "key": key, "device": target.type,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "quick": quick,
            "seconds": round(time.perf_counter() - start, 1), "constants": constants}
    path = path or calibration.path_for(target.type)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = f"{path}.{os.getpid()}.tmp"
    with open(partial, "w") as f:  # then renamed: a reader never sees half a file
        json.dump(data, f, indent=1)
    os.replace(partial, path)
    planner.reload_calibration()
    return {**data, "path": path}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="lfma-calibrate", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="one shape, fewer repeats (under 30 s on a CPU)")
    parser.add_argument("--output", help="write the file here instead of the per-machine cache file")
    parser.add_argument("--copy", help="also write a copy here (benchmarks/gpu_check.py keeps one with its results)")
    args = parser.parse_args(argv)
    data = calibrate(args.device, quick=args.quick, path=args.output)
    if args.copy:
        os.makedirs(os.path.dirname(os.path.abspath(args.copy)), exist_ok=True)
        with open(args.copy, "w") as f:
            json.dump({k: v for k, v in data.items() if k != "path"}, f, indent=1)
    from lfma_kernels.ops import planner
    shipped = planner.TABLES[data["device"]]
    lines: List[str] = [f"lfma-calibrate: {data['key']}", f"  {data['seconds']} s, written to {data['path']}"]
    for name, value in data["constants"].items():
        old = getattr(shipped, name, None)
        if isinstance(value, dict):
            for key, v in value.items():
                ref = 1.0 if old is None else old.get(key, old.get("default"))
                lines.append(f"  {name}[{key}] = {v:.3g} (shipped {ref:.3g})")
        else:
            lines.append(f"  {name} = {value:.3g} (shipped {old:.3g})" if old is not None else f"  {name} = {value:.3g}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
