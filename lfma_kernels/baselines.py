"""Peer adapters for comparisons, built on the same kernels: FourierFT and a minimal LoRA.

``FourierFTLinear`` is FourierFT (Gao et al., 2024): ``n`` random spectral positions shared by
every layer of one shape, *real* trained coefficients, ``dW = alpha * Re(ifft2(F))``. It differs
from LFMA only in the selection (random, not top-K of an init matrix) and in training the real
parts alone, so it runs through the same fused ``lfma_linear`` kernels with the imaginary parts
pinned to zero.

``LoRALinear`` is the minimal LoRA the demo falls back on when ``peft`` is not installed.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import adapter
from ._checks import check_k
from .targets import check_backend_name
from .ops import dispatch
from .ops.decision import count_positions

__all__ = ["FourierFTLinear", "LoRALinear"]


class FourierFTLinear(nn.Module):
    """A frozen ``nn.Linear`` plus FourierFT: ``spectrum`` (``[n]`` real) at ``n`` random positions.

    Positions come from ``seed`` alone (PEFT's ``random_loc_seed``), so layers of one shape share
    them. ``spectrum`` starts at zero, so the adapted layer starts equal to the frozen one. The
    positions are in range by construction, so the forward skips the public entry point's index
    check (a host sync on GPU every step) and calls the backend directly, as ``LFMALinear`` does.
    """

    def __init__(self, base: nn.Linear, n: int, *, alpha: float = 150.0, seed: int = 777,
                 backend: str = "auto") -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"FourierFTLinear wraps an nn.Linear, got {type(base).__name__}")
        d_out, d_in = base.out_features, base.in_features
        check_k(n, (d_out, d_in))
        check_backend_name(backend)
        dispatch.prepare(backend)
        flat = torch.randperm(d_out * d_in, generator=torch.Generator().manual_seed(seed))[:n]
        base.requires_grad_(False)
        self.base = base
        device = base.weight.device
        self.register_buffer("rows", (flat // d_in).to(device))
        self.register_buffer("cols", (flat % d_in).to(device))
        self._positions = count_positions(self.rows, self.cols, (d_out, d_in))
        self.spectrum = nn.Parameter(torch.zeros(n, device=device))
        self.alpha = float(alpha)
        self.backend = backend

    def _adapters(self) -> tuple:
        coeffs = torch.stack([self.spectrum, torch.zeros_like(self.spectrum)], dim=1)
        return (adapter.Adapter(coeffs, self.rows, self.cols, self.alpha, self._positions),)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # No eval cache: the peer is timed and trained as PEFT's FourierFT, which has none.
        return adapter.linear(x, self.base, self._adapters(), self.backend, None, training=True)

    def plan(self, x: Optional[torch.Tensor] = None):
        """What a forward with input ``x`` runs and why (see :func:`lfma_kernels.explain`); without
        ``x``, for the weight's device and dtype."""
        return adapter.plan(x, self.base, self._adapters(), self.backend, training=True, merged=False, cache=None)

    def extra_repr(self) -> str:
        return f"n={self.spectrum.shape[0]}, alpha={self.alpha}, backend={self.backend!r}"


class LoRALinear(nn.Module):
    """``base(x) + (alpha / r) * x A^T B^T`` with ``A`` Kaiming-uniform and ``B`` zero (PEFT's init)."""

    def __init__(self, base: nn.Linear, r: int, *, alpha: float = 1.0) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        base.requires_grad_(False)
        self.base = base
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling
