"""The ``cpp`` backend: the compiled CPU kernels of csrc/ (``torch.ops.lfma_ext``).

Importing this module loads the extension (prebuilt, or compiled on first use: see
:mod:`.extension`) and raises ``RuntimeError`` saying what is missing if it cannot. The raw
``lfma_ext`` ops get their fake (meta) implementations here; :func:`.library.register_backend`
wraps them as ``lfma::cpp_*`` ops with autograd and the folded linear layer, so there is one
autograd implementation for every backend. The CPU algorithm (separable, hybrid row-direct /
column-FFT, or 2-D FFT) is chosen inside the kernels by their cost model (csrc/cpu_kernels.cpp);
``algo=`` on the raw ops forces one.
"""
from __future__ import annotations

import torch

from . import extension
from .common import compute_dtype
from .library import Kernels, register_backend

__all__ = ["delta_weight", "folded_weight", "lfma_linear", "KERNELS", "ALGOS", "BATCH_FFT_PAIR_COST", "algo"]

extension.load("cpu")

# algo= values of the raw ops (csrc/lfma_ext.h).
ALGOS = {"auto": -1, "separable": 0, "hybrid": 1, "fft2": 2}
# The CPU algorithm the backend's kernels ask for: "auto" (the kernels' cost model) or one of ALGOS
# forced, for tests and benchmarks (read at call time). Ignored by the CUDA kernels.
algo = "auto"


@torch.library.register_fake("lfma_ext::delta_weight")
def _delta_weight_fake(coeffs, rows, cols, d_out, d_in, alpha, algo=-1):
    return coeffs.new_empty((d_out, d_in), dtype=compute_dtype(coeffs.dtype))


@torch.library.register_fake("lfma_ext::folded_weight")
def _folded_weight_fake(weight, coeffs, rows, cols, alpha, algo=-1):
    return weight.new_empty(weight.shape)


@torch.library.register_fake("lfma_ext::coeff_grad")
def _coeff_grad_fake(grad_dw, rows, cols, alpha, algo=-1):
    return grad_dw.new_empty((rows.shape[0], 2), dtype=compute_dtype(grad_dw.dtype))


@torch.library.register_fake("lfma_ext::coeff_grad_batch")
def _coeff_grad_batch_fake(x, grad_out, rows, cols, alpha):
    return x.new_empty((rows.shape[0], 2), dtype=compute_dtype(torch.promote_types(x.dtype, grad_out.dtype)))


def _delta_weight(coeffs, rows, cols, shape, alpha) -> torch.Tensor:
    return torch.ops.lfma_ext.delta_weight(coeffs, rows, cols, shape[0], shape[1], alpha, ALGOS[algo])


def _folded_weight(weight, coeffs, rows, cols, alpha) -> torch.Tensor:
    return torch.ops.lfma_ext.folded_weight(weight, coeffs, rows, cols, alpha, ALGOS[algo])


def _coeff_grad(grad_dw, rows, cols, alpha) -> torch.Tensor:
    return torch.ops.lfma_ext.coeff_grad(grad_dw, rows, cols, alpha, ALGOS[algo])


def _coeff_grad_batch_fft(x2d, g2d, rows, cols, shape, alpha, dtype) -> torch.Tensor:
    return torch.ops.lfma_ext.coeff_grad_batch(x2d.to(dtype), g2d.to(dtype), rows, cols, alpha)


# The same three kernels serve the cuda backend (cuda_ops): the dispatcher picks the CPU or CUDA
# kernel of each lfma_ext op from the tensors' device.
KERNELS = Kernels(delta_weight=_delta_weight, folded_weight=_folded_weight, coeff_grad=_coeff_grad)

# The CPU batch path (lfma_ext::coeff_grad_batch; no CUDA kernel, so not in KERNELS). Beyond its two
# row FFTs it costs ~30-80 GEMM multiply-adds per (token, frequency) pair: a gathered complex
# product and the token sums, against a GEMM's vectorised 10-13 ps (benchmarks/bench_cpp.py
# --batch-grad, 2-core CPU, float32, 2026-11-27 UTC; 768x768, 1024x1024 and 768x3072 at 256..4096
# tokens, K from 943 up, where the choice against the dense G is made). So the backward goes through
# G only past K ~ 5000 at 768x768.
BATCH_FFT_PAIR_COST = 60.0
delta_weight, folded_weight, lfma_linear = register_backend(
    "cpp", KERNELS._replace(coeff_grad_batch_fft=_coeff_grad_batch_fft, batch_fft_pair_cost=BATCH_FFT_PAIR_COST))
