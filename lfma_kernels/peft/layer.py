"""The LFMA PEFT tuner layer: per adapter, coefficients, positions, alpha and backend, on an ``nn.Linear``, a
transformers ``Conv1D`` or a quantized linear layer; forward, eval cache and merge are :mod:`lfma_kernels.adapter`'s."""
from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge

from .. import adapter, targets
from ..eval_cache import FoldedWeightCache
from ..ops import dispatch
from ..ops.decision import PositionFacts, count_positions
from . import mixed_batch
from .config import LfmaConfig

__all__ = ["LfmaLayer", "LfmaLinear"]


class LfmaLayer(BaseTunerLayer):
    """The PEFT tuner-layer state of LFMA: per adapter, coefficients, positions, alpha, backend."""

    adapter_layer_names = ("lfma_coeffs",)
    other_param_names = ("lfma_rows", "lfma_cols", "lfma_shape", "lfma_alpha", "lfma_backend", "lfma_positions")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self._quantization = targets.check_base(base_layer, "LfmaLayer")
        self.base_layer = base_layer
        self.lfma_coeffs = nn.ParameterDict({})
        self.lfma_rows = BufferDict({}, persistent=True)
        self.lfma_cols = BufferDict({}, persistent=True)
        # The logical (d_out, d_in) each adapter was built for, saved with it: positions alone cannot
        # tell a 24x16 adapter from one for 32x16 (both sets of rows lie in range), so a load into a
        # layer of another shape is refused by this (LfmaLinear.check_loaded_state).
        self.lfma_shape = BufferDict({}, persistent=True)
        self.lfma_alpha: Dict[str, float] = {}
        self.lfma_backend: Dict[str, str] = {}
        # What the planner reads from each adapter's positions, counted on the host when they are set or loaded.
        self.lfma_positions: Dict[str, Optional[PositionFacts]] = {}
        self._disable_adapters = False
        self.merged_adapters: List[str] = []
        self._cache = FoldedWeightCache()
        self._folds = mixed_batch.FoldPool()  # each adapter's W + dW for mixed-adapter batches
        self.kwargs = kwargs
        self.out_features, self.in_features = adapter.base_shape(base_layer)

    def update_layer(self, adapter_name: str, k: int, config: LfmaConfig, seed: Optional[int]) -> None:
        """Add adapter ``adapter_name`` with ``k`` frequencies selected as ``config`` says."""
        dispatch.prepare(config.backend)
        frequencies = adapter.choose_frequencies(self.get_base_layer(), k=k, top_k_ratio=None, init=config.init,
                                                 init_std=config.init_std, seed=seed, hermitian=config.hermitian,
                                                 init_scale=config.init_scale)
        coeffs = torch.view_as_real(frequencies.values.detach()).float()
        if config.init_weights:
            coeffs = torch.zeros_like(coeffs)
        self.lfma_coeffs[adapter_name] = nn.Parameter(coeffs.contiguous())
        self.lfma_rows[adapter_name] = frequencies.rows.to(torch.int64)
        self.lfma_cols[adapter_name] = frequencies.cols.to(torch.int64)
        self.lfma_positions[adapter_name] = count_positions(frequencies.rows, frequencies.cols,
                                                            (self.out_features, self.in_features))
        self.lfma_shape[adapter_name] = torch.tensor([self.out_features, self.in_features], dtype=torch.int64)
        self.lfma_alpha[adapter_name] = float(config.alpha)
        self.lfma_backend[adapter_name] = config.backend
        self._cache.clear()
        self._folds.drop(adapter_name)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        """PEFT's move for the coefficients (device, and dtype by its convention); the positions
        and shapes move to the device only: peft < 0.21 casts integer buffers to the base's float dtype too,
        which would round positions above 256 in bfloat16."""
        positions = [(store, store[adapter_name]) for store in (self.lfma_rows, self.lfma_cols, self.lfma_shape)
                     if adapter_name in store]
        super()._move_adapter_to_device_of_base_layer(adapter_name, device)
        target = device if device is not None else targets.base_device(self.get_base_layer())
        for store, t in positions:
            store[adapter_name] = t if target.type == "meta" else t.to(target)

    def _adapters(self, names: Sequence[str]) -> List[adapter.Adapter]:
        t = adapter.tensor
        return [adapter.Adapter(t(self.lfma_coeffs, n), t(self.lfma_rows, n), t(self.lfma_cols, n),
                                self.lfma_alpha[n], self.lfma_positions.get(n)) for n in names if n in self.lfma_coeffs]

    def _backend(self, names: Sequence[str]) -> str:
        """The first named adapter's backend (adapters of one layer normally share one)."""
        return next((self.lfma_backend[n] for n in names if n in self.lfma_backend), "auto")

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """PEFT's ``convert_to_lora`` may convert this layer (an SVD of :meth:`get_delta_weight`);
        ``lfma_kernels.peft.convert_to_lora`` does it exactly, from small factors."""
        return True

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """What merging ``adapter_name`` adds to the base layer's stored weight: ``dW``, or ``dW^T``
        for a ``Conv1D`` (PEFT's LoRA convention), in float32, differentiable."""
        base = self.get_base_layer()
        delta = adapter.delta_weight(base, self._adapters([adapter_name])[0], self.lfma_backend[adapter_name])
        return adapter.logical_weight(base, delta)


