"""One backend's kernels as ``torch.library`` custom ops with fake implementations and autograd.

A backend supplies three kernels (:class:`Kernels`); :func:`register_backend` turns them into the
ops ``lfma::<name>_delta_weight``, ``lfma::<name>_folded_weight``, ``lfma::<name>_coeff_grad`` and
``lfma::<name>_linear`` and returns the functions dispatch calls. Being custom ops with fake
implementations, they trace under ``torch.compile`` without graph breaks and pass ``opcheck``.

``<name>_linear`` is ``F.linear(x, W + dW, bias)``: ``dW`` is folded into ``W`` so the layer costs
one GEMM forward and one for ``dL/dx``. The op also returns ``W + dW`` so its backward can reuse it
(rebuilding it cost ~2-4% of a CPU training step at ViT-B shapes); the wrapper hands out only the
output. The backward takes ``dL/dcoeffs`` from the cheapest of: the dense weight gradient ``G = g^T x``
and the backend's ``coeff_grad(G)``, or one of the batch paths that never form ``G`` (docs/math.md), as
:func:`.planner.backward_path` says. Eager calls run the same forward and backward through an
``autograd.Function`` instead of the op, skipping the custom op's Python dispatch (see
``LinearFunction``); under ``torch.compile`` the op runs, under ``torch.func`` transforms a Function
in the style they accept (``TransformableLinear``, with a jvp and a generated vmap rule).

Every derivative has derivatives of its own: a backward run with ``create_graph=True`` (an
input-gradient penalty, a Hessian-vector product) builds a differentiable graph instead of reusing the
first-order fast paths, and ``delta_weight`` and ``coeff_grad`` are each other's backward.

The fake implementations check their inputs with ``torch._check`` (shapes, K, dtypes), so a bad call
under ``torch.compile`` fails at trace time, naming the op and the argument.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

from . import planner, torch_kernels
from .common import add_delta, compute_dtype

__all__ = ["Kernels", "BackendOps", "register_backend", "fold_with", "fold", "coeff_grad_from", "layer_coeff_grad",
           "trace_check_frequencies", "trace_check_positions", "trace_check_matrix"]


class Kernels(NamedTuple):
    # dW (d_out x d_in) in compute_dtype(coeffs.dtype); no autograd needed.
    delta_weight: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Sequence[int], float], torch.Tensor]
    # W + dW in W's dtype, the add done in float32 or wider.
    folded_weight: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
    # dL/dcoeffs [K, 2] from G = dL/d(dW) (float32 or float64), in G's dtype.
    coeff_grad: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
    # Optional: the backend's own "gemm" batch path of a layer's backward, with
    # torch_kernels.coeff_grad_batch_gemm's signature (x2d, g2d, rows, cols, shape, alpha, dtype). It runs
    # inside the traced backward, so it must be traceable (a custom op with a fake implementation).
    # None: torch_kernels' version.
    coeff_grad_batch_gemm: Optional[Callable[..., torch.Tensor]] = None
    # Optional: the backend's own "fft" batch path (same signature, torch_kernels.coeff_grad_batch_fft's
    # contract). None: torch_kernels' version. What it costs is in the planner's tables.
    coeff_grad_batch_fft: Optional[Callable[..., torch.Tensor]] = None
    # Optional: the backend's own rows way of the delta path beside a quantized base, with
    # delta_kernels.delta_rows's signature (x2d, coeffs, rows, cols, shape, alpha). None: the torch version.
    delta_rows: Optional[Callable[..., torch.Tensor]] = None
    # Optional: several adapters' rows way in one call, no autograd (a mixed-adapter batch while
    # decoding): (x2d with rows grouped by adapter, [Adapter, ...], [rows of each], shape). None: one
    # delta_rows call per adapter.
    delta_rows_grouped: Optional[Callable[..., torch.Tensor]] = None
    # Optional, for kernels that choose their algorithm themselves (cpp): what they would choose, with
    # their estimates, for planner.plan (planner.AlgorithmReport).
    algorithm_report: Optional[planner.AlgorithmReport] = None


class BackendOps(NamedTuple):
    """What :mod:`lfma_kernels.ops.dispatch` calls on a backend."""
    delta_weight: Callable[..., torch.Tensor]   # (coeffs, rows, cols, shape, alpha), differentiable
    folded_weight: Callable[..., torch.Tensor]  # (weight, coeffs, rows, cols, alpha), no autograd
    lfma_linear: Callable[..., torch.Tensor]    # (x, weight, bias, coeffs, rows, cols, alpha), differentiable


def fold(kernels: Kernels, weight: torch.Tensor, coeffs, rows, cols, alpha) -> torch.Tensor:
    """``W + dW`` in ``weight``'s layout. A weight that is the transpose of a contiguous tensor (a
    transformers Conv1D stores ``(in, out)``) is folded in its stored layout, with no copy:
    ``(W + dW)^T = W^T + dW^T``, and ``dW^T`` is the same sum of cosines with the roles of ``rows``
    and ``cols`` swapped (the phase ``m u / d_out + n v / d_in`` is symmetric in them)."""
    if weight.dim() == 2 and not weight.is_contiguous() and weight.t().is_contiguous():
        return kernels.folded_weight(weight.t(), coeffs, cols, rows, alpha).t()
    return kernels.folded_weight(weight, coeffs, rows, cols, alpha)


def fold_with(delta_weight: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """A ``folded_weight(weight, coeffs, rows, cols, alpha)`` from a ``delta_weight``: ``W + dW`` in
    ``W``'s dtype, no autograd."""
    def folded_weight(weight, coeffs, rows, cols, alpha) -> torch.Tensor:
        with torch.no_grad():
            return add_delta(weight, delta_weight(coeffs, rows, cols, tuple(weight.shape), alpha))
    return folded_weight


