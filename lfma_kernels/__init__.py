"""lfma_kernels: fast LFMA (Layerwise Fourier Masked Adapter) layers for PyTorch.

``dW = alpha * Re(ifft2(F))`` with ``F`` nonzero at K selected frequencies, evaluated without a
dense spectrum or FFT where that is cheaper, folded into the frozen weight, and cached in eval.
"""
from . import distributed, reference
from .calibrator import calibrate
from .functional import available_backends, delta_weight, explain, lfma_linear
from .layers import LFMALinear
from .model import (
    LFMAConfig,
    ParameterCount,
    apply_lfma,
    lfma_state_dict,
    load_lfma,
    merge_lfma,
    save_lfma,
    trainable_parameters,
    unload_lfma,
    unmerge_lfma,
)
from .selection import Frequencies, num_frequencies, select_frequencies

__version__ = "0.1.0"

__all__ = [
    "Frequencies", "LFMAConfig", "calibrate", "LFMALinear", "ParameterCount", "apply_lfma", "available_backends",
    "delta_weight", "explain", "lfma_linear", "lfma_state_dict", "load_lfma", "merge_lfma", "num_frequencies",
    "distributed", "reference", "save_lfma", "select_frequencies", "trainable_parameters", "unload_lfma", "unmerge_lfma",
]
