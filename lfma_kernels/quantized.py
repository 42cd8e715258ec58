"""Quantized base layers: which ones an LFMA adapter runs beside, and how their weight is read and written.

An adapter on a quantized base never touches ``W`` in the forward's hot path the way a full-precision
fold does: it either adds ``x dW^T`` to the base layer's own output (the delta path), or dequantizes
``W`` transiently, folds ``dW`` into that copy and runs one GEMM (what the base's own kernel does on a
CPU anyway). Both need to know the layer's compute dtype and, for the second, for ``init="weight"``
and for merging, how to dequantize and requantize its weight. A :class:`Quantization` says that for
one family of layers; :func:`recognise` finds it, without importing bitsandbytes, torchao or hqq (a
layer of theirs can only exist if they are imported already).

Supported: bitsandbytes ``Linear4bit`` (nf4/fp4, double quantization, any ``compute_dtype`` and
``quant_storage``) and ``Linear8bitLt``; an ``nn.Linear`` whose weight is a torchao quantized tensor
(recognised by class: they report a float dtype); HQQ's ``HQQLinear`` (not an ``nn.Linear``; merging
replaces it with a new one, as PEFT does). Anything else whose weight is not a plain floating point
tensor is refused when the adapter is built (:func:`check_weight`).
"""
from __future__ import annotations

import sys
import warnings
from typing import Optional

import torch
import torch.nn as nn

__all__ = ["Quantization", "ForwardOnly", "recognise", "check_weight", "merge_warning", "SUPPORTED"]

SUPPORTED = ("bitsandbytes Linear4bit (nf4, fp4) and Linear8bitLt", "nn.Linear with a torchao quantized weight "
             "(Int8WeightOnlyConfig, IntxWeightOnlyConfig)", "HQQ's HQQLinear")


class Quantization:
    """How LFMA works with one family of quantized layers. ``name`` appears in plans and errors."""

    name = ""
    dequantizes = True  # W can be read back densely (the fold path, init="weight", merging)
    merges = True       # ... and written back: dequantize, add dW, requantize

    def compute_dtype(self, base: nn.Module, x_dtype: torch.dtype) -> torch.dtype:
        """The dtype the base layer computes in for an input of ``x_dtype``."""
        return x_dtype

    def base_dequantizes(self, base: nn.Module, x: torch.Tensor, grad: bool) -> bool:
        """Whether the base layer's own forward dequantizes ``W`` and runs a dense GEMM for this call
        (then folding ``dW`` into that dense copy costs only building ``dW``), rather than a kernel that
        reads the quantized weight directly."""
        return x.device.type == "cpu"

    def prepare(self, base: nn.Module, grad: bool) -> None:
        """Called before each forward beside the base (``grad``: a backward will follow)."""

    def dequantize(self, base: nn.Module) -> torch.Tensor:
        """A fresh dense ``(d_out, d_in)`` copy of ``W`` (float32 or the layer's own float dtype)."""
        raise NotImplementedError

    def requantize(self, base: nn.Module, weight: torch.Tensor) -> nn.Module:
        """Store ``weight`` (dense, ``(d_out, d_in)``) in ``base``'s own quantized format; returns the layer
        to use from now on (``base`` itself, or a new one where the format cannot be rewritten in place)."""
        raise NotImplementedError


