"""The ``torch`` backend's kernels: pure PyTorch, any device (declared in :mod:`.backends.pytorch`).

``dW`` is the separable rank-2K product of exact-phase cos/sin tables (cheap for small K) or a scatter
into a Hermitian half-spectrum and one ``irfft2`` (cheap for large K); ``dL/dcoeffs`` from ``G`` likewise
through the product or one ``rfft2``. The kernels are in :mod:`.torch_kernels`; which one runs is the
decision's ``algorithm``.
"""
from __future__ import annotations

import torch

from . import torch_kernels
from .backends.base import Kernels
from .common import fold_with

__all__ = ["KERNELS"]


def _delta_weight(coeffs, rows, cols, shape, alpha, algorithm: str) -> torch.Tensor:
    if algorithm == "separable":
        return torch_kernels.delta_weight_separable(coeffs, rows, cols, shape, alpha)
    return torch_kernels.delta_weight_fft(coeffs, rows, cols, shape, alpha)


def _coeff_grad(grad_dw: torch.Tensor, rows, cols, alpha, algorithm: str) -> torch.Tensor:
    if algorithm == "separable":
        return torch_kernels.coeff_grad_separable(grad_dw, rows, cols, alpha)
    return torch_kernels.coeff_grad_fft(grad_dw, rows, cols, alpha)


KERNELS = Kernels(delta_weight=_delta_weight, folded_weight=fold_with(_delta_weight), coeff_grad=_coeff_grad)
