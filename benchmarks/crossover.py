"""Where the torch backend's separable product stops beating scatter + irfft2 (and the same for
the coefficient gradient). Prints median milliseconds per path and the measured crossover K;
the torch-backend entries of the planner's cost table for the device (lfma_kernels/ops/cost_tables.py)
come from this table, and the last two columns show what the planner picks (sep or fft) for dW and
for the gradient. Then the table entries that reproduce the measured crossovers (the model: the
FFT wins once 2K > c(N) * log2(N), c(N) = irfft2_macs * (N / 768^2)^fft_size_exponent, divided by
rfft2_speedup for the gradient; the table holds irfft2_s = irfft2_macs * gemm_mac_s).

    python benchmarks/crossover.py [--device cuda] [--json PATH]
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from typing import Callable, Dict, List, Optional, Sequence

import torch

from costfit import crossover_k, describe, fit_power, write_json
from lfma_kernels.ops import dispatch, planner, torch_kernels
from timing import median_ms

KS = [4, 8, 16, 24, 32, 48, 64, 96, 128, 176, 256, 384]
PATHS = ("sep", "fft", "gsep", "gfft")


def time_paths(fns: Dict[str, Callable[[], object]], device: str) -> Dict[str, float]:
    """Median ms of each function. On a GPU every timed call is followed by a synchronisation:
    the kernels run asynchronously, and without it the timer measures only their launch."""
    return {name: median_ms(fn, device=device, min_time_s=0.05) for name, fn in fns.items()}


def measure(shape: Sequence[int], k: int, g: torch.Tensor, device: str) -> Dict[str, float]:
    """The four paths (dW: separable, FFT; gradient from G: separable, FFT) at one shape and K."""
    rows = torch.randint(0, shape[0], (k,), device=device)
    cols = torch.randint(0, shape[1], (k,), device=device)
    c = torch.randn(k, 2, device=device)
    return time_paths({
        "sep": lambda: torch_kernels.delta_weight_separable(c, rows, cols, shape, 1.0),
        "fft": lambda: torch_kernels.delta_weight_fft(c, rows, cols, shape, 1.0),
        "gsep": lambda: torch_kernels.coeff_grad_separable(g, rows, cols, 1.0),
        "gfft": lambda: torch_kernels.coeff_grad_fft(g, rows, cols, 1.0),
    }, device)


def constants(per_shape: Dict[str, dict], mac_s: List[float]) -> Dict[str, Optional[float]]:
    """The planner's torch-backend entries fitted to the measured crossovers: c(N) = 2K*/log2(N) per
    shape, where the crossover was bracketed ("~"); for the gradient, c(N) / rfft2_speedup; and the
    separable product's time per multiply-add (gemm_mac_s), which turns c into seconds."""
    c_dw, speedups = [], []
    for spec, entry in per_shape.items():
        n = math.prod(int(s) for s in spec.split("x"))
        (rel, k), (grel, gk) = entry["dW"], entry["grad"]
        if rel == "~":
            c_dw.append((n, 2 * k / math.log2(n)))
            if grel == "~":
                speedups.append(k / gk)
    c_768, p = fit_power(c_dw, 768 * 768) if c_dw else (None, None)
    gemm = statistics.median(mac_s) if mac_s else None
    return {"irfft2_macs": c_768, "fft_size_exponent": p,
            "rfft2_speedup": statistics.median(speedups) if speedups else None, "gemm_mac_s": gemm,
            "irfft2_s": None if c_768 is None or gemm is None else c_768 * gemm}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shapes", default="768x768,1024x1024,768x3072,4096x4096")
    parser.add_argument("--json", metavar="PATH", help="also write the times, crossovers and constants here")
    args = parser.parse_args(argv)
    print(f"{'shape':>10} {'K':>5} {'sep ms':>8} {'fft ms':>8} {'gsep ms':>8} {'gfft ms':>8}  dW  grad")
    per_shape: Dict[str, dict] = {}
    rows: List[dict] = []
    mac_s: List[float] = []  # the separable product's seconds per multiply-add, where it is large enough to time
    for spec in args.shapes.split(","):
        shape = tuple(int(s) for s in spec.split("x"))
        g = torch.randn(shape, device=args.device)
        times: Dict[str, List[float]] = {p: [] for p in PATHS}
        for k in KS:
            ms = measure(shape, k, g, args.device)
            for p in PATHS:
                times[p].append(ms[p])
            if k >= 64:
                mac_s.append(ms["sep"] * 1e-3 / (2 * k * shape[0] * shape[1]))
            device_type = torch.device(args.device).type
            decided = dispatch.decide("torch", device_type, torch.float32, k, shape)
            pick = "sep" if decided.dw == "separable" else "fft"
            gpick = "sep" if decided.grad == "separable" else "fft"
            rows.append({"shape": spec, "k": k, **{f"{p}_ms": ms[p] for p in PATHS}, "model_dW": pick,
                         "model_grad": gpick})
            print(f"{spec:>10} {k:>5} {ms['sep']:8.3f} {ms['fft']:8.3f} {ms['gsep']:8.3f} {ms['gfft']:8.3f}"
                  f"  {pick:>3}  {gpick:>4}", flush=True)
        per_shape[spec] = {"dW": crossover_k(KS, times["sep"], times["fft"]),
                           "grad": crossover_k(KS, times["gsep"], times["gfft"])}
    print("\nmeasured crossover K (the FFT is faster from there on):")
    for spec, entry in per_shape.items():
        print(f"  {spec:>10}: dW {describe(entry['dW'])}, grad {describe(entry['grad'])}")
    fitted = constants(per_shape, mac_s)
    table = planner.table_for(torch.device(args.device).type).device
    print(f"entries of the planner's {table!r} table (lfma_kernels/ops/cost_tables.py) that reproduce them:")
    for name, value in fitted.items():
        print(f"  {name} = {'n/a (no bracketed crossover)' if value is None else f'{value:.3g}'}")
    if args.json:
        write_json(args.json, {"script": "benchmarks/crossover.py", "device": args.device, "planner_table": table,
                               "torch": fitted, "crossover_k": per_shape, "times": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
