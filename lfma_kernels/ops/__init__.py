"""Backends: one module per implementation, chosen through :mod:`lfma_kernels.ops.dispatch`."""
