"""The ``cpp`` backend's kernels: the compiled CPU kernels of csrc/ (``torch.ops.lfma_ext``), declared in
:mod:`.backends.cpp`.

Importing this module loads the extension (prebuilt, or compiled on first use: see :mod:`.extension`)
and raises ``RuntimeError`` saying what is missing if it cannot. The raw ``lfma_ext`` ops get their fake
(meta) implementations here; :mod:`.library` and :mod:`.linear_op` run them as the ``lfma::`` ops with
autograd, like every backend's. The algorithm (separable, hybrid, 2-D FFT) is the decision's, passed to
the raw ops as ``algo``.
"""
from __future__ import annotations

from typing import Dict

import torch

from . import extension
from .backends.base import Kernels
from .common import compute_dtype
from .trace_checks import trace_check_frequencies, trace_check_matrix, trace_check_positions

__all__ = ["KERNELS", "LFMA_EXT_KERNELS", "ALGO_CODES"]

extension.load("cpp")

# algo= values of the raw ops (csrc/lfma_ext.h).
ALGO_CODES: Dict[str, int] = {"separable": 0, "hybrid": 1, "fft": 2}


@torch.library.register_fake("lfma_ext::delta_weight")
def _delta_weight_fake(coeffs, rows, cols, d_out, d_in, alpha, algo):
    trace_check_frequencies("lfma_ext::delta_weight", coeffs, rows, cols)
    return coeffs.new_empty((d_out, d_in), dtype=compute_dtype(coeffs.dtype))


@torch.library.register_fake("lfma_ext::folded_weight")
def _folded_weight_fake(weight, coeffs, rows, cols, alpha, algo):
    trace_check_matrix("lfma_ext::folded_weight", "weight", weight)
    trace_check_frequencies("lfma_ext::folded_weight", coeffs, rows, cols)
    return weight.new_empty(weight.shape)


@torch.library.register_fake("lfma_ext::coeff_grad")
def _coeff_grad_fake(grad_dw, rows, cols, alpha, algo):
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


# The same three ops serve the cuda backend (cuda_ops): the dispatcher picks the CPU or CUDA kernel of each
# lfma_ext op from the tensors' device, and the CUDA kernels ignore algo= (they have one algorithm).
def _delta_weight(coeffs, rows, cols, shape, alpha, algorithm: str) -> torch.Tensor:
    return torch.ops.lfma_ext.delta_weight(coeffs, rows, cols, shape[0], shape[1], alpha, ALGO_CODES[algorithm])


def _folded_weight(weight, coeffs, rows, cols, alpha, algorithm: str) -> torch.Tensor:
    return torch.ops.lfma_ext.folded_weight(weight, coeffs, rows, cols, alpha, ALGO_CODES[algorithm])


def _coeff_grad(grad_dw, rows, cols, alpha, algorithm: str) -> torch.Tensor:
    return torch.ops.lfma_ext.coeff_grad(grad_dw, rows, cols, alpha, ALGO_CODES[algorithm])


def _coeff_grad_batch_fft(x2d, g2d, rows, cols, shape, alpha, dtype) -> torch.Tensor:
    return torch.ops.lfma_ext.coeff_grad_batch(x2d.to(dtype), g2d.to(dtype), rows, cols, alpha)


def _delta_rows(x2d, coeffs, rows, cols, shape, alpha) -> torch.Tensor:
    return torch.ops.lfma_ext.delta_rows(x2d, coeffs, rows, cols, alpha, shape[0])


def _delta_rows_grouped(x2d, adapters, tokens, shape) -> torch.Tensor:
    return torch.ops.lfma_ext.delta_rows_grouped(
        x2d, torch.cat([a.coeffs for a in adapters]), torch.cat([a.rows for a in adapters]),
        torch.cat([a.cols for a in adapters]), [int(a.rows.shape[0]) for a in adapters], list(tokens),
        [float(a.alpha) for a in adapters], shape[0])


# The three lfma_ext ops, which have CPU and CUDA kernels: the cuda backend's kernels are these.
LFMA_EXT_KERNELS = Kernels(delta_weight=_delta_weight, folded_weight=_folded_weight, coeff_grad=_coeff_grad)
# The cpp backend adds the CPU-only batch path (lfma_ext::coeff_grad_batch) and the delta path's rows way
# (lfma_ext::delta_rows, and delta_rows_grouped for several adapters at once).
KERNELS = LFMA_EXT_KERNELS._replace(coeff_grad_batch_fft=_coeff_grad_batch_fft, delta_rows=_delta_rows,
                                    delta_rows_grouped=_delta_rows_grouped)
