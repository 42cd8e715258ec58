"""The ``triton`` backend's jitted kernels (the launchers, configs, autotuning and tables are in
:mod:`.triton_ops`). They evaluate LFMA straight from the K frequencies.

Three kernels, all built on the same in-register phase tiles (docs/math.md):

``delta_weight_kernel``
    One program per ``BM x BN`` tile of ``dW`` (or of ``W + dW``). It loops over the K frequencies
    in chunks of ``BK``: loads ``(u, v, a, b)`` for the chunk, reduces the phases exactly in
    integers (``m*u mod d_out``, ``n*v mod d_in``), looks the reduced phases up in a length-``d``
    cos/sin table (built once per size in float64 and rounded, so every tile entry is the
    correctly rounded value) and accumulates the separable rank-2K product
    ``(A_c a - A_s b) B_c^T - (A_s a + A_c b) B_s^T`` with two ``tl.dot`` per chunk. The epilogue
    scales by ``alpha / (d_out d_in)``, optionally adds ``W`` (any float dtype) and stores in the
    output's dtype. One launch; no dense spectrum, no FFT, no host sync.
``coeff_grad_kernel``
    ``dL/dcoeffs`` from ``G = dL/d(dW)``: the partial DFT of ``G`` at the K points. Program
    ``(k chunk, region)`` loops over the ``BM x BN`` tiles of a fixed 128 x 128 region of ``G``,
    computes ``T = G_tile [B_c, B_s]`` with ``tl.dot`` (phase tiles rebuilt on the fly), folds in
    the row phases, and writes the region's partial sums for its K chunk; one ``sum`` over regions
    finishes. The region size does not depend on the autotuned block sizes, so the result is
    deterministic (no atomics) and every config writes every partial.
``coeff_grad_batch_kernel``
    The small-K batch path of a layer's backward (docs/math.md): ``P = g A`` and ``Q = x B``
    per token tile, in the activations' dtype on tensor cores (bf16/fp16) or float32, reduced
    into ``s (Re, -Im) sum_t P Q`` without forming ``G = g^T x`` nor the ``[d, K]`` phase tables:
    one launch plus the partial sum, where the torch backend's version launches a few dozen
    small kernels (phase tables, two GEMMs, elementwise products, reductions).

Float64 operands (``USE_DOT=False``) form their products as broadcast multiply + ``tl.sum``:
Triton has no float64 ``tl.dot`` on NVIDIA GPUs (triton-lang/triton#5483).
"""
import triton
import triton.language as tl

__all__ = ["phase", "mma", "k_chunk", "store_partials", "delta_weight_kernel", "coeff_grad_kernel", "project_rows",
           "coeff_grad_batch_kernel"]


@triton.jit
def phase(table_ptr, pos, idx, d, WIDE: tl.constexpr):
    """cos/sin(2 pi (pos*idx mod d) / d), broadcast over ``pos`` and ``idx``: the phase is reduced
    exactly in integers (int64 when ``d`` is large enough for ``pos*idx`` to overflow int32), then
    read from the interleaved [d, 2] cos/sin table. Residues lie in [0, d): no mask needed."""
    if WIDE:
        r = (pos.to(tl.int64) * idx.to(tl.int64)) % d
    else:
        r = (pos.to(tl.int32) * idx.to(tl.int32)) % d
    return tl.load(table_ptr + 2 * r), tl.load(table_ptr + 2 * r + 1)


