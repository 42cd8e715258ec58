"""Backend registry: which implementations exist here, why the others do not, and what ``auto`` picks.

A backend is a module exposing the three functions of :class:`.library.BackendOps`:
``delta_weight(coeffs, rows, cols, shape, alpha)`` (``dW`` in float32, or float64 for float64
coefficients, differentiable w.r.t. ``coeffs``), ``folded_weight(weight, coeffs, rows, cols,
alpha)`` and ``lfma_linear(x, weight, bias, coeffs, rows, cols, alpha)``. Availability is probed
lazily and once; modules that need an optional dependency are imported only when asked for.
Probe results and modules are kept in plain dicts, so once a backend has been used (or
:func:`prepare`d) ``resolve`` is a few dict lookups that ``torch.compile`` traces without a break.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["BACKENDS", "available_backends", "unavailable_reason", "resolve", "auto_backend", "prepare"]

BACKENDS: Tuple[str, ...] = ("reference", "torch", "triton", "cpp", "cuda")


def _always() -> Optional[str]:
    return None


def _extension_probe(part: str) -> Callable[[], Optional[str]]:
    """The compiled extension (csrc/) loads: prebuilt by setup.py, or compiled on first use and
    cached; for ``cuda`` also a CUDA torch, a GPU and the CUDA part (see ops/extension.py)."""
    def reason() -> Optional[str]:
        from . import extension
        return extension.unavailable_reason(part)
    return reason


def _triton_probe() -> Optional[str]:
    """Triton importable, and a CUDA GPU or the interpreter (``TRITON_INTERPRET=1``) to run it on."""
    if importlib.util.find_spec("triton") is None:
        return ("triton is not installed: `pip install triton` (Linux; it comes with CUDA builds of torch), "
                "then run on a CUDA GPU or set TRITON_INTERPRET=1")
    if not (torch.cuda.is_available() or _TRITON_INTERPRET):
        return ("no CUDA GPU is available (torch.cuda.is_available() is False); run on a CUDA GPU, or set "
                "TRITON_INTERPRET=1 before importing lfma_kernels to run the Triton kernels on CPU through "
                "Triton's (slow) interpreter")
    try:
        importlib.import_module("triton.language")
    except Exception as exc:  # a broken install: say what failed
        return f"triton failed to import ({type(exc).__name__}: {exc}); reinstall triton"
    return None


_MODULES: Dict[str, str] = {
    "reference": "lfma_kernels.reference",
    "torch": "lfma_kernels.ops.torch_ops",
    "triton": "lfma_kernels.ops.triton_ops",
    "cpp": "lfma_kernels.ops.cpp_ops",
    "cuda": "lfma_kernels.ops.cuda_ops",
}
_PROBES: Dict[str, Callable[[], Optional[str]]] = {
    "reference": _always,
    "torch": _always,
    "triton": _triton_probe,
    "cpp": _extension_probe("cpu"),
    "cuda": _extension_probe("cuda"),
}
# Devices each backend can run on; None means any device torch supports.
_DEVICES: Dict[str, Optional[Tuple[str, ...]]] = {
    "reference": None, "torch": None, "triton": ("cuda",), "cpp": ("cpu",), "cuda": ("cuda",),
}


# The Triton interpreter runs kernels on CPU tensors; it must be chosen before triton is imported.
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_reasons: Dict[str, Optional[str]] = {}
_modules: Dict[str, ModuleType] = {}


def unavailable_reason(name: str) -> Optional[str]:
    """``None`` when backend ``name`` can be used here, otherwise why not and how to get it."""
    if name not in _reasons:
        if name not in BACKENDS:
            return f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)} or 'auto'"
        _reasons[name] = _PROBES[name]()
    return _reasons[name]


def available_backends() -> List[str]:
    """The backends usable in this process, in the order of ``BACKENDS``."""
    return [name for name in BACKENDS if unavailable_reason(name) is None]


def _module(name: str) -> ModuleType:
    if name not in _modules:
        _modules[name] = importlib.import_module(_MODULES[name])
    return _modules[name]


def _require(name: str) -> None:
    reason = unavailable_reason(name)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} is not available: {reason}")


def prepare(backend: str) -> None:
    """Probe (and import) what ``backend`` may resolve to, ahead of the first call.

    An explicit backend that cannot run in this process raises ``RuntimeError`` now, saying why:
    availability (an import, a compiled extension, a GPU) does not change within a process.
    Whether it runs on the tensors' device is checked per call, since tensors move."""
    if backend != "auto":
        _require(backend)
    for name in (BACKENDS if backend == "auto" else (backend,)):
        if unavailable_reason(name) is None:
            _module(name)


def _runs_on(name: str, device: torch.device) -> bool:
    devices = _DEVICES[name]
    if name == "triton" and _TRITON_INTERPRET:
        return True
    return devices is None or device.type in devices


# CPU: the cpp kernels (dW, W + dW, dL/dcoeffs) were as fast as or faster than the torch backend's
# at every shape and K measured with benchmarks/bench_cpp.py --crossover (2-core AMD EPYC, torch 2.13,
# float32, 2026-11-26; 64x64 to 4096x4096 and 768x3072 / 3072x768, K = 1 to 29491): torch/cpp from
# 1.0 (4096x4096 with K <= 64, where both run the same MKL GEMM) through 1.5-3 at the paper's shapes
# to 3-10 on small layers (the torch backend's per-call Python overhead). No crossover, so cpp
# whenever it loads; `benchmarks/bench_cpp.py` checks the layer training step with auto against
# each backend alone.
# CUDA: triton, then cuda, then torch. The cuda kernels only evaluate the separable product
# (2K*M*N work, no FFT path), so auto takes them only where the torch backend would run that
# product as well (torch_ops.use_separable), not where it switches to scatter + irfft2 on cuFFT;
# that crossover was measured on CPU, the GPU one is not yet.
def _cuda_kernels_fit(k: int, shape: Sequence[int]) -> bool:
    from . import torch_ops
    return torch_ops.use_separable(k, shape)


def auto_backend(device: torch.device, dtype: torch.dtype, k: int, shape: Sequence[int]) -> str:
    """The fastest available backend for this device (see benchmarks/RESULTS.md)."""
    preferred = ("triton", "cuda", "torch") if device.type == "cuda" else ("cpp", "torch")
    for name in preferred:
        if name == "cuda" and not _cuda_kernels_fit(k, shape):
            continue
        if unavailable_reason(name) is None and _runs_on(name, device):
            return name
    return "torch"


def resolve(backend: str, device: torch.device, dtype: torch.dtype, k: int, shape: Sequence[int]) -> ModuleType:
    """The backend module for a call; ``RuntimeError`` naming the reason if it cannot run here."""
    name = auto_backend(device, dtype, k, shape) if backend == "auto" else backend
    _require(name)
    if not _runs_on(name, device):
        raise RuntimeError(
            f"backend {name!r} does not run on {device.type} tensors (it runs on {', '.join(_DEVICES[name])}); "
            f"move the tensors or use backend='auto'")
    return _module(name)
