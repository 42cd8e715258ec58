"""The ``triton`` backend: fused Triton kernels (kernels: :mod:`..triton_ops`), on a CUDA GPU or on CPU
tensors under ``TRITON_INTERPRET=1`` (which must be set before triton is imported)."""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Optional, Tuple

import torch

from .. import costs
from .base import Backend

__all__ = ["BACKEND", "INTERPRETED"]

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


class TritonBackend(Backend):
    name = "triton"
    kernels_module = "lfma_kernels.ops.triton_ops"
    algorithms = ("separable", "fft")     # fft: the torch backend's scatter + irfft2 (cuFFT)
    descriptions = {
        "separable": ("fused Triton kernel (phase tiles, tl.dot)", "fused partial DFT of G (tl.dot)"),
        "fft": ("the torch backend's scatter + irfft2 (cuFFT)", "the torch backend's rfft2 of G + gather"),
    }

    def unavailable_reason(self) -> Optional[str]:
        if importlib.util.find_spec("triton") is None:
            return ("triton is not installed: `pip install triton` (Linux; it comes with CUDA builds of torch), "
                    "then run on a CUDA GPU or set TRITON_INTERPRET=1")
        if not (torch.cuda.is_available() or INTERPRETED):
            return ("no CUDA GPU is available (torch.cuda.is_available() is False); run on a CUDA GPU, or set "
                    "TRITON_INTERPRET=1 before importing lfma_kernels to run the Triton kernels on CPU through "
                    "Triton's (slow) interpreter")
        try:
            importlib.import_module("triton.language")
        except Exception as exc:  # a broken install: say what failed
            return f"triton failed to import ({type(exc).__name__}: {exc}); reinstall triton"
        return None

    def devices(self) -> Optional[Tuple[str, ...]]:
        # Under the interpreter the kernels take CPU tensors (the interpreter runs them anywhere).
        return None if INTERPRETED else ("cuda",)

    def algorithm_costs(self, table, k, shape, positions, *, gradient):
        if table.triton_mac_s is None:  # no table of its own on this device (the interpreter): torch's
            return costs.torch_dw_costs(table, k, shape, gradient=gradient)
        n = shape[0] * shape[1]
        fixed = table.triton_fft_grad_fixed_s if gradient else table.triton_fft_fixed_s
        return {"fft": fixed + table.triton_fft_s * n * costs.log2(n), "separable": 2.0 * k * n * table.triton_mac_s}


BACKEND = TritonBackend()
