"""The adapted layer as one op, ``lfma::linear``: ``F.linear(x, W + dW, bias)`` with its backward, for every
backend, as a :class:`.decision.Decision` says.

``dW`` is folded into ``W`` so the layer costs one GEMM forward and one for ``dL/dx``. The op also returns
``W + dW`` so its backward can reuse it (rebuilding it is a few percent of a CPU training step at ViT-B
shapes); :func:`lfma_linear` hands out only the output. The backward takes ``dL/dcoeffs`` by the
decision's ``backward`` path: the dense weight gradient ``G = g^T x`` and the backend's ``coeff_grad``, or
one of the batch paths that never form ``G`` (docs/math.md). Eager calls run the same forward and backward
through an ``autograd.Function`` instead of the op, skipping the custom op's Python dispatch (see
``LinearFunction``); under ``torch.compile`` the op runs, under ``torch.func`` transforms a Function in the
style they accept (``TransformableLinear``, with a jvp and a generated vmap rule).

Every derivative has derivatives of its own: a backward run with ``create_graph=True`` (an input-gradient
penalty, a Hessian-vector product) builds a differentiable graph instead of taking the first-order fast
paths: there ``dL/dcoeffs`` comes from the dense ``G`` whatever the decision said, since the batch paths
would hide ``g`` and ``x`` from autograd.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

from .. import reference
from . import dispatch, torch_kernels
from .common import add_delta, compute_dtype
from .decision import Decision
from .library import coeff_grad_from, coeff_grad_runner, differentiable_delta_weight, fold, folded_weight_op
from .trace_checks import trace_check_frequencies, trace_check_matrix

__all__ = ["lfma_linear", "layer_coeff_grad"]


def layer_coeff_grad(backend: str, path: str, x2d: torch.Tensor, g2d: torch.Tensor, rows, cols,
                     shape: Sequence[int], alpha: float, coeffs_dtype: torch.dtype, coeff_grad,
                     g_dense: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A layer's ``dL/dcoeffs`` from its input rows ``x2d`` and output gradient ``g2d`` by ``path`` (a
    decision's ``backward``): from ``G = g^T x`` (``g_dense`` when the caller formed it) and ``coeff_grad``,
    or by one of the batch paths that never form ``G`` (the backend's own, else torch's)."""
    if path == "dense":
        return coeff_grad_from(g2d.T @ x2d if g_dense is None else g_dense, rows, cols, alpha, coeffs_dtype,
                               coeff_grad)
    kernels = dispatch.kernels(backend)
    if path == "gemm":
        batch = kernels.coeff_grad_batch_gemm or torch_kernels.coeff_grad_batch_gemm
    else:
        batch = kernels.coeff_grad_batch_fft or torch_kernels.coeff_grad_batch_fft
    return batch(x2d, g2d, rows, cols, shape, alpha, compute_dtype(coeffs_dtype)).to(coeffs_dtype)


def _forward(x, weight, bias, coeffs, rows, cols, alpha, backend, dw,
             fold_op=None) -> Tuple[torch.Tensor, torch.Tensor]:
    folded = (fold(dispatch.kernels(backend), weight, coeffs, rows, cols, alpha, dw) if fold_op is None
              else fold_op(weight, coeffs, rows, cols, alpha, backend, dw))
    if folded.dtype != x.dtype:  # autocast (see lfma_linear below): the GEMMs run in x's dtype
        folded = folded.to(x.dtype)
    return F.linear(x, folded, bias), folded


@torch.library.custom_op("lfma::linear", mutates_args=())
def linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], coeffs: torch.Tensor,
              rows: torch.Tensor, cols: torch.Tensor, alpha: float, backend: str, dw: str, grad: str,
              backward: str) -> Tuple[torch.Tensor, torch.Tensor]:
    return _forward(x, weight, bias, coeffs, rows, cols, alpha, backend, dw)


