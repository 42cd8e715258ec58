"""The ``cpp`` backend: the compiled C++ CPU kernels of csrc/ (kernels: :mod:`..cpp_ops`).

Three algorithms, each cheapest somewhere (docs/math.md): the separable product (an MKL GEMM, or fused
loops for a tiny K), the hybrid (rows direct from the K frequencies, then row real FFTs) and one 2-D
real FFT. The hybrid's direct work is per distinct *term*: a frequency past ``d_in / 2`` enters as the
conjugate of its mirror, so the two members of a conjugate pair (top-K on a real matrix picks both)
share one term, and only the columns the terms touch are transposed. Those counts come from the
positions, on the host, when they are set or loaded (:func:`..decision.count_positions`); without them
the model assumes K distinct random frequencies. The constants are the CPU cost table's
(:class:`..cost_tables.CompiledCpuCosts`).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

from .. import costs
from .base import Backend

__all__ = ["BACKEND"]


class CppBackend(Backend):
    name = "cpp"
    kernels_module = "lfma_kernels.ops.cpp_ops"
    algorithms = ("separable", "hybrid", "fft")
    uses_positions = True
    descriptions = {
        "separable": ("rank-2K product (MKL GEMM; fused loops for K <= 2)",
                      "G times the phase tables (GEMM; fused loops for K <= 4)"),
        "hybrid": ("rows direct from the K frequencies, then row real FFTs",
                   "row real FFTs of G, then one sum per term"),
        "fft": ("scatter into a half spectrum, one 2-D real FFT", "one 2-D real FFT of G, a gather"),
    }

    def unavailable_reason(self) -> Optional[str]:
        from .. import extension  # prebuilt by setup.py, or compiled on first use and cached (ops/extension.py)
        return extension.unavailable_reason("cpp")

    def devices(self) -> Optional[Tuple[str, ...]]:
        return ("cpu",)

    def algorithm_costs(self, table, k, shape, positions, *, gradient):
        c = table.cpp
        if c is None:  # a device kind without the C++ kernels' constants: torch's estimates
            return costs.torch_dw_costs(table, k, shape, gradient=gradient)
        i = 0 if gradient else 1
        m, n = shape
        mn = m * n
        half = n // 2 + 1
        terms = k if positions is None else min(positions.terms, k)
        # Distinct columns: as counted, or what that many random frequencies touch on average.
        columns = half * (1.0 - math.exp(-terms / half)) if positions is None else positions.columns

        def growth(exponent: float) -> float:  # FFTs slow down once the transform leaves the caches
            return max(1.0, mn / c.cache_entries) ** exponent

        separable = (c.loop_call_s if k <= c.loop_max_k[i] else c.gemm_call_s) + c.mac_s[i] * 2.0 * k * mn
        hybrid = (c.hybrid_call_s + (c.term_row_s[i] * terms + c.column_row_s[i] * columns) * m
                  + c.row_fft_s[i] * growth(c.row_fft_growth[i]) * mn * costs.log2(n))
        fft = c.fft2_call_s + c.fft2_s[i] * growth(c.fft2_growth[i]) * mn * costs.log2(mn)
        return {"separable": separable, "hybrid": hybrid, "fft": fft}


BACKEND = CppBackend()
