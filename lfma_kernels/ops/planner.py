"""Every path choice of the package, in one place: which backend a call runs on, how that backend
builds ``dW`` and reads ``dL/dcoeffs`` from ``G = dL/d(dW)``, and how a layer's backward gets
``dL/dcoeffs`` (docs/math.md). :func:`plan` answers "what runs for this call, and why" with the
reason each alternative was refused; the backends ask :func:`dw_algorithm`, :func:`grad_algorithm`
and :func:`backward_path` at call time, :mod:`.dispatch` asks :func:`choose_backend`.

Cost constants are data: one :class:`CostTable` per device kind (:data:`CPU`, :data:`CUDA`), every
entry in seconds, each citing the command and the ``benchmarks/RESULTS.md`` section it came from.
The C++ CPU kernels choose among their three algorithms themselves (the choice needs the count of
distinct terms and columns of the K frequencies; its constants, in nanoseconds, are in
``csrc/cpu_plan.cpp``); the planner reports that choice (``lfma_ext::choose_algo``) and
:func:`force` overrides it like every other.

:func:`force` is how tests and benchmarks pin a path (``with planner.force(dw="fft"): ...``); a
path name it does not know is a ``ValueError`` at the call.

This module imports nothing from the rest of the package: facts about backends (available here? on
this device?) are passed in by :mod:`.dispatch`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch

from . import calibration

__all__ = [
    "CostTable", "CPU", "CUDA", "TABLES", "table_for", "calibrated", "using", "reload_calibration", "DW_ALGORITHMS", "BACKWARD_PATHS", "ALGORITHMS_OF",
    "force", "forced", "forced_delta", "dw_algorithm", "grad_algorithm", "backward_path", "native_algorithm", "dw_costs",
    "grad_costs", "backward_costs", "DELTA_PATHS", "delta_costs", "delta_path", "mixed_costs", "mixed_path", "choose_backend", "Plan", "Refusal",
    "QuantizedBase", "plan",
]

# Ways to build dW (and, the same names, to read dL/dcoeffs from G): the rank-2K separable product
# (torch: a GEMM with exact-phase tables; triton: its fused kernel; cpp: a GEMM or fused loops; cuda:
# its tiled kernel), the C++ hybrid (rows direct, then row FFTs), or one 2-D (real) FFT.
DW_ALGORITHMS: Tuple[str, ...] = ("separable", "hybrid", "fft")
# Ways a layer's backward gets dL/dcoeffs: from G = g^T x ("dense"), or without forming G through
# the phase tables ("gemm") or one real FFT of every token row of x and g ("fft").
BACKWARD_PATHS: Tuple[str, ...] = ("dense", "gemm", "fft")
# Ways a layer beside a quantized base gets its output (docs/math.md, the delta path): dequantize W into a transient
# dense copy, fold dW into it and run one GEMM ("fold"); or the base layer's own output plus x dW^T by
# row FFTs ("rows"), the exact-phase tables ("separable") or a dense dW and a second GEMM ("dense").
DELTA_PATHS: Tuple[str, ...] = ("fold", "rows", "separable", "dense")
# What each fast backend can run. The reference is the oracle: always the paper's dense spectrum
# and ifft2, autograd through it; the planner does not choose for it.
ALGORITHMS_OF: Mapping[str, Tuple[str, ...]] = {
    "torch": ("separable", "fft"),
    "triton": ("separable", "fft"),        # fft: the torch backend's scatter + irfft2 (cuFFT)
    "cpp": ("separable", "hybrid", "fft"),
    "cuda": ("separable",),
}
# What each (backend, algorithm) runs: (for dW, for dL/dcoeffs from G).
_DESCRIPTIONS: Mapping[Tuple[str, str], Tuple[str, str]] = {
    ("torch", "separable"): ("rank-2K GEMM of exact-phase cos/sin tables", "G times the phase tables (a GEMM)"),
    ("torch", "fft"): ("scatter into a half spectrum, one irfft2", "one rfft2 of G, a gather"),
    ("triton", "separable"): ("fused Triton kernel (phase tiles, tl.dot)", "fused partial DFT of G (tl.dot)"),
    ("triton", "fft"): ("the torch backend's scatter + irfft2 (cuFFT)", "the torch backend's rfft2 of G + gather"),
    ("cpp", "separable"): ("rank-2K product (MKL GEMM; fused loops for K <= 2)", "G times the phase tables (GEMM; "
                                                                                 "fused loops for K <= 4)"),
    ("cpp", "hybrid"): ("rows direct from the K frequencies, then row real FFTs", "row real FFTs of G, then one "
                                                                                  "sum per term"),
    ("cpp", "fft"): ("scatter into a half spectrum, one 2-D real FFT", "one 2-D real FFT of G, a gather"),
    ("cuda", "separable"): ("tiled CUDA kernel (cos/sin tables in shared memory)", "CUDA reduction of G against the "
                                                                                   "phases"),
}
_PATH_DESCRIPTIONS: Mapping[str, str] = {
    "dense": "G = g^T x, then dL/dcoeffs from G",
    "gemm": "P = g A, Q = x B through the phase tables; no G",
    "fft": "a real FFT of each token row of g and x, K products per token; no G",
}
_DELTA_DESCRIPTIONS: Mapping[str, str] = {
    "fold": "dequantize W into a transient copy, fold dW in, one GEMM (dequantized again in the backward)",
    "rows": "the base layer's output + x dW^T by row FFTs of x and one inverse FFT per token",
    "separable": "the base layer's output + x dW^T through the exact-phase tables (LoRA-like)",
    "dense": "the base layer's output + x dW^T with a dense dW and a second GEMM",
}


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
_ACTIVE: Dict[str, CostTable] = {}  # per device kind: the shipped table with this machine's calibration


def table_for(device_type: str) -> CostTable:
    """The table of a device kind (devices without one of their own, mps or xpu, use the CPU's), with
    this machine's calibration laid over it when ``lfma-calibrate`` wrote one (:mod:`.calibration`);
    read once per process."""
    table = _ACTIVE.get(device_type)
    if table is None:
        if torch.compiler.is_compiling():  # no file reads or global writes while Dynamo traces
            return TABLES.get(device_type, CPU)
        table = _ACTIVE[device_type] = calibrated(TABLES.get(device_type, CPU), calibration.load(device_type))
    return table


def calibrated(table: CostTable, data: Optional[Mapping]) -> CostTable:
    """``table`` with a calibration's constants (``data``: :func:`.calibration.load`'s) in place of its own;
    per-backend entries (``batch_pair_s``, ``delta_pair_s``) are merged, so a backend not measured keeps
    the shipped figure."""
    if not data:
        return table
    fitted = calibration.constants_of(data, table)
    if not fitted:
        return table
    # Constants the calibration does not measure (seconds: the FFT paths' and triton's when not on a GPU,
    # dequantizing) move with this machine's GEMM speed, so that every comparison stays on one scale.
    scale = fitted.get("gemm_mac_s", table.gemm_mac_s) / table.gemm_mac_s
    for name in _SCALED:
        if name not in fitted and getattr(table, name) is not None:
            fitted[name] = getattr(table, name) * scale
    for name in ("batch_pair_s", "delta_pair_s"):
        shipped = {b: v * scale for b, v in getattr(table, name).items()}
        fitted[name] = {**shipped, **fitted.get(name, {})}
    status = f"calibrated on this machine {data.get('date', '')} ({data['path']}); shipped: {table.status}"
    return dataclasses.replace(table, status=status, **fitted)


# CostTable fields in seconds (per unit of work): the ones scaled with a calibration's GEMM speed.
_SCALED = ("irfft2_s", "batch_gemm_mac_s", "row_fft_s", "triton_mac_s", "triton_fft_fixed_s",
           "triton_fft_grad_fixed_s", "triton_fft_s", "dequantize_s", "weight_pass_s")


@contextlib.contextmanager
def using(table: CostTable) -> Iterator[None]:
    """Plan with ``table`` for its device kind inside the block (benchmarks compare a calibration with
    the shipped table this way)."""
    saved = _ACTIVE.get(table.device)
    _ACTIVE[table.device] = table
    try:
        yield
    finally:
        if saved is None:
            _ACTIVE.pop(table.device, None)
        else:
            _ACTIVE[table.device] = saved


def reload_calibration() -> None:
    """Read the calibration files again (after ``lfma_kernels.calibrate()`` or a change of
    ``LFMA_CALIBRATION``)."""
    _ACTIVE.clear()


# ---------------------------------------------------------------------------------------------
# forcing a path
# ---------------------------------------------------------------------------------------------
_FORCED: Dict[str, Optional[str]] = {"dw": None, "grad": None, "backward": None, "delta": None}
_CHOICES: Mapping[str, Tuple[str, ...]] = {"dw": DW_ALGORITHMS, "grad": DW_ALGORITHMS, "backward": BACKWARD_PATHS,
                                           "delta": DELTA_PATHS}


@contextlib.contextmanager
def force(*, dw: Optional[str] = None, grad: Optional[str] = None, backward: Optional[str] = None,
          delta: Optional[str] = None) -> Iterator[None]:
    """Pin paths inside the ``with`` block, for every backend and thread (the autograd engine runs
    backward passes on threads of its own):

    * ``dw``: how ``dW`` (and ``W + dW``) is built: ``"separable"``, ``"hybrid"`` (cpp only) or ``"fft"``;
    * ``grad``: how ``dL/dcoeffs`` is read from ``G = dL/d(dW)``, same names;
    * ``backward``: how a layer's backward gets ``dL/dcoeffs``: ``"dense"``, ``"gemm"`` or ``"fft"``
      (a backward that also needs ``dL/dW`` forms ``G`` anyway, and goes through it);
    * ``delta``: how a layer beside a quantized base gets its output: ``"fold"``, ``"rows"``,
      ``"separable"`` or ``"dense"`` (``"fold"`` needs a base LFMA can dequantize); forced, it also
      runs a full-precision layer that way (which otherwise always folds), to compare.

    A name this does not know raises ``ValueError`` here; one a backend does not have (``"hybrid"`` on
    torch) raises ``ValueError`` when that backend is called. Blocks nest; leaving one restores what
    was forced before it. The reference backend (the oracle) is never forced."""
    asked = {"dw": dw, "grad": grad, "backward": backward, "delta": delta}
    for what, value in asked.items():
        if value is not None and value not in _CHOICES[what]:
            raise ValueError(f"planner.force({what}={value!r}): unknown path; choose one of "
                             f"{', '.join(_CHOICES[what])}")
    saved = dict(_FORCED)
    _FORCED.update({what: value for what, value in asked.items() if value is not None})
    try:
        yield
    finally:
        _FORCED.update(saved)


def forced_delta() -> Optional[str]:
    """The delta path forced right now, if any (read on every layer forward: one dict lookup)."""
    return _FORCED["delta"]


def forced() -> Dict[str, Optional[str]]:
    """What is forced right now (``None``: the cost model chooses)."""
    return dict(_FORCED)


def _checked(backend: str, what: str, name: str) -> str:
    if name not in ALGORITHMS_OF[backend]:
        raise ValueError(f"planner.force({what}={name!r}): backend {backend!r} has no {name!r} algorithm "
                         f"(it has {', '.join(ALGORITHMS_OF[backend])})")
    return name


# ---------------------------------------------------------------------------------------------
# the costs and the choices the backends make at call time
# ---------------------------------------------------------------------------------------------
def _log2(x: float) -> float:
    return math.log2(max(x, 2))


def _torch_fft_s(t: CostTable, shape: Sequence[int], *, gradient: bool) -> float:
    """The torch backend's FFT path: scatter + irfft2 for dW, rfft2 + gather for the gradient from G."""
    n = shape[0] * shape[1]
    per_point = t.irfft2_s * (n / (768 * 768)) ** t.fft_size_exponent / (t.rfft2_speedup if gradient else 1.0)
    return per_point * n * _log2(n)