@linear_op.register_fake
def _(x, weight, bias, coeffs, rows, cols, alpha, backend, dw, grad, backward):
    trace_check_matrix("lfma::linear", "weight", weight)
    trace_check_frequencies("lfma::linear", coeffs, rows, cols)
    torch._check(x.dim() >= 1 and x.shape[-1] == weight.shape[1],
                 lambda: f"lfma::linear: x must end in d_in = {weight.shape[1]}, got shape {tuple(x.shape)}")
    torch._check(bias is None or tuple(bias.shape) == (weight.shape[0],),
                 lambda: f"lfma::linear: bias must have shape ({weight.shape[0]},), got "
                         f"{None if bias is None else tuple(bias.shape)}")
    return x.new_empty((*x.shape[:-1], weight.shape[0])), torch.empty_like(weight, dtype=x.dtype)


def _setup(ctx, inputs, output):
    x, weight, bias, coeffs, rows, cols, alpha, backend, dw, grad, backward = inputs
    ctx.save_for_backward(x, output[1], coeffs, rows, cols)
    ctx.alpha, ctx.has_bias, ctx.weight_dtype = alpha, bias is not None, weight.dtype
    ctx.decision = (backend, dw, grad, backward)
    ctx.set_materialize_grads(False)  # W + dW is an internal output: no zero gradient for it


def _backward(ctx, grad_out, grad_folded, how: str = "op"):
    """First order: the fast paths (the saved ``W + dW``, the decision's batch path for ``dL/dcoeffs``).
    Under grad mode (``create_graph=True``, and every torch.func transform, which differentiate with it)
    the backward is a graph of its own, for a second derivative: ``dL/dx = g (W + dW)`` then reaches the
    coefficients through the saved ``W + dW``, an output of this very function, whose gradient
    (``grad_folded``) comes back here and goes on to the weight and, by ``coeff_grad`` (``dW``'s adjoint),
    to the coefficients; ``dL/dcoeffs`` is read from the dense ``G`` by the differentiable ``coeff_grad``."""
    x, folded, coeffs, rows, cols = ctx.saved_tensors
    backend, dw, grad, path = ctx.decision
    need_x, need_w, need_b, need_c = ctx.needs_input_grad[:4]
    differentiable = torch.is_grad_enabled()
    coeff_grad = coeff_grad_runner(backend, grad, dw, "differentiable" if differentiable else how)
    shape = tuple(folded.shape)
    grad_x = grad_w = grad_b = grad_c = None
    if grad_out is not None:
        g2d = grad_out.reshape(-1, shape[0])
        x2d = x.reshape(-1, shape[1])
        weight_grad = need_w or differentiable
        g_dense = g2d.T @ x2d if weight_grad and (need_w or need_c) else None
        grad_w = g_dense if need_w else None
        if need_c:
            grad_c = layer_coeff_grad(backend, "dense" if weight_grad else path, x2d, g2d, rows, cols, shape,
                                      ctx.alpha, coeffs.dtype, coeff_grad, g_dense)
        if need_b and ctx.has_bias:
            grad_b = g2d.sum(0)
        # dL/dx last: its GEMM is compute-bound and streams g from memory at little cost, while the
        # coefficient gradient is memory-bound and reads g best while the op that wrote it has left it in cache.
        if need_x:
            grad_x = (g2d @ folded).reshape(x.shape)
    if grad_folded is not None:  # W + dW itself was differentiated (a second derivative, a jvp's)
        if need_w:
            extra = grad_folded.to(ctx.weight_dtype)
            grad_w = extra if grad_w is None else grad_w + extra
        if need_c:
            extra = coeff_grad_from(grad_folded, rows, cols, ctx.alpha, coeffs.dtype, coeff_grad)
            grad_c = extra if grad_c is None else grad_c + extra
    return (grad_x, grad_w, grad_b, grad_c) + (None,) * 7


linear_op.register_autograd(_backward, setup_context=_setup)


