"""The LFMA PEFT tuner (``BaseTuner``): injection (all or nothing), loading checks, merging."""
from __future__ import annotations

import copy
import re
from functools import partial
import warnings
from contextlib import contextmanager
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _maybe_include_all_linear_layers
from peft.utils.other import AuxiliaryTrainingWrapper
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

from .. import adapter, targets
from .._checks import count
from .config import DEFAULT_K, LfmaConfig
from .layer import LfmaLayer, LfmaLinear

__all__ = ["LfmaModel"]


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
            targets.set_submodule(model, name, module.get_base_layer())
    for p, flag in flags.items():
        p.requires_grad_(flag)


def _unwrap_empty(model: nn.Module) -> None:
    """Put back the base layer of every LFMA layer left without adapters (a refused first load)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LfmaLayer) and not module.lfma_coeffs:
            targets.set_submodule(model, name, module.get_base_layer())


def _names_pre_hook(module: nn.Module, args: tuple, kwargs: dict, adapter_names: List[str]):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


def _add_names_hooks(modules, adapter_names: List[str]) -> list:
    """Hand ``adapter_names`` to the forward of every LFMA layer and ``modules_to_save`` wrapper among
    ``modules``; the hooks' handles."""
    return [m.register_forward_pre_hook(partial(_names_pre_hook, adapter_names=adapter_names), with_kwargs=True)
            for m in modules if isinstance(m, (LfmaLayer, AuxiliaryTrainingWrapper))]


def _copies_per_input(kwargs: dict) -> int:
    """How many rows ``generate`` makes of each input: ``num_beams`` under beam search, else
    ``num_return_sequences`` (given directly or in a ``generation_config``); 1 for a forward. PEFT's LoRA
    reads ``num_beams`` alone."""
    config = kwargs.get("generation_config")

    def setting(name: str) -> int:
        value = kwargs.get(name, getattr(config, name, None))
        return value if isinstance(value, int) and value > 1 else 1
    beams = setting("num_beams")
    return beams if beams > 1 else setting("num_return_sequences")


def _get_encoder(model: nn.Module) -> Optional[nn.Module]:
    """The model's encoder, if it has one apart from itself (transformers 5 returns the model itself)."""
    get = getattr(model, "get_encoder", None)
    encoder = get() if callable(get) else None
    return None if encoder is model else encoder


def _pattern_key(patterns: Sequence[str], name: str) -> Optional[str]:
    """The first pattern that is ``name`` itself or matches its trailing components (PEFT's
    ``rank_pattern`` rule)."""
    return next((p for p in patterns if re.match(rf"(.*\.)?({p})$", name)), None)


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
        """PeftModel runs its forward and ``generate`` inside this. ``adapter_names=`` (one adapter name per
        sample, ``"__base__"`` for none: a mixed-adapter batch) reaches every LFMA layer and
        ``modules_to_save`` wrapper through forward pre-hooks, as PEFT's LoRA does: refused in training
        mode and for names no layer has; under beam search (``num_beams > 1``) each name is repeated per
        beam, except in an encoder, which sees each input once."""
        self.__dict__.get("_lfma_awaiting_state", set()).clear()  # in use: a later refused load deletes nothing
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
            raise TypeError(f"Got adapter names of type {type(adapter_names)}, expected a list of str.")
        wrong = next((n for n in adapter_names if not isinstance(n, str)), None)
        if wrong is not None:
            raise TypeError(f"adapter_names must all be str, got {wrong!r} of type {type(wrong).__name__}")
        modules = list(self.modules())  # walked once for the names and once for the hooks
        known = set().union(*(m.lfma_coeffs.keys() for m in modules if isinstance(m, LfmaLayer)))
        unknown = {n for n in adapter_names if n != "__base__"} - known
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}")
        per_sample = list(adapter_names)
        copies = _copies_per_input(kwargs)
        if copies > 1:
            per_sample = [n for n in adapter_names for _ in range(copies)]
        handles = _add_names_hooks(modules, per_sample)
        encoder = _get_encoder(self.model)
        if encoder is not None and per_sample != list(adapter_names):
            # Registered after the others, so these run last: the encoder's layers see each input once.
            handles += _add_names_hooks(encoder.modules(), list(adapter_names))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def set_mixed_batch_folds(self, max_adapters: int) -> None:
        """How many adapters' ``W + dW`` each full-precision layer keeps for mixed-adapter batches
        (default 4; each costs the memory of the layer's weight, as a merged copy would). An adapter with
        many samples in a batch runs as one GEMM with its own ``W + dW``, kept between calls up to this
        many adapters and built for the call beyond them; 0 keeps none."""
        max_adapters = count(max_adapters, "set_mixed_batch_folds: max_adapters")
        self.__dict__["_lfma_mixed_folds"] = max_adapters  # for layers built later too
        for module in self.modules():
            if isinstance(module, LfmaLayer):
                module._folds.clear()
                module._folds.capacity = max_adapters

    def _check_targets(self, model: nn.Module, config: LfmaConfig) -> None:
        if config.target_modules is None:  # the architecture's defaults, as inject_adapter resolves them
            config = self._prepare_adapter_config(config, self.get_model_config(model))
        elif config.target_modules == "all-linear":
            config = _maybe_include_all_linear_layers(copy.copy(config), model)
        aliases = targets.module_names(model)
        for key, module in _outside_tuner_layers(model):
            if self._check_target_module_exists(config, key):
                base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
                targets.check_target(base, key, model.get_submodule(key.rpartition(".")[0]))
                targets.check_not_aliased(module, key, aliases)
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
        new_module._folds.capacity = self.__dict__.get("_lfma_mixed_folds", new_module._folds.capacity)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        """PEFT's, for base layers whose weight is not called ``weight`` (HQQ keeps ``W_q``): the new
        module takes the place of ``child`` and the adapter tensors go to the base layer's device (as
        PEFT's LoRA does; BaseTuner's version reads ``child.weight``)."""
        setattr(parent, child_name, new_module)
        base = child.base_layer if hasattr(child, "base_layer") else child
        device = targets.base_device(base)
        meta = torch.device("meta")
        for name, module in new_module.named_modules():
            if self.prefix in name and not any(p.device == meta for p in module.parameters()):
                module.to(device)

    @staticmethod
    def _check_fan_in_fan_out(config: LfmaConfig, base: nn.Module) -> None:
        conv1d = targets.is_conv1d(base)
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