def _costs(backend: str, t: CostTable, k: int, shape: Sequence[int], *, gradient: bool) -> Dict[str, float]:
    """Estimated seconds of the torch or triton backend's two ways; "fft" first, so a tie goes to the FFT."""
    n = shape[0] * shape[1]
    if backend == "triton" and t.triton_mac_s is not None:
        fixed = t.triton_fft_grad_fixed_s if gradient else t.triton_fft_fixed_s
        return {"fft": fixed + t.triton_fft_s * n * _log2(n), "separable": 2.0 * k * n * t.triton_mac_s}
    return {"fft": _torch_fft_s(t, shape, gradient=gradient), "separable": 2.0 * k * n * t.gemm_mac_s}


def dw_costs(backend: str, device_type: str, k: int, shape: Sequence[int]) -> Dict[str, float]:
    """Estimated seconds of each way ``backend`` (torch or triton) can build ``dW``."""
    return _costs(backend, table_for(device_type), k, shape, gradient=False)


def grad_costs(backend: str, device_type: str, k: int, shape: Sequence[int]) -> Dict[str, float]:
    """Estimated seconds of each way ``backend`` (torch or triton) can read ``dL/dcoeffs`` from ``G``."""
    return _costs(backend, table_for(device_type), k, shape, gradient=True)


