"""The planner's cost tables: estimated seconds for each path on one device kind, and where each
constant comes from. The CPU table was measured on the project's 2-core CPU (the measurements:
benchmarks/RESULTS.md, "Where the planner's constants come from"); the CUDA table is an estimate until a
GPU run measures it (``make gpu-check``, ``lfma-calibrate --device cuda``). :mod:`.planner` decides with
them; :mod:`.calibration` lays a machine's own measurements over them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Mapping, Optional, Tuple

import torch

__all__ = ["CompiledCpuCosts", "CostTable", "CPU", "CUDA", "TABLES"]


@dataclass(frozen=True)
class CompiledCpuCosts:
    """The C++ CPU kernels' three algorithms (:mod:`.backends.cpp`). Each pair is (reading dL/dcoeffs
    from G, building dW); seconds, or exponents where named so."""
    mac_s: Tuple[float, float]           # separable: per multiply-add of 2K * d_out * d_in
    term_row_s: Tuple[float, float]      # hybrid: per distinct term and row ...
    column_row_s: Tuple[float, float]    # ... and per touched column and row (its transpose)
    row_fft_s: Tuple[float, float]       # hybrid: d_out row FFTs of length d_in, per d_out * d_in * log2(d_in)
    row_fft_growth: Tuple[float, float]  # exponent: x (entries / cache_entries) ** this beyond the caches
    fft2_s: Tuple[float, float]          # one 2-D FFT, per d_out * d_in * log2(d_out * d_in)
    fft2_growth: Tuple[float, float]     # exponent, as row_fft_growth
    cache_entries: float                 # weight entries past which FFTs slow down
    loop_call_s: float                   # fixed costs per call (tables, allocations, FFT plans) ...
    gemm_call_s: float
    hybrid_call_s: float
    fft2_call_s: float
    loop_max_k: Tuple[int, int]          # the separable product runs as fused loops up to this K (csrc kSepLoopMaxK)

    def scaled(self, factors: Mapping[str, float]) -> "CompiledCpuCosts":
        """Each algorithm's costs ("separable", "hybrid", "fft") times its factor: a machine that runs it that
        many times slower (exponents and thresholds unchanged)."""
        s, h, f = (factors.get(name, 1.0) for name in ("separable", "hybrid", "fft"))
        pair = lambda p, x: (p[0] * x, p[1] * x)  # noqa: E731
        return dataclasses.replace(
            self, mac_s=pair(self.mac_s, s), loop_call_s=self.loop_call_s * s, gemm_call_s=self.gemm_call_s * s,
            term_row_s=pair(self.term_row_s, h), column_row_s=pair(self.column_row_s, h),
            row_fft_s=pair(self.row_fft_s, h), hybrid_call_s=self.hybrid_call_s * h,
            fft2_s=pair(self.fft2_s, f), fft2_call_s=self.fft2_call_s * f)


@dataclass(frozen=True)
class CostTable:
    """Estimated seconds for each path, on one device kind. Only the comparisons inside one decision
    matter (separable vs fft, dense vs gemm vs fft); the seconds make a :class:`.decision.Decision` readable."""
    device: str
    status: str                        # "measured" or what is estimated
    backends: Tuple[str, ...]          # auto's order of preference
    float64_backends: Tuple[str, ...]  # ... for float64 inputs
    # torch backend: dW (and dL/dcoeffs from G) by the separable product or an FFT
    gemm_mac_s: float                  # one multiply-add of a float32 GEMM (separable product, G = g^T x)
    irfft2_s: float                    # scatter + irfft2, per point * log2(points) of a 768x768 weight ...
    fft_size_exponent: float           # ... times (points / 768^2) ** this (large FFTs fall out of cache)
    rfft2_speedup: float               # rfft2 + gather (the gradient from G) is this much cheaper
    # a layer's backward: dL/dcoeffs from G, or one of the batch paths that never form it
    batch_gemm_mac_s: float            # the gemm path's skinny GEMMs (2K columns), per multiply-add
    row_fft_s: float                   # the fft path's row FFTs, per token * d * log2(d)
    batch_pair_s: Mapping[str, float]  # the fft path's gather + reduce per (token, frequency), by backend
    # triton backend: fused kernel vs the torch backend's FFT path (None: no triton on this device)
    triton_mac_s: Optional[float] = None          # the fused kernel, per multiply-add of 2K*d_out*d_in
    triton_fft_fixed_s: Optional[float] = None    # scatter + irfft2: launches, fixed
    triton_fft_grad_fixed_s: Optional[float] = None  # rfft2 + gather: launches, fixed
    triton_fft_s: Optional[float] = None          # cuFFT, per point * log2(points)
    # beside a quantized base: dequantizing W, per weight entry; and a base kernel that reads the quantized
    # weight directly (no dense W), as a fraction of a dense float32 GEMM's time (what the fold path
    # gives up by running its own GEMM instead)
    dequantize_s: float = 0.0
    quantized_kernel_fraction: float = 1.0
    # the delta path's rows way: gathers, products and scatters per (token, frequency), by backend
    delta_pair_s: Mapping[str, float] = field(default_factory=dict)
    # a mixed-adapter batch's fold: one more GEMM call over a whole weight for one adapter's rows, per
    # weight entry beyond its multiply-adds (a GEMM over few rows is bound by reading the weight)
    weight_pass_s: float = 0.0
    # the C++ CPU kernels' algorithms (None: not on this device kind)
    cpp: Optional[CompiledCpuCosts] = None

    def order(self, dtype: torch.dtype) -> Tuple[str, ...]:
        return self.float64_backends if dtype == torch.float64 else self.backends

    def batch_pair(self, backend: str) -> float:
        return self.batch_pair_s.get(backend, self.batch_pair_s["default"])

    def delta_pair(self, backend: str) -> float:
        return self.delta_pair_s.get(backend, self.delta_pair_s.get("default", self.batch_pair_s["default"]))


# Every CPU constant is a multiple of one float32 GEMM multiply-add on the project's 2-core CPU, the scale
# the others were measured in. The measurements, their commands, dates and machines: benchmarks/RESULTS.md,
# "Where the planner's constants come from" (from benchmarks/bench_layer.py, benchmarks/crossover.py,
# benchmarks/bench_cpp.py --crossover and --batch-grad).
_CPU_MAC_S = 11e-12


def _gemm_multiples(mac_s: float) -> dict:
    """The constants measured on the CPU as multiples of its GEMM multiply-add, at the GEMM speed ``mac_s``: the
    CPU table's, and the CUDA table's until a GPU measures them (so that the torch backend on CUDA and every
    backward choose as on the CPU)."""
    return dict(
        gemm_mac_s=mac_s,
        # The FFT grows like points^0.4 per point*log2(points) (large transforms fall out of cache, the GEMM
        # does not); irfft2 overtakes the separable product at K ~ 70 for 768x768.
        irfft2_s=7.3 * mac_s, fft_size_exponent=0.4, rfft2_speedup=3.2,
        batch_gemm_mac_s=2.0 * mac_s, row_fft_s=7.0 * mac_s, dequantize_s=30 * mac_s,
        # torch's rows way and batch path build [K, tokens] temporaries; the C++ kernels keep theirs in L1
        delta_pair_s={"default": 1100 * mac_s, "cpp": 170 * mac_s},
        batch_pair_s={"default": 1000 * mac_s, "cpp": 60 * mac_s},
    )


CPU = CostTable(
    device="cpu",
    status="measured on the project's 2-core CPU (AMD EPYC, torch 2.13, float32)",
    # cpp was as fast as or faster than torch at every shape and K measured: cpp whenever it loads, float64 too.
    backends=("cpp", "torch"),
    float64_backends=("cpp", "torch"),
    **_gemm_multiples(_CPU_MAC_S),
    quantized_kernel_fraction=0.55,   # bitsandbytes' AVX512-BF16 4-bit kernel against a float32 GEMM
    # a GEMM over a few rows is bound by reading the weight: the extra pass a mixed batch's fold costs
    weight_pass_s=15 * _CPU_MAC_S,
    # The C++ kernels' three algorithms, fitted to benchmarks/bench_cpp.py --crossover (RESULTS.md, "The cpp
    # backend's algorithms").
    cpp=CompiledCpuCosts(
        mac_s=(0.012e-9, 0.015e-9), term_row_s=(0.35e-9, 0.3e-9), column_row_s=(1.0e-9, 1.2e-9),
        row_fft_s=(0.062e-9, 0.075e-9), row_fft_growth=(0.47, 0.60), fft2_s=(0.065e-9, 0.100e-9),
        fft2_growth=(0.31, 0.57), cache_entries=2.0 ** 21, loop_call_s=12e-6, gemm_call_s=25e-6,
        hybrid_call_s=18e-6, fft2_call_s=20e-6, loop_max_k=(4, 2)),
)

# NOT MEASURED: no GPU was available when these were written (RESULTS.md, "CUDA table"). A GPU run of
# `make gpu-check` calibrates the machine it runs on (lfma-calibrate --quick) and measures the rest with
# bench_gpu.py --crossover and crossover.py --device cuda; edit this table from its gpu_constants.json,
# then set `status` to the GPU and date.
_GPU_MAC_S = 1 / 20e12  # ESTIMATE: float32 IEEE tl.dot on CUDA cores at ~60% of the 33.5 TMAC/s FP32 peak

CUDA = CostTable(
    device="cuda",
    status="ESTIMATES for an H100/H200-class GPU, not measured (see the comment above the table)",
    # The CUDA kernels only evaluate the separable product, so auto takes them only where the torch backend
    # would run that product too. float64: Triton has no float64 tl.dot on NVIDIA GPUs
    # (triton-lang/triton#5483), so the torch backend's cuBLAS DGEMM / cuFFT runs it.
    backends=("triton", "cuda", "torch"),
    float64_backends=("torch",),
    **_gemm_multiples(_GPU_MAC_S),
    weight_pass_s=20 * _GPU_MAC_S,      # ESTIMATE: a float32 weight read at ~4 TB/s, ~1 ps per entry
    quantized_kernel_fraction=0.1,      # ESTIMATE: bitsandbytes' 4-bit GEMV reads 1/8 of a float32 weight
    # ESTIMATES: the fused kernel at ~20 T multiply-adds/s; the FFT path's launches and cuFFT (memory bound)
    triton_mac_s=_GPU_MAC_S,
    triton_fft_fixed_s=25e-6,
    triton_fft_grad_fixed_s=20e-6,
    triton_fft_s=0.33e-12,
)

TABLES: Mapping[str, CostTable] = {"cpu": CPU, "cuda": CUDA}
