"""Shared test helpers: the float64 oracle comparison (relative error in float64) and random frequencies."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

# Without a GPU, the Triton backend runs its kernels on CPU tensors through Triton's interpreter,
# which must be chosen before triton (imported by lfma_kernels' triton backend) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The planner's shipped tables, whatever a developer's lfma-calibrate wrote for this machine
# (tests/test_calibration.py turns calibration on where it tests it).
os.environ["LFMA_CALIBRATION"] = "off"

import lfma_kernels as lfma  # noqa: E402
from lfma_kernels.ops import dispatch, library  # noqa: E402


def _runs_on_cpu(backend: str) -> bool:
    return dispatch.why_not(backend, "cpu") is None


# Backends that implement the fast paths (the reference is the oracle they are compared with) and
# run on the CPU tensors the generic tests build. On a GPU machine the CUDA-only backends (triton
# without the interpreter) are tested on CUDA tensors in their own files (test_triton.py).
FAST_BACKENDS = [b for b in lfma.available_backends() if b != "reference" and _runs_on_cpu(b)]
# The Triton backend is running through the (slow, CPU) interpreter: small shapes only.
TRITON_INTERPRETED = "triton" in FAST_BACKENDS and os.environ.get("TRITON_INTERPRET") == "1"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64."""
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm()).item()


def linear_against_oracle(backend, x, weight, bias, coeffs, rows, cols, grad, alpha=12.0):
    """``(name, got, want)`` for the output, ``dL/dx`` and ``dL/dcoeffs`` of ``lfma.lfma_linear`` with
    ``backend`` in float32 against the float64 reference, both backpropagating ``grad``."""
    def run(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in (x, coeffs)]
        out = fn(leaves[0], weight.to(dtype), bias.to(dtype), leaves[1])
        out.backward(grad.to(dtype))
        return out, leaves[0].grad, leaves[1].grad

    want = run(lambda x, w, b, c: lfma.reference.lfma_linear(x, w, b, c, rows, cols, alpha), torch.float64)
    got = run(lambda x, w, b, c: lfma.lfma_linear(x, w, b, c, rows, cols, alpha, backend=backend), torch.float32)
    return list(zip(("output", "grad x", "grad coeffs"), got, want))


def compiled_matches_eager(model, x, *, out_tol, grad_tol, loss=lambda out: out.pow(2).sum(), **compile_kwargs):
    """``torch.compile(model, fullgraph=True, **compile_kwargs)`` against eager: the training output
    and every LFMA layer's coefficient gradient, then the eval output (the cached ``W + dW``)."""
    layers = [m for m in model.modules() if isinstance(m, lfma.LFMALinear)]
    compiled = torch.compile(model, fullgraph=True, **compile_kwargs)
    expected = model(x)
    loss(expected).backward()
    grads = [m.coeffs.grad.clone() for m in layers]
    model.zero_grad()
    out = compiled(x)
    loss(out).backward()
    assert rel_err(out, expected) <= out_tol
    for layer, grad in zip(layers, grads):
        assert rel_err(layer.coeffs.grad, grad) <= grad_tol
    model.eval()
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) <= out_tol


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


def make_layer(d_in=80, d_out=48, **kwargs):
    """A seeded ``LFMALinear`` on a fresh non-square ``nn.Linear`` (K = 17 unless given)."""
    torch.manual_seed(0)
    kwargs.setdefault("k", 17)
    return lfma.LFMALinear(nn.Linear(d_in, d_out), **kwargs)


def swap_in_checkpoints(module, prefix, forward, out_features, in_features, swaps=40):
    """Checkpoint swaps with ``load_state_dict(assign=True)``: to A, a forward, to B, to C, a forward
    that must see C; ``forward()``'s results, in order. The checkpoints die with each swap, so C is
    often allocated at A's freed address with version 0 again: a cache keyed on addresses and
    versions alone served ``W_A + dW`` there."""
    gen = torch.Generator().manual_seed(2)
    outputs = []
    for _ in range(swaps):
        for run in (True, False, True):
            checkpoint = {prefix + "weight": torch.randn(out_features, in_features, generator=gen),
                          prefix + "bias": torch.randn(out_features, generator=gen)}
            module.load_state_dict(checkpoint, assign=True, strict=False)
            del checkpoint
            if run:
                with torch.no_grad():
                    outputs.append(forward())
    return outputs


@pytest.fixture
def count_folds(monkeypatch):
    """Counts how often the backend ``auto`` picks for ``make_layer()`` rebuilds W + dW (a cache miss)."""
    calls = []
    original = library.folded_weight

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(library, "folded_weight", counting)
    return calls


class AttentionBlock(nn.Module):
    """An ``nn.MultiheadAttention`` (whose ``out_proj`` is read, never called) beside a plain layer."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, 16)
