"""The ``reference`` backend: the paper's formulation (dense spectrum, ``torch.fft.ifft2``, a second GEMM),
the oracle. It has no kernels and no choices: the layers call :mod:`lfma_kernels.reference` directly."""
from __future__ import annotations

from .base import Backend

__all__ = ["BACKEND"]


class Reference(Backend):
    name = "reference"
    algorithms = ("ifft2",)
    descriptions = {"ifft2": ("the paper's dense complex spectrum and torch.fft.ifft2 (the oracle)",
                              "autograd through ifft2")}

    def algorithm_costs(self, table, k, shape, positions, *, gradient):
        return {"ifft2": 0.0}

    def auto_refusal(self, table, k, shape):
        return "auto never picks the oracle (the paper's dense formulation)"


BACKEND = Reference()
