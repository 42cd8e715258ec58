"""The ``torch`` backend: pure PyTorch, any device.

``dW`` is evaluated either as the separable rank-2K product of exact-phase cos/sin tables
(cheap for small K) or by scattering the K coefficients into a Hermitian half-spectrum and
running one ``irfft2`` (cheap for large K). The batch paths for ``dL/dcoeffs``
(``P = g A``, ``Q = x B``, DESIGN section 1) and the cost model that picks a path live here and
serve every backend; :mod:`.library` registers the kernels as ``torch.library`` ops.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from .common import compute_dtype, fold_weight, scale
from .library import Kernels, register_backend

__all__ = [
    "delta_weight",
    "folded_weight",
    "lfma_linear",
    "phase_tables",
    "delta_weight_separable",
    "delta_weight_fft",
    "coeff_grad_separable",
    "coeff_grad_fft",
    "coeff_grad_batch_gemm",
    "coeff_grad_batch_fft",
    "use_separable",
    "coeff_grad_path",
]

# Crossover between the separable product (d_out*d_in*2K multiply-adds) and scatter + one real
# 2-D FFT: the FFT wins when 2K > c(N) * log2(N). Measured with benchmarks/crossover.py on the
# project's 2-core CPU (torch 2.13, float32, 2026-11-26): irfft2 overtakes the product at K ~ 70
# for 768x768, ~100 for 1024x1024, ~150 for 768x3072 and ~350 for 4096x4096, so c is 7.3 at
# 768x768 and grows like N^0.4 (the large transforms fall out of cache while the GEMM does not).
# The forward rfft2 that reads the coefficient gradient is ~3.2x cheaper than irfft2 here.
_FFT_C_768 = 7.3
_RFFT_SPEEDUP = 3.2
# One batch of row rffts (tokens x d) costs _ROW_FFT_C * tokens * d * log2(d) GEMM multiply-adds
# (the two row FFTs of a 768x768, 1024x1024 or 768x3072 layer at 256-4096 tokens: 6.4-8.2;
# benchmarks/bench_cpp.py --batch-grad, the "row ffts" column, 2026-11-27). The batch GEMMs
# x B and g A are skinny (2K columns) and come with the tables and the [tokens, K] products: they
# ran at 1.6-2.8x the cost per multiply-add of a square GEMM (K = 32..104, same runs), so the
# gemm path is charged _GEMM_PATH_C per multiply-add. (With 16 and 1 here, the model sent
# 768x768 with K=58 at 4096 tokens through gemm: 13.8 ms against the fft path's 6.3 ms.)
_ROW_FFT_C = 7.0
_GEMM_PATH_C = 2.0
# ...and gathering the K bins of every token and reducing their products costs ~1000 multiply-adds
# per (token, K) pair (a gather of scattered rows and a batch of tiny products, 5-14 ns per pair
# against ~10 ps per GEMM multiply-add), which is why the dense path G = g^T x wins again for
# large K (768x768 at 4096 tokens: fft 7-10 ms at K=176, 17-45 ms at K=943, dense 25 ms).
_GATHER_C = 1000.0


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
    p, sp = _row_spectrum_at(g2d.to(dtype), rows, shape[0])
    q, sq = _row_spectrum_at(x2d.to(dtype), cols, shape[1])
    # One batched [2, tokens] x [tokens, 2] product per frequency gives all four real dot products
    # (sum Pr Qr, Pr Qi, Pi Qr, Pi Qi) without materialising a [K, tokens] temporary.
    dots = torch.bmm(p.transpose(1, 2), q)
    rr, ri, ir, ii = dots[:, 0, 0], dots[:, 0, 1], dots[:, 1, 0], dots[:, 1, 1]
    # Re(P Q) = Pr Qr - sp sq Pi Qi,  Im(P Q) = sq Pr Qi + sp Pi Qr;  the grads are s * (Re, -Im).
    s = scale(shape, alpha)
    return torch.stack([(rr - sp * sq * ii) * s, (sq * ri + sp * ir) * (-s)], dim=1)


def _fft_cost(shape: Sequence[int], inverse: bool) -> float:
    """An FFT's cost in the separable product's units (multiply-adds), see the constants above."""
    n = shape[0] * shape[1]
    c = _FFT_C_768 * (n / (768 * 768)) ** 0.4 / (1.0 if inverse else _RFFT_SPEEDUP)
    return c * n * math.log2(max(n, 2))


def use_separable(k: int, shape: Sequence[int], *, inverse: bool = True) -> bool:
    """Separable product for ``dW`` (``inverse``) or for the gradient from ``G``, versus an FFT."""
    return shape[0] * shape[1] * 2 * k < _fft_cost(shape, inverse)


def coeff_grad_path(tokens: int, k: int, shape: Sequence[int], *, pair_cost: Optional[float] = None) -> str:
    """How ``lfma_linear``'s backward gets ``dL/dcoeffs``: ``"dense"`` (``G = g^T x``, ``tokens*d_out*d_in``,
    then a gather from ``G``), ``"gemm"`` (batch path through the phase tables, ``tokens*2K*(d_out+d_in)``)
    or ``"fft"`` (batch path through a real FFT of every row of ``g`` and ``x``, then ``pair_cost`` per
    token and frequency for the gather and reduction: ``_GATHER_C`` for this module's version)."""
    d_out, d_in = shape
    pair_cost = _GATHER_C if pair_cost is None else pair_cost
    costs = {
        "dense": tokens * d_out * d_in + min(d_out * d_in * 2 * k, _fft_cost(shape, inverse=False)),
        "gemm": _GEMM_PATH_C * tokens * 2 * k * (d_out + d_in),
        "fft": _ROW_FFT_C * tokens * (d_out * math.log2(max(d_out, 2)) + d_in * math.log2(max(d_in, 2)))
        + pair_cost * tokens * k,
    }
    return min(costs, key=costs.get)


def _delta_weight(coeffs, rows, cols, shape, alpha) -> torch.Tensor:
    if use_separable(rows.shape[0], shape):
        return delta_weight_separable(coeffs, rows, cols, shape, alpha)
    return delta_weight_fft(coeffs, rows, cols, shape, alpha)


def _folded_weight(weight: torch.Tensor, coeffs, rows, cols, alpha) -> torch.Tensor:
    return fold_weight(weight, _delta_weight(coeffs, rows, cols, tuple(weight.shape), alpha))


def _coeff_grad(grad_dw: torch.Tensor, rows, cols, alpha) -> torch.Tensor:
    if use_separable(rows.shape[0], grad_dw.shape, inverse=False):
        return coeff_grad_separable(grad_dw, rows, cols, alpha)
    return coeff_grad_fft(grad_dw, rows, cols, alpha)


delta_weight, folded_weight, lfma_linear = register_backend(
    "torch", Kernels(delta_weight=_delta_weight, folded_weight=_folded_weight, coeff_grad=_coeff_grad))