class Bnb4bit(Quantization):
    name = "bitsandbytes 4-bit"

    def compute_dtype(self, base, x_dtype):
        return base.compute_dtype if base.compute_dtype is not None else x_dtype

    def base_dequantizes(self, base, x, grad):
        # bitsandbytes' own kernels without a dense W: on a CPU with AVX512-BF16, eval forwards without
        # gradients (a repacked weight); on a GPU, single-token GEMV at inference. Otherwise it
        # dequantizes and runs a dense GEMM (training, prefill).
        if grad:
            return True
        if x.device.type == "cpu":
            return base.training or not getattr(base, "support_avx512bf16_for_cpu", False)
        return x.numel() != x.shape[-1]

    def prepare(self, base, grad):
        # A weight bitsandbytes repacked for an eval forward has no backward in its own Linear4bit (the
        # packed kernel bypasses its autograd and adds the bias in place: a training forward after an
        # eval one fails, bitsandbytes 0.50): back to the usual layout before a forward with gradients.
        if grad:
            _unpack_for_cpu_inference(base)

    def dequantize(self, base):
        import bitsandbytes.functional as bnbf

        _unpack_for_cpu_inference(base)
        return bnbf.dequantize_4bit(base.weight.data, base.weight.quant_state)

    def requantize(self, base, weight):
        import bitsandbytes as bnb

        old = base.weight
        # PEFT's bnb merge (peft/tuners/lora/bnb.py): a new Params4bit with the old one's settings
        # (quant_type, blocksize, compress_statistics, quant_storage, module), quantized on the move.
        kwargs = {k: v for k, v in old.__dict__.items() if not k.startswith("_") and k != "data"}
        kwargs.update(requires_grad=False, bnb_quantized=False)
        kwargs.pop("quant_state", None)
        base.weight = bnb.nn.Params4bit(weight.to("cpu"), **kwargs).to(old.device)
        return base


class Bnb8bit(Quantization):
    name = "bitsandbytes 8-bit"
    # LLM.int8 on a GPU multiplies in int8; on a CPU bitsandbytes dequantizes (the default rule).

    def dequantize(self, base):
        weight, state = base.weight, base.state
        scb = state.SCB if state.SCB is not None else weight.SCB
        # Rows of int8 times their absmax / 127 (bitsandbytes' vector-wise quantization).
        return weight.data.float() * (scb.float().view(-1, 1) / 127.0)

    def requantize(self, base, weight):
        import bitsandbytes as bnb

        old = base.weight
        base.weight = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False,
                                        has_fp16_weights=old.has_fp16_weights).to(old.device)
        base.state.reset_grads()
        return base


class Torchao(Quantization):
    name = "torchao"

    def dequantize(self, base):
        return base.weight.dequantize()

    def requantize(self, base, weight):
        base.weight = nn.Parameter(_torchao_like(base.weight, weight.to(base.weight.dtype)), requires_grad=False)
        return base


class Hqq(Quantization):
    name = "hqq"

    def compute_dtype(self, base, x_dtype):
        return base.compute_dtype

    def dequantize(self, base):
        return base.dequantize()

    def requantize(self, base, weight):
        import copy

        from hqq.core.quantize import HQQLinear

        # PEFT's HQQ merge (peft.utils.quantization_utils.HqqBackend): a new layer quantized with the old
        # one's settings; HQQLinear cannot requantize itself in place (its packed weight is a Parameter).
        config = {**copy.deepcopy(base.quant_config), "offload_meta": base.offload_meta}
        layer = HQQLinear(None, config, compute_dtype=base.compute_dtype, device=base.device)
        config.pop("offload_meta")
        layer.quantize(weight.to(base.compute_dtype), **config)
        layer.bias = base.bias
        return layer


