"""The one implementation of an LFMA-adapted layer, shared by ``LFMALinear`` and the PEFT layer.

An adapted layer is a frozen base layer (``nn.Linear``, or transformers' ``Conv1D``, whose weight
is stored transposed as ``(in, out)``) plus one or more adapters, each K coefficients at K fixed
frequencies with its own ``alpha``. Everything is defined on the *logical* ``(d_out, d_in)``
weight (docs/math.md): frequencies, ``dW``, saved adapters. Here live the forward (one folded
GEMM whatever the number of active adapters), the eval cache's key, merge and unmerge, and the
frequency selection; the two layer classes only hold the state and name it their way. What an
adapter may be built on, and the checks of targets and loads, are :mod:`.targets`'.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._checks import check_budget, check_k, finite_number
from . import quantized
from .eval_cache import FoldedWeightCache, optimizer_steps
from .ops import dispatch, library, linear_op, planner, quantized_ops
from .ops.decision import Decision, PositionFacts, QuantizedBase
from .quantized import Quantization
from .selection import Frequencies, init_matrix, num_frequencies, select_frequencies
from .targets import base_device, is_conv1d, is_dtensor

__all__ = [
    "Adapter", "EvalCacheHooks", "needs_grad", "cache_allowed", "base_shape", "logical_weight", "tensor", "linear",
    "dense_weight", "delta_weight", "folded_weight", "folded_linear", "fold_decision", "quantized_linear", "plan",
    "merge", "unmerge", "layer_k",
    "choose_frequencies",
]


class Adapter(NamedTuple):
    coeffs: torch.Tensor  # [K, 2] real (real, imag), trained
    rows: torch.Tensor    # int64 [K], frequency index along d_out
    cols: torch.Tensor    # int64 [K], frequency index along d_in
    alpha: float
    # What the planner reads from the positions, counted on the host when they were set or loaded
    # (ops/decision.py: count_positions); None: not counted (K random frequencies are assumed).
    positions: Optional[PositionFacts] = None


def tensor(module: nn.Module, name: str) -> torch.Tensor:
    """``getattr(module, name)`` for a parameter or buffer, without ``nn.Module.__getattr__``'s
    ~0.5 us on the eval hot path; falls back to it for anything else (a parametrization, say)."""
    t = module._parameters.get(name)
    if t is None:
        t = module._buffers.get(name)
    return t if t is not None else getattr(module, name)


def cache_allowed(module: nn.Module) -> bool:
    """Whether an adapted layer may keep an eval cache: not while FSDP2 (or another DTensor
    engine) manages its parameters. FSDP2 refills the unsharded parameters without bumping their
    version counters, so an in-place change to the shards outside an optimizer step could go
    unseen, and a cached full ``W + dW`` per layer would undo the sharding's memory saving. Read
    between forwards (``train()``/``eval()``), when FSDP2 has the sharded DTensors registered."""
    return not any(is_dtensor(p) for p in module.parameters())


class EvalCacheHooks:
    """The ``nn.Module`` hooks of a layer that owns an eval cache (``self._cache``), shared by
    ``LFMALinear`` and the PEFT layer: a mode switch drops the cached ``W + dW`` and re-reads
    whether a cache is allowed (:func:`cache_allowed`); a device or dtype move drops it."""

    _cache: FoldedWeightCache

    def _caches(self) -> tuple:
        """Every cache of ``W + dW`` the layer keeps (each has ``clear()`` and ``enabled``)."""
        return (self._cache,)

    def train(self, mode: bool = True):
        allowed = cache_allowed(self)
        for cache in self._caches():
            cache.clear()
            cache.enabled = allowed
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self.clear_cache()
        return super()._apply(fn, *args, **kwargs)

    def clear_cache(self) -> None:
        """Drop every kept ``W + dW``. Needed only after writing to the coefficients, positions or the weight
        through ``tensor.data`` outside an optimizer step, which PyTorch hides from the version counters the
        caches are keyed on; every other change is noticed."""
        for cache in self._caches():
            cache.clear()


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether a gradient will flow back through a call on ``tensors`` (grad mode on, one of them requires grad)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def base_shape(base: nn.Module) -> Tuple[int, int]:
    """The logical ``(d_out, d_in)``."""
    if is_conv1d(base):
        d_in, d_out = base.weight.shape
        return int(d_out), int(d_in)
    return base.out_features, base.in_features


def logical_weight(base: nn.Module, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``W`` as ``(d_out, d_in)``: a Conv1D's stored ``(in, out)`` weight is seen transposed (a
    view: the kernels fold it in its stored layout, see ``ops/library.py``)."""
    w = tensor(base, "weight") if weight is None else weight
    return w.t() if is_conv1d(base) else w