def _cheapest(costs: Mapping[str, float]) -> str:
    return min(costs, key=costs.get)


def dw_algorithm(backend: str, device_type: str, k: int, shape: Sequence[int]) -> str:
    """How the torch or triton backend builds ``dW`` (or ``W + dW``): ``"separable"`` or ``"fft"``."""
    if _FORCED["dw"] is not None:
        return _checked(backend, "dw", _FORCED["dw"])
    return _cheapest(dw_costs(backend, device_type, k, shape))


def grad_algorithm(backend: str, device_type: str, k: int, shape: Sequence[int]) -> str:
    """How the torch or triton backend reads ``dL/dcoeffs`` from ``G``: ``"separable"`` or ``"fft"``."""
    if _FORCED["grad"] is not None:
        return _checked(backend, "grad", _FORCED["grad"])
    return _cheapest(grad_costs(backend, device_type, k, shape))


def native_algorithm(backend: str, what: str) -> Optional[str]:
    """For the compiled backends, which choose inside their kernels: the algorithm forced for ``what``
    (``"dw"`` or ``"grad"``), or ``None`` to let the kernels' own cost model choose (csrc/cpu_plan.cpp)."""
    name = _FORCED[what]
    return None if name is None else _checked(backend, what, name)


def backward_costs(backend: str, device_type: str, tokens: int, k: int, shape: Sequence[int]) -> Dict[str, float]:
    """Estimated seconds of each way a layer's backward can get ``dL/dcoeffs`` (docs/math.md): the
    dense ``G = g^T x`` then a gradient from it (the torch backend's cheaper way), the gemm batch path
    ``tokens * 2K * (d_out + d_in)``, or the fft batch path (row FFTs, then ``backend``'s cost per
    (token, frequency) pair)."""
    t = table_for(device_type)
    d_out, d_in = shape
    n = d_out * d_in
    return {
        "dense": tokens * n * t.gemm_mac_s + min(2.0 * k * n * t.gemm_mac_s, _torch_fft_s(t, shape, gradient=True)),
        "gemm": t.batch_gemm_mac_s * tokens * 2 * k * (d_out + d_in),
        "fft": t.row_fft_s * tokens * (d_out * _log2(d_out) + d_in * _log2(d_in)) + t.batch_pair(backend) * tokens * k,
    }


