"""The ``cuda`` backend: the CUDA kernels of csrc/lfma_cuda.cu (kernels: :mod:`..cuda_ops`)."""
from __future__ import annotations

from typing import Optional, Tuple

from .. import costs
from .base import Backend

__all__ = ["BACKEND"]


class CudaBackend(Backend):
    name = "cuda"
    kernels_module = "lfma_kernels.ops.cuda_ops"
    algorithms = ("separable",)
    descriptions = {"separable": ("tiled CUDA kernel (cos/sin tables in shared memory)",
                                  "CUDA reduction of G against the phases")}

    def unavailable_reason(self) -> Optional[str]:
        from .. import extension  # a CUDA torch, a GPU and the CUDA part of the extension (ops/extension.py)
        return extension.unavailable_reason("cuda")

    def devices(self) -> Optional[Tuple[str, ...]]:
        return ("cuda",)

    def algorithm_costs(self, table, k, shape, positions, *, gradient):
        return {"separable": 2.0 * k * shape[0] * shape[1] * table.gemm_mac_s}

    def auto_refusal(self, table, k, shape):
        # Its kernels evaluate only the separable product: worth it where the torch backend would run that
        # product too, not where it switches to an FFT.
        torch_costs = costs.torch_dw_costs(table, k, shape, gradient=False)
        if costs.cheapest(torch_costs) == "separable":
            return None
        listing = ", ".join(f"{name} {s * 1e3:.3g} ms" for name, s in torch_costs.items())
        return ("its kernels only evaluate the separable product, and the torch backend would switch to an FFT "
                f"here ({listing})")


BACKEND = CudaBackend()
