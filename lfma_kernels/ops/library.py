"""``dW``, ``W + dW`` and ``dL/dcoeffs`` from ``G`` as ``torch.library`` custom ops, once for every backend.

``lfma::delta_weight``, ``lfma::folded_weight`` and ``lfma::coeff_grad`` take the backend's name and the
algorithms a :class:`.decision.Decision` chose as arguments and run that backend's kernels
(:func:`.dispatch.kernels`). Being custom ops with fake implementations they trace under
``torch.compile`` without graph breaks and pass ``opcheck``; the string arguments are constants of the
traced graph. The layer op, ``lfma::linear``, is :mod:`.linear_op`'s.

``dW`` is linear in the coefficients and ``coeff_grad`` is its adjoint (the same ``s e^{i theta_k}``
terms), so each one's backward is the other: derivatives of every order, with no extra kernel. They are
registered twice: on the ops (``torch.compile`` traces them, and eager calls of the ops) and as
``autograd.Function``s with ``setup_context`` and a generated vmap rule (``torch.func`` transforms refuse
the ops' generated autograd: "must override the setup_context staticmethod").
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import reference
from . import dispatch
from .common import compute_dtype, fold_with
from .decision import Decision
from .trace_checks import trace_check_frequencies, trace_check_matrix, trace_check_positions

__all__ = ["stored_transposed", "fold", "delta_weight", "folded_weight", "coeff_grad_from", "differentiable_delta_weight",
           "folded_weight_op", "coeff_grad_runner"]


def stored_transposed(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is the transpose of a contiguous tensor (a transformers Conv1D stores ``(in, out)``):
    :func:`fold` then builds ``W + dW`` in that stored layout, so its algorithm is decided for it."""
    return weight.dim() == 2 and not weight.is_contiguous() and weight.t().is_contiguous()


def fold(kernels, weight: torch.Tensor, coeffs, rows, cols, alpha, dw: str) -> torch.Tensor:
    """``W + dW`` in ``weight``'s layout by ``kernels.folded_weight`` with algorithm ``dw``. A weight stored
    transposed (:func:`stored_transposed`) is folded in its stored layout, with no copy: ``(W + dW)^T = W^T +
    dW^T``, and ``dW^T`` is the same sum of cosines with the roles of ``rows`` and ``cols`` swapped (the phase
    ``m u / d_out + n v / d_in`` is symmetric)."""
    if stored_transposed(weight):
        return kernels.folded_weight(weight.t(), coeffs, cols, rows, alpha, dw).t()
    return kernels.folded_weight(weight, coeffs, rows, cols, alpha, dw)


def coeff_grad_from(grad_dw: torch.Tensor, rows, cols, alpha, coeffs_dtype, run) -> torch.Tensor:
    """``dL/dcoeffs`` in the coefficients' dtype from ``G``, by ``run(G, rows, cols, alpha)``: an op or a
    differentiable Function (both traceable), or in an eager first-order backward the kernel itself."""
    return run(grad_dw.to(compute_dtype(coeffs_dtype)), rows, cols, alpha).to(coeffs_dtype)


def _vmap_by_loop(op):
    """A vmap rule for an op whose kernels take one matrix: one call per batch entry, stacked (per-sample
    gradients, ensembles of coefficients run through the kernels instead of functorch's warning fallback)."""
    def rule(info, in_dims, *args):
        outputs = [op(*(a if d is None else a.select(d, i) for a, d in zip(args, in_dims)))
                   for i in range(info.batch_size)]
        return torch.stack(outputs), 0
    return rule


@torch.library.custom_op("lfma::delta_weight", mutates_args=())
def delta_weight_op(coeffs: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, d_out: int, d_in: int,
                    alpha: float, backend: str, dw: str, grad: str) -> torch.Tensor:
    """``grad``: the algorithm of its backward (a ``coeff_grad``)."""
    return dispatch.kernels(backend).delta_weight(coeffs, rows, cols, (d_out, d_in), alpha, dw)


@delta_weight_op.register_fake
def _(coeffs, rows, cols, d_out, d_in, alpha, backend, dw, grad):
    trace_check_frequencies("lfma::delta_weight", coeffs, rows, cols)
    torch._check(d_out >= 1 and d_in >= 1,
                 lambda: f"lfma::delta_weight: d_out and d_in must be positive, got {d_out} x {d_in}")
    return coeffs.new_empty((d_out, d_in), dtype=compute_dtype(coeffs.dtype))


@torch.library.custom_op("lfma::folded_weight", mutates_args=())
def folded_weight_op(weight: torch.Tensor, coeffs: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                     alpha: float, backend: str, dw: str) -> torch.Tensor:
    return fold(dispatch.kernels(backend), weight, coeffs, rows, cols, alpha, dw)


@folded_weight_op.register_fake
def _(weight, coeffs, rows, cols, alpha, backend, dw):
    trace_check_matrix("lfma::folded_weight", "weight", weight)
    trace_check_frequencies("lfma::folded_weight", coeffs, rows, cols)
    return torch.empty_like(weight)


@torch.library.custom_op("lfma::coeff_grad", mutates_args=())
def coeff_grad_op(grad_dw: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, alpha: float, backend: str,
                  grad: str, dw: str) -> torch.Tensor:
    """``dw``: the algorithm of its backward (a ``delta_weight``)."""
    return dispatch.kernels(backend).coeff_grad(grad_dw, rows, cols, alpha, grad)


@coeff_grad_op.register_fake
def _(grad_dw, rows, cols, alpha, backend, grad, dw):
    trace_check_matrix("lfma::coeff_grad", "grad_dw", grad_dw)
    trace_check_positions("lfma::coeff_grad", rows, cols)
    return grad_dw.new_empty((rows.shape[0], 2))


