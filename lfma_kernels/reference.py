"""The paper's formulation (Algorithm 1), kept as the oracle every fast path is checked against.

``dW = alpha * Re(ifft2(F))`` with ``F`` a dense complex spectrum holding the K trained
coefficients, then a second GEMM with ``dW``. The paper writes ``x @ dW``, which only
type-checks for square layers; we use PyTorch's ``F.linear`` orientation (``x @ dW^T``, ``dW``
shaped like the frozen weight). Runs in float64 when given float64 coefficients.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .ops.common import compute_dtype, fold_weight

__all__ = ["delta_weight", "folded_weight", "lfma_linear"]


def delta_weight(
    coeffs: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    shape: Sequence[int],
    alpha: float,
) -> torch.Tensor:
    """``alpha * Re(ifft2(F))`` with ``F[rows[k], cols[k]] += coeffs[k, 0] + 1j * coeffs[k, 1]``."""
    real_dtype = compute_dtype(coeffs.dtype)
    c = torch.complex(coeffs[:, 0].to(real_dtype), coeffs[:, 1].to(real_dtype))
    spectrum = torch.zeros(tuple(shape), dtype=c.dtype, device=coeffs.device)
    # accumulate=True: repeated positions add up, as they would in the closed form.
    spectrum = spectrum.index_put((rows, cols), c, accumulate=True)
    return torch.fft.ifft2(spectrum).real * alpha


def folded_weight(
    weight: torch.Tensor,
    coeffs: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    alpha: float,
) -> torch.Tensor:
    """``W + dW`` in ``W``'s dtype, the add done in ``dW``'s precision (what ``merge`` writes)."""
    with torch.no_grad():
        return fold_weight(weight, delta_weight(coeffs, rows, cols, weight.shape, alpha))


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
