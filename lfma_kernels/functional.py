"""The public functional API: validated entry points that dispatch to a backend."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ._checks import check_frequencies, check_shape
from .ops import dispatch

__all__ = ["delta_weight", "lfma_linear", "available_backends"]

available_backends = dispatch.available_backends


def delta_weight(
    coeffs: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    shape: Sequence[int],
    alpha: float,
    *,
    backend: str = "auto",
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``alpha * Re(ifft2(F))`` for the sparse spectrum ``F[rows[k], cols[k]] += coeffs[k,0] + i coeffs[k,1]``.

    Differentiable w.r.t. ``coeffs``; returned in ``dtype`` (default ``coeffs.dtype``), accumulated
    in float32 or wider whatever the output dtype.
    """
    shape = check_shape(shape)
    check_frequencies(coeffs, rows, cols, shape)
    impl = dispatch.resolve(backend, coeffs.device, coeffs.dtype, rows.shape[0], shape)
    return impl.delta_weight(coeffs, rows.long(), cols.long(), shape, float(alpha)).to(dtype or coeffs.dtype)


def lfma_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    coeffs: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    alpha: float,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``F.linear(x, weight + delta_weight(...), bias)`` over any leading batch dims.

    Differentiable w.r.t. ``x`` and ``coeffs``, and ``weight``/``bias`` when they require grad.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (d_out, d_in), got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must end in d_in = {weight.shape[1]}, got shape {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    shape = tuple(weight.shape)
    check_frequencies(coeffs, rows, cols, shape)
    impl = dispatch.resolve(backend, x.device, x.dtype, rows.shape[0], shape)
    return impl.lfma_linear(x, weight, bias, coeffs, rows.long(), cols.long(), float(alpha))
