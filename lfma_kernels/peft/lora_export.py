"""LFMA adapters as LoRA adapters, exactly: for LoRA servers (vLLM, S-LoRA, LoRAX) and every LoRA tool.

Each selected frequency adds a rank-2 real matrix to ``dW``. Grouped by their column frequency ``v``
(``v`` and ``-v`` together: ``Re(z) = Re(conj z)``),

    dW = s Re sum_v a_v b_v^T,   a_v[m] = sum_{k: v_k = v} c_k e^{2 pi i m u_k / d_out},   b_v[n] = e^{2 pi i n v / d_in}

so ``dW = A B^T`` with ``A = s [Re a_v, -Im a_v]`` and ``B = [Re b_v, Im b_v]``: rank at most twice the
distinct column frequencies (one for ``v = 0`` and ``v = d_in/2``, where ``b_v`` is real), or likewise by
rows, whichever is fewer. The smallest exact rank and the optimal truncations come from an SVD of the
small core ``R_A R_B^T`` of the two factors' QR decompositions (never of the dense ``dW``), in float64.

:func:`convert_to_lora` and :func:`save_as_lora` have PEFT's signatures and return values
(``peft.tuners.lora.conversion``), with ``rank=None`` (the exact rank of each layer) as default; they take
a PEFT model with LFMA adapters or a native ``apply_lfma`` model. :func:`lora_ranks` says, per layer, the
exact rank, the rank exported and the relative error of ``dW`` at that rank.
"""
from __future__ import annotations

import logging
import numbers
import os
import pathlib
import warnings
from typing import TYPE_CHECKING, Dict, Iterator, List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn as nn

from .. import adapter, targets
from ..layers import LFMALinear
from ..model import _save_names
from .layer import LfmaLayer

if TYPE_CHECKING:
    from peft import LoraConfig

__all__ = ["convert_to_lora", "save_as_lora", "lora_ranks", "LayerRank"]

_log = logging.getLogger(__name__)
_PEFT_PREFIX = "base_model.model."  # the key prefix of a PeftModel's adapter state
Rank = Optional[Union[int, float]]


class LayerRank(NamedTuple):
    exact: int             # the smallest rank of an exact LoRA of this layer's dW
    exported: int          # the rank convert_to_lora gives it
    relative_error: float  # ||dW - B A||_F / ||dW||_F at that rank (0: exact)


class _Layer(NamedTuple):
    name: str  # the module's name in the PEFT model (base_model.model....)
    base: nn.Module
    adapter: adapter.Adapter


