"""Backend registry: which implementations exist here, why the others do not, and the one a call runs.

Each backend is a :class:`Backend` record: its name, where its code lives, an availability probe
that says why it cannot run here and how to fix that, the devices it runs on, and, once loaded, its
kernels (:class:`.library.Kernels`) and registered ops (:class:`.library.BackendOps`:
``delta_weight``, ``folded_weight``, ``lfma_linear``). Probes run lazily and once; a module that
needs an optional dependency is imported only when asked for. What ``auto`` picks is the planner's
decision (:func:`.planner.choose_backend`), given this registry's facts. Probe results and loaded
records are kept in plain dicts, so once a backend has been used (or :func:`prepare`d)
:func:`resolve` is a few dict lookups that ``torch.compile`` traces without a break.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import planner
from .library import BackendOps, Kernels, fold_with
from .quantized_ops import QuantizedOps, register_quantized

__all__ = ["Backend", "BACKENDS", "REGISTRY", "available_backends", "unavailable_reason", "why_not", "backend",
           "resolve", "auto_backend", "prepare", "explain"]

BACKENDS: Tuple[str, ...] = ("reference", "torch", "triton", "cpp", "cuda")

# The Triton interpreter runs kernels on CPU tensors; it must be chosen before triton is imported.
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass
class Backend:
    """One implementation of the LFMA ops. ``kernels`` and the registered ops (``delta_weight``,
    ``folded_weight``, ``lfma_linear``: :class:`.library.BackendOps`) are set when it is loaded
    (:func:`backend`); the reference has no kernels (it is the paper's formulation, the oracle)."""
    name: str
    module: str                                  # where its code lives
    probe: Callable[[], Optional[str]]           # None when it can run in this process, else why not + how to fix
    devices: Callable[[], Optional[Tuple[str, ...]]]  # device types it runs on (None: any device torch supports)
    summary: str
    kernels: Optional[Kernels] = None
    delta_weight: Optional[Callable[..., torch.Tensor]] = None   # (coeffs, rows, cols, shape, alpha), differentiable
    folded_weight: Optional[Callable[..., torch.Tensor]] = None  # (weight, coeffs, rows, cols, alpha), no autograd
    lfma_linear: Optional[Callable[..., torch.Tensor]] = None    # (x, weight, bias, coeffs, rows, cols, alpha)
    # Beside a quantized base (.quantized_ops): x dW^T by a delta path, and the dequantized fold
    delta_linear: Optional[Callable[..., torch.Tensor]] = None        # (x, coeffs, rows, cols, alpha, shape, path)
    dequantized_linear: Optional[Callable[..., torch.Tensor]] = None  # (x, coeffs, rows, cols, alpha, dequantize, bias)

    def runs_on(self, device: torch.device) -> bool:
        devices = self.devices()
        return devices is None or device.type in devices


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


def _on(*devices: str) -> Callable[[], Optional[Tuple[str, ...]]]:
    return lambda: devices


def _triton_devices() -> Optional[Tuple[str, ...]]:
    # Under the interpreter the kernels take CPU tensors (the interpreter runs them anywhere).
    return None if _TRITON_INTERPRET else ("cuda",)


REGISTRY: Dict[str, Backend] = {b.name: b for b in (
    Backend("reference", "lfma_kernels.reference", _always, lambda: None,
            "the paper's formulation (dense spectrum, torch.fft.ifft2, second GEMM): the oracle"),
    Backend("torch", "lfma_kernels.ops.torch_ops", _always, lambda: None,
            "pure PyTorch: separable product or irfft2, folded into W, batch coefficient gradients"),
    Backend("triton", "lfma_kernels.ops.triton_ops", _triton_probe, _triton_devices,
            "fused Triton kernels (GPU, or CPU under TRITON_INTERPRET=1)"),
    Backend("cpp", "lfma_kernels.ops.cpp_ops", _extension_probe("cpp"), _on("cpu"),
            "compiled C++ CPU kernels (csrc/)"),
    Backend("cuda", "lfma_kernels.ops.cuda_ops", _extension_probe("cuda"), _on("cuda"),
            "compiled CUDA kernels (csrc/lfma_cuda.cu)"),
)}
_reasons: Dict[str, Optional[str]] = {}
_loaded: Dict[str, Backend] = {}


def unavailable_reason(name: str) -> Optional[str]:
    """``None`` when backend ``name`` can be used here, otherwise why not and how to get it."""
    if name not in _reasons:
        if name not in REGISTRY:
            return f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)} or 'auto'"
        _reasons[name] = REGISTRY[name].probe()
    return _reasons[name]