class LfmaLinear(adapter.EvalCacheHooks, nn.Module, LfmaLayer):
    """LFMA on an ``nn.Linear`` or a transformers ``Conv1D`` (PEFT's ``fan_in_fan_out``)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LfmaConfig, k: int, seed: Optional[int],
                 **kwargs: Any) -> None:
        super().__init__()
        LfmaLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = targets.is_conv1d(base_layer)
        self._active_adapter = adapter_name
        self.register_load_state_dict_post_hook(LfmaLinear._shapes_are_optional)
        self.register_load_state_dict_post_hook(LfmaLinear._count_loaded_positions)
        self.update_layer(adapter_name, k, config, seed)

    def _caches(self) -> tuple:
        return (self._cache, self._folds)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        base = self.base_layer
        if adapter_names is not None:
            self._check_mixed_batch(x, adapter_names)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return base(x, *args, **kwargs)
        if adapter_names is not None:
            return mixed_batch.linear(x, base, mixed_batch.groups_of(adapter_names, lambda n, s: self._group(n, s, x)),
                                      self._folds, self._cache, self._quantization,
                                      lambda rows: base(rows, *args, **kwargs))
        if self.merged:
            return base(x, *args, **kwargs)
        names = self.active_adapters
        adapters = self._adapters(names)
        if not adapters:
            return base(x, *args, **kwargs)
        return adapter.linear(x, base, adapters, self._backend(names), self._cache, self.training, self._quantization)

    def _check_mixed_batch(self, x: torch.Tensor, adapter_names: Sequence[str]) -> None:
        """PEFT's LoRA checks of ``adapter_names=`` (one name per sample; no merged adapter), its messages."""
        if len(x) != len(adapter_names):
            raise ValueError("Length of `adapter_names` should be the same as the number of inputs, but got "
                             f"{len(adapter_names)} and {len(x)} respectively.")
        if self.merged:
            raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please call "
                             "`unmerge_adapter` first.")

    def _group(self, name: str, samples: List[int], x: torch.Tensor) -> Optional[mixed_batch.Group]:
        if name not in self.lfma_coeffs:
            return None
        return mixed_batch.Group(name, self._adapters([name])[0], self.lfma_backend[name], samples,
                                 torch.tensor(samples, dtype=torch.int64, device=x.device))

    def plan(self, x: Optional[torch.Tensor] = None):
        """What a forward with input ``x`` over the active adapters runs and why (see
        :func:`lfma_kernels.explain`); without ``x``, for the base weight's device and dtype."""
        names = self.active_adapters
        return adapter.plan(x, self.base_layer, self._adapters(names), self._backend(names), training=self.training,
                            merged=self.merged, cache=self._cache)

    def merged_weight(self, adapter_names: Sequence[str]) -> torch.Tensor:
        """``W + sum(dW)`` of the named adapters as ``(d_out, d_in)``, no autograd (what merging writes)."""
        return adapter.folded_weight(self.get_base_layer(), self._adapters(adapter_names), self._backend(adapter_names))

    def _set_base_layer(self, layer: nn.Module) -> None:
        """A merge into a quantized format that cannot be rewritten in place (HQQ) gives a new base layer."""
        if layer is not self.get_base_layer():
            self.base_layer = layer

    def merge(self, safe_merge: bool = False, adapter_names: Optional[List[str]] = None) -> None:
        """Merge the named (default: active) adapters into the base weight with one fold of their
        summed ``dW``; ``safe_merge=True`` refuses a non-finite result and changes nothing."""
        names = [n for n in check_adapters_to_merge(self, adapter_names) if n in self.lfma_coeffs]
        if not names:
            return
        self._set_base_layer(adapter.merge(self.get_base_layer(), self._adapters(names), self._backend(names),
                                           safe=safe_merge, what=f"merging LFMA adapter(s) {names}"))
        self.merged_adapters.extend(names)
        self._cache.clear()

    def unmerge(self) -> None:
        """Subtract every merged adapter again (exact up to rounding in the weight's dtype)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        names = list(self.merged_adapters)
        self._set_base_layer(adapter.unmerge(self.get_base_layer(), self._adapters(names), self._backend(names)))
        self.merged_adapters = []
        self._cache.clear()

    def loaded_adapters(self, state_dict: dict, prefix: str) -> List[str]:
        """The adapters whose state ``state_dict`` holds for this layer (its keys under ``prefix``)."""
        names = set()
        for store in ("lfma_coeffs", "lfma_rows", "lfma_cols", "lfma_shape"):
            start = f"{prefix}{store}."
            names.update(key[len(start):] for key in state_dict if key.startswith(start))
        return sorted(names)

    def check_loaded_state(self, state_dict: dict, prefix: str) -> None:
        """Refuse, before anything is loaded, adapter state for another shape, positions out of
        range, or other coefficients for an adapter merged into the weight (unmerge would then
        subtract the wrong dW); ``ValueError`` naming the layer. State saved without its layer's
        shape (before lfma_kernels recorded it) loads with a warning that it was not checked."""
        where = prefix.rstrip(".") or "the layer"
        shape = (self.out_features, self.in_features)
        for name in self.loaded_adapters(state_dict, prefix):
            saved = state_dict.get(f"{prefix}lfma_shape.{name}")
            if saved is None:
                warnings.warn(f"loading {where}: the state of LFMA adapter {name!r} carries no layer shape (saved by "
                              "an older lfma_kernels), so whether it was saved for this layer's shape "
                              f"{shape} is not checked; save it again to record it", UserWarning)
            elif tuple(int(d) for d in saved.tolist()) != shape:
                raise ValueError(f"loading {where}: LFMA adapter {name!r} was saved for a layer of shape "
                                 f"{tuple(int(d) for d in saved.tolist())} (d_out, d_in); this layer's is {shape}")
            if name in self.merged_adapters and not targets.unchanged_by(state_dict, prefix, {
                    f"{store}.{name}": getattr(self, store)[name].detach()
                    for store in ("lfma_coeffs", "lfma_rows", "lfma_cols")}):
                raise ValueError(f"loading {where}: LFMA adapter {name!r} is merged into the weight; unmerge it "
                                 "(model.unmerge_adapter()) before loading other state into it, then merge again")
            targets.check_loaded_positions(state_dict, prefix, (f"lfma_coeffs.{name}", f"lfma_rows.{name}",
                                                                f"lfma_cols.{name}"), shape)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Called before the children (lfma_coeffs, lfma_rows, lfma_cols) load their entries. Under a
        # PeftModel, LfmaModel has already checked every layer's state (nothing loads on a refusal).
        self.check_loaded_state(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @staticmethod
    def _count_loaded_positions(module: nn.Module, incompatible_keys) -> None:
        """A load_state_dict post-hook: the planner's facts of every adapter's positions, counted again from the
        buffers as loaded (the children load after the layer's own ``_load_from_state_dict``)."""
        shape = (module.out_features, module.in_features)
        module.lfma_positions = {name: count_positions(rows, module.lfma_cols[name], shape)
                                 for name, rows in module.lfma_rows.items() if name in module.lfma_cols}

    @staticmethod
    def _shapes_are_optional(module: nn.Module, incompatible_keys) -> None:
        """A load_state_dict post-hook: state saved before shapes were recorded lacks ``lfma_shape``;
        that is not a missing adapter tensor (PEFT would warn, strict loading would fail)."""
        incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if ".lfma_shape." not in k]

    def delete_adapter(self, adapter_name: str) -> None:
        self._cache.clear()
        self._folds.drop(adapter_name)
        super().delete_adapter(adapter_name)

    def __repr__(self) -> str:
        return "lfma." + super().__repr__()