def backward_path(backend: str, device_type: str, tokens: int, k: int, shape: Sequence[int], *,
                  weight_grad: bool = False) -> str:
    """How a layer's backward gets ``dL/dcoeffs``: ``"dense"``, ``"gemm"`` or ``"fft"``. ``weight_grad``:
    ``dL/dW`` is needed too, which is ``G`` itself, so the dense path costs nothing extra."""
    if weight_grad:
        return "dense"
    if _FORCED["backward"] is not None:
        return _FORCED["backward"]
    return _cheapest(backward_costs(backend, device_type, tokens, k, shape))


def delta_costs(backend: str, device_type: str, tokens: int, k: int, shape: Sequence[int], *, training: bool,
                base_dequantizes: bool) -> Dict[str, float]:
    """Estimated seconds each way of running a layer beside a quantized base adds to the base layer's
    own work (a forward, and in ``training`` its backward too: the delta's adjoint, or the fold again;
    ``dL/dcoeffs`` is the same batch path whatever the way, so it is left out). ``base_dequantizes``:
    the base's own kernel dequantizes W and runs a dense GEMM anyway (bitsandbytes and torchao on a CPU,
    bitsandbytes in training on a GPU), so the fold replaces that work and only adds building dW; where
    the base has a kernel of its own (a 4-bit GEMV at inference, bitsandbytes' AVX512-BF16 CPU kernel),
    the fold also pays the dequantization and a dense GEMM in place of that kernel."""
    t = table_for(device_type)
    d_out, d_in = shape
    n = d_out * d_in
    passes = 2 if training else 1
    dw = min(_costs("torch", t, k, shape, gradient=False).values())
    fold = dw if base_dequantizes else (dw + n * t.dequantize_s
                                        + tokens * n * t.gemm_mac_s * (1.0 - t.quantized_kernel_fraction))
    return {
        "fold": passes * fold,
        "rows": passes * tokens * (t.row_fft_s * (d_out * _log2(d_out) + d_in * _log2(d_in))
                                   + t.delta_pair(backend) * k),
        "separable": passes * t.batch_gemm_mac_s * tokens * 2 * k * (d_out + d_in),
        "dense": passes * (dw + tokens * n * t.gemm_mac_s),
    }


