"""Shared test helpers: the float64 oracle comparison of DESIGN section 5 and random frequencies."""
from __future__ import annotations

import pytest
import torch

import lfma_kernels as lfma

# Backends that implement the fast paths (the reference is the oracle they are compared with).
FAST_BACKENDS = [b for b in lfma.available_backends() if b != "reference"]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64."""
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm()).item()


def random_frequencies(shape, k, *, generator=None, dtype=torch.float32, device="cpu"):
    """K random positions (repeats allowed, as the contract allows) and coefficients."""
    rows = torch.randint(0, shape[0], (k,), generator=generator).to(device)
    cols = torch.randint(0, shape[1], (k,), generator=generator).to(device)
    coeffs = torch.randn(k, 2, generator=generator, dtype=torch.float64).to(device, dtype)
    return coeffs, rows, cols


@pytest.fixture
def gen():
    """A fresh, seeded generator per test: inputs are random, and reproducible on failure."""
    return torch.Generator().manual_seed(1234)
