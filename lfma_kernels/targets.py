"""What an LFMA adapter may be built on, and the checks every entry point shares: the layer types (an
``nn.Linear``, transformers' ``Conv1D``, a quantized layer :mod:`.quantized` recognises), sharding, tied
and aliased weights, backend names, and positions arriving through ``load_state_dict``."""
from __future__ import annotations

import sys
import warnings
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from . import quantized
from ._checks import check_frequencies
from .ops import dispatch
from .quantized import Quantization

__all__ = ["is_conv1d", "is_adaptable", "set_submodule", "base_device", "check_base", "check_target",
           "check_backend_name", "loadable_backend", "module_names", "check_not_aliased", "tied_weight_names",
           "is_dtensor", "check_unsharded", "check_loaded_positions", "unchanged_by"]


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D``, recognised without importing transformers: if it is not
    imported, no module of that class can exist."""
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return conv1d is not None and isinstance(module, conv1d)


def is_adaptable(module: nn.Module) -> bool:
    """An ``nn.Linear``, a transformers ``Conv1D``, or a quantized linear layer that is neither (HQQ)."""
    return isinstance(module, nn.Linear) or is_conv1d(module) or quantized.recognise(module) is not None


def _quantized_support() -> str:
    """What quantized layers LFMA adapts, and what a newer PEFT would add."""
    text = "; ".join(quantized.SUPPORTED)
    peft = sys.modules.get("peft")
    if peft is not None and "peft.utils.quantization_utils" not in sys.modules:
        text += (f"; through PEFT >= 0.21 also the layers it can only run forward (GPTQ, AWQ, AQLM, EETQ, INC): "
                 f"peft {getattr(peft, '__version__', '?')} is installed")
    else:
        text += "; through PEFT, the layers it can only run forward (GPTQ, AWQ, AQLM, EETQ, INC)"
    return text


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``name`` of ``model``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def base_device(base: nn.Module) -> torch.device:
    """Where the base layer's weight lives (a quantized layer may keep it under another name)."""
    weight = getattr(base, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device
    return next(t for t in (*base.parameters(), *base.buffers())).device


def check_base(base: nn.Module, what: str) -> Optional[Quantization]:
    """What a layer class (``what``) can wrap: an unsharded ``nn.Linear`` or ``Conv1D``, with a plain
    float weight or a quantized one LFMA supports (its :class:`~.quantized.Quantization`, else ``None``)."""
    if not is_adaptable(base):
        raise TypeError(f"{what} wraps an nn.Linear or a transformers Conv1D, got {type(base).__name__}")
    check_unsharded(base, what)
    return quantized.check_weight(base, what)


def check_target(module: nn.Module, name: str, parent: Optional[nn.Module]) -> None:
    """What the model tooling and the PEFT method adapt (``name`` in the model, under ``parent``): an
    ``nn.Linear`` or ``Conv1D`` that its parent calls, with an unsharded weight."""
    if not is_adaptable(module):
        raise TypeError(f"target {name!r} is a {type(module).__name__}; LFMA adapts nn.Linear and transformers "
                        f"Conv1D layers, and the quantized layers {_quantized_support()}")
    if isinstance(parent, nn.MultiheadAttention):
        # MultiheadAttention reads out_proj.weight and .bias directly instead of calling the module:
        # a wrapped out_proj would be bypassed (PEFT's layers even hand it the base weight, silently).
        raise TypeError(f"target {name!r} is the out_proj of an nn.MultiheadAttention, which reads its weight "
                        "directly instead of calling it, so an adapter there would never run; LFMA adapts "
                        "layers that are called")
    check_unsharded(module, f"target {name!r}")


def check_backend_name(backend: str) -> None:
    if backend != "auto" and backend not in dispatch.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of {', '.join(dispatch.BACKENDS)}")


def loadable_backend(saved: str, override: Optional[str], where: str) -> str:
    """The backend a loaded adapter runs with: ``override`` when given; else the saved one, which is
    a preference, not a requirement: one that cannot run here (``"cuda"`` on a CPU-only machine)
    becomes ``"auto"`` with a warning."""
    if override is not None:
        check_backend_name(override)
        return override
    check_backend_name(saved)
    reason = None if saved == "auto" else dispatch.unavailable_reason(saved)
    if reason is None:
        return saved
    warnings.warn(f"{where} was saved with backend={saved!r}, which cannot run here ({reason}); using "
                  "backend='auto'. Pass backend= to choose another.", stacklevel=3)
    return "auto"


def module_names(model: nn.Module) -> Dict[int, List[str]]:
    """Every name each module of ``model`` is registered under, by ``id`` (``named_modules`` lists a
    module once, under its first name)."""
    names: Dict[int, List[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


def check_not_aliased(module: nn.Module, name: str, names: Dict[int, List[str]]) -> None:
    """Refuse a target registered under more than one name (``names``: :func:`module_names`): an
    adapter installed at one name would be bypassed by every call through the others."""
    aliases = names.get(id(module), [name])
    if len(aliases) > 1:
        raise ValueError(f"target {name!r} is one module registered under several names ({', '.join(aliases)}); an "
                         "adapter replaces it at one name only, so calls through the others would bypass it. Register "
                         "the module once (keep the other reference as a plain attribute, not a submodule)")


def tied_weight_names(model: nn.Module, layer_name: str, base: nn.Module) -> List[str]:
    """Names outside ``layer_name`` under which ``model`` holds the base layer's weight, or another
    parameter sharing its storage (a tied embedding, say): merging into that weight would change
    those modules too."""
    weight = getattr(base, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return []
    storage = weight.untyped_storage().data_ptr()
    inside = layer_name + "."
    return [n for n, p in model.named_parameters(remove_duplicate=False) if not n.startswith(inside)
            and (p is weight or (p.device == weight.device and p.untyped_storage().data_ptr() == storage))]


def is_dtensor(t: Optional[torch.Tensor]) -> bool:
    if t is None or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def check_unsharded(base: nn.Module, what: str) -> None:
    """Refuse a base whose weight is already sharded (a DTensor: ``fully_shard`` or tensor
    parallelism came first): coefficients added afterwards would be trained by no engine's
    gradient reduction (the ranks silently diverge), and ``init="weight"`` would leave DTensor
    positions. Adapt the unsharded model, then shard it."""
    if is_dtensor(getattr(base, "weight", None)):
        raise ValueError(f"{what}: the base layer's weight is a DTensor, already sharded (fully_shard or tensor "
                         "parallelism); apply LFMA (apply_lfma / load_lfma / get_peft_model) to the unsharded "
                         "model first, then shard it")


def check_loaded_positions(state_dict: dict, prefix: str, keys: Tuple[str, str, str], shape: Tuple[int, int]) -> None:
    """Positions arriving through ``load_state_dict`` (``keys``: coefficients, rows, cols under
    ``prefix``) are range-checked before anything is loaded: once per load (a host sync on GPU),
    never per step. A partial load that leaves any of them out is not checked here."""
    names = [prefix + key for key in keys]
    if all(name in state_dict for name in names):
        try:
            check_frequencies(*(state_dict[name] for name in names), shape)
        except ValueError as e:
            raise ValueError(f"loading {prefix.rstrip('.') or 'the layer'}: {e}") from None


def unchanged_by(state_dict: dict, prefix: str, current: Dict[str, torch.Tensor]) -> bool:
    """Whether loading ``state_dict`` would leave each tensor of ``current`` (by key under ``prefix``)
    as it is: its entries for them are missing or equal. A merged layer may reload its own state."""
    for key, tensor_now in current.items():
        incoming = state_dict.get(prefix + key)
        if incoming is not None and not (incoming.shape == tensor_now.shape
                                         and torch.equal(incoming.to(tensor_now.device, tensor_now.dtype), tensor_now)):
            return False
    return True