class LinearFunction(torch.autograd.Function):
    """``linear_op`` for eager calls: the same forward, context and backward without the custom op's Python
    dispatch (~0.15 ms per call of a layer, forward and backward, whatever its size: what a small layer, or
    a GPU layer whose kernels take microseconds, is dominated by). ``forward`` takes ``ctx`` (no separate
    ``setup_context``), so ``apply`` skips binding the arguments through ``inspect.signature`` on every
    call; that also makes it refuse torch.func transforms, which get ``TransformableLinear``."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _forward(*inputs[:9])
        _setup(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, grad_out, grad_folded):
        return _backward(ctx, grad_out, grad_folded, "kernel")


class TransformableLinear(torch.autograd.Function):
    """The same layer for torch.func transforms (grad, vmap(grad) per-sample gradients, jacrev, jacfwd,
    hessian): ``setup_context`` style, a jvp, and a vmap rule generated from them. W + dW is folded through
    the op, whose vmap rule serves coefficients batched by vmap (ensembles); the backward is the
    differentiable one, since the transforms differentiate with create_graph."""
    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, coeffs, rows, cols, alpha, backend, dw, grad, backward):
        return _forward(x, weight, bias, coeffs, rows, cols, alpha, backend, dw, fold_op=folded_weight_op)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup(ctx, inputs, output)
        # The same tensors as for the backward: the generated vmap rule keeps one record of which saved
        # tensors are batched per ctx (two different sets fail under jacrev(jacfwd)).
        ctx.save_for_forward(inputs[0], output[1], *inputs[3:6])

    @staticmethod
    def backward(ctx, grad_out, grad_folded):
        return _backward(ctx, grad_out, grad_folded, "kernel")

    @staticmethod
    def jvp(ctx, t_x, t_weight, t_bias, t_coeffs, *_):
        """Forward mode (torch.func.jvp, jacfwd, hessian, and eager forward AD): ``y = x (W + dW)^T + b`` is
        linear in each of ``x``, ``W``, ``b`` and the coefficients."""
        x, folded, _, rows, cols = ctx.saved_tensors
        backend, dw, grad, _ = ctx.decision
        t_folded = torch.zeros_like(folded) if t_weight is None else t_weight.to(folded.dtype)
        if t_coeffs is not None:
            t_folded = t_folded + differentiable_delta_weight(t_coeffs, rows, cols, *folded.shape, ctx.alpha,
                                                              backend, dw, grad).to(folded.dtype)
        t_out = F.linear(x, t_folded, t_bias)
        if t_x is not None:
            t_out = t_out + F.linear(t_x, folded)
        return t_out, t_folded


def _composite(x, weight, bias, coeffs, rows, cols, alpha, *decision) -> torch.Tensor:
    """torch.compile of a torch.func transform (compile(grad(f))): Dynamo inlines the Function and hands the
    ops the transforms' wrapped tensors, which custom ops refuse; the separable dW in plain differentiable
    operations traces and transforms as it is (same values; this rare case runs no other algorithm)."""
    dw = torch_kernels.delta_weight_separable(coeffs, rows, cols, tuple(weight.shape), alpha)
    return F.linear(x, add_delta(weight, dw).to(x.dtype), bias)


def _run(*args) -> torch.Tensor:
    # Under torch.func transforms (compiled or not) and eager forward-mode AD: the Function they accept,
    # which has a jvp; traced (torch.compile, export): the op, which has a fake implementation; eager: the
    # Function without the op's dispatch.
    if torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0:
        if torch.compiler.is_compiling():
            return _composite(*args)
        return TransformableLinear.apply(*args)[0]
    if torch.compiler.is_compiling():
        return linear_op(*args)[0]
    return LinearFunction.apply(*args)[0]


@dispatch.executes(reference.lfma_linear)
def lfma_linear(decision: Decision, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                coeffs: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, alpha: float) -> torch.Tensor:
    """``F.linear(x, W + dW, bias)`` as ``decision`` says; differentiable w.r.t. ``x``, ``coeffs`` (and ``W``,
    ``bias`` when they require grad)."""
    choices = (decision.backend, decision.dw, decision.grad, decision.backward or "dense")
    device = x.device.type
    if torch.is_autocast_enabled(device):
        # torch.autocast casts F.linear's operands to its dtype, but leaves a custom op's inputs alone while
        # still casting the F.linear inside it: the output, x and W + dW would then disagree in the backward.
        # Cast as autocast would (W + dW is folded in the weight's own precision first, then cast, as F.linear
        # casts W) and run the op with autocast off.
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            return _run(x.to(dtype), weight, None if bias is None else bias.to(dtype), coeffs, rows, cols,
                        float(alpha), *choices)
    if x.dtype != weight.dtype:
        raise RuntimeError(f"lfma::linear: x is {x.dtype} but the weight is {weight.dtype}; as for F.linear they "
                           "must agree (or run under torch.autocast)")
    return _run(x, weight, bias, coeffs, rows, cols, float(alpha), *choices)
