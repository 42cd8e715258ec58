"""``LFMALinear``: a frozen ``nn.Linear`` plus K trained complex coefficients at fixed frequencies."""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._checks import check_frequencies, check_k
from .eval_cache import FoldedWeightCache, optimizer_steps
from .ops import dispatch
from .selection import Frequencies, init_matrix, num_frequencies, select_frequencies

__all__ = ["LFMALinear"]


def check_backend_name(backend: str) -> None:
    if backend != "auto" and backend not in dispatch.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of {', '.join(dispatch.BACKENDS)}")


def _tensor(module: nn.Module, name: str) -> torch.Tensor:
    """``getattr(module, name)`` for a parameter or buffer, without ``nn.Module.__getattr__``'s
    ~0.5 us on the eval hot path; falls back to it for anything else (a parametrization, say)."""
    t = module._parameters.get(name)
    if t is None:
        t = module._buffers.get(name)
    return t if t is not None else getattr(module, name)


class LFMALinear(nn.Module):
    """``y = x (W + dW)^T + b`` with ``dW = alpha * Re(ifft2(F))``, ``F`` nonzero at K frequencies.

    The wrapped ``base`` is frozen in place; only ``coeffs`` (``[K, 2]`` float32: real, imag) train.
    Positions are the K strongest 2-D frequencies of an init matrix (``init="random"``: a seeded
    Gaussian of std ``init_std``; ``"weight"``: the frozen weight; or a tensor), or, through
    ``frequencies=``, positions and initial values chosen by the caller (FourierFT-style shared
    positions, or a saved adapter).

    In eval mode, when neither ``coeffs`` nor the weight needs a gradient, the layer multiplies
    by a cached ``W + dW``, so inference costs exactly what the frozen layer costs. The cache is
    rebuilt when anything it was built from changes (in place included, fused optimizers too: see
    :mod:`lfma_kernels.eval_cache`), and dropped on ``train()``, ``merge``/``unmerge`` and device
    or dtype moves; ``clear_cache()`` is for writes through ``.data`` outside an optimizer step.

    ``backend``: ``"auto"`` or a name from ``lfma.available_backends()``; one that cannot run in
    this process raises ``RuntimeError`` here, saying why. One that runs on another device than
    the layer's (``"cuda"`` for a layer still on CPU) is accepted, and checked at each call,
    since the layer may be moved there first.
    """

    def __init__(
        self,
        base: nn.Linear,
        *,
        k: Optional[int] = None,
        top_k_ratio: Optional[float] = None,
        alpha: float = 12.0,
        init: Union[str, torch.Tensor] = "random",
        init_std: float = 1e-3,
        seed: int = 0,
        hermitian: bool = False,
        backend: str = "auto",
        frequencies: Optional[Frequencies] = None,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LFMALinear wraps an nn.Linear, got {type(base).__name__}")
        check_backend_name(backend)
        dispatch.prepare(backend)
        shape = (base.out_features, base.in_features)
        if frequencies is None:
            if (k is None) == (top_k_ratio is None):
                raise ValueError("pass exactly one of k and top_k_ratio")
            k = check_k(k, shape) if k is not None else num_frequencies(shape, top_k_ratio)
            frequencies = select_frequencies(init_matrix(init, base.weight, std=init_std, seed=seed), k,
                                             hermitian=hermitian)
        else:
            values = frequencies.values
            if not values.is_complex() or values.dim() != 1:
                raise ValueError(f"frequencies.values must be a complex 1-D tensor, got {values.dtype} {tuple(values.shape)}")
            check_frequencies(torch.view_as_real(values), frequencies.rows, frequencies.cols, shape)
        device = base.weight.device
        base.requires_grad_(False)
        self.base = base
        self.coeffs = nn.Parameter(torch.view_as_real(frequencies.values.detach()).to(device, torch.float32).clone())
        self.register_buffer("rows", frequencies.rows.detach().to(device, torch.int64).clone())
        self.register_buffer("cols", frequencies.cols.detach().to(device, torch.int64).clone())
        self.alpha = float(alpha)
        self.hermitian = bool(hermitian)
        self.backend = backend
        self._merged = False
        self._cache = FoldedWeightCache()

    # ------------------------------------------------------------------ properties
    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def k(self) -> int:
        return self.rows.shape[0]

    @property
    def merged(self) -> bool:
        return self._merged

    def _impl(self, x: torch.Tensor):
        return dispatch.resolve(self.backend, x.device, x.dtype, self.k, (self.out_features, self.in_features))

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._merged:
            return self.base(x)
        if not self.training:
            base = self._modules["base"]
            cached = self._eval_weight(base)
            if cached is not None:
                return F.linear(x, cached, _tensor(base, "bias"))
        return self._impl(x).lfma_linear(x, self.base.weight, self.base.bias, self.coeffs, self.rows, self.cols,
                                         self.alpha)

    def delta_weight(self) -> torch.Tensor:
        """``dW`` (float32, shaped like the weight), differentiable w.r.t. ``coeffs``."""
        return self._impl(self.coeffs).delta_weight(self.coeffs, self.rows, self.cols,
                                                    (self.out_features, self.in_features), self.alpha)

    def _folded_weight(self, sign: float = 1.0) -> torch.Tensor:
        w = self.base.weight
        coeffs = self.coeffs if sign > 0 else -self.coeffs.detach()
        return self._impl(w).folded_weight(w, coeffs, self.rows, self.cols, self.alpha)

    def _eval_weight(self, base: nn.Module) -> Optional[torch.Tensor]:
        """The cached ``W + dW``, or ``None`` when this forward needs a gradient through it (the
        coefficients or the weight require grad under grad mode) or when a change to its sources
        could go unseen (inference tensors track no version). See :mod:`.eval_cache`."""
        c, w = _tensor(self, "coeffs"), _tensor(base, "weight")
        if torch.is_grad_enabled() and (c.requires_grad or w.requires_grad):
            return None
        rows, cols = _tensor(self, "rows"), _tensor(self, "cols")
        try:
            key = (optimizer_steps(), c._version, c.data_ptr(), w._version, w.data_ptr(),
                   rows._version, rows.data_ptr(), cols._version, cols.data_ptr())
        except RuntimeError:  # inference tensors (a layer built under inference_mode) have no version
            return None
        return self._cache.get(key, self._folded_weight)

    def clear_cache(self) -> None:
        """Drop the eval cache of ``W + dW``. Needed only after writing to ``coeffs``, ``rows``,
        ``cols`` or the weight through ``.data`` outside an optimizer step, which PyTorch hides
        from the version counters the cache is keyed on; every other change is noticed."""
        self._cache.clear()

    # ------------------------------------------------------------------ merge
    @torch.no_grad()
    def merge(self, safe: bool = False) -> None:
        """Add ``dW`` into the frozen weight; ``safe=True`` refuses non-finite results and leaves
        the weight untouched. Merging a merged layer does nothing."""
        if self._merged:
            return
        merged = self._folded_weight()
        if safe and not torch.isfinite(merged).all():
            raise ValueError("merge(safe=True): W + dW has non-finite values; the weight was left untouched")
        self.base.weight.copy_(merged)
        self._merged = True
        self._cache.clear()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract ``dW`` from the weight again (exact up to rounding in the weight's dtype)."""
        if not self._merged:
            return
        self.base.weight.copy_(self._folded_weight(sign=-1.0))
        self._merged = False
        self._cache.clear()

    # ------------------------------------------------------------------ nn.Module hooks
    def train(self, mode: bool = True) -> "LFMALinear":
        self._cache.clear()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self._cache.clear()
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        n = self.out_features * self.in_features
        return (f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, "
                f"ratio={self.k / n:.4g}, real_params={2 * self.k}, alpha={self.alpha}, "
                f"hermitian={self.hermitian}, backend={self.backend!r}, merged={self._merged}")
