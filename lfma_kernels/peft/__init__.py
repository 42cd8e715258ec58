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

Files: ``config.py`` (``LfmaConfig``, the PEFT version floor, ``PeftType.LFMA``), ``layer.py`` (the tuner
layer), ``model.py`` (the tuner), ``mixed_batch.py`` (``adapter_names=``), ``lora_export.py``
(``convert_to_lora``, ``save_as_lora``).
"""
from __future__ import annotations

from .config import DEFAULT_K, SUPPORTED_PEFT, LfmaConfig
from .layer import LfmaLayer, LfmaLinear
from .model import LfmaModel
from .lora_export import LayerRank, convert_to_lora, lora_ranks, save_as_lora
from peft.utils import PeftType, register_peft_method  # after .config, which checks PEFT's version first

__all__ = ["LfmaConfig", "LfmaModel", "LfmaLayer", "LfmaLinear", "SUPPORTED_PEFT", "DEFAULT_K", "convert_to_lora",
           "save_as_lora", "lora_ranks", "LayerRank"]


def _register() -> None:
    """Register once per process. A second import of this module (``importlib.reload``) points
    PEFT at the new classes; a method "lfma" from another package is refused."""
    from peft.mapping import (PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING,
                              PEFT_TYPE_TO_TUNER_MAPPING)

    registered = PEFT_TYPE_TO_TUNER_MAPPING.get(PeftType.LFMA)
    if registered is None:
        register_peft_method(name="lfma", config_cls=LfmaConfig, model_cls=LfmaModel, prefix="lfma_")
    elif registered.__module__.startswith(__name__ + "."):
        PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.LFMA] = LfmaConfig
        PEFT_TYPE_TO_TUNER_MAPPING[PeftType.LFMA] = LfmaModel
        PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.LFMA] = "lfma_"
    else:
        raise ImportError(f"PEFT already has a method 'lfma' from {registered.__module__}; "
                          "lfma_kernels.peft cannot register its own")


_register()
