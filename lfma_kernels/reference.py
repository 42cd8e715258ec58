"""The paper's formulation (Algorithm 1), kept as the oracle every fast path is checked against.

``dW = alpha * Re(ifft2(F))`` with ``F`` a dense complex spectrum holding the K trained
coefficients, then a second GEMM with ``dW``. The paper writes ``x @ dW``, which only
type-checks for square layers; we use PyTorch's ``F.linear`` orientation (``x @ dW^T``, ``dW``
shaped like the frozen weight). Runs in float64 when given float64 coefficients. The gradient
oracle, :func:`coeff_grad`, is the paper's too: autograd through ``ifft2``.

It imports nothing from the code it checks.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["delta_weight", "coeff_grad", "lfma_linear", "delta_linear", "dequantized_linear"]


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def delta_weight(
    coeffs: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    shape: Sequence[int],
    alpha: float,
) -> torch.Tensor:
    """``alpha * Re(ifft2(F))`` with ``F[rows[k], cols[k]] += coeffs[k, 0] + 1j * coeffs[k, 1]``."""
    real_dtype = _real_dtype(coeffs.dtype)
    c = torch.complex(coeffs[:, 0].to(real_dtype), coeffs[:, 1].to(real_dtype))
    spectrum = torch.zeros(tuple(shape), dtype=c.dtype, device=coeffs.device)
    # accumulate=True: repeated positions add up, as they would in the closed form.
    spectrum = spectrum.index_put((rows, cols), c, accumulate=True)
    return torch.fft.ifft2(spectrum).real * alpha


def coeff_grad(
    grad_dw: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    alpha: float,
) -> torch.Tensor:
    """``dL/dcoeffs`` (``[K, 2]``: real, imag) for ``dL/d(dW) = grad_dw``, the paper's way: autograd
    through :func:`delta_weight` (the dense spectrum and ``ifft2``). In float64 for float64
    ``grad_dw``, float32 otherwise. ``dW`` is linear in the coefficients, so the gradient does not
    depend on their values."""
    dtype = _real_dtype(grad_dw.dtype)
    with torch.enable_grad():
        coeffs = torch.zeros(rows.shape[0], 2, dtype=dtype, device=grad_dw.device, requires_grad=True)
        dw = delta_weight(coeffs, rows, cols, tuple(grad_dw.shape), alpha)
        (grad,) = torch.autograd.grad(dw, coeffs, grad_dw.to(dtype))
    return grad


def lfma_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    coeffs: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    alpha: float,
) -> torch.Tensor:
    """The paper's layer: the frozen layer's output plus a second GEMM with a dense ``dW``."""
    dw = delta_weight(coeffs, rows, cols, weight.shape, alpha).to(x.dtype)
    return F.linear(x, weight, bias) + F.linear(x, dw)


def delta_linear(x: torch.Tensor, coeffs: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, alpha: float,
                 shape: Sequence[int]) -> torch.Tensor:
    """``x dW^T`` beside a quantized base, the paper's way (a dense ``dW``, then a GEMM)."""
    return F.linear(x, delta_weight(coeffs, rows, cols, shape, alpha).to(x.dtype))


def dequantized_linear(x: torch.Tensor, coeffs: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, alpha: float,
                       dequantize, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The base layer's dequantized weight plus the paper's ``dW``, autograd through both."""
    weight = dequantize()
    return F.linear(x, (weight + delta_weight(coeffs, rows, cols, weight.shape, alpha).to(weight.dtype)).to(x.dtype),
                    bias)
