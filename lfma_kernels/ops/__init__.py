"""Backends: one module per implementation (kernels in ``*_kernels.py``, launchers and registration in
``*_ops.py``), registered in :mod:`lfma_kernels.ops.dispatch`; every path choice is made by
:mod:`lfma_kernels.ops.planner`."""
