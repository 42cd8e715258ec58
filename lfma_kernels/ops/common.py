"""Small pieces every backend shares: accumulation dtype, the ``alpha / (d_out*d_in)`` scale, ``W + dW``."""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["compute_dtype", "scale", "add_delta", "fold_with"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """``dW`` is accumulated in float32, or float64 when the coefficients are float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def scale(shape: Sequence[int], alpha: float) -> float:
    """``s = alpha / (d_out * d_in)``: ``ifft2``'s 1/N normalisation times the user's ``alpha``."""
    return float(alpha) / (shape[0] * shape[1])


def add_delta(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``W + dW`` in ``W``'s dtype, the add done in ``dW``'s (float32 or wider) precision."""
    if weight.dtype == delta.dtype:
        return weight + delta
    return (weight.to(delta.dtype) + delta).to(weight.dtype)


def fold_with(delta_weight):
    """A ``folded_weight(weight, coeffs, rows, cols, alpha, *args)`` from a ``delta_weight(coeffs, rows, cols,
    shape, alpha, *args)``: ``W + dW`` in ``W``'s dtype, no autograd."""
    def folded_weight(weight, coeffs, rows, cols, alpha, *args) -> torch.Tensor:
        with torch.no_grad():
            return add_delta(weight, delta_weight(coeffs, rows, cols, tuple(weight.shape), alpha, *args))
    return folded_weight
