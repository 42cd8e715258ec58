"""One backend's layer beside a quantized base (docs/math.md, the delta path): the delta path and the dequantized fold.

- :func:`register_quantized` ``(name, kernels).delta_linear(x, coeffs, rows, cols, alpha, shape, path)``:
  ``x dW^T`` by ``path`` (:mod:`.delta_kernels`: ``rows``, ``separable`` or ``dense``, the last on this
  backend's ``dW`` kernel); the caller adds it to the base layer's own output, whose autograd gives the
  base's share of ``dL/dx``. Backward: ``g dW`` by the same path on the transposed layer, and
  ``dL/dcoeffs`` by the layer's batch paths (:func:`.library.layer_coeff_grad`).
- ``dequantized_linear(x, coeffs, rows, cols, alpha, dequantize, bias)``: ``F.linear(x, dequantize() + dW,
  bias)`` with one GEMM, as the full-precision fold. The dense ``W`` never outlives the call: only ``x``
  and the coefficients are saved, and the backward dequantizes again (as bitsandbytes' own autograd
  does), or the memory a quantized base saves would be spent on a dense copy per layer.

Both are ``autograd.Function``s with ``ctx`` in ``forward`` (no custom-op dispatch: quantized layers
do not trace under ``torch.compile`` anyway) and a first-order backward: a second derivative raises.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import planner
from .delta_kernels import adjoint, delta_dense, delta_rows, delta_separable
from .library import Kernels, fold, layer_coeff_grad

__all__ = ["QuantizedOps", "register_quantized"]


class QuantizedOps(NamedTuple):
    delta_linear: Callable[..., torch.Tensor]       # (x, coeffs, rows, cols, alpha, shape, path)
    dequantized_linear: Callable[..., torch.Tensor]  # (x, coeffs, rows, cols, alpha, dequantize, bias)


def register_quantized(name: str, kernels: Kernels) -> QuantizedOps:
    deltas = {"rows": kernels.delta_rows or delta_rows, "separable": delta_separable,
              "dense": delta_dense(kernels.delta_weight)}

    def coefficient_gradient(x2d, g2d, coeffs, rows, cols, shape, alpha):
        path = planner.backward_path(name, g2d.device.type, x2d.shape[0], rows.shape[0], shape)
        return layer_coeff_grad(kernels, path, x2d, g2d, rows, cols, shape, alpha, coeffs.dtype, kernels.coeff_grad)

    def delta_forward(ctx, x, coeffs, rows, cols, alpha, shape, path):
        ctx.save_for_backward(x, coeffs, rows, cols)
        ctx.alpha, ctx.shape, ctx.path = alpha, tuple(shape), path
        out = deltas[path](x.reshape(-1, shape[1]), coeffs, rows, cols, shape, alpha)
        return out.to(x.dtype).reshape(*x.shape[:-1], shape[0])

    @once_differentiable
    def delta_backward(ctx, grad_out):
        x, coeffs, rows, cols = ctx.saved_tensors
        shape = ctx.shape
        g2d, x2d = grad_out.reshape(-1, shape[0]), x.reshape(-1, shape[1])
        grad_c = grad_x = None
        if ctx.needs_input_grad[1]:
            grad_c = coefficient_gradient(x2d, g2d, coeffs, rows, cols, shape, ctx.alpha)
        if ctx.needs_input_grad[0]:
            grad_x = adjoint(deltas[ctx.path])(g2d, coeffs, rows, cols, shape, ctx.alpha).to(x.dtype).reshape(x.shape)
        return grad_x, grad_c, None, None, None, None, None

    def folded(dequantize, coeffs, rows, cols, alpha, dtype):
        return fold(kernels, dequantize(), coeffs.detach(), rows, cols, alpha).to(dtype)

    def fold_forward(ctx, x, coeffs, rows, cols, alpha, dequantize, bias):
        ctx.save_for_backward(x, coeffs, rows, cols)
        ctx.alpha, ctx.dequantize, ctx.has_bias = alpha, dequantize, bias is not None
        return F.linear(x, folded(dequantize, coeffs, rows, cols, alpha, x.dtype), bias)

    @once_differentiable
    def fold_backward(ctx, grad_out):
        x, coeffs, rows, cols = ctx.saved_tensors
        need_x, need_c = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        weight = folded(ctx.dequantize, coeffs, rows, cols, ctx.alpha, x.dtype) if need_x else None
        shape = (grad_out.shape[-1], x.shape[-1])
        g2d, x2d = grad_out.reshape(-1, shape[0]), x.reshape(-1, shape[1])
        grad_c = coefficient_gradient(x2d, g2d, coeffs, rows, cols, shape, ctx.alpha) if need_c else None
        grad_b = g2d.sum(0) if ctx.has_bias and ctx.needs_input_grad[6] else None
        grad_x = (g2d @ weight).reshape(x.shape) if need_x else None
        return grad_x, grad_c, None, None, None, None, grad_b

    DeltaLinear = type(f"lfma_{name}_delta_linear", (torch.autograd.Function,),
                       {"forward": staticmethod(delta_forward), "backward": staticmethod(delta_backward)})
    DequantizedLinear = type(f"lfma_{name}_dequantized_linear", (torch.autograd.Function,),
                             {"forward": staticmethod(fold_forward), "backward": staticmethod(fold_backward)})

    def delta_linear(x, coeffs, rows, cols, alpha, shape: Sequence[int], path: str) -> torch.Tensor:
        return DeltaLinear.apply(x, coeffs, rows, cols, float(alpha), tuple(shape), path)

    def dequantized_linear(x, coeffs, rows, cols, alpha, dequantize, bias) -> torch.Tensor:
        return DequantizedLinear.apply(x, coeffs, rows, cols, float(alpha), dequantize, bias)

    return QuantizedOps(delta_linear, dequantized_linear)