def delta_path(backend: str, device_type: str, tokens: int, k: int, shape: Sequence[int], *, training: bool,
               base_dequantizes: bool, can_dequantize: bool = True) -> str:
    """How a layer beside a quantized base gets its output (:data:`DELTA_PATHS`); ``can_dequantize=False``
    (a base only its own forward can run) rules the fold out."""
    forced_name = _FORCED["delta"]
    if forced_name is not None:
        if forced_name == "fold" and not can_dequantize:
            raise ValueError("planner.force(delta='fold'): this base layer cannot be dequantized")
        return forced_name
    costs = delta_costs(backend, device_type, tokens, k, shape, training=training, base_dequantizes=base_dequantizes)
    if not can_dequantize:
        costs.pop("fold")
    return _cheapest(costs)


def mixed_costs(backend: str, device_type: str, tokens: int, k: int, shape: Sequence[int], *,
                fold: Optional[bool], whole_batch: bool = False) -> Dict[str, float]:
    """Estimated seconds one adapter's rows of a mixed-adapter batch (``tokens`` of them, no gradient) add to
    a GEMM of the base weight over those rows: a delta path beside the base layer's output, or ``"fold"``,
    a GEMM of their own with the adapter's ``W + dW``, which reads the whole weight once more unless its
    rows are the ``whole_batch`` (then no base GEMM runs besides it; ``fold``: True, that ``W + dW`` is
    kept from an earlier call; False, built now; None, no fold: a quantized base)."""
    costs = delta_costs(backend, device_type, tokens, k, shape, training=False, base_dequantizes=True)
    del costs["fold"]
    if fold is not None:
        t = table_for(device_type)
        build = 0.0 if fold else min(_costs("torch", t, k, shape, gradient=False).values())
        costs["fold"] = (0.0 if whole_batch else shape[0] * shape[1] * t.weight_pass_s) + build
    return costs


def mixed_path(backend: str, device_type: str, tokens: int, k: int, shape: Sequence[int], *,
               fold: Optional[bool], whole_batch: bool = False) -> str:
    """How one adapter's rows of a mixed-adapter batch get their output (:func:`mixed_costs`); a forced
    delta path (:func:`force`) applies here too."""
    forced_name = _FORCED["delta"]
    if forced_name is not None:
        if forced_name == "fold" and fold is None:
            raise ValueError("planner.force(delta='fold'): a mixed-adapter batch beside a quantized base takes "
                             "the delta paths (its base layer runs once for every sample)")
        return forced_name
    return _cheapest(mixed_costs(backend, device_type, tokens, k, shape, fold=fold, whole_batch=whole_batch))


