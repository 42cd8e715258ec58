"""Input checks of the fake implementations: ``torch._check``, so a bad call under ``torch.compile`` fails
at trace time, naming the op and the argument."""
from __future__ import annotations

import torch

__all__ = ["trace_check_positions", "trace_check_frequencies", "trace_check_matrix"]


def trace_check_positions(op: str, rows: torch.Tensor, cols: torch.Tensor) -> None:
    for name, idx in (("rows", rows), ("cols", cols)):
        torch._check(idx.dim() == 1 and idx.dtype == torch.int64,
                     lambda: f"{op}: {name} must be a 1-D int64 tensor, got shape {tuple(idx.shape)} dtype {idx.dtype}")
    torch._check(rows.shape[0] == cols.shape[0],
                 lambda: f"{op}: rows and cols must have the same length K, got {rows.shape[0]} and {cols.shape[0]}")


def trace_check_frequencies(op: str, coeffs: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> None:
    torch._check(coeffs.dim() == 2 and coeffs.shape[1] == 2,
                 lambda: f"{op}: coeffs must have shape [K, 2] (real, imag), got {tuple(coeffs.shape)}")
    torch._check(coeffs.dtype.is_floating_point and not coeffs.dtype.is_complex,
                 lambda: f"{op}: coeffs must be a real floating-point tensor, got {coeffs.dtype}")
    trace_check_positions(op, rows, cols)
    torch._check(coeffs.shape[0] == rows.shape[0],
                 lambda: f"{op}: rows, cols and coeffs must have the same length K, got {rows.shape[0]} and "
                         f"{coeffs.shape[0]}")


def trace_check_matrix(op: str, name: str, t: torch.Tensor) -> None:
    """A weight, ``G`` or a ``[tokens, features]`` activation: 2-D, real floating point."""
    torch._check(t.dim() == 2, lambda: f"{op}: {name} must be 2-D, got shape {tuple(t.shape)}")
    torch._check(t.dtype.is_floating_point, lambda: f"{op}: {name} must be floating point, got {t.dtype}")
