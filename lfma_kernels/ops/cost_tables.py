"""The planner's cost tables: estimated seconds for each path on one device kind, and where each
constant comes from. The CPU table was measured on the project's 2-core CPU (each constant cites its
command and, where recorded, its benchmarks/RESULTS.md section); the CUDA table is an estimate until a
GPU run measures it (``make gpu-check``, ``lfma-calibrate --device cuda``). :mod:`.planner` decides with
them; :mod:`.calibration` lays a machine's own measurements over them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Tuple

import torch

__all__ = ["CostTable", "CPU", "CUDA", "TABLES"]

# ---------------------------------------------------------------------------------------------
# cost tables
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CostTable:
    """Estimated seconds for each path, on one device kind. Only the comparisons inside one decision
    matter (separable vs fft, dense vs gemm vs fft); the seconds make :class:`Plan` readable."""
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
    sources: Mapping[str, str] = field(default_factory=dict)

    def order(self, dtype: torch.dtype) -> Tuple[str, ...]:
        return self.float64_backends if dtype == torch.float64 else self.backends

    def batch_pair(self, backend: str) -> float:
        return self.batch_pair_s.get(backend, self.batch_pair_s["default"])

    def delta_pair(self, backend: str) -> float:
        return self.delta_pair_s.get(backend, self.delta_pair_s.get("default", self.batch_pair_s["default"]))


# One float32 GEMM multiply-add on the project's 2-core CPU (AMD EPYC, torch 2.13 with MKL, 2 threads):
# a frozen 768x768 layer's training step (forward + dL/dx: 2 * 4096 * 768^2 multiply-adds) took
# 50-51 ms, 1024x1024 97-101 ms: 10.4-11.5 ps. RESULTS.md section "layer cpu float32", "frozen" column
# (python benchmarks/bench_layer.py --ratios 0.0001,0.0003,0.0005,0.0016,0.05 --output
# benchmarks/RESULTS.md, 2026-11-27). It sets the scale: the other CPU constants were measured as
# multiples of it, which is how they are written below.
_CPU_MAC_S = 11e-12

CPU = CostTable(
    device="cpu",
    status="measured on the project's 2-core CPU (AMD EPYC, torch 2.13, float32)",
    # The cpp kernels (dW, W + dW, dL/dcoeffs) were as fast as or faster than the torch backend at every
    # shape and K measured (python benchmarks/bench_cpp.py --crossover, 64x64 .. 4096x4096 and 768x3072 /
    # 3072x768, K = 1 .. 29491, 2026-11-26; printed, not in RESULTS.md): torch/cpp from 1.0 (4096x4096,
    # K <= 64) through 1.5-3 at the paper's shapes to 3-10 on small layers. No crossover: cpp whenever it
    # loads, in float64 too (the C++ kernels accumulate in double).
    backends=("cpp", "torch"),
    float64_backends=("cpp", "torch"),
    gemm_mac_s=_CPU_MAC_S,
    # irfft2 overtakes the separable product at K ~ 70 for 768x768, ~100 for 1024x1024, ~150 for 768x3072
    # and ~350 for 4096x4096 (python benchmarks/crossover.py, 2026-11-26; printed, not in RESULTS.md): the
    # FFT costs 7.3 GEMM multiply-adds per point * log2(points) at 768x768, growing like points^0.4 (large
    # transforms fall out of cache while the GEMM does not); rfft2 + gather is 3.2x cheaper than irfft2.
    irfft2_s=7.3 * _CPU_MAC_S,
    fft_size_exponent=0.4,
    rfft2_speedup=3.2,
    # The gemm path's skinny GEMMs (x B, g A: 2K columns) with their tables and [tokens, K] products ran at
    # 1.6-2.8x a square GEMM's cost per multiply-add (K = 32..104); the two row FFTs of 768x768, 1024x1024
    # and 768x3072 layers at 256-4096 tokens cost 6.4-8.2 multiply-adds per token * d * log2(d)
    # (python benchmarks/bench_cpp.py --batch-grad --shapes 768x768,1024x1024,768x3072 --ks
    # 16,32,58,104,176,943,5000,29491 --token-counts 256,1024,4096 --rounds 9 --min-time 0.3, AMD EPYC,
    # 2026-11-27). Re-measured on the Intel Xeon after the batch kernel took its FFTs by cache-sized token
    # blocks (RESULTS.md section "cpp batch-grad cpu", same command, 2026-11-30): the fft path's small-K
    # times give 6.2-9.4 of that machine's GEMM multiply-adds per token * d * log2(d), so row_fft_s holds;
    # the table picks the fastest path, or one within 9%, in 67 of the 72 cells. The five others are K = 16
    # at 256-1024 tokens, where the skinny GEMMs cost 3-8 multiply-adds there (2 at 4096 tokens) and the
    # gemm path is picked at 1.4-2.9x the fft path's time; no paper selection has K that small at these
    # shapes (0.0001 of 768x768 is K = 58).
    batch_gemm_mac_s=2.0 * _CPU_MAC_S,
    row_fft_s=7.0 * _CPU_MAC_S,
    # bitsandbytes' dequantize_4bit of a 768x768 nf4 weight took 0.13 ms on the Intel machine (the issue's
    # figure) and 0.28 ms on the AMD one with the other core busy: 0.2-0.5 ns per entry. Its AVX512-BF16
    # kernel (eval without gradients) ran 1024 tokens of a 768x768 nf4 layer in 5.3 ms against 9.6 ms for
    # the float32 GEMM (AMD EPYC, 2026-12-03, a loop of 10 calls; not in RESULTS.md).
    dequantize_s=30 * _CPU_MAC_S,
    quantized_kernel_fraction=0.55,
    # x dW^T by row FFTs at 768x768 and 1024 tokens (AMD EPYC, 2026-12-03, a loop of 10 calls; not in
    # RESULTS.md): lfma_ext::delta_rows 1.4 / 1.9 / 3.1 ms at K = 58 / 176 / 943 (its row FFTs as
    # row_fft_s, then ~170 multiply-adds per token and frequency: two gathered complex products and
    # scatters); delta_kernels.delta_rows (torch) 4.1 / 6.2 / 12.5 ms (~1100: [K, tokens] temporaries).
    delta_pair_s={"default": 1100 * _CPU_MAC_S, "cpp": 170 * _CPU_MAC_S},
    # F.linear over a 768x768 / 2304x768 / 3072x768 float32 weight took 56 / 127 / 172 us for one row
    # (8-9 multiply-adds per weight entry) and 203 / 553 / 949 us for 16 (AMD EPYC, 2026-12-03, median of
    # 30 calls): a GEMM call of its own for a few rows costs ~15 multiply-adds per entry before its own.
    weight_pass_s=15 * _CPU_MAC_S,
    batch_pair_s={
        # torch_kernels.coeff_grad_batch_fft (every backend without a batch kernel of its own): a gather of
        # scattered rows and a batch of tiny products, 5-14 ns per (token, frequency) pair (768x768 at 4096
        # tokens: fft path 7-10 ms at K = 176, 17-45 ms at K = 943, dense 25 ms; python
        # benchmarks/bench_cpp.py --batch-grad, 2026-11-26, before the C++ kernel existed; not in RESULTS.md).
        "default": 1000 * _CPU_MAC_S,
        # lfma_ext::coeff_grad_batch: 30-80 multiply-adds per pair beyond its row FFTs on the AMD machine
        # (a gathered complex product and the token sums, operands in L1); 9-385 on the Intel one with the
        # SSE2 products (the section's "pair" column at K >= 943, noisy: the difference of two times). The
        # choice against the dense G at large K is right in every cell but two within 9%.
        "cpp": 60 * _CPU_MAC_S,
    },
    sources={"cpp algorithms": "csrc/cpu_plan.cpp (lfma_ext::choose_algo), python benchmarks/bench_cpp.py "
                               "--crossover, 2026-11-26"},
)

# NOT MEASURED: no GPU was available when these were written. Each GPU run of
# `python3 benchmarks/gpu_check.py OUT` (make gpu-check) measures them and writes OUT/gpu_constants.json;
# to apply a run, edit this table by hand from that file:
#   triton_mac_s            = 1 / triton_backend.triton.triton_macs_per_s
#   triton_fft_fixed_s      = triton_backend.triton.triton_fft_fixed_s      (bench_gpu.py --crossover)
#   triton_fft_grad_fixed_s = triton_backend.triton.triton_fft_grad_fixed_s
#   triton_fft_s            = triton_backend.triton.triton_fft_s
#   irfft2_s                = torch_backend.torch.irfft2_macs * (this table's gemm_mac_s)
#                                                                    (crossover.py --device cuda)
#   fft_size_exponent       = torch_backend.torch.fft_size_exponent
#   rfft2_speedup           = torch_backend.torch.rfft2_speedup
# and check the backward against triton_backend.coeff_grad_paths (measured dense / gemm / fft times and
# what backward_path picked); where it picked wrong, refit batch_gemm_mac_s, row_fft_s and batch_pair_s
# (seconds, like gemm_mac_s) to those times. Then set `status` to the GPU and date, and cite the
# RESULTS_GPU.md sections; tests/test_planner.py's CUDA expectations may need the new crossovers.
# The triton entries are back-of-envelope figures for an H100/H200-class GPU. The torch-backend and
# backward entries are the CPU table's multiples (so the torch backend on CUDA and every backward still
# choose exactly as on the CPU), scaled by the fused kernel's assumed multiply-add time.
_GPU_MAC_S = 1 / 20e12  # ESTIMATE: float32 IEEE tl.dot on CUDA cores at ~60% of the 33.5 TMAC/s FP32 peak

CUDA = CostTable(
    device="cuda",
    status="ESTIMATES for an H100/H200-class GPU, not measured (see the comment above the table)",
    # triton, then the CUDA kernels, then torch. The CUDA kernels only evaluate the separable product
    # (2K*d_out*d_in work, no FFT path), so auto takes them only where the torch backend would run that
    # product as well. float64: Triton has no float64 tl.dot on NVIDIA GPUs (triton-lang/triton#5483), so
    # its kernels fall back to broadcast products on CUDA cores (exact, slow); the torch backend runs
    # cuBLAS DGEMM / cuFFT in float64. Not measured otherwise.
    backends=("triton", "cuda", "torch"),
    float64_backends=("torch",),
    gemm_mac_s=_GPU_MAC_S,
    irfft2_s=7.3 * _GPU_MAC_S,        # the CPU multiple, not measured on a GPU
    fft_size_exponent=0.4,            # the CPU value, not measured on a GPU
    rfft2_speedup=3.2,                # the CPU value, not measured on a GPU
    batch_gemm_mac_s=2.0 * _GPU_MAC_S,  # the CPU multiple, not measured on a GPU
    row_fft_s=7.0 * _GPU_MAC_S,         # the CPU multiple, not measured on a GPU
    dequantize_s=30 * _GPU_MAC_S,       # the CPU multiple, not measured on a GPU
    delta_pair_s={"default": 1100 * _GPU_MAC_S},  # the CPU multiple, not measured on a GPU
    weight_pass_s=20 * _GPU_MAC_S,  # ESTIMATE: a float32 weight read at ~4 TB/s, ~1 ps per entry
    quantized_kernel_fraction=0.1,      # ESTIMATE: bitsandbytes' 4-bit GEMV reads 1/8 of a float32 weight
    batch_pair_s={"default": 1000 * _GPU_MAC_S, "cpp": 60 * _GPU_MAC_S},  # the CPU multiples
    # The fused kernel: 2*K*d_out*d_in multiply-adds in float32 IEEE tl.dot at ~20 T multiply-adds/s. The
    # FFT path: ~25 us fixed for the scatter's half-dozen launches plus irfft2 (~20 us for rfft2 and the
    # gather of the gradient path), and ~0.33 ps per point per log2(points) for cuFFT itself (memory
    # bound: ~135 us for a 4096x4096 irfft2). With these the kernel builds dW below K = 487 at 768x768,
    # 304 at 1024x1024, 175 at 768x3072 and 3072x768, 94 at 4096x4096 (gradient: 402, 256, 154, 91).
    triton_mac_s=_GPU_MAC_S,
    triton_fft_fixed_s=25e-6,
    triton_fft_grad_fixed_s=20e-6,
    triton_fft_s=0.33e-12,
)

TABLES: Mapping[str, CostTable] = {"cpu": CPU, "cuda": CUDA}
