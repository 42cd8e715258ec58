"""The cost formulas every backend shares: estimated seconds from a :class:`.cost_tables.CostTable`.

The torch backend's two ways of building ``dW`` (other backends fall back on them or compare against
them), a layer's three backward paths for ``dL/dcoeffs``, and the ways a layer beside a quantized base,
or one adapter's rows of a mixed batch, gets its output (docs/math.md). A backend's own algorithms are
costed by its object (:meth:`.backends.base.Backend.algorithm_costs`); what its chosen algorithms cost
(``dw_s``, ``grad_s``) and the per-backend constants of the kernels it may own (``batch_pair_s``,
``delta_pair_s``) enter here.
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Sequence

from .cost_tables import CostTable

__all__ = ["log2", "cheapest", "row_fft_work", "skinny_gemm_macs", "torch_dw_costs", "backward_costs", "delta_costs",
           "mixed_costs"]


def log2(x: float) -> float:
    return math.log2(max(x, 2))


def cheapest(costs: Mapping[str, float]) -> str:
    """The first of the cheapest (so the order of ``costs`` breaks ties). A loop, not ``min(..., key=...)``:
    torch.compile traces a first decision made inside a compiled function, and Dynamo refuses the latter."""
    best = None
    for name, seconds in costs.items():
        if best is None or seconds < costs[best]:
            best = name
    return best


def row_fft_work(tokens: int, shape: Sequence[int]) -> float:
    """The row FFTs of ``tokens`` rows of x (length d_in) and of g (length d_out), in points * log2(length): the
    unit of ``row_fft_s`` (the fft batch path and the delta path's rows way)."""
    return tokens * (shape[0] * log2(shape[0]) + shape[1] * log2(shape[1]))


def skinny_gemm_macs(tokens: int, k: int, shape: Sequence[int]) -> float:
    """The multiply-adds of the phase-table GEMMs (2K columns) over ``tokens`` rows: the unit of
    ``batch_gemm_mac_s`` (the gemm batch path and the delta path's separable way)."""
    return tokens * 2 * k * (shape[0] + shape[1])


def torch_fft_s(t: CostTable, shape: Sequence[int], *, gradient: bool) -> float:
    """The torch backend's FFT path: scatter + irfft2 for dW, rfft2 + gather for the gradient from G."""
    n = shape[0] * shape[1]
    per_point = t.irfft2_s * (n / (768 * 768)) ** t.fft_size_exponent / (t.rfft2_speedup if gradient else 1.0)
    return per_point * n * log2(n)


def torch_dw_costs(t: CostTable, k: int, shape: Sequence[int], *, gradient: bool) -> Dict[str, float]:
    """The torch backend's two ways; "fft" first, so a tie goes to the FFT."""
    return {"fft": torch_fft_s(t, shape, gradient=gradient), "separable": 2.0 * k * shape[0] * shape[1] * t.gemm_mac_s}


def backward_costs(t: CostTable, backend: str, tokens: int, k: int, shape: Sequence[int],
                   grad_s: float) -> Dict[str, float]:
    """Each way a layer's backward can get ``dL/dcoeffs``: the dense ``G = g^T x`` then the backend's gradient
    from it (``grad_s``), the gemm batch path ``tokens * 2K * (d_out + d_in)``, or the fft batch path (row
    FFTs, then ``backend``'s cost per (token, frequency) pair)."""
    return {
        "dense": tokens * shape[0] * shape[1] * t.gemm_mac_s + grad_s,
        "gemm": t.batch_gemm_mac_s * skinny_gemm_macs(tokens, k, shape),
        "fft": t.row_fft_s * row_fft_work(tokens, shape) + t.batch_pair(backend) * tokens * k,
    }


def delta_costs(t: CostTable, backend: str, tokens: int, k: int, shape: Sequence[int], dw_s: float, *,
                training: bool, base_dequantizes: bool) -> Dict[str, float]:
    """What each way of running a layer beside a quantized base adds to the base layer's own work (a forward,
    and in ``training`` its backward too: the delta's adjoint, or the fold again; ``dL/dcoeffs`` is the same
    batch path whatever the way, so it is left out); ``dw_s``: the backend building dW. ``base_dequantizes``:
    the base's own kernel dequantizes W and runs a dense GEMM anyway (bitsandbytes and torchao on a CPU,
    bitsandbytes in training on a GPU), so the fold replaces that work and only adds building dW; where the
    base has a kernel of its own (a 4-bit GEMV at inference, bitsandbytes' AVX512-BF16 CPU kernel), the fold
    also pays the dequantization and a dense GEMM in place of that kernel."""
    n = shape[0] * shape[1]
    passes = 2 if training else 1
    fold = dw_s if base_dequantizes else (dw_s + n * t.dequantize_s
                                          + tokens * n * t.gemm_mac_s * (1.0 - t.quantized_kernel_fraction))
    return {
        "fold": passes * fold,
        "rows": passes * (t.row_fft_s * row_fft_work(tokens, shape) + t.delta_pair(backend) * tokens * k),
        "separable": passes * t.batch_gemm_mac_s * skinny_gemm_macs(tokens, k, shape),
        "dense": passes * (dw_s + tokens * n * t.gemm_mac_s),
    }


def mixed_costs(t: CostTable, backend: str, tokens: int, k: int, shape: Sequence[int], dw_s: float, *,
                fold: Optional[bool], whole_batch: bool) -> Dict[str, float]:
    """What one adapter's rows of a mixed-adapter batch (``tokens`` of them, no gradient) add to a GEMM of
    the base weight over those rows: a delta path beside the base layer's output, or ``"fold"``, a GEMM of
    their own with the adapter's ``W + dW``, which reads the whole weight once more unless its rows are the
    ``whole_batch`` (then no base GEMM runs besides it; ``fold``: True, that ``W + dW`` is kept from an
    earlier call; False, built now; None, no fold: a quantized base)."""
    costs = delta_costs(t, backend, tokens, k, shape, dw_s, training=False, base_dequantizes=True)
    del costs["fold"]
    if fold is not None:
        build = 0.0 if fold else dw_s
        costs["fold"] = (0.0 if whole_batch else shape[0] * shape[1] * t.weight_pass_s) + build
    return costs
