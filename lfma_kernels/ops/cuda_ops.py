"""The ``cuda`` backend's kernels: the CUDA kernels of csrc/lfma_cuda.cu, registered for the same
``torch.ops.lfma_ext`` ops as the CPU kernels (fake implementations in :mod:`.cpp_ops`); declared in
:mod:`.backends.cuda`.

Importing this module loads (or compiles on first use) the CUDA part of the extension and raises
``RuntimeError`` saying what is missing if it cannot: a CUDA build of torch, a GPU, or nvcc.
"""
from __future__ import annotations

from . import extension

__all__ = ["KERNELS"]

extension.load("cuda")

from . import cpp_ops  # noqa: E402  (after the CUDA part is known to load)

KERNELS = cpp_ops.LFMA_EXT_KERNELS
