"""The ``torch`` backend: pure PyTorch, any device.

``dW`` is the separable rank-2K product of exact-phase cos/sin tables (cheap for small K) or a
scatter into a Hermitian half-spectrum and one ``irfft2`` (cheap for large K); ``dL/dcoeffs`` from
``G`` likewise through the product or one ``rfft2``. The kernels are in :mod:`.torch_kernels`, the
choice between them is the planner's (:func:`.planner.dw_algorithm`), and :mod:`.library`
registers them as ``torch.library`` ops (``lfma::torch_*``).
"""
from __future__ import annotations

import torch

from . import planner, torch_kernels
from .library import Kernels, fold_with, register_backend

__all__ = ["KERNELS", "OPS"]


def _delta_weight(coeffs, rows, cols, shape, alpha) -> torch.Tensor:
    if planner.dw_algorithm("torch", coeffs.device.type, rows.shape[0], shape) == "separable":
        return torch_kernels.delta_weight_separable(coeffs, rows, cols, shape, alpha)
    return torch_kernels.delta_weight_fft(coeffs, rows, cols, shape, alpha)


def _coeff_grad(grad_dw: torch.Tensor, rows, cols, alpha) -> torch.Tensor:
    if planner.grad_algorithm("torch", grad_dw.device.type, rows.shape[0], grad_dw.shape) == "separable":
        return torch_kernels.coeff_grad_separable(grad_dw, rows, cols, alpha)
    return torch_kernels.coeff_grad_fft(grad_dw, rows, cols, alpha)


KERNELS = Kernels(delta_weight=_delta_weight, folded_weight=fold_with(_delta_weight), coeff_grad=_coeff_grad)
OPS = register_backend("torch", KERNELS)