def _combined(adapters: Sequence[Adapter]) -> Adapter:
    """Several adapters as one: positions concatenated (repeated positions add up in every
    kernel) and each ``alpha`` moved into its coefficients, so one fold serves their sum."""
    if len(adapters) == 1:
        return adapters[0]
    return Adapter(torch.cat([a.coeffs * a.alpha for a in adapters]), torch.cat([a.rows for a in adapters]),
                   torch.cat([a.cols for a in adapters]), 1.0)


def _decide(backend: str, device: torch.device, dtype: torch.dtype, a: Adapter, shape: Sequence[int],
            **facts) -> Decision:
    """The Decision for adapter ``a`` on a ``shape`` weight, tensors on ``device`` in ``dtype``."""
    return dispatch.decide(backend, device, dtype, a.rows.shape[0], shape, positions=a.positions, **facts)


def dense_weight(base: nn.Module) -> torch.Tensor:
    """``W`` as a dense ``(d_out, d_in)`` tensor: the weight itself (a view for a Conv1D), or a fresh
    dequantized copy of a quantized one."""
    quantization = quantized.recognise(base)
    return logical_weight(base) if quantization is None else quantization.dequantize(base)


def folded_weight(base: nn.Module, adapters: Sequence[Adapter], backend: str, sign: float = 1.0) -> torch.Tensor:
    """``W + sign * sum(dW)`` as a dense ``(d_out, d_in)`` in the weight's dtype (the dequantized
    weight's for a quantized base), no autograd."""
    w = dense_weight(base)
    a = _combined(adapters)
    coeffs = a.coeffs if sign > 0 else -a.coeffs.detach()
    decision = _decide(backend, w.device, w.dtype, a, w.shape, transposed=library.stored_transposed(w))
    return library.folded_weight(decision, w, coeffs, a.rows, a.cols, a.alpha)


def delta_weight(base: nn.Module, adapter: Adapter, backend: str) -> torch.Tensor:
    """``dW`` (``(d_out, d_in)``, float32 or wider), differentiable w.r.t. the coefficients."""
    shape = base_shape(base)
    decision = _decide(backend, adapter.coeffs.device, adapter.coeffs.dtype, adapter, shape)
    return library.delta_weight(decision, adapter.coeffs, adapter.rows,
                                adapter.cols, shape, adapter.alpha)


def _eval_weight(base: nn.Module, adapters: Sequence[Adapter], backend: str,
                 cache: Optional[FoldedWeightCache]) -> Optional[torch.Tensor]:
    """The cached ``W + dW``, or ``None`` when this forward needs a gradient through it (the
    coefficients or the weight require grad under grad mode) or when a change to its sources
    could go unseen (inference tensors track no version). See :mod:`.eval_cache`."""
    w = tensor(base, "weight")
    if cache is None or not cache.enabled or (
            needs_grad(w, *(a.coeffs for a in adapters))):
        return None
    if torch._C._are_functorch_transforms_active():  # wrapped or batched tensors: nothing to cache
        return None
    try:
        key = [optimizer_steps(), id(w), w._version, w.data_ptr()]
        for a in adapters:
            c, r, k = a.coeffs, a.rows, a.cols
            key += (a.alpha, id(c), c._version, c.data_ptr(), id(r), r._version, r.data_ptr(), id(k), k._version,
                    k.data_ptr())
    except RuntimeError:  # inference tensors (a layer built under inference_mode) have no version
        return None
    return cache.get(tuple(key), lambda: [w, *(t for a in adapters for t in (a.coeffs, a.rows, a.cols))],
                     lambda: folded_weight(base, adapters, backend))


def linear(x: torch.Tensor, base: nn.Module, adapters: Sequence[Adapter], backend: str,
           cache: Optional[FoldedWeightCache], training: bool,
           quantization: Optional[Quantization] = None) -> torch.Tensor:
    """``F.linear(x, W + sum(dW), b)``: one folded GEMM forward and one for ``dL/dx``; in eval, the
    cached ``W + dW`` whenever no gradient flows through it (``cache=None`` or a disabled one: never).
    Beside a quantized base (``quantization``, what :func:`check_base` returned), the delta path:
    :func:`quantized_linear`."""
    if quantization is not None:
        return quantized_linear(x, base, quantization, adapters, backend)
    if planner.forced().delta is not None:  # the delta paths, forced on a full-precision base (to compare)
        return quantized_linear(x, base, FULL_PRECISION, adapters, backend)
    return folded_linear(x, base, adapters, backend, None if training else cache)