def _cuda_kernels_fit(t: CostTable, k: int, shape: Sequence[int]) -> bool:
    """The CUDA kernels evaluate only the separable product: worth it where the torch backend would
    run that product too, not where it switches to an FFT."""
    return _cheapest(_costs("torch", t, k, shape, gradient=False)) == "separable"


def choose_backend(device: torch.device, dtype: torch.dtype, k: int, shape: Sequence[int],
                   why_not: Callable[[str, torch.device], Optional[str]]) -> str:
    """What ``backend="auto"`` runs for tensors on ``device`` of ``dtype`` with K frequencies on a
    ``shape`` weight: the first backend of the device table's order that fits and ``why_not`` (facts
    from :mod:`.dispatch`: available here, runs on this device) does not refuse; torch otherwise."""
    t = table_for(device.type)
    for name in t.order(dtype):
        if name == "cuda" and not _cuda_kernels_fit(t, k, shape):
            continue
        if why_not(name, device) is None:
            return name
    return "torch"


# ---------------------------------------------------------------------------------------------
# explaining a call
# ---------------------------------------------------------------------------------------------
class QuantizedBase(NamedTuple):
    """What :func:`plan` needs to know of a quantized base layer (:mod:`lfma_kernels.quantized`)."""
    name: str               # the quantization, as plans name it
    training: bool          # a backward will follow
    base_dequantizes: bool  # the base's own kernel dequantizes W and runs a dense GEMM for this call
    can_dequantize: bool    # LFMA can dequantize W (else only the delta paths)


class Refusal(NamedTuple):
    what: str    # "backend", "dW", "gradient" or "backward"
    choice: str
    reason: str


# (algorithm, {name: estimated seconds}) as a backend's own cost model reports it, for a K, a shape,
# "dw" or "grad", and (when known) the positions; see cpp_ops.algorithm_report.
AlgorithmReport = Callable[[int, Sequence[int], str, Optional[torch.Tensor], Optional[torch.Tensor]],
                           Tuple[str, Dict[str, float], str]]


@dataclass(frozen=True)
class Plan:
    """What a call runs and why (``print(plan)`` for a readable account)."""
    shape: Tuple[int, int]
    k: int
    device: str
    dtype: torch.dtype
    tokens: Optional[int]
    backend: str
    backend_reason: str
    dw: str                        # how dW / W + dW is built
    grad: str                      # how dL/dcoeffs is read from G (delta_weight's backward, the dense path)
    backward: Optional[str]        # how lfma_linear's backward gets dL/dcoeffs (None: no tokens given)
    reasons: Mapping[str, str]     # "dW", "gradient", "backward": why that choice
    estimates: Mapping[str, Mapping[str, float]]  # per decision: alternative -> estimated seconds
    refused: Tuple[Refusal, ...]
    table: str
    notes: Tuple[str, ...] = ()
    delta: Optional[str] = None    # beside a quantized base: how the output is formed (DELTA_PATHS)

    def __str__(self) -> str:
        tokens = "" if self.tokens is None else f", {self.tokens} tokens"
        dtype = str(self.dtype).replace("torch.", "")
        lines = [f"lfma plan: {self.shape[0]}x{self.shape[1]}, K={self.k}, {self.device} {dtype}{tokens}",
                 f"  backend   {self.backend:<10} {self.backend_reason}"]
        for label, key, value in (("delta", "delta", self.delta), ("dW", "dW", self.dw),
                                  ("gradient", "gradient", self.grad), ("backward", "backward", self.backward)):
            if value is not None:
                lines.append(f"  {label:<9} {value:<10} {self.reasons.get(key, '')}".rstrip())
        if self.refused:
            lines.append("  refused:")
            lines += [f"    {r.what} {r.choice}: {r.reason}" for r in self.refused]
        lines += [f"  note: {n}" for n in self.notes]
        lines.append(f"  cost table: {self.table}")
        return "\n".join(lines)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


