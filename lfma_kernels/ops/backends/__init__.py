"""The backends, one file each (:mod:`.base` says what a backend declares). Adding one: a file with its
:class:`.base.Backend` subclass and kernels, and one line below; ``auto`` considers it where the device's
cost table lists it (:mod:`..cost_tables`)."""
from __future__ import annotations

from typing import Dict

from . import cpp, cuda, pytorch, reference, triton
from .base import Backend, Kernels

__all__ = ["Backend", "Kernels", "REGISTRY", "BACKENDS"]

REGISTRY: Dict[str, Backend] = {b.name: b for b in (
    reference.BACKEND,
    pytorch.BACKEND,
    triton.BACKEND,
    cpp.BACKEND,
    cuda.BACKEND,
)}
BACKENDS = tuple(REGISTRY)