def folded_linear(x: torch.Tensor, base: nn.Module, adapters: Sequence[Adapter], backend: str,
                  cache: Optional[FoldedWeightCache]) -> torch.Tensor:
    """``F.linear(x, W + sum(dW), b)`` on a full-precision base: the cached ``W + dW`` when it may serve
    (``cache``, not ``None`` in eval), else ``W + dW`` folded for this call."""
    if cache is not None:
        cached = _eval_weight(base, adapters, backend, cache)
        if cached is not None:
            return F.linear(x, cached, tensor(base, "bias"))
    w = logical_weight(base)
    a = _combined(adapters)
    return linear_op.lfma_linear(fold_decision(x, w, a, backend), x, w, tensor(base, "bias"), a.coeffs, a.rows,
                                 a.cols, a.alpha)


def fold_decision(x: torch.Tensor, w: torch.Tensor, a: Adapter, backend: str) -> Decision:
    """What a folded forward (and its backward) runs, in the dtype its GEMMs run in (autocast's, if on). The
    backward path is decided for ``x``'s rows when a gradient will flow (a token count in eval would only
    multiply the decisions kept, one per sequence length)."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    grad = needs_grad(x, a.coeffs, w)
    tokens = x.numel() // w.shape[1] if grad else None
    if tokens is not None and not isinstance(tokens, int):
        # A symbolic size (torch.compile with dynamic shapes): the graph must not depend on its value, so the
        # backward path is decided for a typical training step's rows.
        tokens = SYMBOLIC_TOKENS
    return _decide(backend, x.device, dtype, a, w.shape, tokens=tokens, weight_grad=w.requires_grad,
                   transposed=library.stored_transposed(w))


SYMBOLIC_TOKENS = 4096  # the token count a compiled graph with a dynamic batch size decides its backward for


class FullPrecision(Quantization):
    """A plain float base run through the delta paths, when ``planner.force(delta=...)`` asks for them (to
    compare the delta paths with the fold, which full-precision layers otherwise always use; the weight
    gets no gradient through the forced "fold")."""
    name = "full-precision"

    def base_dequantizes(self, base, x, grad):
        return True

    def dequantize(self, base):
        return logical_weight(base).detach()


FULL_PRECISION = FullPrecision()


def _delta_decision(x: torch.Tensor, base: nn.Module, quantization: Quantization, a: Adapter, backend: str,
                    tokens: Optional[int], grad: Optional[bool] = None) -> Decision:
    """What a call beside a quantized base runs, decided in the base's compute dtype; whether a gradient will
    flow (``decision.call.quantized.training``) is ``grad``, else read from ``x`` and the coefficients."""
    if grad is None:
        grad = needs_grad(x, a.coeffs)
    facts = QuantizedBase(quantization.name, grad, quantization.base_dequantizes(base, x, grad),
                          quantization.dequantizes)
    return _decide(backend, x.device, quantization.compute_dtype(base, x.dtype), a, base_shape(base), tokens=tokens,
                   quantized=facts)


def quantized_linear(x: torch.Tensor, base: nn.Module, quantization: Quantization, adapters: Sequence[Adapter],
                     backend: str) -> torch.Tensor:
    """The base layer's output plus ``x sum(dW)^T``, ``W`` never touched (the delta path), or one GEMM
    with ``dW`` folded into a transient dequantized ``W``, as the planner chooses
    (the decision's ``delta``). Computed in the base's compute dtype, returned as the base returns.
    No eval cache: a cached dense ``W + dW`` would undo what quantizing the base saved."""
    a = _combined(adapters)
    shape = base_shape(base)
    decision = _delta_decision(x, base, quantization, a, backend, x.numel() // shape[1])
    quantization.prepare(base, decision.call.quantized.training)
    dtype = decision.call.dtype
    if decision.delta == "fold":
        bias = tensor(base, "bias")
        return quantized_ops.dequantized_linear(decision, x.to(dtype), a.coeffs, a.rows, a.cols, a.alpha,
                                                lambda: quantization.dequantize(base).to(dtype),
                                                None if bias is None else bias.to(dtype)).to(x.dtype)
    out = base(x)
    return out + quantized_ops.delta_linear(decision, x.to(dtype), a.coeffs, a.rows, a.cols, a.alpha,
                                            shape).to(out.dtype)


def plan(x: Optional[torch.Tensor], base: nn.Module, adapters: Sequence[Adapter], backend: str, *,
         training: bool, merged: bool, cache: Optional[FoldedWeightCache]) -> Decision:
    """The decision :func:`linear` executes for input ``x`` (and, in training, its backward), with a note on
    the layer's state: a :class:`~lfma_kernels.ops.decision.Decision`. Without ``x``, for the weight's device
    and dtype and no token count (so no backward path)."""
    if not adapters:
        raise ValueError("no active LFMA adapter: the layer runs its base layer alone")
    a = _combined(adapters)
    shape = base_shape(base)
    quantization = quantized.recognise(base)
    if quantization is None and planner.forced().delta is not None:
        quantization = FULL_PRECISION
    if quantization is not None:
        like = x if x is not None else torch.empty(0, device=base_device(base))
        tokens = None if x is None else x.numel() // shape[1]
        return _delta_decision(like, base, quantization, a, backend, tokens, None if x is not None else training)
    weight = logical_weight(base)
    if x is not None:
        decision = fold_decision(x, weight, a, backend)
    else:
        decision = _decide(backend, weight.device, weight.dtype, a, shape, weight_grad=weight.requires_grad,
                           transposed=library.stored_transposed(weight))
    if merged:
        note = "merged: the forward is the base layer alone (dW is in its weight)"
    elif training:
        note = "training: W + dW folded on every forward, one GEMM forward and one for dL/dx"
    elif cache is not None and cache.enabled:
        note = ("eval: one GEMM with a cached W + dW when nothing feeding it needs a gradient (built by "
                "this backend when stale); otherwise the training path")
    else:
        note = "eval without a cache (sharded parameters): W + dW folded on every forward"
    return dataclasses.replace(decision, notes=decision.notes + (note,))


def _check_mergeable(base: nn.Module, what: str) -> None:
    quantization = quantized.recognise(base)
    if quantization is not None and not quantization.merges:
        raise TypeError(f"{what}: a {quantization.name} layer cannot be dequantized and requantized; keep the "
                        "adapter unmerged (it runs beside the quantized layer)")


def _store(base: nn.Module, weight: torch.Tensor, what: str) -> nn.Module:
    """Write a dense ``(d_out, d_in)`` weight into ``base``: in place, or requantized (with a warning:
    rounding changes the outputs, as PEFT warns for LoRA); returns the layer to use from now on (a
    new one where a quantized format cannot be rewritten in place)."""
    quantization = quantized.recognise(base)
    if quantization is None:
        tensor(base, "weight").copy_(logical_weight(base, weight))
        return base
    layer = quantization.requantize(base, weight)
    quantized.merge_warning(quantization)
    return layer


@torch.no_grad()
def merge(base: nn.Module, adapters: Sequence[Adapter], backend: str, *, safe: bool, what: str) -> nn.Module:
    """Add ``sum(dW)`` into the base weight (``dW^T`` into a Conv1D's stored weight; dequantized,
    added and requantized for a quantized base); with ``safe=True`` a non-finite result raises
    ``ValueError`` and the weight is left untouched. Returns the base layer to use from now on
    (a new one for a quantized format that cannot be rewritten in place: HQQ)."""
    _check_mergeable(base, what)
    merged = folded_weight(base, adapters, backend)
    if safe and not torch.isfinite(merged).all():
        raise ValueError(f"{what}: W + dW has non-finite values; the weight was left untouched")
    return _store(base, merged, what)


@torch.no_grad()
def unmerge(base: nn.Module, adapters: Sequence[Adapter], backend: str) -> nn.Module:
    """Subtract ``sum(dW)`` again (exact up to rounding in the weight's dtype, or the quantization's);
    returns the base layer to use from now on, as :func:`merge`."""
    _check_mergeable(base, "unmerge")
    return _store(base, folded_weight(base, adapters, backend, sign=-1.0), "unmerge")


def layer_k(shape: Sequence[int], k: Optional[int], top_k_ratio: Optional[float]) -> int:
    """K for a layer of logical ``shape`` from exactly one of ``k`` and ``top_k_ratio``, checked."""
    k, top_k_ratio = check_budget(k, top_k_ratio)
    return check_k(k, shape) if k is not None else num_frequencies(shape, top_k_ratio)


def choose_frequencies(
    base: nn.Module,
    *,
    k: Optional[int],
    top_k_ratio: Optional[float],
    init: Union[str, torch.Tensor],
    init_std: float,
    seed: Optional[int],
    hermitian: bool,
    init_scale: float = 1.0,
) -> Frequencies:
    """The paper's selection on the logical weight: the K strongest frequencies of the init
    matrix ``D``, exactly one of ``k`` / ``top_k_ratio``; the values (the starting coefficients)
    are ``init_scale * fft2(D)`` there. The scale leaves the selection alone (top-K of |fft2(D)|
    is scale-free): ``init="weight", init_scale=0.01`` is the official code's ``D = 0.01 W``
    start, ``init_scale=0`` starts at ``dW = 0`` on the chosen support. ``seed=None`` draws ``D`` from
    torch's global RNG."""
    shape = base_shape(base)
    k = layer_k(shape, k, top_k_ratio)
    init_scale = finite_number(init_scale, "init_scale")
    # Only init="weight" reads the weight (a quantized one dequantized once, here); the others need its shape.
    uses_weight = isinstance(init, str) and init == "weight"
    weight = dense_weight(base) if uses_weight else torch.empty(shape, device="meta")
    chosen = select_frequencies(init_matrix(init, weight, std=init_std, seed=seed), k, hermitian=hermitian)
    return chosen if init_scale == 1.0 else chosen._replace(values=chosen.values * init_scale)
