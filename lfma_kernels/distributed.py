"""LFMA under PyTorch's data-parallel engines (DDP, FSDP2 ``fully_shard``, FSDP1).

Apply LFMA (``apply_lfma`` / ``load_lfma``) to the unsharded model first, then wrap it: an engine
only synchronises or shards the parameters it finds when it wraps the model.

- ``fsdp_auto_wrap_policy``: the FSDP1 (``FullyShardedDataParallel``) auto-wrap policy;
- ``full_adapter_state_dict``: the trained tensors of a wrapped model, gathered, and
  ``load_adapter_state``: those tensors into an unsharded copy, to save or merge the adapter there.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn

from .layers import LFMALinear

__all__ = ["fsdp_auto_wrap_policy", "full_adapter_state_dict", "load_adapter_state"]


# Parameter containers are read by their parent's forward and never called themselves, so an FSDP
# unit of their own would never be unsharded: the parent is wrapped in their place (PEFT layers
# keep their coefficients in an nn.ParameterDict).
_CONTAINERS = (nn.ParameterDict, nn.ParameterList)


def _owns_trainable(module: nn.Module) -> bool:
    """A trainable parameter of ``module`` itself or of one of its parameter containers."""
    held = [module] + [c for c in module.children() if isinstance(c, _CONTAINERS)]
    return any(p.requires_grad for m in held for p in m.parameters(recurse=False))


def fsdp_auto_wrap_policy(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """FSDP1 ``auto_wrap_policy``: every ``LFMALinear``, and every module that owns a trainable
    parameter (a ``modules_to_save`` head, say), becomes an FSDP unit of its own.

    Use it with ``use_orig_params=True``: ``FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy,
    use_orig_params=True)``. An ``LFMALinear`` unit holds the frozen base weight and the trained
    coefficients in one flat parameter, which ``use_orig_params=False`` refuses (it needs uniform
    ``requires_grad``), and the base cannot be a unit of its own because ``LFMALinear`` reads its
    weight without calling its forward, the moment FSDP1 unshards a unit. Confining the mix to the
    adapted layers keeps the rest of the model, in the root unit, frozen: FSDP1 allocates a
    gradient for the whole flat parameter of any unit with a trainable member.
    """
    if recurse:
        return True  # look at every submodule
    if isinstance(module, _CONTAINERS):
        return False
    return isinstance(module, LFMALinear) or _owns_trainable(module)


def full_adapter_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The trainable parameters and the buffers (the adapter's ``coeffs``, ``rows``, ``cols`` and
    the ``modules_to_save`` weights) of a model wrapped by DDP, FSDP1 or FSDP2, as whole tensors
    on the CPU of every rank, named as in the unwrapped model; the frozen weights are left out, so
    nothing the size of the model is gathered.

    A collective: every rank must call it. ``load_adapter_state`` puts the result into an unsharded
    copy of the model, to save or merge the adapter there.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=False, ignore_frozen_params=True)
    return {name: tensor.detach().cpu() for name, tensor in get_model_state_dict(model, options=options).items()}


def load_adapter_state(model: nn.Module, state: Dict[str, torch.Tensor]) -> nn.Module:
    """Load ``full_adapter_state_dict``'s result into ``model``, an unsharded copy of the trained
    model with the same adapter applied (its frozen weights are not in ``state`` and stay as they
    are); returns ``model``. Raises ``KeyError`` when ``state`` lacks a trainable parameter or a
    buffer of ``model``, or holds a tensor ``model`` has no place for."""
    result = model.load_state_dict(state, strict=False)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    missing = [key for key in result.missing_keys if key not in frozen]
    if missing or result.unexpected_keys:
        raise KeyError(f"the gathered state does not fit the model: missing {missing}, "
                       f"unexpected {result.unexpected_keys}")
    return model