def _listing(costs: Mapping[str, float]) -> str:
    return ", ".join(f"{name} {_ms(s)}" for name, s in costs.items())


def _refusals(what: str, chosen: str, costs: Mapping[str, float]) -> List[Refusal]:
    return [Refusal(what, name, f"est. {_ms(s)} against {_ms(costs[chosen])} for {chosen}")
            for name, s in costs.items() if name != chosen]


def plan(device: torch.device, dtype: torch.dtype, k: int, shape: Sequence[int], *,
         why_not: Callable[[str, torch.device], Optional[str]], backends: Sequence[str],
         tokens: Optional[int] = None, backend: str = "auto", weight_grad: bool = False,
         rows: Optional[torch.Tensor] = None, cols: Optional[torch.Tensor] = None,
         algorithm_report: Optional[AlgorithmReport] = None, quantized: Optional[QuantizedBase] = None) -> Plan:
    """What a call with K frequencies on a ``shape`` weight, tensors on ``device`` of ``dtype`` (and,
    for a layer's training step, ``tokens`` rows of input) runs, with the reason every alternative
    was refused. ``why_not`` and ``backends`` are the registry's facts (:func:`.dispatch.explain`
    supplies them); ``algorithm_report`` is the chosen backend's own cost model where its kernels
    choose (cpp); ``rows``/``cols`` make that report exact. A backend asked for by name is planned
    as it would run (:mod:`.dispatch` refuses one that cannot run here when it is called)."""
    device = torch.device(device)
    shape = (int(shape[0]), int(shape[1]))
    t = table_for(device.type)
    refused: List[Refusal] = []
    notes: List[str] = []
    if backend == "auto":
        chosen = choose_backend(device, dtype, k, shape, why_not)
        order = t.order(dtype)
        dtype_name = str(dtype).replace("torch.", "")
        why = f"auto on {device.type} {dtype_name}: the first of {', '.join(order)} that runs here"
        for name in backends:
            if name == chosen:
                continue
            if name == "reference":
                reason = "auto never picks the oracle (the paper's dense formulation)"
            elif name not in order:
                reason = f"not in auto's order for {device.type} {dtype_name} ({', '.join(order)}; cost table {t.device})"
                if device.type == "cuda" and dtype == torch.float64 and name in t.backends:
                    reason += ": float64 runs on the torch backend's cuBLAS / cuFFT, not on CUDA-core fallbacks"
                fact = why_not(name, device)
                reason += f" (and {fact})" if fact else ""
            elif name == "cuda" and not _cuda_kernels_fit(t, k, shape):
                reason = ("its kernels only evaluate the separable product, and the torch backend would switch to "
                          f"an FFT here ({_listing(_costs('torch', t, k, shape, gradient=False))})")
            else:
                reason = why_not(name, device) or f"ranked after {chosen} on {device.type}"
            refused.append(Refusal("backend", name, reason))
    else:
        chosen = backend
        why = "asked for by name"
        reason = why_not(chosen, device)
        if reason is not None:
            notes.append(f"backend {chosen!r} cannot run this call here ({reason})")

    reasons: Dict[str, str] = {}
    estimates: Dict[str, Dict[str, float]] = {}
    picks = {}
    for what, label in (("dw", "dW"), ("grad", "gradient")):
        side = 0 if what == "dw" else 1
        forced_name = _FORCED[what]
        if chosen == "reference":
            pick = "ifft2" if what == "dw" else "autograd"
            reasons[label] = ("the paper's dense complex spectrum and torch.fft.ifft2 (the oracle)" if what == "dw"
                              else "autograd through ifft2")
        elif forced_name is not None:
            pick = _checked(chosen, what, forced_name)
            reasons[label] = f"{_DESCRIPTIONS[(chosen, pick)][side]}; forced ({what}={pick!r})"
            refused += [Refusal(label, a, f"planner.force({what}={pick!r}) is in effect")
                        for a in ALGORITHMS_OF[chosen] if a != pick]
        elif chosen in ("torch", "triton"):
            costs = _costs(chosen, t, k, shape, gradient=what == "grad")
            pick = _cheapest(costs)
            estimates[label] = costs
            reasons[label] = f"{_DESCRIPTIONS[(chosen, pick)][side]} (cost table {t.device})"
            refused += _refusals(label, pick, costs)
        elif len(ALGORITHMS_OF[chosen]) == 1:  # cuda
            pick = ALGORITHMS_OF[chosen][0]
            reasons[label] = f"{_DESCRIPTIONS[(chosen, pick)][side]} (its only algorithm)"
        elif algorithm_report is not None:  # cpp: the kernels' own cost model
            pick, costs, basis = algorithm_report(k, shape, what, rows, cols)
            estimates[label] = costs
            reasons[label] = f"{_DESCRIPTIONS[(chosen, pick)][side]} (the C++ kernels' cost model, {basis})"
            refused += _refusals(label, pick, costs)
        else:
            pick = "native"
            reasons[label] = "chosen inside the C++ kernels (csrc/cpu_plan.cpp); the extension is not loaded"
        picks[what] = pick
    dw, grad = picks["dw"], picks["grad"]

    backward = None
    if tokens is not None:
        if chosen == "reference":
            backward = "autograd"
            reasons["backward"] = "autograd through the paper's layer (a second GEMM with a dense dW)"
        else:
            costs = backward_costs(chosen, device.type, tokens, k, shape)
            estimates["backward"] = costs
            backward = backward_path(chosen, device.type, tokens, k, shape, weight_grad=weight_grad)
            if weight_grad:
                reasons["backward"] = f"{_PATH_DESCRIPTIONS['dense']}; dL/dW is needed too, and that is G"
                refused += [Refusal("backward", p, "dL/dW needs G anyway") for p in BACKWARD_PATHS if p != "dense"]
            elif _FORCED["backward"] is not None:
                reasons["backward"] = f"{_PATH_DESCRIPTIONS[backward]}; forced (backward={backward!r})"
                refused += [Refusal("backward", p, f"planner.force(backward={backward!r}) is in effect")
                            for p in BACKWARD_PATHS if p != backward]
            else:
                reasons["backward"] = f"{_PATH_DESCRIPTIONS[backward]} (cost table {t.device})"
                refused += _refusals("backward", backward, costs)
    delta = None
    if quantized is not None:
        notes.append(f"beside a {quantized.name} base layer: W is never folded in place and there is no eval cache")
        if tokens is not None and chosen != "reference":
            delta = delta_path(chosen, device.type, tokens, k, shape, training=quantized.training,
                               base_dequantizes=quantized.base_dequantizes, can_dequantize=quantized.can_dequantize)
            costs = delta_costs(chosen, device.type, tokens, k, shape, training=quantized.training,
                                base_dequantizes=quantized.base_dequantizes)
            estimates["delta"] = costs
            if _FORCED["delta"] is not None:
                reasons["delta"] = f"{_DELTA_DESCRIPTIONS[delta]}; forced (delta={delta!r})"
                refused += [Refusal("delta", p, f"planner.force(delta={delta!r}) is in effect")
                            for p in DELTA_PATHS if p != delta]
            else:
                reasons["delta"] = f"{_DELTA_DESCRIPTIONS[delta]} (cost table {t.device})"
                refused += _refusals("delta", delta, {p: c for p, c in costs.items()
                                                      if p != "fold" or quantized.can_dequantize})
                if not quantized.can_dequantize:
                    refused.append(Refusal("delta", "fold", f"a {quantized.name} layer cannot be dequantized"))
        elif chosen == "reference":
            delta = "reference"
            reasons["delta"] = "the base layer's output + x dW^T with the paper's dense dW (the oracle)"
    return Plan(shape=shape, k=int(k), device=device.type, dtype=dtype, tokens=tokens, backend=chosen,
                backend_reason=why, dw=dw, grad=grad, backward=backward, reasons=reasons, estimates=estimates,
                refused=tuple(refused), table=f"{t.device} ({t.status})", notes=tuple(notes), delta=delta)
