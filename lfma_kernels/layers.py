"""``LFMALinear``: a frozen ``nn.Linear`` (or transformers ``Conv1D``) plus K trained complex
coefficients at fixed frequencies. The math, cache and merge live in :mod:`.adapter`."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn as nn

from . import adapter, targets
from ._checks import check_frequencies, check_options
from .eval_cache import FoldedWeightCache
from .ops import dispatch
from .ops.decision import count_positions
from .selection import Frequencies

__all__ = ["LFMALinear"]


def check_given_frequencies(frequencies: Frequencies, shape: Tuple[int, int]) -> None:
    values = frequencies.values
    if not values.is_complex() or values.dim() != 1:
        raise ValueError(f"frequencies.values must be a complex 1-D tensor, got {values.dtype} {tuple(values.shape)}")
    check_frequencies(torch.view_as_real(values), frequencies.rows, frequencies.cols, shape)


class LFMALinear(adapter.EvalCacheHooks, nn.Module):
    """``y = x (W + dW)^T + b`` with ``dW = alpha * Re(ifft2(F))``, ``F`` nonzero at K frequencies.

    ``base`` is an ``nn.Linear`` or a transformers ``Conv1D`` (GPT-2's projections, weight stored
    ``(in, out)``), frozen in place; only ``coeffs`` (``[K, 2]`` float32: real, imag) train. A quantized
    base (bitsandbytes ``Linear4bit`` / ``Linear8bitLt``, an ``nn.Linear`` with a torchao weight: see
    :mod:`lfma_kernels.quantized`) is never folded in place: the layer adds ``x dW^T`` to its output, or
    folds ``dW`` into a transient dequantized ``W``, whichever the planner finds cheaper; merging
    dequantizes, adds and requantizes; there is no eval cache.
    Frequencies and ``dW`` live on the logical ``(d_out, d_in)`` weight; merging a ``Conv1D``
    adds ``dW^T`` to its stored weight. Positions are the K strongest 2-D frequencies of an init
    matrix ``D`` (``init="random"``: a seeded Gaussian of std ``init_std``; ``"weight"``: the
    frozen weight; or a tensor), or, through ``frequencies=``, positions and initial values chosen
    by the caller (FourierFT-style shared positions, or a saved adapter). The coefficients start
    at ``init_scale * fft2(D)`` at those positions: 1 is the paper's start; with
    ``init="weight"``, 0.01 is the official code's (``D = 0.01 W``) and 0 starts from ``dW = 0``
    on the weight's strongest frequencies.

    In eval mode, when neither ``coeffs`` nor the weight needs a gradient, the layer multiplies
    by a cached ``W + dW``, so inference costs exactly what the frozen layer costs. The cache is
    rebuilt when anything it was built from changes (in place included, fused optimizers too: see
    :mod:`lfma_kernels.eval_cache`), and dropped on ``train()``, ``merge``/``unmerge`` and device
    or dtype moves; ``clear_cache()`` is for writes through ``.data`` outside an optimizer step.
    Under FSDP2 (parameters sharded as DTensors when ``train()``/``eval()`` is called) there is no
    cache: every eval forward folds ``W + dW`` afresh (see :func:`.adapter.cache_allowed`).

    ``backend``: ``"auto"`` or a name from ``lfma.available_backends()``; one that cannot run in
    this process raises ``RuntimeError`` here, saying why. One that runs on another device than
    the layer's (``"cuda"`` for a layer still on CPU) is accepted, and checked at each call,
    since the layer may be moved there first.
    """

    def __init__(
        self,
        base: nn.Module,
        *,
        k: Optional[int] = None,
        top_k_ratio: Optional[float] = None,
        alpha: float = 12.0,
        init: Union[str, torch.Tensor] = "random",
        init_std: float = 1e-3,
        seed: Optional[int] = 0,
        hermitian: bool = False,
        backend: str = "auto",
        frequencies: Optional[Frequencies] = None,
        init_scale: float = 1.0,
    ) -> None:
        super().__init__()
        quantization = targets.check_base(base, "LFMALinear")
        targets.check_backend_name(backend)
        options = check_options(k=k, top_k_ratio=top_k_ratio, alpha=alpha, init_std=init_std, init_scale=init_scale,
                                seed=seed, budget=frequencies is None)
        dispatch.prepare(backend)
        if frequencies is None:
            frequencies = adapter.choose_frequencies(base, k=options.k, top_k_ratio=options.top_k_ratio, init=init,
                                                     init_std=options.init_std, seed=options.seed,
                                                     hermitian=hermitian, init_scale=options.init_scale)
        else:
            check_given_frequencies(frequencies, adapter.base_shape(base))
        device = targets.base_device(base)
        base.requires_grad_(False)
        self.base = base
        self.coeffs = nn.Parameter(torch.view_as_real(frequencies.values.detach()).to(device, torch.float32).clone())
        self.register_buffer("rows", frequencies.rows.detach().to(device, torch.int64).clone())
        self.register_buffer("cols", frequencies.cols.detach().to(device, torch.int64).clone())
        self._positions = count_positions(self.rows, self.cols, adapter.base_shape(base))
        self.alpha = options.alpha
        self.hermitian = bool(hermitian)
        self.backend = backend
        self._merged = False
        self._cache = FoldedWeightCache()
        self._quantization = quantization

    # ------------------------------------------------------------------ properties
    @property
    def in_features(self) -> int:
        return adapter.base_shape(self.base)[1]

    @property
    def out_features(self) -> int:
        return adapter.base_shape(self.base)[0]

    @property
    def k(self) -> int:
        return self.rows.shape[0]

    @property
    def merged(self) -> bool:
        return self._merged

    def _adapters(self) -> tuple:
        t = adapter.tensor
        return (adapter.Adapter(t(self, "coeffs"), t(self, "rows"), t(self, "cols"), self.alpha, self._positions),)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self._modules["base"]
        if self._merged:
            return base(x)
        return adapter.linear(x, base, self._adapters(), self.backend, self._cache, self.training, self._quantization)

    def delta_weight(self) -> torch.Tensor:
        """``dW`` (float32, shaped ``(d_out, d_in)`` like the logical weight), differentiable
        w.r.t. ``coeffs``."""
        return adapter.delta_weight(self.base, self._adapters()[0], self.backend)

    def plan(self, x: Optional[torch.Tensor] = None):
        """What a forward with input ``x`` (and, in training, its backward) runs and why: the backend,
        how ``dW`` and ``dL/dcoeffs`` are computed, the reason each alternative was refused
        (:func:`lfma_kernels.explain`); ``print()`` it. Without ``x``: for the weight's device and dtype."""
        return adapter.plan(x, self.base, self._adapters(), self.backend, training=self.training, merged=self._merged,
                            cache=self._cache)

    # ------------------------------------------------------------------ merge
    def merge(self, safe: bool = False) -> None:
        """Add ``dW`` into the frozen weight; ``safe=True`` refuses non-finite results and leaves
        the weight untouched. Merging a merged layer does nothing."""
        if self._merged:
            return
        self.base = adapter.merge(self.base, self._adapters(), self.backend, safe=safe, what="merge(safe=True)")
        self._merged = True
        self._cache.clear()

    def unmerge(self) -> None:
        """Subtract ``dW`` from the weight again (exact up to rounding in the weight's dtype)."""
        if not self._merged:
            return
        self.base = adapter.unmerge(self.base, self._adapters(), self.backend)
        self._merged = False
        self._cache.clear()

    def _folded_weight(self) -> torch.Tensor:
        """``W + dW`` as ``(d_out, d_in)`` in the weight's dtype, no autograd (what ``merge`` writes)."""
        return adapter.folded_weight(self.base, self._adapters(), self.backend)

    # ------------------------------------------------------------------ nn.Module hooks
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        keys = ("coeffs", "rows", "cols")
        if self._merged and not targets.unchanged_by(state_dict, prefix, {k: getattr(self, k).detach() for k in keys}):
            # The weight holds the old dW: new coefficients would make unmerge() subtract the wrong one.
            raise ValueError(f"loading {prefix.rstrip('.') or 'the layer'}: the layer is merged; unmerge it "
                             "(unmerge_lfma(model) or layer.unmerge()) before loading other adapter state, then "
                             "merge again; its adapter state was not loaded")
        shape = (self.out_features, self.in_features)
        targets.check_loaded_positions(state_dict, prefix, keys, shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "rows" in state_dict or prefix + "cols" in state_dict:
            self._positions = count_positions(self.rows, self.cols, shape)

    def extra_repr(self) -> str:
        n = self.out_features * self.in_features
        quantized = "" if self._quantization is None else f", base={self._quantization.name}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, "
                f"ratio={self.k / n:.4g}, real_params={2 * self.k}, alpha={self.alpha}, "
                f"hermitian={self.hermitian}, backend={self.backend!r}, merged={self._merged}{quantized}")
