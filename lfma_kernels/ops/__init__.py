"""Backends and the way a call reaches them: each backend declared by one object in :mod:`.backends` (its
kernels in ``*_kernels.py`` / ``*_ops.py``), every path choice one :class:`.decision.Decision` from
:mod:`.planner`, made through :mod:`.dispatch` and executed by the custom ops of :mod:`.library` and
:mod:`.linear_op` (docs/architecture.md)."""