def _torchao_like(old: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` quantized as ``old`` is, from the configuration its tensor exposes; ``TypeError`` for a
    torchao tensor class whose configuration cannot be read back (PEFT needs the model's quantizer for
    the same reason)."""
    cls = type(old)
    if cls.__name__ == "Int8Tensor" and getattr(old, "act_quant_kwargs", None) is None:
        from torchao.quantization.granularity import PerRow, PerTensor

        granularity = PerTensor() if list(old.block_size) == list(old.shape) else PerRow()
        return cls.from_hp(weight, granularity)
    if cls.__name__ == "IntxUnpackedToInt8Tensor" and old.activation_quantization is None:
        return cls.from_hp(weight, tuple(old.block_size), old.target_dtype)
    raise TypeError(f"merging into a torchao {cls.__name__} weight is not supported: its quantization settings "
                    "cannot be read back from the tensor; keep the adapter unmerged (the delta path runs beside "
                    "the quantized layer), or merge into the full-precision model and quantize it afterwards")


def _unpack_for_cpu_inference(base: nn.Module) -> None:
    """bitsandbytes repacks a 4-bit weight for its AVX512-BF16 CPU kernel on the first eval forward
    without gradients; the repacked layout cannot be dequantized. Undo it (bitsandbytes does the same
    before a state_dict)."""
    state = base.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        base.weight.data, base.weight.quant_state = _convert_weight_packed_for_cpu_inverse(base.weight.data, state)


class ForwardOnly(Quantization):
    """A layer only its own forward can run (GPTQ, AWQ, AQLM, EETQ, INC: what PEFT >= 0.21 calls a
    ``ForwardOnlyQuantizationBackend``): the delta path only; no fold, no ``init="weight"``, no merge."""
    dequantizes = False
    merges = False

    def __init__(self, name: str) -> None:
        self.name = name

    def base_dequantizes(self, base, x, grad):
        return False

    def dequantize(self, base):
        raise TypeError(f"a {self.name} layer cannot be dequantized (its kernels only run its forward), so "
                        "init='weight' and merging are not available on it; use init='random'")


def _peft_forward_only(base: nn.Module) -> Optional[Quantization]:
    """A quantized layer PEFT (>= 0.21, already imported) knows but can only run forward."""
    utils = sys.modules.get("peft.utils.quantization_utils")
    if utils is None or isinstance(base, nn.Linear) or not hasattr(base, "in_features"):
        return None
    try:
        backend = utils.resolve_quantization_backend(base)
    except (ValueError, ImportError):
        return None
    if isinstance(backend, utils.ForwardOnlyQuantizationBackend):
        return ForwardOnly(backend.backend_name or type(base).__name__)
    return None


def _module_class(module_name: str, class_name: str) -> Optional[type]:
    return getattr(sys.modules.get(module_name), class_name, None)


def _is_torchao(weight: torch.Tensor) -> bool:
    base = _module_class("torchao.utils", "TorchAOBaseTensor")
    return base is not None and isinstance(weight, base)


_RECOGNISERS: tuple = (
    (lambda m: isinstance(m, _module_class("hqq.core.quantize", "HQQLinear") or ()), Hqq()),
    (lambda m: isinstance(m, _module_class("bitsandbytes.nn", "Linear4bit") or ()), Bnb4bit()),
    (lambda m: isinstance(m, _module_class("bitsandbytes.nn", "Linear8bitLt") or ()), Bnb8bit()),
    (lambda m: isinstance(m, nn.Linear) and _is_torchao(m.weight), Torchao()),
)


def recognise(base: nn.Module) -> Optional[Quantization]:
    """The :class:`Quantization` of ``base``, or ``None`` for a layer with a plain float weight."""
    for matches, quantization in _RECOGNISERS:
        if matches(base):
            return quantization
    return _peft_forward_only(base)


def check_weight(base: nn.Module, what: str) -> Optional[Quantization]:
    """:func:`recognise`, refusing (``TypeError``, when the adapter is built) a weight that is neither a
    plain floating-point tensor nor a supported quantized one: an unknown packed format would
    otherwise fail at the first forward, or silently fold ``dW`` into packed integers."""
    quantization = recognise(base)
    if quantization is not None:
        return quantization
    weight = getattr(base, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{what}: the base layer ({type(base).__name__}) has no weight tensor LFMA can read, and is not "
                        f"a quantized layer LFMA supports ({'; '.join(SUPPORTED)})")
    plain = type(weight) in (torch.Tensor, nn.Parameter)
    if not plain or not weight.dtype.is_floating_point:
        raise TypeError(f"{what}: the base layer's weight is a {type(weight).__name__} of dtype {weight.dtype}, not a "
                        f"plain floating-point tensor, and not a quantized format LFMA supports ({'; '.join(SUPPORTED)})")
    return None



def merge_warning(quantization: Quantization) -> None:
    warnings.warn(f"Merge into a {quantization.name} layer: W + dW is requantized, so the merged model's outputs "
                  "differ from the adapter's by the quantization's rounding.", UserWarning, stacklevel=3)

