"""LFMA as a registered PEFT method: ``import lfma_kernels.peft``, then PEFT's own API.

    import lfma_kernels.peft            # registers the method "lfma" (peft_type "LFMA") with PEFT
    from lfma_kernels.peft import LfmaConfig
    model = get_peft_model(model, LfmaConfig(target_modules=["query", "value"], top_k_ratio=0.0003))

PEFT has no plugin discovery: the import must run before ``PeftModel.from_pretrained`` reads an
``adapter_config.json`` with ``"peft_type": "LFMA"``. Registration extends PEFT's closed
``PeftType`` enum (with ``aenum``) and calls ``peft.utils.register_peft_method``, once per process.

The layer (:class:`LfmaLinear`, for ``nn.Linear`` and transformers ``Conv1D``) keeps each
adapter's state under names that contain ``lfma_``: ``lfma_coeffs`` (real ``[K, 2]`` parameters,
never complex: NCCL rejects complex tensors, and PEFT casts adapter tensors to the base model's
float dtype, which would drop an imaginary part; float32 under PEFT's default
``autocast_adapter_dtype=True``, the base dtype without it, as every PEFT method) and
``lfma_rows`` / ``lfma_cols`` (integer buffers, saved with the adapter: an ``init="weight"``
selection depends on the base weights and cannot be regenerated from a seed; PEFT's and
``model.to(dtype)``'s casts leave integers alone) and ``lfma_shape`` (the layer's ``(d_out, d_in)``,
saved so that a load into a layer of another shape is refused).
The forward, eval cache, merge and selection are :mod:`lfma_kernels.adapter`'s, shared with
``LFMALinear``: one folded GEMM per forward, however many adapters are active.
"""
from __future__ import annotations

import copy
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from . import adapter
from ._checks import check_options, positive_int
from .eval_cache import FoldedWeightCache
from .ops import dispatch

try:
    import peft
    from peft.config import PeftConfig
    from peft.tuners._buffer_dict import BufferDict
    from peft.tuners.tuners_utils import (BaseTuner, BaseTunerLayer, _maybe_include_all_linear_layers,
                                          check_adapters_to_merge)
    from peft.utils import PeftType, register_peft_method
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
except ImportError as e:  # missing, or too old to have these names
    raise ImportError(f"lfma_kernels.peft needs peft >= 0.18 (pip install 'lfma_kernels[peft]'): {e}") from e

__all__ = ["LfmaConfig", "LfmaModel", "LfmaLayer", "LfmaLinear", "SUPPORTED_PEFT", "DEFAULT_K"]

# K when a config gives neither k nor top_k_ratio, so that a config built from target_modules alone
# works, as every PEFT config does: about the paper's RoBERTa-base budget (0.0016 * 768^2 = 943),
# and FourierFT's default n_frequency (1000).
DEFAULT_K = 1000

# Tested with peft 0.18.1 and 0.21.2 (tests/test_peft.py): the BaseTuner hooks used here
# (tuner_layer_cls, target_module_mapping, structural adapter-state selection) date from 0.18.
SUPPORTED_PEFT = (0, 18)


def _version_tuple(version: str) -> tuple:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:2])


if _version_tuple(peft.__version__) < SUPPORTED_PEFT:
    raise ImportError(f"lfma_kernels.peft supports peft >= {'.'.join(map(str, SUPPORTED_PEFT))}; "
                      f"peft {peft.__version__} is installed: pip install -U 'lfma_kernels[peft]'")


def _extend_peft_type() -> None:
    if "LFMA" in PeftType.__members__:
        return
    try:
        from aenum import extend_enum
    except ImportError as e:
        raise ImportError("lfma_kernels.peft needs aenum to register LFMA with PEFT's closed PeftType enum: "
                          "pip install 'lfma_kernels[peft]'") from e
    extend_enum(PeftType, "LFMA", "LFMA")


_extend_peft_type()