def _factors(a: adapter.Adapter, shape: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` in float64 with ``dW = A B^T``: grouped by column frequency, or by row frequency (the
    transposed problem) when that gives fewer columns."""
    d_out, d_in = shape
    # On the CPU: the factors are small, and float64/complex128 are not on every device (MPS).
    c = torch.complex(*a.coeffs.detach().cpu().double().unbind(-1))
    rows, cols = a.rows.cpu().long(), a.cols.cpu().long()
    by_rows = _groups(rows, d_out) < _groups(cols, d_in)
    if by_rows:  # dW^T has the roles of rows and columns swapped
        rows, cols, d_out, d_in = cols, rows, d_in, d_out
    # Every frequency with v > d_in/2 is taken as its conjugate: (conj c, -u, -v) gives the same Re.
    flip = cols > d_in // 2
    c = torch.where(flip, c.conj(), c)
    u = torch.where(flip, (-rows) % d_out, rows)
    v = torch.where(flip, (-cols) % d_in, cols)
    distinct, group = torch.unique(v, return_inverse=True)
    spectrum = torch.zeros(d_out, len(distinct), dtype=c.dtype, device=c.device)
    spectrum.index_put_((u, group), c, accumulate=True)
    a_v = torch.fft.ifft(spectrum, dim=0) * d_out  # sum_u Z[u] e^{2 pi i m u / d_out}
    n = torch.arange(d_in, dtype=torch.float64, device=c.device)
    phase = 2 * torch.pi * ((n[:, None] * distinct[None, :]) % d_in) / d_in  # exact reduction, as the kernels
    real_b = (distinct == 0) | (2 * distinct == d_in)  # b_v real: one column, not two
    s = a.alpha / (shape[0] * shape[1])
    left = torch.cat([s * a_v.real, -s * a_v.imag[:, ~real_b]], dim=1)
    right = torch.cat([torch.cos(phase), torch.sin(phase)[:, ~real_b]], dim=1)
    return (right, left) if by_rows else (left, right)


def _groups(freqs: torch.Tensor, d: int) -> int:
    """Columns of the factors when grouping by these frequencies (conjugates merged; real ones once)."""
    canonical = torch.unique(torch.minimum(freqs % d, (-freqs) % d))
    return 2 * len(canonical) - int(((canonical == 0) | (2 * canonical == d)).sum())


def _svd(a: adapter.Adapter, shape: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, S, V)``, float64, ``dW = U diag(S) V^T`` with orthonormal columns, ``S`` descending and cut at
    the exact rank (numpy's matrix_rank tolerance on the core)."""
    left, right = _factors(a, shape)
    q_left, r_left = torch.linalg.qr(left)
    q_right, r_right = torch.linalg.qr(right)
    u, s, vh = torch.linalg.svd(r_left @ r_right.T)
    tol = (s[0] if len(s) else 0.0) * max(shape) * torch.finfo(torch.float64).eps
    keep = int((s > tol).sum())
    return q_left @ u[:, :keep], s[:keep], q_right @ vh[:keep].T


def _cutoff(s: torch.Tensor, threshold: float) -> int:
    """PEFT's energy rule: the smallest rank whose singular values hold ``threshold`` of ``sum(S^2)``."""
    energy = torch.cumsum(s ** 2, 0)
    return min(int(torch.searchsorted(energy, threshold * energy[-1]).item()) + 1, len(s))


def _rank_for(rank: Rank, s: torch.Tensor, shape: Tuple[int, int], name: str) -> int:
    if rank is None:
        return len(s)
    if isinstance(rank, float):
        return _cutoff(s, rank) if len(s) else 0
    if rank > min(shape):
        raise ValueError(f"The chosen rank {rank} is larger than the weight shape ({min(shape)}) of layer {name!r}, "
                         "please choose a lower rank.")
    return rank


def _check_rank(rank: Rank) -> Rank:
    if rank is None:
        return None
    if isinstance(rank, bool) or not isinstance(rank, (numbers.Integral, numbers.Real)):
        raise TypeError(f"rank must be None, an int or a float in (0, 1], got {rank!r}")
    rank = int(rank) if isinstance(rank, numbers.Integral) else float(rank)
    if isinstance(rank, float) and not 0 < rank <= 1:
        raise ValueError(f"If rank is a float, it is interpreted as a threshold. It must be between 0 and 1 but got "
                         f"{rank}.")
    if isinstance(rank, int) and rank < 1:
        raise ValueError("Passing a rank of 0 doesn't make sense, please pass a valid value.")
    return rank


def _layers(model: nn.Module, adapter_name: str) -> List[_Layer]:
    """The LFMA layers carrying ``adapter_name`` (PEFT) or every ``LFMALinear`` (native), by PEFT key name."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    others = {type(m).__name__ for m in model.modules() if isinstance(m, BaseTunerLayer) and not isinstance(m, LfmaLayer)}
    if others:
        raise TypeError(f"Some module types on this model do not support LoRA conversion: {', '.join(sorted(others))}.")
    layers = []
    native = not any(isinstance(m, LfmaLayer) for m in model.modules())
    for name, module in model.named_modules():
        if isinstance(module, LfmaLayer) and adapter_name in module.lfma_coeffs:
            layers.append(_Layer(name, module.get_base_layer(), module._adapters([adapter_name])[0]))
        elif native and isinstance(module, LFMALinear):
            layers.append(_Layer(_PEFT_PREFIX + name, module.base, module._adapters()[0]))
    if not layers:
        raise TypeError(f"Could not detect any layer that supports LoRA conversion (no LFMA layer with adapter "
                        f"{adapter_name!r}).")
    return layers


def _exports(model: nn.Module, rank: Rank, adapter_name: str, progressbar: bool
             ) -> Iterator[Tuple[_Layer, LayerRank, torch.Tensor, torch.Tensor]]:
    """Per layer: its :class:`LayerRank` and LoRA's ``(A [r, d_in], B [d_out, r])`` in float32."""
    from tqdm import tqdm

    rank = _check_rank(rank)
    for layer in tqdm(_layers(model, adapter_name), disable=not progressbar, desc="Converting to LoRA"):
        shape = adapter.base_shape(layer.base)
        u, s, v = _svd(layer.adapter, shape)
        r = _rank_for(rank, s, shape, layer.name.removeprefix(_PEFT_PREFIX))
        kept = min(r, len(s))
        total = float((s ** 2).sum())
        error = (float((s[kept:] ** 2).sum()) / total) ** 0.5 if total > 0 else 0.0
        lora_b = torch.zeros(shape[0], r, dtype=torch.float64, device=s.device)
        lora_a = torch.zeros(r, shape[1], dtype=torch.float64, device=s.device)
        lora_b[:, :kept] = u[:, :kept] * s[:kept]  # PEFT's split: B = U S, A = V^T
        lora_a[:kept] = v[:, :kept].T
        yield layer, LayerRank(len(s), r, error), lora_a.float().contiguous(), lora_b.float().contiguous()


def lora_ranks(model: nn.Module, rank: Rank = None, adapter_name: str = "default") -> Dict[str, LayerRank]:
    """Per LFMA layer (by name in the base model): the exact LoRA rank of its ``dW``, the rank
    :func:`convert_to_lora` would export with this ``rank``, and the relative error of ``dW`` there."""
    return {layer.name.removeprefix(_PEFT_PREFIX): info
            for layer, info, _, _ in _exports(model, rank, adapter_name, progressbar=False)}


def _config_of(model: nn.Module, adapter_name: str):
    """The LFMA config of the adapter (PEFT's ``peft_config``, or a native model's ``lfma_config``)."""
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict):
        return peft_config.get(adapter_name)
    return getattr(model, "lfma_config", None)


@torch.no_grad()
def convert_to_lora(model: nn.Module, rank: Rank = None, adapter_name: str = "default", progressbar: bool = False
                    ) -> Tuple["LoraConfig", Dict[str, torch.Tensor]]:
    """The LFMA adapter ``adapter_name`` of ``model`` as a LoRA adapter: ``(LoraConfig, state_dict)``, as
    ``peft.tuners.lora.conversion.convert_to_lora`` returns them (``PeftModel.from_pretrained`` loads what
    :func:`save_as_lora` writes of them onto the base model).

    ``rank``: ``None`` (default), each layer's smallest exact rank (through ``rank_pattern``; the outputs are
    reproduced up to float32 rounding); an int, that rank everywhere, truncated optimally (zero-padded
    where the exact rank is lower); a float in (0, 1], PEFT's energy threshold. The scaling is baked in
    (``lora_alpha = r``). Conv1D targets (GPT-2) are exported with ``fan_in_fan_out=True``; their A and B
    are laid out as PEFT's LoRA keeps them for Conv1D, which is the ``nn.Linear`` layout of the logical
    ``(d_out, d_in)`` weight (LoRA transposes only when merging). ``modules_to_save`` are carried; ``bias``
    other than ``"none"`` is refused, as PEFT refuses it. A truncation that loses more than 1e-6 of any
    layer's ``dW`` (relative) warns with the worst layer; :func:`lora_ranks` lists them all."""
    from peft import LoraConfig

    rank = _check_rank(rank)
    config = _config_of(model, adapter_name)
    bias = getattr(config, "bias", "none")
    if bias != "none":
        raise ValueError(f"The adapter's config sets bias={bias}, this is not supported right now.")
    state_dict: Dict[str, torch.Tensor] = {}
    ranks: Dict[str, int] = {}
    errors: Dict[str, LayerRank] = {}
    fan_in_fan_out = False
    for layer, info, lora_a, lora_b in _exports(model, rank, adapter_name, progressbar):
        key = layer.name.removeprefix(_PEFT_PREFIX)
        errors[key] = info
        if info.exported == 0:  # no dW at all (zero coefficients): no LoRA layer either, as PEFT does
            continue
        ranks[key] = info.exported
        fan_in_fan_out |= targets.is_conv1d(layer.base)
        state_dict[f"{layer.name}.lora_A.weight"] = lora_a
        state_dict[f"{layer.name}.lora_B.weight"] = lora_b
    if not state_dict:
        raise ValueError(f"LFMA adapter {adapter_name!r} has dW = 0 in every layer: nothing to convert")
    _log.info("LFMA -> LoRA: " + ", ".join(f"{k}: exact rank {v.exact}, exported {v.exported}, error {v.relative_error:.1e}"
                                           for k, v in errors.items()))
    worst = max(errors.items(), key=lambda kv: kv[1].relative_error)
    if worst[1].relative_error > 1e-6:
        warnings.warn(f"convert_to_lora(rank={rank!r}) truncates dW: relative error up to {worst[1].relative_error:.2e}"
                      f" (layer {worst[0]!r}, exact rank {worst[1].exact}, exported {worst[1].exported}); "
                      "lfma_kernels.peft.lora_ranks lists every layer, rank=None exports exactly", UserWarning,
                      stacklevel=3)  # past torch.no_grad's wrapper: the caller's line
    uniform = isinstance(rank, int)
    # r is the largest rank exported, not PEFT's placeholder 1: LoRA servers check r against their
    # maximum (vLLM's max_lora_rank) before they read rank_pattern.
    largest = max(ranks.values())
    lora_config = LoraConfig(
        r=largest, lora_alpha=largest, target_modules=set(ranks),
        rank_pattern={} if uniform else dict(ranks), alpha_pattern={} if uniform else dict(ranks),
        fan_in_fan_out=fan_in_fan_out, base_model_name_or_path=getattr(config, "base_model_name_or_path", None),
        modules_to_save=_modules_to_save(model, config, adapter_name, state_dict))
    return lora_config, state_dict


def _modules_to_save(model: nn.Module, config, adapter_name: str, state_dict: Dict[str, torch.Tensor]
                     ) -> Optional[List[str]]:
    """Carry the adapter's ``modules_to_save``: their names into the config and their whole state (buffers
    such as a norm's running statistics too) into ``state_dict``, under the keys PEFT's LoRA loads."""
    names = list(getattr(config, "modules_to_save", None) or [])
    if not names:
        return None
    from peft.utils.other import ModulesToSaveWrapper

    if hasattr(model, "lfma_config"):  # native: the modules themselves, as save_lfma finds them
        owners = {_PEFT_PREFIX + name: model.get_submodule(name) for name in _save_names(model, config)}
    else:
        owners = {name: module.modules_to_save[adapter_name] for name, module in model.named_modules()
                  if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save}
    for name, module in owners.items():
        for key, tensor in module.state_dict().items():
            state_dict[f"{name}.{key}"] = tensor.detach().clone()
    return names


def save_as_lora(path: Union[str, os.PathLike], model: nn.Module, rank: Rank = None, adapter_name: str = "default",
                 progressbar: bool = False) -> None:
    """:func:`convert_to_lora`, then write ``adapter_model.safetensors`` and ``adapter_config.json`` into
    ``path`` (created if missing), as PEFT's ``save_as_lora``: ``PeftModel.from_pretrained(base, path)``
    loads it as a plain LoRA adapter."""
    from peft.utils import SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import save_file

    lora_config, state_dict = convert_to_lora(model, rank=rank, adapter_name=adapter_name, progressbar=progressbar)
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path / SAFETENSORS_WEIGHTS_NAME))
    lora_config.save_pretrained(str(path))