@triton.jit
def mma(a, b, acc, USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a @ b``: ``tl.dot`` (IEEE/TF32 for float32 operands), or for float64 a broadcast
    product reduced with ``tl.sum`` (Triton has no float64 dot on NVIDIA GPUs)."""
    if USE_DOT:
        if a.dtype == tl.float32:
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        else:
            acc = tl.dot(a, b, acc)
    else:
        acc = acc + tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    return acc


@triton.jit
def k_chunk(rows_ptr, cols_ptr, K, BK: tl.constexpr):
    """The gradient kernels' program: a 1-D grid, the K chunk varying fastest (consecutive programs
    read the same region of their input: L2). Returns the program's region, its chunk's frequency
    indices ``k`` with their mask, and their positions ``(u, v)`` (padding frequencies get (0, 0))."""
    pid = tl.program_id(0)
    num_k = tl.cdiv(K, BK)
    region = pid // num_k
    k = (pid % num_k) * BK + tl.arange(0, BK)
    k_mask = k < K
    u = tl.load(rows_ptr + k, mask=k_mask, other=0)
    v = tl.load(cols_ptr + k, mask=k_mask, other=0)
    return region, k, k_mask, u, v


@triton.jit
def store_partials(part_ptr, region, k, k_mask, stride_pr, stride_pk, re, im, scale_hi, scale_lo):
    """The gradient kernels' epilogue: ``s * (re, -im)`` as the region's partial ``dL/dcoeffs`` of its
    K chunk (``s`` arrives as two float32 scalars, hi + lo, so float64 keeps all its bits)."""
    re = re * scale_hi + re * scale_lo
    im = -(im * scale_hi + im * scale_lo)
    base = part_ptr + region * stride_pr + k * stride_pk
    tl.store(base, re, mask=k_mask)
    tl.store(base + 1, im, mask=k_mask)


# Sizes are not specialised (only strides are): one compiled variant per config serves every shape and K.
@triton.jit(do_not_specialize=["d_out", "d_in", "K"])
def delta_weight_kernel(
    out_ptr, w_ptr, rows_ptr, cols_ptr, coeffs_ptr, table_m_ptr, table_n_ptr,
    d_out, d_in, K, scale_hi, scale_lo,
    stride_om, stride_on, stride_wm, stride_wn, stride_ck, stride_cj,
    HAS_W: tl.constexpr, WIDE: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    m = pid_m * BM + tl.arange(0, BM)
    n = pid_n * BN + tl.arange(0, BN)
    acc_dtype = table_m_ptr.dtype.element_ty
    acc = tl.zeros((BM, BN), dtype=acc_dtype)
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        k_mask = k < K
        # Padding frequencies get (u, v) = (0, 0) and a = b = 0: valid table rows, zero weight.
        u = tl.load(rows_ptr + k, mask=k_mask, other=0)
        v = tl.load(cols_ptr + k, mask=k_mask, other=0)
        a = tl.load(coeffs_ptr + k * stride_ck, mask=k_mask, other=0.0).to(acc_dtype)
        b = tl.load(coeffs_ptr + k * stride_ck + stride_cj, mask=k_mask, other=0.0).to(acc_dtype)
        ac, as_ = phase(table_m_ptr, m[:, None], u[None, :], d_out, WIDE)   # [BM, BK]
        bc, bs = phase(table_n_ptr, n[None, :], v[:, None], d_in, WIDE)     # [BK, BN]
        left_c = ac * a[None, :] - as_ * b[None, :]
        left_s = -(as_ * a[None, :] + ac * b[None, :])
        acc = mma(left_c, bc, acc, USE_DOT, PRECISION)
        acc = mma(left_s, bs, acc, USE_DOT, PRECISION)
    # s = alpha / (d_out d_in) arrives as two float32 scalars (hi + lo) so float64 keeps all its bits.
    acc = acc * scale_hi + acc * scale_lo
    mask = (m < d_out)[:, None] & (n < d_in)[None, :]
    rows64 = m.to(tl.int64)[:, None]  # int64 offsets: weights past 2**31 entries (large vocabularies)
    if HAS_W:
        w = tl.load(w_ptr + rows64 * stride_wm + n[None, :] * stride_wn, mask=mask, other=0.0)
        if w.dtype == tl.float64:
            acc = w + acc.to(tl.float64)
        else:
            acc = acc + w.to(acc_dtype)
    tl.store(out_ptr + rows64 * stride_om + n[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["d_out", "d_in", "K"])
def coeff_grad_kernel(
    part_ptr, g_ptr, rows_ptr, cols_ptr, table_m_ptr, table_n_ptr,
    d_out, d_in, K, scale_hi, scale_lo,
    stride_gm, stride_gn, stride_pr, stride_pk,
    REGION: tl.constexpr, WIDE: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    region, k, k_mask, u, v = k_chunk(rows_ptr, cols_ptr, K, BK)
    regions_n = tl.cdiv(d_in, REGION)
    m0 = (region // regions_n) * REGION
    n0 = (region % regions_n) * REGION
    acc_dtype = table_m_ptr.dtype.element_ty
    out_c = tl.zeros((BK,), dtype=acc_dtype)
    out_s = tl.zeros((BK,), dtype=acc_dtype)
    for mt in range(0, tl.minimum(REGION, d_out - m0), BM):
        m = m0 + mt + tl.arange(0, BM)
        t_c = tl.zeros((BM, BK), dtype=acc_dtype)
        t_s = tl.zeros((BM, BK), dtype=acc_dtype)
        for nt in range(0, tl.minimum(REGION, d_in - n0), BN):
            n = n0 + nt + tl.arange(0, BN)
            g = tl.load(g_ptr + m.to(tl.int64)[:, None] * stride_gm + n[None, :] * stride_gn,
                        mask=(m < d_out)[:, None] & (n < d_in)[None, :], other=0.0).to(acc_dtype)
            bc, bs = phase(table_n_ptr, n[:, None], v[None, :], d_in, WIDE)   # [BN, BK]
            t_c = mma(g, bc, t_c, USE_DOT, PRECISION)
            t_s = mma(g, bs, t_s, USE_DOT, PRECISION)
        ac, as_ = phase(table_m_ptr, m[:, None], u[None, :], d_out, WIDE)     # [BM, BK]
        # sum_n G cos(phi_m + psi_n) = A_c T_c - A_s T_s;  sum_n G sin(...) = A_s T_c + A_c T_s
        out_c += tl.sum(ac * t_c - as_ * t_s, axis=0)
        out_s += tl.sum(as_ * t_c + ac * t_s, axis=0)
    store_partials(part_ptr, region, k, k_mask, stride_pr, stride_pk, out_c, out_s, scale_hi, scale_lo)


@triton.jit
def project_rows(z_ptr, t64, t_mask, stride_zt, stride_zd, d, table_ptr, idx, acc_dtype: tl.constexpr,
                  WIDE: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr, LOWP: tl.constexpr,
                  BT: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr):
    """``(Re, Im)`` of ``z A`` for a ``[BT, d]`` tile of token rows ``z`` and the ``[d, BK]`` phase
    matrix ``A[j, k] = exp(2 pi i (j idx_k mod d) / d)``: the batch path's ``P = g A`` and ``Q = x B``."""
    out_c = tl.zeros((BT, BK), dtype=acc_dtype)
    out_s = tl.zeros((BT, BK), dtype=acc_dtype)
    for d0 in range(0, d, BD):
        j = d0 + tl.arange(0, BD)
        z = tl.load(z_ptr + t64 * stride_zt + j[None, :] * stride_zd,
                    mask=t_mask[:, None] & (j < d)[None, :], other=0.0)
        c, s = phase(table_ptr, j[:, None], idx[None, :], d, WIDE)   # [BD, BK]
        if LOWP:
            c = c.to(z.dtype)   # 16-bit activations: tensor cores, float32 accumulation
            s = s.to(z.dtype)
        else:
            z = z.to(acc_dtype)
        out_c = mma(z, c, out_c, USE_DOT, PRECISION)
        out_s = mma(z, s, out_s, USE_DOT, PRECISION)
    return out_c, out_s