def available_backends() -> List[str]:
    """The backends usable in this process, in the order of ``BACKENDS``."""
    return [name for name in BACKENDS if unavailable_reason(name) is None]


def why_not(name: str, device: torch.device) -> Optional[str]:
    """``None`` when backend ``name`` can run a call on ``device`` tensors here, otherwise why not."""
    reason = unavailable_reason(name)
    if reason is not None:
        return f"not available: {reason}"
    record = REGISTRY[name]
    if not record.runs_on(device):
        return f"does not run on {device.type} tensors (it runs on {', '.join(record.devices())})"
    return None


def _load(name: str) -> Backend:
    record = REGISTRY[name]
    module = importlib.import_module(record.module)
    if name == "reference":  # the oracle is plain functions: no kernels, and a fold built on its dW
        ops = BackendOps(module.delta_weight, fold_with(module.delta_weight), module.lfma_linear)
        quantized = QuantizedOps(module.delta_linear, module.dequantized_linear)
    else:
        record.kernels, ops = module.KERNELS, module.OPS
        quantized = register_quantized(name, module.KERNELS)
    record.delta_weight, record.folded_weight, record.lfma_linear = ops
    record.delta_linear, record.dequantized_linear = quantized
    return record


def _require(name: str) -> None:
    reason = unavailable_reason(name)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} is not available: {reason}")


def backend(name: str) -> Backend:
    """The loaded record of backend ``name``; ``RuntimeError`` saying why if it cannot run here."""
    if name not in _loaded:
        _require(name)
        _loaded[name] = _load(name)
    return _loaded[name]


def prepare(name: str) -> None:
    """Probe (and load) what ``name`` may resolve to, ahead of the first call.

    An explicit backend that cannot run in this process raises ``RuntimeError`` now, saying why:
    availability (an import, a compiled extension, a GPU) does not change within a process.
    Whether it runs on the tensors' device is checked per call, since tensors move."""
    if name != "auto":
        _require(name)
    for candidate in (BACKENDS if name == "auto" else (name,)):
        if unavailable_reason(candidate) is None:
            backend(candidate)


def auto_backend(device: torch.device, dtype: torch.dtype, k: int, shape: Sequence[int]) -> str:
    """The name ``backend="auto"`` resolves to for this call (:func:`.planner.choose_backend`)."""
    return planner.choose_backend(device, dtype, k, shape, why_not)


def resolve(name: str, device: torch.device, dtype: torch.dtype, k: int, shape: Sequence[int]) -> Backend:
    """The backend record for a call; ``RuntimeError`` naming the reason if it cannot run here."""
    if name == "auto":
        name = planner.choose_backend(device, dtype, k, shape, why_not)
    _require(name)
    record = _loaded.get(name) or backend(name)
    if not record.runs_on(device):
        raise RuntimeError(
            f"backend {name!r} does not run on {device.type} tensors (it runs on {', '.join(record.devices())}); "
            f"move the tensors or use backend='auto'")
    return record


def explain(shape: Sequence[int], k: int, *, device="cpu", dtype: torch.dtype = torch.float32,
            tokens: Optional[int] = None, backend_name: str = "auto", weight_grad: bool = False,
            rows: Optional[torch.Tensor] = None, cols: Optional[torch.Tensor] = None,
            quantized: Optional[planner.QuantizedBase] = None) -> planner.Plan:
    """:func:`.planner.plan` with this registry's facts: availability, devices, and the chosen
    backend's own report where its kernels choose (cpp)."""
    device = torch.device(device)
    if backend_name != "auto" and backend_name not in REGISTRY:
        _require(backend_name)  # unknown name: RuntimeError listing the choices
    chosen = backend_name if backend_name != "auto" else planner.choose_backend(device, dtype, k, shape, why_not)
    report = None
    if unavailable_reason(chosen) is None:
        kernels = backend(chosen).kernels
        report = None if kernels is None else kernels.algorithm_report
    return planner.plan(device, dtype, k, shape, why_not=why_not, backends=BACKENDS, tokens=tokens,
                        backend=backend_name, weight_grad=weight_grad, rows=rows, cols=cols,
                        algorithm_report=report, quantized=quantized)
