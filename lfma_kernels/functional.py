"""The public functional API: validated entry points that dispatch to a backend."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ._checks import check_frequencies, check_k, check_shape, finite_number
from .adapter import Adapter, fold_decision
from .ops import dispatch, library, linear_op
from .ops.decision import Decision, count_positions

__all__ = ["delta_weight", "lfma_linear", "available_backends", "explain"]

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
    alpha = finite_number(alpha, "alpha")
    rows, cols = rows.long(), cols.long()
    decision = dispatch.decide(backend, coeffs.device, coeffs.dtype, rows.shape[0], shape,
                               positions=_positions(rows, cols, shape, backend))
    return library.delta_weight(decision, coeffs, rows, cols, shape, alpha).to(dtype or coeffs.dtype)


def _positions(rows: torch.Tensor, cols: torch.Tensor, shape: Sequence[int], backend: str):
    """The positions' facts for the planner where a backend that reads them may run the call: one host copy of
    K indices, beside the range checks' own."""
    return count_positions(rows, cols, shape) if dispatch.reads_positions(backend, rows.device.type) else None


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
    alpha = finite_number(alpha, "alpha")
    a = Adapter(coeffs, rows.long(), cols.long(), alpha, _positions(rows, cols, shape, backend))
    return linear_op.lfma_linear(fold_decision(x, weight, a, backend), x, weight, bias, a.coeffs, a.rows, a.cols,
                                 alpha)


def explain(
    shape: Sequence[int],
    k: Optional[int] = None,
    *,
    rows: Optional[torch.Tensor] = None,
    cols: Optional[torch.Tensor] = None,
    tokens: Optional[int] = None,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
    weight_grad: bool = False,
) -> Decision:
    """What a call with K frequencies on a ``shape = (d_out, d_in)`` weight runs, and why: the backend,
    how it builds ``dW`` and reads ``dL/dcoeffs`` from ``G``, and (given ``tokens``, the rows of a
    layer's input) how ``lfma_linear``'s backward gets ``dL/dcoeffs``, with the reason every
    alternative was refused. ``device``/``dtype`` are those of the call's tensors (``x`` for a layer,
    the coefficients for ``delta_weight``); a CUDA device may be named on a machine without one.
    ``rows``/``cols`` (or just ``k``) give the frequencies; with them, the cpp backend's algorithms are
    costed exactly (from their distinct terms). ``weight_grad``: the frozen weight needs a gradient too.
    ``print()`` the result: it is the decision a call with these facts executes."""
    shape = check_shape(shape)
    if rows is not None or cols is not None:
        if rows is None or cols is None or rows.dim() != 1 or rows.shape != cols.shape:
            raise ValueError("rows and cols must be given together, as 1-D tensors of one length K")
        if k is not None and k != rows.shape[0]:
            raise ValueError(f"k = {k} but rows and cols hold {rows.shape[0]} frequencies")
        k = rows.shape[0]
    if k is None:
        raise ValueError("pass k, or rows and cols")
    check_k(k, shape)
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0):
        raise ValueError(f"tokens must be a non-negative int, got {tokens!r}")
    positions = None if rows is None else count_positions(rows, cols, shape)
    return dispatch.decide(backend, torch.device(device), dtype, k, shape, tokens=tokens, weight_grad=weight_grad,
                           positions=positions)