@triton.jit(do_not_specialize=["T", "d_out", "d_in", "K"])
def coeff_grad_batch_kernel(
    part_ptr, x_ptr, g_ptr, rows_ptr, cols_ptr, table_m_ptr, table_n_ptr,
    T, d_out, d_in, K, scale_hi, scale_lo,
    stride_xt, stride_xn, stride_gt, stride_gm, stride_pr, stride_pk,
    REGION: tl.constexpr, WIDE: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr,
    LOWP_G: tl.constexpr, LOWP_X: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr,
):
    region, k, k_mask, u, v = k_chunk(rows_ptr, cols_ptr, K, BK)
    acc_dtype = table_m_ptr.dtype.element_ty
    out_a = tl.zeros((BK,), dtype=acc_dtype)
    out_b = tl.zeros((BK,), dtype=acc_dtype)
    for t0 in range(0, tl.minimum(REGION, T - region * REGION), BT):
        t = region * REGION + t0 + tl.arange(0, BT)
        t_mask = t < T
        t64 = t.to(tl.int64)[:, None]  # int64 offsets: T * d may pass 2**31
        # P = g A,  A[m, k] = exp(2 pi i (m u_k mod d_out) / d_out);  Q = x B likewise
        p_c, p_s = project_rows(g_ptr, t64, t_mask, stride_gt, stride_gm, d_out, table_m_ptr, u, acc_dtype,
                                 WIDE, USE_DOT, PRECISION, LOWP_G, BT, BD, BK)
        q_c, q_s = project_rows(x_ptr, t64, t_mask, stride_xt, stride_xn, d_in, table_n_ptr, v, acc_dtype,
                                 WIDE, USE_DOT, PRECISION, LOWP_X, BT, BD, BK)
        # dL/da = s Re(sum_t P Q),  dL/db = -s Im(sum_t P Q)  (padding tokens have P = Q = 0)
        out_a += tl.sum(p_c * q_c - p_s * q_s, axis=0)
        out_b += tl.sum(p_c * q_s + p_s * q_c, axis=0)
    store_partials(part_ptr, region, k, k_mask, stride_pr, stride_pk, out_a, out_b, scale_hi, scale_lo)
