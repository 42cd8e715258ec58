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
import os
from types import ModuleType
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["BACKENDS", "available_backends", "unavailable_reason", "resolve", "auto_backend", "prepare"]

BACKENDS: Tuple[str, ...] = ("reference", "torch", "triton", "cpp", "cuda")


def _always() -> Optional[str]:
    return None


def _not_built(what: str) -> Callable[[], Optional[str]]:
    def reason() -> Optional[str]:
        return f"{what} is not part of this version of lfma_kernels; use backend='torch'"
    return reason


_MODULES: Dict[str, str] = {
    "reference": "lfma_kernels.reference",
    "torch": "lfma_kernels.ops.torch_ops",
}
_PROBES: Dict[str, Callable[[], Optional[str]]] = {
    "reference": _always,
    "torch": _always,
    "triton": _not_built("the Triton backend"),
    "cpp": _not_built("the C++ extension"),
    "cuda": _not_built("the CUDA extension"),
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


def prepare(backend: str) -> None:
    """Probe (and import) what ``backend`` may resolve to, ahead of the first call."""
    for name in (BACKENDS if backend == "auto" else (backend,)):
        if unavailable_reason(name) is None:
            _module(name)


def _runs_on(name: str, device: torch.device) -> bool:
    devices = _DEVICES[name]
    if name == "triton" and _TRITON_INTERPRET:
        return True
    return devices is None or device.type in devices


def auto_backend(device: torch.device, dtype: torch.dtype, k: int, shape: Sequence[int]) -> str:
    """The fastest available backend for this device (see benchmarks/RESULTS.md)."""
    preferred = ("triton", "cuda", "torch") if device.type == "cuda" else ("cpp", "torch")
    for name in preferred:
        if unavailable_reason(name) is None and _runs_on(name, device):
            return name
    return "torch"


def resolve(backend: str, device: torch.device, dtype: torch.dtype, k: int, shape: Sequence[int]) -> ModuleType:
    """The backend module for a call; ``RuntimeError`` naming the reason if it cannot run here."""
    name = auto_backend(device, dtype, k, shape) if backend == "auto" else backend
    reason = unavailable_reason(name)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} is not available: {reason}")
    if not _runs_on(name, device):
        raise RuntimeError(
            f"backend {name!r} does not run on {device.type} tensors (it runs on {', '.join(_DEVICES[name])}); "
            f"move the tensors or use backend='auto'")
    return _module(name)
