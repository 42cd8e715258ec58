"""The ``torch`` backend: pure PyTorch on any device (kernels: :mod:`..torch_ops`)."""
from __future__ import annotations

from .. import costs
from .base import Backend

__all__ = ["BACKEND"]


class TorchBackend(Backend):
    name = "torch"
    kernels_module = "lfma_kernels.ops.torch_ops"
    algorithms = ("separable", "fft")
    descriptions = {
        "separable": ("rank-2K GEMM of exact-phase cos/sin tables", "G times the phase tables (a GEMM)"),
        "fft": ("scatter into a half spectrum, one irfft2", "one rfft2 of G, a gather"),
    }

    def algorithm_costs(self, table, k, shape, positions, *, gradient):
        return costs.torch_dw_costs(table, k, shape, gradient=gradient)


BACKEND = TorchBackend()