# ---------------------------------------------------------------------------------------------
# input checks of the fake implementations (torch._check: a bad call fails at trace time)
# ---------------------------------------------------------------------------------------------
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


def coeff_grad_from(grad_dw: torch.Tensor, rows, cols, alpha, coeffs_dtype, run) -> torch.Tensor:
    """``dL/dcoeffs`` in the coefficients' dtype from ``G``, by ``run``: an op or a differentiable
    Function (both traceable), or in an eager first-order backward the kernel itself."""
    return run(grad_dw.to(compute_dtype(coeffs_dtype)), rows, cols, alpha).to(coeffs_dtype)


def layer_coeff_grad(kernels: Kernels, path: str, x2d: torch.Tensor, g2d: torch.Tensor, rows, cols,
                     shape: Sequence[int], alpha: float, coeffs_dtype: torch.dtype, coeff_grad,
                     g_dense: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A layer's ``dL/dcoeffs`` from its input rows ``x2d`` and output gradient ``g2d`` by ``path``
    (:func:`.planner.backward_path`): from ``G = g^T x`` (``g_dense`` when the caller formed it) and
    ``coeff_grad``, or by one of the batch paths that never form ``G`` (the backend's own, else torch's)."""
    if path == "dense":
        return coeff_grad_from(g2d.T @ x2d if g_dense is None else g_dense, rows, cols, alpha, coeffs_dtype,
                               coeff_grad)
    if path == "gemm":
        batch = kernels.coeff_grad_batch_gemm or torch_kernels.coeff_grad_batch_gemm
    else:
        batch = kernels.coeff_grad_batch_fft or torch_kernels.coeff_grad_batch_fft
    return batch(x2d, g2d, rows, cols, shape, alpha, compute_dtype(coeffs_dtype)).to(coeffs_dtype)


def _vmap_by_loop(op):
    """A vmap rule for an op whose kernels take one matrix: one call per batch entry, stacked."""
    def rule(info, in_dims, *args):
        outputs = [op(*(a if d is None else a.select(d, i) for a, d in zip(args, in_dims)))
                   for i in range(info.batch_size)]
        return torch.stack(outputs), 0
    return rule


def register_backend(name: str, kernels: Kernels) -> BackendOps:
    prefix = f"lfma::{name}_"

    @torch.library.custom_op(prefix + "delta_weight", mutates_args=())
    def delta_weight_op(coeffs: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, d_out: int, d_in: int,
                        alpha: float) -> torch.Tensor:
        return kernels.delta_weight(coeffs, rows, cols, (d_out, d_in), alpha)

    @delta_weight_op.register_fake
    def _(coeffs, rows, cols, d_out, d_in, alpha):
        trace_check_frequencies(prefix + "delta_weight", coeffs, rows, cols)
        torch._check(d_out >= 1 and d_in >= 1, lambda: f"{prefix}delta_weight: d_out and d_in must be positive, "
                                                       f"got {d_out} x {d_in}")
        return coeffs.new_empty((d_out, d_in), dtype=compute_dtype(coeffs.dtype))

    @torch.library.custom_op(prefix + "folded_weight", mutates_args=())
    def folded_weight_op(weight: torch.Tensor, coeffs: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                         alpha: float) -> torch.Tensor:
        return fold(kernels, weight, coeffs, rows, cols, alpha)

    @folded_weight_op.register_fake
    def _(weight, coeffs, rows, cols, alpha):
        trace_check_matrix(prefix + "folded_weight", "weight", weight)
        trace_check_frequencies(prefix + "folded_weight", coeffs, rows, cols)
        return torch.empty_like(weight)

    @torch.library.custom_op(prefix + "coeff_grad", mutates_args=())
    def coeff_grad_op(grad_dw: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, alpha: float) -> torch.Tensor:
        return kernels.coeff_grad(grad_dw, rows, cols, alpha)

    @coeff_grad_op.register_fake
    def _(grad_dw, rows, cols, alpha):
        trace_check_matrix(prefix + "coeff_grad", "grad_dw", grad_dw)
        trace_check_positions(prefix + "coeff_grad", rows, cols)
        return grad_dw.new_empty((rows.shape[0], 2))

    # One matrix per kernel call: under torch.vmap (per-sample gradients, ensembles of coefficients)
    # the ops run once per batch entry instead of through functorch's warning fallback.
    for op in (delta_weight_op, folded_weight_op, coeff_grad_op):
        op.register_vmap(_vmap_by_loop(op))

    # dW is linear in the coefficients and coeff_grad is its adjoint (the same s * e^{i theta_k} terms),
    # so each one's backward is the other: derivatives of every order, with no extra kernel. They are
    # registered twice: on the ops (torch.compile traces them, and eager calls of the ops) and as
    # autograd.Functions with ``setup_context`` and a generated vmap rule (torch.func transforms, which
    # refuse the ops' generated autograd: "must override the setup_context staticmethod").
    def delta_weight_setup(ctx, inputs, output):
        coeffs, rows, cols, _, _, alpha = inputs
        ctx.save_for_backward(rows, cols)
        ctx.alpha, ctx.coeffs_dtype = alpha, coeffs.dtype

    def delta_weight_backward(ctx, grad_dw, coeff_grad=coeff_grad_op):
        rows, cols = ctx.saved_tensors
        return (coeff_grad_from(grad_dw, rows, cols, ctx.alpha, ctx.coeffs_dtype, coeff_grad),
                None, None, None, None, None)

    def coeff_grad_setup(ctx, inputs, output):
        grad_dw, rows, cols, alpha = inputs
        ctx.save_for_backward(rows, cols)
        ctx.alpha, ctx.shape, ctx.grad_dtype = alpha, tuple(grad_dw.shape), grad_dw.dtype

    def coeff_grad_backward(ctx, grad_coeffs, delta_weight=delta_weight_op):
        rows, cols = ctx.saved_tensors
        dw = delta_weight(grad_coeffs.to(compute_dtype(ctx.grad_dtype)), rows, cols, *ctx.shape, ctx.alpha)
        return dw.to(ctx.grad_dtype), None, None, None

    delta_weight_op.register_autograd(delta_weight_backward, setup_context=delta_weight_setup)
    coeff_grad_op.register_autograd(coeff_grad_backward, setup_context=coeff_grad_setup)

    class DeltaWeight(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(coeffs, rows, cols, d_out, d_in, alpha):
            return delta_weight_op(coeffs, rows, cols, d_out, d_in, alpha)

        @staticmethod
        def setup_context(ctx, inputs, output):
            delta_weight_setup(ctx, inputs, output)
            ctx.save_for_forward(inputs[1], inputs[2])
            ctx.shape = inputs[3:5]

        @staticmethod
        def backward(ctx, grad_dw):
            return delta_weight_backward(ctx, grad_dw, CoeffGrad.apply)

        @staticmethod
        def jvp(ctx, tangent, *_):  # linear: the tangent of dW is dW of the tangent
            rows, cols = ctx.saved_tensors
            return DeltaWeight.apply(tangent, rows, cols, *ctx.shape, ctx.alpha)

    class CoeffGrad(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(grad_dw, rows, cols, alpha):
            return coeff_grad_op(grad_dw, rows, cols, alpha)

        @staticmethod
        def setup_context(ctx, inputs, output):
            coeff_grad_setup(ctx, inputs, output)
            ctx.save_for_forward(inputs[1], inputs[2])

        @staticmethod
        def backward(ctx, grad_coeffs):
            return coeff_grad_backward(ctx, grad_coeffs, DeltaWeight.apply)

        @staticmethod
        def jvp(ctx, tangent, *_):
            rows, cols = ctx.saved_tensors
            return CoeffGrad.apply(tangent, rows, cols, ctx.alpha)

    def traceable(op, function):
        """The Function under torch.func transforms (they refuse the op's generated autograd), else the op
        (its registered autograd has every order too, and torch.compile traces it)."""
        return lambda *args: function.apply(*args) if torch._C._are_functorch_transforms_active() else op(*args)

    differentiable_delta_weight = traceable(delta_weight_op, DeltaWeight)
    differentiable_coeff_grad = traceable(coeff_grad_op, CoeffGrad)

    def linear_forward(x, weight, bias, coeffs, rows, cols, alpha, fold_op=None) -> Tuple[torch.Tensor, torch.Tensor]:
        folded = (fold(kernels, weight, coeffs, rows, cols, alpha) if fold_op is None
                  else fold_op(weight, coeffs, rows, cols, alpha))
        if folded.dtype != x.dtype:  # autocast (see lfma_linear below): the GEMMs run in x's dtype
            folded = folded.to(x.dtype)
        return F.linear(x, folded, bias), folded

    @torch.library.custom_op(prefix + "linear", mutates_args=())
    def linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], coeffs: torch.Tensor,
                  rows: torch.Tensor, cols: torch.Tensor, alpha: float) -> Tuple[torch.Tensor, torch.Tensor]:
        return linear_forward(x, weight, bias, coeffs, rows, cols, alpha)

    @linear_op.register_fake
    def _(x, weight, bias, coeffs, rows, cols, alpha):
        trace_check_matrix(prefix + "linear", "weight", weight)
        trace_check_frequencies(prefix + "linear", coeffs, rows, cols)
        torch._check(x.dim() >= 1 and x.shape[-1] == weight.shape[1],
                     lambda: f"{prefix}linear: x must end in d_in = {weight.shape[1]}, got shape {tuple(x.shape)}")
        torch._check(bias is None or tuple(bias.shape) == (weight.shape[0],),
                     lambda: f"{prefix}linear: bias must have shape ({weight.shape[0]},), got "
                             f"{None if bias is None else tuple(bias.shape)}")
        return x.new_empty((*x.shape[:-1], weight.shape[0])), torch.empty_like(weight, dtype=x.dtype)

    def linear_setup(ctx, inputs, output):
        x, weight, bias, coeffs, rows, cols, alpha = inputs
        ctx.save_for_backward(x, output[1], coeffs, rows, cols)
        ctx.alpha, ctx.has_bias, ctx.weight_dtype = alpha, bias is not None, weight.dtype
        ctx.set_materialize_grads(False)  # W + dW is an internal output: no zero gradient for it

    def linear_backward(ctx, grad_out, grad_folded, coeff_grad=coeff_grad_op):
        """First order: the fast paths (the saved ``W + dW``, the planner's batch path for ``dL/dcoeffs``).
        Under grad mode (``create_graph=True``, and every torch.func transform, which differentiate with
        it) the backward is a graph of its own, for a second derivative: an input-gradient penalty
        (``dL/dx = g (W + dW)`` depends on the coefficients), a Hessian-vector product, MAML. ``dL/dx =
        g (W + dW)`` then reaches the coefficients through the saved ``W + dW``, an output of this very
        function, whose gradient (``grad_folded``) comes back here and goes on to the weight and, by
        ``coeff_grad`` (``dW``'s adjoint), to the coefficients; ``dL/dcoeffs`` is read from the dense
        ``G = g^T x`` by the differentiable ``coeff_grad`` (the batch paths would hide ``g`` and ``x``)."""
        x, folded, coeffs, rows, cols = ctx.saved_tensors
        need_x, need_w, need_b, need_c = ctx.needs_input_grad[:4]
        differentiable = torch.is_grad_enabled()
        if differentiable:
            coeff_grad = differentiable_coeff_grad
        shape = tuple(folded.shape)
        grad_x = grad_w = grad_b = grad_c = None
        if grad_out is not None:
            g2d = grad_out.reshape(-1, shape[0])
            x2d = x.reshape(-1, shape[1])
            weight_grad = need_w or differentiable
            path = planner.backward_path(name, g2d.device.type, x2d.shape[0], rows.shape[0], shape,
                                         weight_grad=weight_grad)
            g_dense = g2d.T @ x2d if weight_grad and (need_w or need_c) else None
            grad_w = g_dense if need_w else None
            if need_c:
                grad_c = layer_coeff_grad(kernels, path, x2d, g2d, rows, cols, shape, ctx.alpha, coeffs.dtype,
                                          coeff_grad, g_dense)
            if need_b and ctx.has_bias:
                grad_b = g2d.sum(0)
            # dL/dx last: its GEMM is compute-bound and streams g from memory at little cost, while the
            # coefficient gradient is memory-bound and reads g best while the op that wrote it has left
            # it in cache (the cpp batch path inside a RoBERTa-base step: 1.6-1.8 ms so, 1.8-1.9 ms after
            # the GEMM).
            if need_x:
                grad_x = (g2d @ folded).reshape(x.shape)
        if grad_folded is not None:  # W + dW itself was differentiated (a second derivative, a jvp's)
            if need_w:
                extra = grad_folded.to(ctx.weight_dtype)
                grad_w = extra if grad_w is None else grad_w + extra
            if need_c:
                extra = coeff_grad_from(grad_folded, rows, cols, ctx.alpha, coeffs.dtype, coeff_grad)
                grad_c = extra if grad_c is None else grad_c + extra
        return grad_x, grad_w, grad_b, grad_c, None, None, None

    linear_op.register_autograd(linear_backward, setup_context=linear_setup)

    def function_forward(ctx, x, weight, bias, coeffs, rows, cols, alpha):
        output = linear_forward(x, weight, bias, coeffs, rows, cols, alpha)
        linear_setup(ctx, (x, weight, bias, coeffs, rows, cols, alpha), output)
        return output

    def function_backward(ctx, grad_out, grad_folded):
        return linear_backward(ctx, grad_out, grad_folded, kernels.coeff_grad)

    # ``linear_op`` for eager calls: the same forward, context and backward without the custom op's
    # Python dispatch (~0.15 ms per call of a layer, forward and backward, whatever its size: what a
    # small layer, or a GPU layer whose kernels take microseconds, is dominated by). ``forward`` takes
    # ``ctx`` (no separate ``setup_context``), so ``apply`` skips binding the arguments through
    # ``inspect.signature`` on every call; that also makes it refuse torch.func transforms, which get
    # ``TransformableLinear`` below. Named after the op, so a grad_fn says which backend ran
    # (``lfma_cpp_linearBackward``).
    LinearFunction = type(f"lfma_{name}_linear", (torch.autograd.Function,),
                          {"forward": staticmethod(function_forward), "backward": staticmethod(function_backward)})

    def transformable_setup(ctx, inputs, output):
        linear_setup(ctx, inputs, output)
        # The same tensors as for the backward: the generated vmap rule keeps one record of which saved
        # tensors are batched per ctx (two different sets fail under jacrev(jacfwd)).
        ctx.save_for_forward(inputs[0], output[1], *inputs[3:6])

    def linear_jvp(ctx, t_x, t_weight, t_bias, t_coeffs, *_):
        """Forward mode (torch.func.jvp, jacfwd, hessian, and eager forward AD): ``y = x (W + dW)^T + b``
        is linear in each of ``x``, ``W``, ``b`` and the coefficients."""
        x, folded, _, rows, cols = ctx.saved_tensors
        alpha = ctx.alpha
        t_folded = torch.zeros_like(folded) if t_weight is None else t_weight.to(folded.dtype)
        if t_coeffs is not None:
            t_folded = t_folded + differentiable_delta_weight(t_coeffs, rows, cols, *folded.shape, alpha).to(
                folded.dtype)
        t_out = F.linear(x, t_folded, t_bias)
        if t_x is not None:
            t_out = t_out + F.linear(t_x, folded)
        return t_out, t_folded

    # The same layer for torch.func transforms (grad, vmap(grad) per-sample gradients, jacrev, jacfwd,
    # hessian): ``setup_context`` style, a jvp, and a vmap rule generated from them. W + dW is folded
    # through the op, whose vmap rule serves coefficients batched by vmap (ensembles); the backward is
    # the differentiable one, since the transforms differentiate with create_graph.
    TransformableLinear = type(f"lfma_{name}_linear_transformable", (torch.autograd.Function,), {
        "generate_vmap_rule": True,
        "forward": staticmethod(lambda x, weight, bias, coeffs, rows, cols, alpha: linear_forward(
            x, weight, bias, coeffs, rows, cols, alpha, fold_op=folded_weight_op)),
        "setup_context": staticmethod(transformable_setup),
        "backward": staticmethod(function_backward),
        "jvp": staticmethod(linear_jvp)})

    def run_linear(*args) -> torch.Tensor:
        # Under torch.func transforms (compiled or not) and eager forward-mode AD: the Function they
        # accept, which has a jvp; traced (torch.compile, export): the op, which has a fake
        # implementation; eager: the Function without the op's dispatch.
        if torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0:
            if torch.compiler.is_compiling():
                return composite_linear(*args)
            return TransformableLinear.apply(*args)[0]
        if torch.compiler.is_compiling():
            return linear_op(*args)[0]
        return LinearFunction.apply(*args)[0]

    def composite_linear(x, weight, bias, coeffs, rows, cols, alpha) -> torch.Tensor:
        # torch.compile of a torch.func transform (compile(grad(f))): Dynamo inlines the Function and
        # hands the ops the transforms' wrapped tensors, which custom ops refuse; the separable dW in
        # plain differentiable operations traces and transforms as it is (same values; this rare case
        # does not get the planner's choice of algorithm).
        dw = torch_kernels.delta_weight_separable(coeffs, rows, cols, tuple(weight.shape), alpha)
        return F.linear(x, add_delta(weight, dw).to(x.dtype), bias)

    def delta_weight(coeffs, rows, cols, shape, alpha) -> torch.Tensor:
        return differentiable_delta_weight(coeffs, rows, cols, int(shape[0]), int(shape[1]), float(alpha))

    def folded_weight(weight, coeffs, rows, cols, alpha) -> torch.Tensor:
        return folded_weight_op(weight, coeffs.detach(), rows, cols, float(alpha))

    def lfma_linear(x, weight, bias, coeffs, rows, cols, alpha) -> torch.Tensor:
        device = x.device.type
        if torch.is_autocast_enabled(device):
            # torch.autocast casts F.linear's operands to its dtype, but leaves a custom op's inputs
            # alone while still casting the F.linear inside it: the output, x and W + dW would then
            # disagree in the backward. Cast as autocast would (W + dW is folded in the weight's own
            # precision first, then cast, as F.linear casts W) and run the op with autocast off.
            dtype = torch.get_autocast_dtype(device)
            with torch.autocast(device, enabled=False):
                return run_linear(x.to(dtype), weight, None if bias is None else bias.to(dtype), coeffs, rows,
                                  cols, float(alpha))
        if x.dtype != weight.dtype:
            raise RuntimeError(f"{prefix}linear: x is {x.dtype} but the weight is {weight.dtype}; as for F.linear "
                               "they must agree (or run under torch.autocast)")
        return run_linear(x, weight, bias, coeffs, rows, cols, float(alpha))

    return BackendOps(delta_weight, folded_weight, lfma_linear)
