"""The ``cpp`` backend: the compiled CPU kernels of csrc/ (``torch.ops.lfma_ext``).

Importing this module loads the extension (prebuilt, or compiled on first use: see
:mod:`.extension`) and raises ``RuntimeError`` saying what is missing if it cannot. The raw
``lfma_ext`` ops get their fake (meta) implementations here; :func:`.library.register_backend`
wraps them as ``lfma::cpp_*`` ops with autograd and the folded linear layer, so there is one
autograd implementation for every backend. The CPU algorithm (separable, hybrid row-direct /
row-FFT, or 2-D FFT) is chosen inside the kernels by their cost model (csrc/cpu_plan.cpp), which
needs the count of distinct terms of the K frequencies; :func:`algorithm_report` asks it what it
would choose, for :func:`.planner.plan`, and :func:`.planner.force` overrides it (``algo=`` of
the raw ops).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch

from . import extension, planner
from .common import compute_dtype
from .library import Kernels, trace_check_frequencies, trace_check_matrix, trace_check_positions, register_backend

__all__ = ["KERNELS", "OPS", "LFMA_EXT_KERNELS", "ALGO_CODES", "algorithm_report"]

extension.load("cpp")

# algo= values of the raw ops (csrc/lfma_ext.h): -1 lets the kernels' cost model choose.
ALGO_CODES: Dict[Optional[str], int] = {None: -1, "separable": 0, "hybrid": 1, "fft": 2}
_ALGO_NAMES = {code: name for name, code in ALGO_CODES.items() if name is not None}


@torch.library.register_fake("lfma_ext::delta_weight")
def _delta_weight_fake(coeffs, rows, cols, d_out, d_in, alpha, algo=-1):
    trace_check_frequencies("lfma_ext::delta_weight", coeffs, rows, cols)
    return coeffs.new_empty((d_out, d_in), dtype=compute_dtype(coeffs.dtype))


@torch.library.register_fake("lfma_ext::folded_weight")
def _folded_weight_fake(weight, coeffs, rows, cols, alpha, algo=-1):
    trace_check_matrix("lfma_ext::folded_weight", "weight", weight)
    trace_check_frequencies("lfma_ext::folded_weight", coeffs, rows, cols)
    return weight.new_empty(weight.shape)


@torch.library.register_fake("lfma_ext::coeff_grad")
def _coeff_grad_fake(grad_dw, rows, cols, alpha, algo=-1):
    trace_check_matrix("lfma_ext::coeff_grad", "grad_dw", grad_dw)
    trace_check_positions("lfma_ext::coeff_grad", rows, cols)
    return grad_dw.new_empty((rows.shape[0], 2), dtype=compute_dtype(grad_dw.dtype))


@torch.library.register_fake("lfma_ext::coeff_grad_batch")
def _coeff_grad_batch_fake(x, grad_out, rows, cols, alpha):
    op = "lfma_ext::coeff_grad_batch"
    trace_check_matrix(op, "x", x)
    trace_check_matrix(op, "grad_out", grad_out)
    trace_check_positions(op, rows, cols)
    torch._check(x.shape[0] == grad_out.shape[0], lambda: f"{op}: x and grad_out must have the same number of "
                                                          f"tokens, got {x.shape[0]} and {grad_out.shape[0]}")
    return x.new_empty((rows.shape[0], 2), dtype=compute_dtype(torch.promote_types(x.dtype, grad_out.dtype)))


@torch.library.register_fake("lfma_ext::delta_rows")
def _delta_rows_fake(x, coeffs, rows, cols, alpha, d_out):
    op = "lfma_ext::delta_rows"
    trace_check_matrix(op, "x", x)
    trace_check_frequencies(op, coeffs, rows, cols)
    return x.new_empty((x.shape[0], d_out), dtype=compute_dtype(coeffs.dtype))


@torch.library.register_fake("lfma_ext::delta_rows_grouped")
def _delta_rows_grouped_fake(x, coeffs, rows, cols, k_counts, t_counts, alphas, d_out):
    op = "lfma_ext::delta_rows_grouped"
    trace_check_matrix(op, "x", x)
    trace_check_frequencies(op, coeffs, rows, cols)
    torch._check(len(k_counts) == len(t_counts) == len(alphas),
                 lambda: f"{op}: k_counts, t_counts and alphas need one entry per adapter")
    torch._check(sum(t_counts) == x.shape[0], lambda: f"{op}: t_counts add up to {sum(t_counts)}, x has {x.shape[0]} rows")
    return x.new_empty((x.shape[0], d_out), dtype=compute_dtype(coeffs.dtype))


def _backend(t: torch.Tensor) -> str:
    # The same kernels serve the cuda backend (cuda_ops): the dispatcher picks the CPU or CUDA kernel
    # of each lfma_ext op from the tensors' device (the CUDA kernels ignore algo=).
    return "cuda" if t.device.type == "cuda" else "cpp"


def _delta_weight(coeffs, rows, cols, shape, alpha) -> torch.Tensor:
    algo = ALGO_CODES[planner.native_algorithm(_backend(coeffs), "dw")]
    return torch.ops.lfma_ext.delta_weight(coeffs, rows, cols, shape[0], shape[1], alpha, algo)


def _folded_weight(weight, coeffs, rows, cols, alpha) -> torch.Tensor:
    algo = ALGO_CODES[planner.native_algorithm(_backend(weight), "dw")]
    return torch.ops.lfma_ext.folded_weight(weight, coeffs, rows, cols, alpha, algo)


def _coeff_grad(grad_dw, rows, cols, alpha) -> torch.Tensor:
    algo = ALGO_CODES[planner.native_algorithm(_backend(grad_dw), "grad")]
    return torch.ops.lfma_ext.coeff_grad(grad_dw, rows, cols, alpha, algo)


def _coeff_grad_batch_fft(x2d, g2d, rows, cols, shape, alpha, dtype) -> torch.Tensor:
    return torch.ops.lfma_ext.coeff_grad_batch(x2d.to(dtype), g2d.to(dtype), rows, cols, alpha)


def _delta_rows(x2d, coeffs, rows, cols, shape, alpha) -> torch.Tensor:
    return torch.ops.lfma_ext.delta_rows(x2d, coeffs, rows, cols, alpha, shape[0])


def _delta_rows_grouped(x2d, adapters, tokens, shape) -> torch.Tensor:
    return torch.ops.lfma_ext.delta_rows_grouped(
        x2d, torch.cat([a.coeffs for a in adapters]), torch.cat([a.rows for a in adapters]),
        torch.cat([a.cols for a in adapters]), [int(a.rows.shape[0]) for a in adapters], list(tokens),
        [float(a.alpha) for a in adapters], shape[0])


def algorithm_report(k: int, shape: Sequence[int], what: str, rows: Optional[torch.Tensor] = None,
                     cols: Optional[torch.Tensor] = None) -> Tuple[str, Dict[str, float], str]:
    """What the CPU kernels' cost model (csrc/cpu_plan.cpp) picks for ``what`` ("dw" or "grad") and
    its estimates in seconds; with ``rows``/``cols``, exactly as a call with them would (counting the
    distinct terms), otherwise for K random frequencies."""
    ops = torch.ops.lfma_ext
    inverse = what == "dw"  # the C++ model's name: dW is an inverse (irfft) transform
    if rows is not None and cols is not None:
        terms, columns = (int(v) for v in ops.count_terms(rows.cpu().long(), cols.cpu().long(), shape[0], shape[1]))
        basis = "the positions' distinct terms and columns" if terms >= 0 else "K past where terms are counted"
    else:
        terms, columns = -1, -1
        basis = f"K={k} random frequencies"
    pick = _ALGO_NAMES[int(ops.choose_algo(k, shape[0], shape[1], inverse, terms, columns))]
    costs_ns = ops.algo_costs(k, shape[0], shape[1], inverse, terms, columns)
    return pick, {"fft": costs_ns[2] * 1e-9, "hybrid": costs_ns[1] * 1e-9, "separable": costs_ns[0] * 1e-9}, basis


# The three lfma_ext ops, which have CPU and CUDA kernels: the cuda backend (cuda_ops) is these.
LFMA_EXT_KERNELS = Kernels(delta_weight=_delta_weight, folded_weight=_folded_weight, coeff_grad=_coeff_grad)
# The cpp backend adds the CPU-only batch path (lfma_ext::coeff_grad_batch), the delta path's rows way
# (lfma_ext::delta_rows, and delta_rows_grouped for several adapters at once) and its algorithm report.
KERNELS = LFMA_EXT_KERNELS._replace(coeff_grad_batch_fft=_coeff_grad_batch_fft, delta_rows=_delta_rows,
                                    delta_rows_grouped=_delta_rows_grouped, algorithm_report=algorithm_report)
OPS = register_backend("cpp", KERNELS)
