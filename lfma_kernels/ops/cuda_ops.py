"""The ``cuda`` backend: the CUDA kernels of csrc/lfma_cuda.cu, registered for the same
``torch.ops.lfma_ext`` ops as the CPU kernels (fake implementations in :mod:`.cpp_ops`).

Importing this module loads (or compiles on first use) the CUDA part of the extension and raises
``RuntimeError`` saying what is missing if it cannot: a CUDA build of torch, a GPU, or nvcc.
"""
from __future__ import annotations

from . import extension
from .library import register_backend

__all__ = ["KERNELS", "OPS"]

extension.load("cuda")

from . import cpp_ops  # noqa: E402  (after the CUDA part is known to load)

KERNELS = cpp_ops.LFMA_EXT_KERNELS
OPS = register_backend("cuda", KERNELS)