@dataclass
class LfmaConfig(PeftConfig):
    """Configuration of an LFMA adapter (see DESIGN section 3 and ``lfma.LFMALinear``).

    Args:
        target_modules: module names (suffix match) or one regex; ``nn.Linear`` and transformers
            ``Conv1D`` layers. Defaults per architecture as PEFT's LoRA (e.g. query/value).
        exclude_modules: names or regex of modules not to adapt.
        k / top_k_ratio: at most one: K frequencies per layer, or ``K = int(d_out*d_in*ratio)``;
            neither: ``K = DEFAULT_K`` (1000).
        k_pattern: per-module K by name pattern, e.g. ``{"c_attn": 64}`` (like FourierFT's
            ``n_frequency_pattern``), overriding ``k`` / ``top_k_ratio`` there.
        alpha: ``dW = alpha * Re(ifft2(F))``.
        init / init_std / seed: the matrix ``D`` whose strongest frequencies are selected:
            ``"random"`` (a Gaussian of std ``init_std``) or ``"weight"`` (the frozen weight; no
            seed involved). ``seed=None`` (default, PEFT's convention): ``D`` is drawn from torch's
            global RNG, so adapters added one after another differ and ``torch.manual_seed`` makes
            a run reproducible; an int: seed ``seed + i`` for the i-th adapted layer, exactly as
            the native ``apply_lfma``.
        init_scale: the coefficients start at ``init_scale * fft2(D)`` on the selected support
            (1: the paper; ``init="weight"`` with 0.01: the official code's ``D = 0.01 W``; 0: a
            zero start, as ``init_weights=True``, which wins when set).
        hermitian: select from the half-spectrum only (K independent frequencies).
        backend: kernel backend, ``"auto"`` or one of ``lfma.available_backends()``.
        init_weights: ``True``: zero coefficients (the adapted model starts as the base model);
            ``False`` (default, as the paper and PEFT's FourierFT): ``c = fft2(D)[u, v]``.
        fan_in_fan_out: the target stores its weight ``(in, out)``; forced to ``True`` (with a
            warning) for ``Conv1D`` targets and to ``False`` for ``nn.Linear``.
        bias: ``"none"``, ``"all"`` or ``"lfma_only"`` (biases of the adapted layers train).
        modules_to_save, layers_to_transform, layers_pattern: as in every PEFT method.
    """

    target_modules: Optional[Union[List[str], str]] = field(
        default=None, metadata={"help": "Module names (suffix match) or a regex of the layers to adapt."})
    exclude_modules: Optional[Union[List[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex of modules not to adapt."})
    k: Optional[int] = field(default=None, metadata={"help": "Frequencies per layer (or top_k_ratio)."})
    top_k_ratio: Optional[float] = field(default=None, metadata={"help": "K = int(d_out * d_in * ratio)."})
    alpha: float = field(default=12.0, metadata={"help": "Scale of dW = alpha * Re(ifft2(F))."})
    init: str = field(default="random", metadata={"help": "'random' or 'weight': the matrix selected from."})
    init_std: float = field(default=1e-3, metadata={"help": "Std of the 'random' init matrix."})
    init_scale: float = field(default=1.0, metadata={"help": "Starting coefficients: init_scale * fft2(D)."})
    seed: Optional[int] = field(default=None, metadata={
        "help": "Seed of the first layer's 'random' init matrix; None: torch's global RNG."})
    hermitian: bool = field(default=False, metadata={"help": "Select one of each conjugate pair only."})
    backend: str = field(default="auto", metadata={"help": "Kernel backend."})
    init_weights: bool = field(default=False, metadata={"help": "True: zero coefficients (identity start)."})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "The target stores its weight (in, out)."})
    modules_to_save: Optional[List[str]] = field(
        default=None, metadata={"help": "Modules trained fully and saved with the adapter."})
    layers_to_transform: Optional[Union[List[int], int]] = field(
        default=None, metadata={"help": "Indices of the layers to adapt."})
    layers_pattern: Optional[Union[List[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list layers_to_transform indexes."})
    k_pattern: Dict[str, int] = field(
        default_factory=dict, metadata={"help": "Per-module K by name pattern, e.g. {'c_attn': 64}."})
    bias: str = field(default="none", metadata={"help": "'none', 'all' or 'lfma_only'."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.LFMA
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.k is None and self.top_k_ratio is None:
            self.k = DEFAULT_K
        try:
            options = check_options(k=self.k, top_k_ratio=self.top_k_ratio, alpha=self.alpha, init_std=self.init_std,
                                    init_scale=self.init_scale, seed=self.seed)
            self.k_pattern = {pattern: positive_int(k, f"k_pattern[{pattern!r}]")
                              for pattern, k in self.k_pattern.items()}
        except ValueError as e:
            raise ValueError(f"LfmaConfig: {e}") from None
        # Plain Python numbers (numpy or tensor scalars in, JSON-serialisable adapter_config.json out).
        self.k, self.top_k_ratio, self.alpha = options.k, options.top_k_ratio, options.alpha
        self.init_std, self.init_scale, self.seed = options.init_std, options.init_scale, options.seed
        if self.init not in ("random", "weight"):
            raise ValueError(f"LfmaConfig: init must be 'random' or 'weight', got {self.init!r}")
        if self.bias not in ("none", "all", "lfma_only"):
            raise ValueError(f"LfmaConfig: bias must be 'none', 'all' or 'lfma_only', got {self.bias!r}")
        adapter.check_backend_name(self.backend)
        if isinstance(self.target_modules, str):
            if self.layers_to_transform is not None or self.layers_pattern is not None:
                raise ValueError("LfmaConfig: layers_to_transform / layers_pattern cannot be used when "
                                 "target_modules is a regex string")
            try:
                re.compile(self.target_modules)
            except re.error as e:
                raise ValueError(f"LfmaConfig: target_modules {self.target_modules!r} is not a valid regular "
                                 f"expression: {e}") from None
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("LfmaConfig: layers_pattern needs layers_to_transform")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None,
                        **kwargs: Any) -> "LfmaConfig":
        """PEFT's loader, then: the saved backend is a preference (one that cannot run here, as
        ``"cuda"`` on a CPU-only machine, becomes ``"auto"`` with a warning), and the config is marked
        as read from a checkpoint, so that an adapter built from it whose weights do not fit the
        model is removed again (see ``LfmaModel._load_from_state_dict``)."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        config.backend = adapter.loadable_backend(config.backend, None,
                                                  f"the LFMA adapter at {pretrained_model_name_or_path}")
        config._lfma_from_checkpoint = True
        return config


def _outside_tuner_layers(model: nn.Module):
    """``(name, module)`` of every named module except the root and those inside a tuner layer (its
    ``base_layer``), which PEFT never targets."""
    inside = set()
    for key, module in model.named_modules():
        if key.rpartition(".")[0] in inside:
            inside.add(key)
            continue
        if isinstance(module, BaseTunerLayer):
            inside.add(key)
        if key:
            yield key, module


def _take_back(model: nn.Module, adapter_name: str, before: Dict[str, nn.Module],
               flags: Dict[nn.Parameter, bool]) -> None:
    """Undo a failed injection of ``adapter_name``: layers built for it give back their base layer,
    layers that existed lose the adapter, and every ``requires_grad`` flag is restored."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, LfmaLayer) or adapter_name not in module.lfma_coeffs:
            continue
        if before.get(name) is module:
            module.delete_adapter(adapter_name)
        else:
            adapter.set_submodule(model, name, module.get_base_layer())
    for p, flag in flags.items():
        p.requires_grad_(flag)


def _unwrap_empty(model: nn.Module) -> None:
    """Put back the base layer of every LFMA layer left without adapters (a refused first load)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LfmaLayer) and not module.lfma_coeffs:
            adapter.set_submodule(model, name, module.get_base_layer())


def _pattern_key(patterns: Sequence[str], name: str) -> Optional[str]:
    """The first pattern that is ``name`` itself or matches its trailing components (PEFT's
    ``rank_pattern`` rule)."""
    return next((p for p in patterns if re.match(rf"(.*\.)?({p})$", name)), None)


class LfmaLayer(BaseTunerLayer):
    """The PEFT tuner-layer state of LFMA: per adapter, coefficients, positions, alpha, backend."""

    adapter_layer_names = ("lfma_coeffs",)
    other_param_names = ("lfma_rows", "lfma_cols", "lfma_shape", "lfma_alpha", "lfma_backend")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self._quantization = adapter.check_base(base_layer, "LfmaLayer")
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
        self._disable_adapters = False
        self.merged_adapters: List[str] = []
        self._cache = FoldedWeightCache()
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
        self.lfma_shape[adapter_name] = torch.tensor([self.out_features, self.in_features], dtype=torch.int64)
        self.lfma_alpha[adapter_name] = float(config.alpha)
        self.lfma_backend[adapter_name] = config.backend
        self._cache.clear()
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        """PEFT's move for the coefficients (device, and dtype by its convention); the positions
        and shapes move to the device only: peft < 0.21 casts integer buffers to the base's float dtype too,
        which would round positions above 256 in bfloat16."""
        positions = [(store, store[adapter_name]) for store in (self.lfma_rows, self.lfma_cols, self.lfma_shape)
                     if adapter_name in store]
        super()._move_adapter_to_device_of_base_layer(adapter_name, device)
        target = device if device is not None else adapter.base_device(self.get_base_layer())
        for store, t in positions:
            store[adapter_name] = t if target.type == "meta" else t.to(target)

    def _adapters(self, names: Sequence[str]) -> List[adapter.Adapter]:
        t = adapter.tensor
        return [adapter.Adapter(t(self.lfma_coeffs, n), t(self.lfma_rows, n), t(self.lfma_cols, n),
                                self.lfma_alpha[n]) for n in names if n in self.lfma_coeffs]

    def _backend(self, names: Sequence[str]) -> str:
        """The first named adapter's backend (adapters of one layer normally share one)."""
        return next((self.lfma_backend[n] for n in names if n in self.lfma_backend), "auto")

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
        self.fan_in_fan_out = adapter.is_conv1d(base_layer)
        self._active_adapter = adapter_name
        self.register_load_state_dict_post_hook(LfmaLinear._shapes_are_optional)
        self.update_layer(adapter_name, k, config, seed)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.base_layer
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return base(x, *args, **kwargs)
        if self.merged:
            return base(x, *args, **kwargs)
        names = self.active_adapters
        adapters = self._adapters(names)
        if not adapters:
            return base(x, *args, **kwargs)
        return adapter.linear(x, base, adapters, self._backend(names), self._cache, self.training, self._quantization)

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
            if name in self.merged_adapters and not adapter.unchanged_by(state_dict, prefix, {
                    f"{store}.{name}": getattr(self, store)[name].detach()
                    for store in ("lfma_coeffs", "lfma_rows", "lfma_cols")}):
                raise ValueError(f"loading {where}: LFMA adapter {name!r} is merged into the weight; unmerge it "
                                 "(model.unmerge_adapter()) before loading other state into it, then merge again")
            adapter.check_loaded_positions(state_dict, prefix, (f"lfma_coeffs.{name}", f"lfma_rows.{name}",
                                                                f"lfma_cols.{name}"), shape)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Called before the children (lfma_coeffs, lfma_rows, lfma_cols) load their entries. Under a
        # PeftModel, LfmaModel has already checked every layer's state (nothing loads on a refusal).
        self.check_loaded_state(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @staticmethod
    def _shapes_are_optional(module: nn.Module, incompatible_keys) -> None:
        """A load_state_dict post-hook: state saved before shapes were recorded lacks ``lfma_shape``;
        that is not a missing adapter tensor (PEFT would warn, strict loading would fail)."""
        incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if ".lfma_shape." not in k]

    def delete_adapter(self, adapter_name: str) -> None:
        self._cache.clear()
        super().delete_adapter(adapter_name)

    def __repr__(self) -> str:
        return "lfma." + super().__repr__()


class LfmaModel(BaseTuner):
    """Creates LFMA adapters on a model (PEFT ``BaseTuner``); use through ``get_peft_model``."""

    prefix: str = "lfma_"
    tuner_layer_cls = LfmaLayer
    # LoRA's defaults (query/value projections; GPT-2's c_attn), plus ViT, which LoRA's lacks
    # (transformers 5 renamed its query/value to q_proj/v_proj; a model has one pair or the other).
    target_module_mapping = {**TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
                             "vit": ["query", "value", "q_proj", "v_proj"]}

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """PEFT's injection, made all-or-nothing: every target is checked (type, a single name, K)
        before the first is replaced, and should a layer still fail, every layer built or extended
        for this adapter is taken back, so the model is exactly as before (PEFT's ``add_adapter``
        only removes the config; it also skips ``_pre_injection_hook``, so the checks live here)."""
        config = self.peft_config[adapter_name]
        self._check_targets(model, config)
        before = dict(model.named_modules())
        flags = {p: p.requires_grad for p in model.parameters()}
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except BaseException:
            _take_back(model, adapter_name, before, flags)
            self.__dict__.get("_lfma_target_order", {}).pop(adapter_name, None)
            raise
        if getattr(config, "_lfma_from_checkpoint", False):
            # Built for a load that follows (load_adapter, PeftModel.from_pretrained): until it comes, or a
            # forward runs, a refused load removes this adapter again. The mark is the config's once only.
            config._lfma_from_checkpoint = False
            self.__dict__.setdefault("_lfma_awaiting_state", set()).add(adapter_name)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
        """PeftModel runs its forward and ``generate`` inside this. ``adapter_names=`` (a mixed-adapter
        batch, one adapter per sample) is refused rather than ignored: without this hook PEFT drops the
        argument and every sample would get the active adapters."""
        if kwargs.get("adapter_names") is not None:
            raise ValueError("LFMA does not serve mixed-adapter batches (adapter_names=) yet; run the samples of "
                             "each adapter separately, after model.set_adapter(name)")
        self.__dict__.get("_lfma_awaiting_state", set()).clear()  # in use: a later refused load deletes nothing
        yield

    def _check_targets(self, model: nn.Module, config: LfmaConfig) -> None:
        if config.target_modules is None:  # the architecture's defaults, as inject_adapter resolves them
            config = self._prepare_adapter_config(config, self.get_model_config(model))
        elif config.target_modules == "all-linear":
            config = _maybe_include_all_linear_layers(copy.copy(config), model)
        aliases = adapter.module_names(model)
        for key, module in _outside_tuner_layers(model):
            if self._check_target_module_exists(config, key):
                base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
                adapter.check_target(base, key, model.get_submodule(key.rpartition(".")[0]))
                adapter.check_not_aliased(module, key, aliases)
                self._layer_k(config, key, base)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """Every layer's incoming state checked before any layer loads (a ``load_state_dict`` visits
        this module before its layers), so a refused load changes nothing. An adapter whose config
        was just read from a checkpoint (``load_adapter``, ``PeftModel.from_pretrained``) and whose
        first load is refused is removed again, from the layers and from ``peft_config``: no
        half-added adapter is left behind."""
        awaiting = self.__dict__.setdefault("_lfma_awaiting_state", set())
        layers = [(prefix + name + ".", module) for name, module in self.named_modules()
                  if isinstance(module, LfmaLinear)]
        loading = {n for layer_prefix, layer in layers for n in layer.loaded_adapters(state_dict, layer_prefix)}
        try:
            for layer_prefix, layer in layers:
                layer.check_loaded_state(state_dict, layer_prefix)
        except ValueError:
            for name in sorted(loading & awaiting):
                if name in self.peft_config:
                    self.delete_adapter(name)
            _unwrap_empty(self.model)
            raise
        finally:
            awaiting -= loading
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _create_and_replace(self, lfma_config: LfmaConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, **optional_kwargs: Any) -> None:
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        self._check_fan_in_fan_out(lfma_config, base)
        k = self._layer_k(lfma_config, current_key, base)
        seed = None if lfma_config.seed is None else lfma_config.seed + self._layer_index(
            lfma_config, adapter_name, current_key)
        try:
            if isinstance(target, LfmaLayer):
                target.update_layer(adapter_name, k, lfma_config, seed)
                return
            new_module = LfmaLinear(target, adapter_name, lfma_config, k, seed)
        except ValueError as e:
            raise ValueError(f"layer {current_key!r}: {e}") from e
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        """PEFT's, for base layers whose weight is not called ``weight`` (HQQ keeps ``W_q``): the new
        module takes the place of ``child`` and the adapter tensors go to the base layer's device (as
        PEFT's LoRA does; BaseTuner's version reads ``child.weight``)."""
        setattr(parent, child_name, new_module)
        base = child.base_layer if hasattr(child, "base_layer") else child
        device = adapter.base_device(base)
        meta = torch.device("meta")
        for name, module in new_module.named_modules():
            if self.prefix in name and not any(p.device == meta for p in module.parameters()):
                module.to(device)

    @staticmethod
    def _check_fan_in_fan_out(config: LfmaConfig, base: nn.Module) -> None:
        conv1d = adapter.is_conv1d(base)
        if conv1d and not config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out is set to False but the target module is `Conv1D`. "
                          "Setting fan_in_fan_out to True.")
            config.fan_in_fan_out = True
        elif not conv1d and config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
                          "Setting fan_in_fan_out to False.")
            config.fan_in_fan_out = False

    @staticmethod
    def _layer_k(config: LfmaConfig, key: str, base: nn.Module) -> int:
        """K of the layer ``key``: its ``k_pattern`` entry, else ``k`` or ``top_k_ratio``; checked
        against the layer's shape, an error naming the layer."""
        pattern = _pattern_key(list(config.k_pattern), key)
        k, ratio = (config.k_pattern[pattern], None) if pattern is not None else (config.k, config.top_k_ratio)
        try:
            return adapter.layer_k(adapter.base_shape(base), k, ratio)
        except ValueError as e:
            hint = ("" if pattern is not None or ratio is not None else
                    f" (LfmaConfig's k={k}{', the default budget' if k == DEFAULT_K else ''}); set a smaller k, a "
                    f"top_k_ratio, or a k_pattern entry for this layer")
            raise ValueError(f"layer {key!r}: {e}{hint}") from None

    def _layer_index(self, config: LfmaConfig, adapter_name: str, key: str) -> int:
        """The layer's position among the adapter's targets in ``named_modules`` order, so that
        layer ``i`` draws its random init with ``seed + i`` exactly as the native ``apply_lfma``."""
        order = self.__dict__.setdefault("_lfma_target_order", {})
        if adapter_name not in order:
            names = [n for n, _ in _outside_tuner_layers(self.model) if self._check_target_module_exists(config, n)]
            order[adapter_name] = {n: i for i, n in enumerate(names)}
        return order[adapter_name].get(key, 0)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        # A later adapter of this name may target other layers: its order is computed afresh.
        self.__dict__.get("_lfma_target_order", {}).pop(adapter_name, None)

    def _safe_merge_check(self, adapter_names: Optional[List[str]]) -> None:
        """Every layer's merged weight checked before any is written, so that a non-finite
        adapter anywhere changes nothing (PEFT's own loop would merge the layers before it)."""
        for name, module in self.model.named_modules():
            if isinstance(module, LfmaLinear):
                names = [n for n in (adapter_names or module.active_adapters)
                         if n in module.lfma_coeffs and n not in module.merged_adapters]
                if names and not torch.isfinite(module.merged_weight(names)).all():
                    raise ValueError(f"safe merge: layer {name!r} would get non-finite weights from LFMA adapter(s) "
                                     f"{names}; nothing was merged")

    def merge_adapter(self, adapter_names: Optional[List[str]] = None, safe_merge: bool = False) -> None:
        if safe_merge:
            self._safe_merge_check(adapter_names)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names: Optional[List[str]] = None):
        if merge and safe_merge:
            self._safe_merge_check(adapter_names)
        return super()._unload_and_optionally_merge(merge=merge, progressbar=progressbar, safe_merge=safe_merge,
                                                    adapter_names=adapter_names)


def _register() -> None:
    """Register once per process. A second import of this module (``importlib.reload``) points
    PEFT at the new classes; a method "lfma" from another package is refused."""
    from peft.mapping import (PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING,
                              PEFT_TYPE_TO_TUNER_MAPPING)

    registered = PEFT_TYPE_TO_TUNER_MAPPING.get(PeftType.LFMA)
    if registered is None:
        register_peft_method(name="lfma", config_cls=LfmaConfig, model_cls=LfmaModel, prefix="lfma_")
    elif registered.__module__ == __name__:
        PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.LFMA] = LfmaConfig
        PEFT_TYPE_TO_TUNER_MAPPING[PeftType.LFMA] = LfmaModel
        PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.LFMA] = "lfma_"
    else:
        raise ImportError(f"PEFT already has a method 'lfma' from {registered.__module__}; "
                          "lfma_kernels.peft cannot register its own")


_register()
