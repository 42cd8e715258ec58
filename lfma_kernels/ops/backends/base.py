"""What a backend is: the one object that declares everything the rest of the package knows about it.

A backend (one file in this folder, one line in ``__init__.py``'s registry) says

- where its kernels live and what they are (:class:`Kernels`, loaded only when it is used);
- the algorithms it has for building ``dW`` and for reading ``dL/dcoeffs`` from ``G``, and what each
  one runs (:attr:`Backend.descriptions`, which ``lfma.explain`` prints);
- whether it can run in this process, and why not, with the fix (:meth:`Backend.unavailable_reason`),
  and on which devices (:meth:`Backend.devices`);
- what each of its algorithms costs for a call (:meth:`Backend.algorithm_costs`, from the cost table
  of the call's device), and why ``auto`` would pass it over for a call it could run
  (:meth:`Backend.auto_refusal`).

The planner (:mod:`..planner`) decides with these answers and nothing else; the kernels receive the
algorithm it chose. A layer's backward paths and the delta paths beside a quantized base are common to
every backend (:mod:`..costs`), with per-backend constants for the parts a backend may own (its batch
and rows kernels: ``Kernels.coeff_grad_batch_fft``, ``Kernels.delta_rows``).
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch

from ..cost_tables import CostTable

__all__ = ["Kernels", "Backend"]


class Kernels(NamedTuple):
    """A backend's kernels. ``algorithm`` is one of its :attr:`Backend.algorithms`, as decided."""
    # dW (d_out x d_in) in compute_dtype(coeffs.dtype); no autograd needed.
    delta_weight: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Sequence[int], float, str], torch.Tensor]
    # W + dW in W's dtype, the add done in float32 or wider: (weight, coeffs, rows, cols, alpha, algorithm).
    folded_weight: Callable[..., torch.Tensor]
    # dL/dcoeffs [K, 2] from G = dL/d(dW) (float32 or float64), in G's dtype: (G, rows, cols, alpha, algorithm).
    coeff_grad: Callable[..., torch.Tensor]
    # Optional: the backend's own "gemm" batch path of a layer's backward, with
    # torch_kernels.coeff_grad_batch_gemm's signature (x2d, g2d, rows, cols, shape, alpha, dtype). It runs
    # inside the traced backward, so it must be traceable (a custom op with a fake implementation).
    coeff_grad_batch_gemm: Optional[Callable[..., torch.Tensor]] = None
    # Optional: the backend's own "fft" batch path (same signature, torch_kernels.coeff_grad_batch_fft's).
    coeff_grad_batch_fft: Optional[Callable[..., torch.Tensor]] = None
    # Optional: the rows way of the delta path beside a quantized base, with delta_kernels.delta_rows's
    # signature (x2d, coeffs, rows, cols, shape, alpha).
    delta_rows: Optional[Callable[..., torch.Tensor]] = None
    # Optional: several adapters' rows way in one call, no autograd (a mixed-adapter batch while decoding):
    # (x2d with rows grouped by adapter, [Adapter, ...], [rows of each], shape).
    delta_rows_grouped: Optional[Callable[..., torch.Tensor]] = None


class Backend:
    """One implementation of the LFMA ops. Subclasses set the class attributes and override what differs."""
    name: str = ""
    kernels_module: Optional[str] = None     # the module whose KERNELS are this backend's (None: no kernels)
    algorithms: Tuple[str, ...] = ()          # ways to build dW, and (the same names) to read dL/dcoeffs from G
    # algorithm -> (what it runs for dW, what it runs for dL/dcoeffs from G)
    descriptions: Mapping[str, Tuple[str, str]] = {}
    uses_positions: bool = False              # its costs read the positions' facts (explain then says so)

    def unavailable_reason(self) -> Optional[str]:
        """``None`` when it can run in this process, else why not and how to fix that (probed once)."""
        return None

    def devices(self) -> Optional[Tuple[str, ...]]:
        """The device types it runs on (``None``: any device torch supports)."""
        return None

    def load(self) -> Optional[Kernels]:
        """Import the kernels (raising if they cannot load: call only when available)."""
        return None if self.kernels_module is None else importlib.import_module(self.kernels_module).KERNELS

    def algorithm_costs(self, table: CostTable, k: int, shape: Tuple[int, int], positions,
                        *, gradient: bool) -> Dict[str, float]:
        """Estimated seconds of each algorithm for dW (``gradient=False``) or dL/dcoeffs from G; a tie goes
        to the first. ``positions``: the call's :class:`..decision.PositionFacts`, or ``None``."""
        raise NotImplementedError

    def auto_refusal(self, table: CostTable, k: int, shape: Tuple[int, int]) -> Optional[str]:
        """Why ``auto`` passes this backend over for a call it could run (``None``: it does not)."""
        return None
