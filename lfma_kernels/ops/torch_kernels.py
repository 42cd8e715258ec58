"""Pure-PyTorch kernels, any device: ``dW`` by the separable product or one ``irfft2``, ``dL/dcoeffs``
from ``G`` by the separable product or one ``rfft2``, and the two batch paths of a layer's backward
that never form ``G`` (``P = g A``, ``Q = x B``: docs/math.md). The ``torch`` backend
(:mod:`.torch_ops`) is built from them, the backward of every backend (:mod:`.library`) falls back
on the batch paths, and the ``triton`` backend on the FFT paths. Which one runs is the planner's
choice (:mod:`.planner`); nothing here chooses.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

from .common import compute_dtype, scale

__all__ = [
    "phase_tables",
    "delta_weight_separable",
    "delta_weight_fft",
    "coeff_grad_separable",
    "coeff_grad_fft",
    "coeff_grad_batch_gemm",
    "coeff_grad_batch_fft",
]


def phase_tables(idx: torch.Tensor, d: int, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """``cos/sin(2 pi (m * idx[k] mod d) / d)`` for ``m < d``, shape ``[d, K]``.

    The phase is reduced with exact integer arithmetic before any float is formed and then
    looked up in a length-``d`` table built in float64: a float32 angle ``2 pi m u / d`` would
    carry ~1e-4 relative error at d=768, the table lookup is correctly rounded.
    """
    device = idx.device
    residue = (torch.arange(d, device=device, dtype=torch.int64)[:, None] * idx.to(torch.int64)[None, :]) % d
    angle = torch.arange(d, device=device, dtype=torch.float64) * (2.0 * math.pi / d)
    return torch.cos(angle).to(dtype)[residue], torch.sin(angle).to(dtype)[residue]


def _separable_factors(coeffs, rows, cols, shape, alpha):
    """``dW = L @ R^T`` with ``L = s [A_c a - A_s b, -(A_s a + A_c b)]`` and ``R = [B_c, B_s]``."""
    dtype = compute_dtype(coeffs.dtype)
    a, b = coeffs[:, 0].to(dtype), coeffs[:, 1].to(dtype)
    ac, as_ = phase_tables(rows, shape[0], dtype)
    bc, bs = phase_tables(cols, shape[1], dtype)
    s = scale(shape, alpha)
    left = torch.cat([(ac * a - as_ * b) * s, (as_ * a + ac * b) * (-s)], dim=1)
    return left, torch.cat([bc, bs], dim=1)


def delta_weight_separable(coeffs, rows, cols, shape, alpha) -> torch.Tensor:
    left, right = _separable_factors(coeffs, rows, cols, shape, alpha)
    return left @ right.T


def _half_spectrum_index(rows, cols, shape):
    """Where each coefficient and its conjugate mirror land in an ``rfft2``-layout half spectrum.

    Positions outside the stored half are redirected to column 0 with a zero weight, so there is
    no boolean indexing (and no host sync on GPU)."""
    d_out, d_in = shape
    half = d_in // 2
    mirror_rows, mirror_cols = (-rows) % d_out, (-cols) % d_in
    keep, keep_mirror = cols <= half, mirror_cols <= half
    return (rows, torch.where(keep, cols, 0), keep), (mirror_rows, torch.where(keep_mirror, mirror_cols, 0), keep_mirror)


def delta_weight_fft(coeffs, rows, cols, shape, alpha) -> torch.Tensor:
    """Scatter into the Hermitian part ``(F + conj(F[-u,-v])) / 2`` of the spectrum and ``irfft2``:
    ``Re(ifft2(F))`` equals ``ifft2`` of that Hermitian part, and ``irfft2`` needs half the work of
    the paper's complex ``ifft2``."""
    d_out, d_in = shape
    dtype = compute_dtype(coeffs.dtype)
    c = torch.complex(coeffs[:, 0].to(dtype), coeffs[:, 1].to(dtype)) * 0.5
    (r, v, keep), (mr, mv, keep_m) = _half_spectrum_index(rows, cols, shape)
    zero = torch.zeros((), dtype=c.dtype, device=c.device)
    spectrum = torch.zeros((d_out, d_in // 2 + 1), dtype=c.dtype, device=c.device)
    spectrum.index_put_((r, v), torch.where(keep, c, zero), accumulate=True)
    # conj_physical, not conj(): under AOT tracing (torch.compile) torch.where dropped the lazy
    # conjugate bit of a conj() view and returned the unconjugated values (torch 2.13).
    spectrum.index_put_((mr, mv), torch.where(keep_m, torch.conj_physical(c), zero), accumulate=True)
    return torch.fft.irfft2(spectrum, s=(d_out, d_in)) * alpha


def coeff_grad_separable(grad_dw: torch.Tensor, rows, cols, alpha) -> torch.Tensor:
    """``s * (sum G cos(theta), -sum G sin(theta))`` through ``G @ [B_c, B_s]`` (``d_out*d_in*2K``)."""
    shape = grad_dw.shape
    k = rows.shape[0]
    ac, as_ = phase_tables(rows, shape[0], grad_dw.dtype)
    bc, bs = phase_tables(cols, shape[1], grad_dw.dtype)
    t = grad_dw @ torch.cat([bc, bs], dim=1)
    tc, ts = t[:, :k], t[:, k:]
    s = scale(shape, alpha)
    return torch.stack([(ac * tc - as_ * ts).sum(0) * s, (as_ * tc + ac * ts).sum(0) * (-s)], dim=1)


def coeff_grad_fft(grad_dw: torch.Tensor, rows, cols, alpha) -> torch.Tensor:
    """``s * (Re, Im) fft2(G)[u, v]``, read from one ``rfft2`` (``G`` is real, so the other half is
    the conjugate mirror)."""
    shape = grad_dw.shape
    spectrum = torch.fft.rfft2(grad_dw)
    (r, v, keep), (mr, mv, _) = _half_spectrum_index(rows, cols, shape)
    value = torch.where(keep, spectrum[r, v], torch.conj_physical(spectrum[mr, mv]))  # see delta_weight_fft
    return torch.view_as_real(value) * scale(shape, alpha)


def coeff_grad_batch_gemm(x2d: torch.Tensor, g2d: torch.Tensor, rows, cols, shape, alpha, dtype) -> torch.Tensor:
    """``dL/dcoeffs`` without forming ``G = g^T x``: ``P = g A``, ``Q = x B`` through two GEMMs with the
    exact-phase tables; cost ``tokens * 2K * (d_out + d_in)``."""
    k = rows.shape[0]
    ac, as_ = phase_tables(rows, shape[0], x2d.dtype)
    bc, bs = phase_tables(cols, shape[1], x2d.dtype)
    p = (g2d @ torch.cat([ac, as_], dim=1)).to(dtype)
    q = (x2d @ torch.cat([bc, bs], dim=1)).to(dtype)
    pr, pi, qr, qi = p[:, :k], p[:, k:], q[:, :k], q[:, k:]
    s = scale(shape, alpha)
    return torch.stack([(pr * qr - pi * qi).sum(0) * s, (pr * qi + pi * qr).sum(0) * (-s)], dim=1)


def _row_spectrum_at(z2d: torch.Tensor, idx: torch.Tensor, d: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``sum_m z[t, m] exp(+2 pi i m idx_k / d)`` for every token, as the stored ``rfft`` bins
    (real view ``[K, tokens, 2]``) and the sign their imaginary part takes:
    ``exp(+2 pi i m u / d) = exp(-2 pi i m ((-u) mod d) / d)``, and a bin past ``d/2`` is the conjugate
    of its mirror. Transforming ``z^T`` along dim 0 leaves each bin's tokens contiguous, so the gather
    copies whole rows (a column gather from ``[tokens, d/2+1]`` ran ~4x slower)."""
    spectrum = torch.fft.rfft(z2d.T, dim=0)
    j = (-idx) % d
    stored = j <= d // 2
    bins = torch.view_as_real(spectrum.index_select(0, torch.where(stored, j, idx)))
    return bins, torch.where(stored, 1.0, -1.0).to(bins.dtype)


def coeff_grad_batch_fft(x2d: torch.Tensor, g2d: torch.Tensor, rows, cols, shape, alpha, dtype) -> torch.Tensor:
    """The batch path with ``P = g A`` and ``Q = x B`` read off one real FFT of each row of ``g`` and
    ``x``: ``tokens * (d_out log d_out + d_in log d_in)`` instead of ``tokens * 2K * (d_out + d_in)``."""
    if x2d.shape[0] == 0:  # MKL refuses a batch of no transforms
        return x2d.new_zeros((rows.shape[0], 2), dtype=dtype)
    p, sp = _row_spectrum_at(g2d.to(dtype), rows, shape[0])
    q, sq = _row_spectrum_at(x2d.to(dtype), cols, shape[1])
    # One batched [2, tokens] x [tokens, 2] product per frequency gives all four real dot products
    # (sum Pr Qr, Pr Qi, Pi Qr, Pi Qi) without materialising a [K, tokens] temporary.
    dots = torch.bmm(p.transpose(1, 2), q)
    rr, ri, ir, ii = dots[:, 0, 0], dots[:, 0, 1], dots[:, 1, 0], dots[:, 1, 1]
    # Re(P Q) = Pr Qr - sp sq Pi Qi,  Im(P Q) = sq Pr Qi + sp Pi Qr;  the grads are s * (Re, -Im).
    s = scale(shape, alpha)
    return torch.stack([(rr - sp * sq * ii) * s, (sq * ri + sp * ir) * (-s)], dim=1)
