"""Backend registry facts and the front door of every call: what can run here, and what a call runs.

The backends are objects of :mod:`.backends` (one file each); this module asks them, once per process,
whether they can run here (:func:`unavailable_reason`), loads their kernels on first use
(:func:`kernels`), and hands the planner those facts to decide a call (:func:`decide`). Probe results
and loaded kernels are kept in plain dicts, so once a backend has been used (or :func:`prepare`d) a
decision is a few dict lookups that ``torch.compile`` traces without a break.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import planner
from .backends import BACKENDS, REGISTRY, Kernels
from .decision import Call, Decision, MixedFold, PositionFacts, QuantizedBase

__all__ = ["BACKENDS", "available_backends", "unavailable_reason", "why_not", "kernels", "executes", "reads_positions",
           "prepare", "decide"]

_reasons: Dict[str, Optional[str]] = {}
_kernels: Dict[str, Optional[Kernels]] = {}
# per device type: (backend name) -> why it cannot run a call on that device here, or None
_why_not_on: Dict[str, object] = {}


def unavailable_reason(name: str) -> Optional[str]:
    """``None`` when backend ``name`` can be used here, otherwise why not and how to get it."""
    if name not in _reasons:
        if name not in REGISTRY:
            return f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)} or 'auto'"
        _reasons[name] = REGISTRY[name].unavailable_reason()
    return _reasons[name]


def available_backends() -> List[str]:
    """The backends usable in this process, in the registry's order."""
    return [name for name in BACKENDS if unavailable_reason(name) is None]


def why_not(name: str, device_type: str) -> Optional[str]:
    """``None`` when backend ``name`` can run a call on ``device_type`` tensors here, otherwise why not."""
    reason = unavailable_reason(name)
    if reason is not None:
        return f"not available: {reason}"
    return _device_refusal(name, device_type)


def _device_refusal(name: str, device_type: str) -> Optional[str]:
    devices = REGISTRY[name].devices()
    if devices is not None and device_type not in devices:
        return f"does not run on {device_type} tensors (it runs on {', '.join(devices)})"
    return None


def reads_positions(backend: str, device_type: str) -> bool:
    """Whether a call asking for ``backend`` on ``device_type`` tensors may run on a backend whose costs read the
    positions' facts (worth counting them on the host)."""
    names = BACKENDS if backend == "auto" else (backend,)
    return any(name in REGISTRY and REGISTRY[name].uses_positions and why_not(name, device_type) is None
               for name in names)


def _facts(device_type: str):
    facts = _why_not_on.get(device_type)
    if facts is None:
        facts = _why_not_on[device_type] = lambda name: why_not(name, device_type)
    return facts


def _require(name: str) -> None:
    reason = unavailable_reason(name)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} is not available: {reason}")


def kernels(name: str) -> Optional[Kernels]:
    """The loaded kernels of backend ``name`` (``None`` for the reference); ``RuntimeError`` saying why if it
    cannot run here."""
    if name not in _kernels:
        _require(name)
        _kernels[name] = REGISTRY[name].load()
    return _kernels[name]


def executes(oracle: Callable[..., torch.Tensor]):
    """Decorates an entry point ``body(decision, *args)`` that runs a Decision: a reference decision runs
    ``oracle(*args)`` (the paper's formulation, no kernels); any other first checks that its backend can run
    here, on the call's device (``RuntimeError`` naming the reason), and loads its kernels."""
    def wrap(body):
        @functools.wraps(body)
        def run(decision: Decision, *args):
            name = decision.backend
            if name == "reference":
                return oracle(*args)
            _require(name)  # a dict lookup once probed
            kernels(name)
            refusal = _device_refusal(name, decision.call.device)
            if refusal is not None:
                raise RuntimeError(f"backend {name!r} {refusal}; move the tensors or use backend='auto'")
            return body(decision, *args)
        return run
    return wrap


def prepare(name: str) -> None:
    """Probe (and load) what ``name`` may resolve to, ahead of the first call.

    An explicit backend that cannot run in this process raises ``RuntimeError`` now, saying why:
    availability (an import, a compiled extension, a GPU) does not change within a process.
    Whether it runs on the tensors' device is checked per call, since tensors move."""
    if name != "auto":
        _require(name)
    for candidate in (BACKENDS if name == "auto" else (name,)):
        if unavailable_reason(candidate) is None:
            kernels(candidate)
    # The cost tables (with this machine's calibration) and the registry's facts, read now: a first call
    # traced by torch.compile may neither read files nor write these caches.
    for device_type in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
        planner.table_for(device_type)
        _facts(device_type)


def decide(backend: str, device: torch.device, dtype: torch.dtype, k: int, shape: Sequence[int], *,
           tokens: Optional[int] = None, weight_grad: bool = False, positions: Optional[PositionFacts] = None,
           quantized: Optional[QuantizedBase] = None, mixed: Optional[MixedFold] = None,
           transposed: bool = False) -> Decision:
    """The planner's :class:`.decision.Decision` for a call, with this registry's facts. An unknown
    backend name raises ``RuntimeError`` listing the choices."""
    if backend != "auto" and backend not in REGISTRY:
        _require(backend)
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    call = Call(device_type, dtype, int(k), (int(shape[0]), int(shape[1])), backend, tokens, bool(weight_grad),
                positions, quantized, mixed, transposed)
    return planner.decide(call, _facts(device_type))