for _op in (delta_weight_op, folded_weight_op, coeff_grad_op):
    _op.register_vmap(_vmap_by_loop(_op))


def _delta_weight_setup(ctx, inputs, output):
    coeffs, rows, cols, _, _, alpha, backend, dw, grad = inputs
    ctx.save_for_backward(rows, cols)
    ctx.alpha, ctx.coeffs_dtype, ctx.algorithms = alpha, coeffs.dtype, (backend, grad, dw)


def _delta_weight_backward(ctx, grad_dw, coeff_grad=coeff_grad_op):
    rows, cols = ctx.saved_tensors
    run = lambda g, r, c, a: coeff_grad(g, r, c, a, *ctx.algorithms)  # noqa: E731
    return (coeff_grad_from(grad_dw, rows, cols, ctx.alpha, ctx.coeffs_dtype, run),) + (None,) * 8


def _coeff_grad_setup(ctx, inputs, output):
    grad_dw, rows, cols, alpha, backend, grad, dw = inputs
    ctx.save_for_backward(rows, cols)
    ctx.alpha, ctx.shape, ctx.grad_dtype, ctx.algorithms = alpha, tuple(grad_dw.shape), grad_dw.dtype, (backend, dw,
                                                                                                        grad)


def _coeff_grad_backward(ctx, grad_coeffs, delta_weight=delta_weight_op):
    rows, cols = ctx.saved_tensors
    dw = delta_weight(grad_coeffs.to(compute_dtype(ctx.grad_dtype)), rows, cols, *ctx.shape, ctx.alpha,
                      *ctx.algorithms)
    return (dw.to(ctx.grad_dtype),) + (None,) * 6


delta_weight_op.register_autograd(_delta_weight_backward, setup_context=_delta_weight_setup)
coeff_grad_op.register_autograd(_coeff_grad_backward, setup_context=_coeff_grad_setup)


class DeltaWeight(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(coeffs, rows, cols, d_out, d_in, alpha, backend, dw, grad):
        return delta_weight_op(coeffs, rows, cols, d_out, d_in, alpha, backend, dw, grad)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _delta_weight_setup(ctx, inputs, output)
        ctx.save_for_forward(inputs[1], inputs[2])
        ctx.shape, ctx.forward_algorithms = inputs[3:5], inputs[6:9]

    @staticmethod
    def backward(ctx, grad_dw):
        return _delta_weight_backward(ctx, grad_dw, CoeffGrad.apply)

    @staticmethod
    def jvp(ctx, tangent, *_):  # linear: the tangent of dW is dW of the tangent
        rows, cols = ctx.saved_tensors
        return DeltaWeight.apply(tangent, rows, cols, *ctx.shape, ctx.alpha, *ctx.forward_algorithms)


class CoeffGrad(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(grad_dw, rows, cols, alpha, backend, grad, dw):
        return coeff_grad_op(grad_dw, rows, cols, alpha, backend, grad, dw)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _coeff_grad_setup(ctx, inputs, output)
        ctx.save_for_forward(inputs[1], inputs[2])
        ctx.forward_algorithms = inputs[4:7]

    @staticmethod
    def backward(ctx, grad_coeffs):
        return _coeff_grad_backward(ctx, grad_coeffs, DeltaWeight.apply)

    @staticmethod
    def jvp(ctx, tangent, *_):
        rows, cols = ctx.saved_tensors
        return CoeffGrad.apply(tangent, rows, cols, ctx.alpha, *ctx.forward_algorithms)


def _traceable(op, function):
    """The Function under torch.func transforms (they refuse the op's generated autograd), else the op (its
    registered autograd has every order too, and torch.compile traces it)."""
    return lambda *args: function.apply(*args) if torch._C._are_functorch_transforms_active() else op(*args)


differentiable_delta_weight = _traceable(delta_weight_op, DeltaWeight)
differentiable_coeff_grad = _traceable(coeff_grad_op, CoeffGrad)


@dispatch.executes(reference.delta_weight)
def delta_weight(decision: Decision, coeffs: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                 shape: Sequence[int], alpha: float) -> torch.Tensor:
    """``dW`` as ``decision`` says, differentiable w.r.t. ``coeffs``."""
    return differentiable_delta_weight(coeffs, rows, cols, int(shape[0]), int(shape[1]), float(alpha),
                                       decision.backend, decision.dw, decision.grad)


@dispatch.executes(fold_with(reference.delta_weight))
def folded_weight(decision: Decision, weight: torch.Tensor, coeffs: torch.Tensor, rows: torch.Tensor,
                  cols: torch.Tensor, alpha: float) -> torch.Tensor:
    """``W + dW`` in ``W``'s dtype as ``decision`` says, no autograd."""
    return folded_weight_op(weight, coeffs.detach(), rows, cols, float(alpha), decision.backend, decision.dw)


def coeff_grad_runner(backend: str, grad: str, dw: str, how: str):
    """``(G, rows, cols, alpha) -> dL/dcoeffs`` by ``backend``'s ``grad`` algorithm: ``"kernel"`` itself (an
    eager first-order backward), ``"op"`` (traced backwards) or ``"differentiable"`` (a backward under grad
    mode; ``dw`` is the algorithm of its own backward)."""
    if how == "kernel":
        kernel = dispatch.kernels(backend).coeff_grad
        return lambda g, r, c, a: kernel(g, r, c, a, grad)
    run = coeff_grad_op if how == "op" else differentiable_coeff_grad
    return lambda g, r, c, a: run(g, r, c, a, backend, grad, dw)
