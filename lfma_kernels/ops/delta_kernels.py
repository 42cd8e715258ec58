"""``x dW^T`` without ever forming ``W``: the delta path beside a quantized base layer (docs/math.md).

Every function maps token rows ``x2d`` (``[tokens, d_in]``) to ``x2d dW^T`` (``[tokens, d_out]``) for
``dW = alpha * Re(ifft2(F))``, ``F`` holding the K coefficients; with ``s = alpha / (d_out d_in)``,
``theta_k(m) = 2 pi m u_k / d_out`` and ``phi_k(n) = 2 pi n v_k / d_in``:

    (x dW^T)[t, m] = s Re sum_k c_k e^{i theta_k(m)} Q[t, k],   Q[t, k] = sum_n x[t, n] e^{i phi_k(n)}

``dL/dx = g dW`` is the same map with the roles of rows and columns swapped (``dW^T`` is the same sum
of cosines with ``u`` and ``v`` exchanged; the phase is symmetric in them), so :func:`adjoint` serves
the backward with the forward's kernels. ``dL/dcoeffs`` is the layer's batch gradient from ``x`` and
``g`` (:mod:`.torch_kernels`' ``coeff_grad_batch_*``), whatever computed the forward.

Three ways, each cheapest somewhere (a decision's ``delta``, costed by :func:`.costs.delta_costs`):

- ``rows``: a real FFT of each token row of ``x`` along ``d_in``, the K bins gathered and multiplied by
  the coefficients, scattered into a Hermitian half spectrum along ``d_out`` and one inverse real FFT:
  ``tokens * (d_in log d_in + d_out log d_out + K)``, whatever K.
- ``separable``: ``x`` times the exact-phase tables of the K columns, then the coefficients, then the
  tables of the K rows, LoRA-like: ``tokens * 2K * (d_in + d_out)``, cheapest for small K.
- ``dense``: ``dW`` from the backend's kernel, then a GEMM: ``tokens * d_out * d_in`` plus building ``dW``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .common import compute_dtype, scale
from .torch_kernels import phase_tables

__all__ = ["delta_rows", "delta_separable", "delta_dense", "adjoint", "DELTA_PATHS"]


def _row_sums(x2d: torch.Tensor, cols: torch.Tensor, d_in: int) -> torch.Tensor:
    """``Q[k, t] = sum_n x[t, n] exp(+2 pi i n v_k / d_in)`` (``[K, tokens]`` complex) from one real FFT
    per row: ``exp(+...)`` at ``v`` is the stored bin ``(-v) mod d_in`` when that lies in the half
    spectrum, else the conjugate of bin ``v``. Transforming ``x^T`` along dim 0 keeps each bin's tokens
    contiguous for the gather."""
    spectrum = torch.fft.rfft(x2d.T, dim=0)
    mirrored = (-cols) % d_in
    stored = mirrored <= d_in // 2
    bins = spectrum.index_select(0, torch.where(stored, mirrored, cols))
    return torch.where(stored[:, None], bins, torch.conj_physical(bins))


def delta_rows(x2d: torch.Tensor, coeffs: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
               shape: Sequence[int], alpha: float) -> torch.Tensor:
    """The ``rows`` way: ``O(tokens (d_in log d_in + d_out log d_out + K))``. ``Re sum_u R[u] e^{+i 2 pi m u
    / d_out}`` is ``d_out`` times the inverse real FFT of R's Hermitian part ``(R[u] + conj(R[-u])) / 2``,
    which needs half the work of a complex inverse FFT; both members land in the stored half."""
    d_out, d_in = shape
    dtype = compute_dtype(coeffs.dtype)
    if x2d.shape[0] == 0:  # MKL refuses a batch of no transforms
        return x2d.new_zeros((0, d_out))
    c = torch.complex(coeffs[:, 0].to(dtype), coeffs[:, 1].to(dtype)) * (0.5 * scale(shape, alpha) * d_out)
    z = _row_sums(x2d.to(dtype), cols, d_in) * c[:, None]  # [K, tokens]
    half = d_out // 2
    mirror = (-rows) % d_out
    spectrum = torch.zeros((half + 1, x2d.shape[0]), dtype=z.dtype, device=z.device)
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    # A member outside the stored half is sent to bin 0 with a zero value: no boolean indexing (no
    # host sync on a GPU); its partner, always stored, carries it.
    spectrum.index_add_(0, torch.where(rows <= half, rows, 0), torch.where((rows <= half)[:, None], z, zero))
    spectrum.index_add_(0, torch.where(mirror <= half, mirror, 0),
                        torch.where((mirror <= half)[:, None], torch.conj_physical(z), zero))
    return torch.fft.irfft(spectrum, n=d_out, dim=0).T


def delta_separable(x2d: torch.Tensor, coeffs: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                    shape: Sequence[int], alpha: float) -> torch.Tensor:
    """The ``separable`` way: with ``P = x B_c``, ``S = x B_s`` (``[tokens, K]``),
    ``x dW^T = s ((P a - S b) A_c^T - (S a + P b) A_s^T)``; two GEMMs of width 2K."""
    d_out, d_in = shape
    dtype = compute_dtype(coeffs.dtype)
    k = rows.shape[0]
    bc, bs = phase_tables(cols, d_in, dtype)
    ac, as_ = phase_tables(rows, d_out, dtype)
    ps = x2d.to(dtype) @ torch.cat([bc, bs], dim=1)
    p, q = ps[:, :k], ps[:, k:]
    a, b = coeffs[:, 0].to(dtype), coeffs[:, 1].to(dtype)
    s = scale(shape, alpha)
    mixed = torch.cat([(p * a - q * b) * s, (q * a + p * b) * (-s)], dim=1)
    return mixed @ torch.cat([ac, as_], dim=1).T


def delta_dense(delta_weight: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """The ``dense`` way on a backend's ``delta_weight`` kernel: ``dW`` once, then one GEMM."""
    def run(x2d, coeffs, rows, cols, shape, alpha) -> torch.Tensor:
        dw = delta_weight(coeffs, rows, cols, tuple(shape), alpha)
        return x2d.to(dw.dtype) @ dw.T
    return run


def adjoint(delta: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``g -> g dW`` from ``x -> x dW^T``: the same map on the transposed layer (rows and columns
    swapped, the shape reversed)."""
    def run(g2d, coeffs, rows, cols, shape, alpha) -> torch.Tensor:
        return delta(g2d, coeffs, cols, rows, (shape[1], shape[0]), alpha)
    return run


DELTA_PATHS = ("rows", "separable", "dense")
