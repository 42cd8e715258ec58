"""A layer beside a quantized base (docs/math.md, the delta path), for every backend, as a decision says.

- :func:`delta_linear` ``(decision, x, coeffs, rows, cols, alpha, shape)``: ``x dW^T`` by the decision's
  ``delta`` path (:mod:`.delta_kernels`: ``rows``, ``separable`` or ``dense``, the last on the backend's
  ``dW`` kernel); the caller adds it to the base layer's own output, whose autograd gives the base's share
  of ``dL/dx``. Backward: ``g dW`` by the same path on the transposed layer, and ``dL/dcoeffs`` by the
  decision's ``backward`` path (:func:`.linear_op.layer_coeff_grad`).
- :func:`dequantized_linear` ``(decision, x, coeffs, rows, cols, alpha, dequantize, bias)``:
  ``F.linear(x, dequantize() + dW, bias)`` with one GEMM, as the full-precision fold. The dense ``W`` never
  outlives the call: only ``x`` and the coefficients are saved, and the backward dequantizes again (as
  bitsandbytes' own autograd does), or the memory a quantized base saves would be spent on a dense copy.

Both are ``autograd.Function``s with ``ctx`` in ``forward`` (no custom-op dispatch: quantized layers do
not trace under ``torch.compile`` anyway) and a first-order backward: a second derivative raises.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .. import reference
from . import dispatch, linear_op
from .decision import Decision
from .delta_kernels import adjoint, delta_dense, delta_rows, delta_separable
from .library import coeff_grad_runner, fold

__all__ = ["delta_linear", "dequantized_linear"]


def _delta_way(decision: Decision):
    """``x dW^T`` by the decision's delta path, on its backend's kernels where it has them."""
    kernels = dispatch.kernels(decision.backend)
    if decision.delta == "rows":
        return kernels.delta_rows or delta_rows
    if decision.delta == "separable":
        return delta_separable
    return delta_dense(lambda c, r, v, shape, alpha: kernels.delta_weight(c, r, v, shape, alpha, decision.dw))


def _coefficient_gradient(decision: Decision, x2d, g2d, coeffs, rows, cols, shape, alpha):
    run = coeff_grad_runner(decision.backend, decision.grad, decision.dw, "kernel")
    return linear_op.layer_coeff_grad(decision.backend, decision.backward or "dense", x2d, g2d, rows, cols, shape,
                                      alpha, coeffs.dtype, run)


class DeltaLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, coeffs, rows, cols, alpha, shape, decision):
        ctx.save_for_backward(x, coeffs, rows, cols)
        ctx.alpha, ctx.shape, ctx.decision = alpha, tuple(shape), decision
        out = _delta_way(decision)(x.reshape(-1, shape[1]), coeffs, rows, cols, shape, alpha)
        return out.to(x.dtype).reshape(*x.shape[:-1], shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, coeffs, rows, cols = ctx.saved_tensors
        shape, decision = ctx.shape, ctx.decision
        g2d, x2d = grad_out.reshape(-1, shape[0]), x.reshape(-1, shape[1])
        grad_c = grad_x = None
        if ctx.needs_input_grad[1]:
            grad_c = _coefficient_gradient(decision, x2d, g2d, coeffs, rows, cols, shape, ctx.alpha)
        if ctx.needs_input_grad[0]:
            way = adjoint(_delta_way(decision))
            grad_x = way(g2d, coeffs, rows, cols, shape, ctx.alpha).to(x.dtype).reshape(x.shape)
        return grad_x, grad_c, None, None, None, None, None


def _folded(decision: Decision, dequantize, coeffs, rows, cols, alpha, dtype):
    kernels = dispatch.kernels(decision.backend)
    return fold(kernels, dequantize(), coeffs.detach(), rows, cols, alpha, decision.dw).to(dtype)


class DequantizedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, coeffs, rows, cols, alpha, dequantize, bias, decision):
        ctx.save_for_backward(x, coeffs, rows, cols)
        ctx.alpha, ctx.dequantize, ctx.has_bias, ctx.decision = alpha, dequantize, bias is not None, decision
        return F.linear(x, _folded(decision, dequantize, coeffs, rows, cols, alpha, x.dtype), bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, coeffs, rows, cols = ctx.saved_tensors
        decision = ctx.decision
        need_x, need_c = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        weight = _folded(decision, ctx.dequantize, coeffs, rows, cols, ctx.alpha, x.dtype) if need_x else None
        shape = (grad_out.shape[-1], x.shape[-1])
        g2d, x2d = grad_out.reshape(-1, shape[0]), x.reshape(-1, shape[1])
        grad_c = _coefficient_gradient(decision, x2d, g2d, coeffs, rows, cols, shape, ctx.alpha) if need_c else None
        grad_b = g2d.sum(0) if ctx.has_bias and ctx.needs_input_grad[6] else None
        grad_x = (g2d @ weight).reshape(x.shape) if need_x else None
        return grad_x, grad_c, None, None, None, None, grad_b, None


@dispatch.executes(reference.delta_linear)
def delta_linear(decision: Decision, x, coeffs, rows, cols, alpha, shape: Sequence[int]) -> torch.Tensor:
    """``x dW^T`` by ``decision.delta`` (``rows``, ``separable`` or ``dense``)."""
    return DeltaLinear.apply(x, coeffs, rows, cols, float(alpha), tuple(shape), decision)


@dispatch.executes(reference.dequantized_linear)
def dequantized_linear(decision: Decision, x, coeffs, rows, cols, alpha, dequantize, bias) -> torch.Tensor:
    """``F.linear(x, dequantize() + dW, bias)``, one GEMM, the dense weight transient."""
    return DequantizedLinear.apply(x, coeffs, rows, cols, float(alpha), dequantize, bias, decision)
