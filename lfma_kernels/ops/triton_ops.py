"""The ``triton`` backend: fused Triton kernels that evaluate LFMA straight from the K frequencies.

The jitted kernels are in :mod:`.triton_kernels` (``delta_weight_kernel``: ``dW`` or ``W + dW`` in
one launch; ``coeff_grad_kernel``: the partial DFT of ``G`` at the K points;
``coeff_grad_batch_kernel``: a layer's batch gradient without ``G``); here are their launchers:
block-size configs and autotuning, the correctly rounded cos/sin tables, the dot-precision option,
the backend's kernels (fused kernel or the torch backend's FFT path, as decided). The backend itself is
declared in :mod:`.backends.triton`.

For large K the scatter + ``irfft2`` (cuFFT) path of the torch backend wins; the planner picks (its GPU
table holds estimates until measured). Float32 ``tl.dot``
runs in IEEE precision by default; :func:`set_dot_precision` opts into TF32 (``"tf32"``, ~1e-3
relative) or TF32x3 (``"tf32x3"``, close to float32 accuracy on tensor cores). Triton has no float64
``tl.dot`` on NVIDIA GPUs (triton-lang/triton#5483), so float64 inputs take the same kernels
with the products formed as broadcast multiply + ``tl.sum`` (CUDA cores; small fixed blocks):
exact, for gradcheck and tests, not fast (``auto`` sends float64 on CUDA to the torch backend).

Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors through Triton's interpreter with one
fixed small config (no autotuning). The interpreter's known gaps: TF32 is ignored, bf16
``tl.dot`` operates on the raw bits (so 16-bit operands are upcast to float32 there), and
float32 -> bf16 stores truncate instead of rounding to nearest.
"""
from __future__ import annotations

import contextlib
import os
import struct
from typing import Dict, Sequence, Tuple

import torch
import triton

from . import torch_kernels, triton_kernels
from .backends.base import Kernels
from .backends.triton import INTERPRETED
from .common import add_delta, compute_dtype, scale
from .trace_checks import trace_check_matrix, trace_check_positions

__all__ = [
    "KERNELS",
    "coeff_grad_batch_gemm",
    "set_dot_precision",
    "get_dot_precision",
    "INTERPRETED",
]


# ---------------------------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------------------------
_PRECISIONS = ("ieee", "tf32", "tf32x3")


def _check_precision(value: str) -> str:
    if value not in _PRECISIONS:
        raise ValueError(f"dot precision must be one of {', '.join(_PRECISIONS)}, got {value!r}")
    return value


_dot_precision = _check_precision(os.environ.get("LFMA_TRITON_DOT_PRECISION", "ieee"))


def set_dot_precision(value: str) -> None:
    """Input precision of the float32 ``tl.dot`` calls: ``"ieee"`` (default, float32 FMA),
    ``"tf32x3"`` (three TF32 products: near-float32 accuracy on tensor cores) or ``"tf32"``
    (~1e-3 relative error: below bf16 rounding, above the float32 tolerances of the tests).
    Also settable with the environment variable ``LFMA_TRITON_DOT_PRECISION``. Ignored by the
    interpreter and for 16-bit or float64 operands."""
    global _dot_precision
    _dot_precision = _check_precision(value)


def get_dot_precision() -> str:
    return _dot_precision


# ---------------------------------------------------------------------------------------------
# block sizes: autotuned on the GPU, one fixed config under the interpreter and for float64
# ---------------------------------------------------------------------------------------------
# Fixed regions of the gradient kernels (a 128 x 128 block of G, 128 tokens): the partial sums'
# layout must not depend on the tuned block sizes (see triton_kernels' docstring).
_REGION = 128
_INTERPRET_REGION = 64  # the interpreter's region: small, but still several blocks per region

# float32 operands on CUDA cores (IEEE) or tensor cores (tf32): tiles over the paper's shapes
# (768x768 .. 4096x4096); the smallest blocks serve K below one 32-wide chunk and narrow layers.
_FWD_CONFIGS = [
    triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [
        (32, 64, 16, 4, 2), (64, 64, 16, 4, 2), (64, 64, 32, 4, 2), (128, 64, 32, 8, 2), (64, 128, 32, 8, 2),
        (128, 128, 16, 8, 2), (128, 128, 32, 8, 2),
    ]
]
_GRAD_CONFIGS = [
    triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [
        (32, 64, 16, 4, 2), (64, 64, 32, 4, 2), (128, 64, 32, 8, 2), (64, 128, 32, 8, 2), (128, 128, 32, 8, 2),
    ]
]
_BATCH_CONFIGS = [
    triton.Config({"BT": bt, "BD": bd, "BK": bk}, num_warps=w, num_stages=s)
    for bt, bd, bk, w, s in [
        (64, 32, 16, 4, 3), (64, 64, 32, 4, 3), (128, 32, 32, 4, 3), (128, 64, 32, 8, 3), (64, 64, 64, 4, 3),
        (128, 64, 64, 8, 3),
    ]
]
_INTERPRET_FWD = {"BM": 64, "BN": 64, "BK": 32}
_INTERPRET_GRAD = {"BM": 32, "BN": 32, "BK": 32}
_INTERPRET_BATCH = {"BT": 32, "BD": 32, "BK": 32}
# float64: broadcast-product path, small blocks so the [B, BK, B] product fits in registers.
_FP64_FWD = {"BM": 16, "BN": 16, "BK": 16}
_FP64_GRAD = {"BM": 16, "BN": 16, "BK": 16}
_FP64_BATCH = {"BT": 16, "BD": 16, "BK": 16}


def _next_pow2(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


def _prune(dims: Dict[str, str]):
    """Drop configs whose blocks are larger than the problem needs (block <= max(16, next_pow2(size)))."""
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        limits = {block: max(16, _next_pow2(args[size])) for block, size in dims.items()}
        kept = [c for c in configs if all(c.kwargs[b] <= lim for b, lim in limits.items())]
        return kept or [min(configs, key=lambda c: sum(c.kwargs[b] for b in dims))]
    return {"early_config_prune": prune}


def _tuning_bench(fn, quantiles):
    """Autotuning timer: shorter than Triton's default (25 ms warmup, 100 ms per config), as each
    new (shape, K, dtype) key tunes once in the first step that meets it."""
    from triton.testing import do_bench
    return do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


def _autotune(kernel, configs, key, blocks):
    try:
        return triton.autotune(configs, key=key, do_bench=_tuning_bench, prune_configs_by=_prune(blocks))(kernel)
    except TypeError:  # a Triton without autotune(do_bench=): its default timer
        return triton.autotune(configs, key=key, prune_configs_by=_prune(blocks))(kernel)


# Autotune keys: the shape and K (plus, added by Triton, the dtype of every tensor argument).
_delta_weight_tuned = _autotune(triton_kernels.delta_weight_kernel, _FWD_CONFIGS,
                                ["d_out", "d_in", "K", "HAS_W", "PRECISION"], {"BM": "d_out", "BN": "d_in", "BK": "K"})
_coeff_grad_tuned = _autotune(triton_kernels.coeff_grad_kernel, _GRAD_CONFIGS,
                              ["d_out", "d_in", "K", "PRECISION"], {"BM": "d_out", "BN": "d_in", "BK": "K"})
_coeff_grad_batch_tuned = _autotune(triton_kernels.coeff_grad_batch_kernel, _BATCH_CONFIGS,
                                    ["d_out", "d_in", "K", "T", "PRECISION"], {"BT": "T", "BD": "d_out", "BK": "K"})


def _launch(tuned, kernel, grid, fixed, args: dict, *, fp64: bool, fp64_config: dict) -> None:
    """Autotuned launch on the GPU; one fixed config under the interpreter or for float64."""
    if fp64:
        kernel[grid](**args, **fp64_config, num_warps=4)
    elif INTERPRETED:
        kernel[grid](**args, **fixed, num_warps=4)
    else:
        tuned[grid](**args)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------
_tables: Dict[Tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def _table(d: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[d, 2]`` = (cos, sin)(2 pi j / d), correctly rounded to ``dtype`` (torch_kernels.phase_tables
    at the unit frequency); cached per size, dtype and device (a few KiB each).

    Built on first use: under CUDA-graph capture, run one eager step first (the usual warmup)."""
    key = (d, dtype, device)
    table = _tables.get(key)
    if table is None:
        cos, sin = torch_kernels.phase_tables(torch.ones(1, dtype=torch.int64, device=device), d, dtype)
        table = _tables[key] = torch.cat([cos, sin], dim=1).contiguous()
    return table


def _scale_parts(shape: Sequence[int], alpha: float) -> Tuple[float, float]:
    """``s`` split into two float32-representable parts (Triton passes Python floats as float32)."""
    s = scale(shape, alpha)
    hi = struct.unpack("f", struct.pack("f", s))[0]
    return hi, s - hi


def _wide(*dims: int) -> bool:
    """int64 phase products once ``(d + block) * d`` could overflow int32."""
    return max(dims) > 32768


def _low_precision_dot(dtype: torch.dtype, acc: torch.dtype) -> bool:
    return dtype in (torch.bfloat16, torch.float16) and acc == torch.float32 and not INTERPRETED


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _launch_delta_weight(coeffs: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, shape: Sequence[int],
                         alpha: float, weight: torch.Tensor = None) -> torch.Tensor:
    """``dW`` (float32/float64 as :func:`compute_dtype`), or ``W + dW`` in ``W``'s dtype."""
    d_out, d_in = int(shape[0]), int(shape[1])
    k = rows.shape[0]
    dtype = compute_dtype(coeffs.dtype)
    device = coeffs.device
    out = torch.empty((d_out, d_in), dtype=dtype if weight is None else weight.dtype, device=device)
    w = out if weight is None else weight
    hi, lo = _scale_parts(shape, alpha)
    args = dict(
        out_ptr=out, w_ptr=w, rows_ptr=rows.contiguous(), cols_ptr=cols.contiguous(), coeffs_ptr=coeffs,
        table_m_ptr=_table(d_out, dtype, device), table_n_ptr=_table(d_in, dtype, device),
        d_out=d_out, d_in=d_in, K=k, scale_hi=hi, scale_lo=lo,
        stride_om=out.stride(0), stride_on=out.stride(1), stride_wm=w.stride(0), stride_wn=w.stride(1),
        stride_ck=coeffs.stride(0), stride_cj=coeffs.stride(1),
        HAS_W=weight is not None, WIDE=_wide(d_out, d_in), USE_DOT=dtype != torch.float64, PRECISION=_dot_precision,
    )

    def grid(meta):
        return triton.cdiv(d_out, meta["BM"]), triton.cdiv(d_in, meta["BN"])
    with _device_guard(out):
        _launch(_delta_weight_tuned, triton_kernels.delta_weight_kernel, grid, _INTERPRET_FWD, args,
                fp64=dtype == torch.float64, fp64_config=_FP64_FWD)
    return out


def _launch_coeff_grad(grad_dw: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s * (sum G cos(theta), -sum G sin(theta))`` per frequency, ``[K, 2]`` in ``G``'s dtype."""
    d_out, d_in = grad_dw.shape
    k = rows.shape[0]
    dtype = compute_dtype(grad_dw.dtype)
    device = grad_dw.device
    region = _INTERPRET_REGION if INTERPRETED else _REGION
    regions = triton.cdiv(d_out, region) * triton.cdiv(d_in, region)
    part = torch.empty((regions, k, 2), dtype=dtype, device=device)
    hi, lo = _scale_parts((d_out, d_in), alpha)
    args = dict(
        part_ptr=part, g_ptr=grad_dw, rows_ptr=rows.contiguous(), cols_ptr=cols.contiguous(),
        table_m_ptr=_table(d_out, dtype, device), table_n_ptr=_table(d_in, dtype, device),
        d_out=d_out, d_in=d_in, K=k, scale_hi=hi, scale_lo=lo,
        stride_gm=grad_dw.stride(0), stride_gn=grad_dw.stride(1), stride_pr=part.stride(0), stride_pk=part.stride(1),
        REGION=region, WIDE=_wide(d_out, d_in), USE_DOT=dtype != torch.float64, PRECISION=_dot_precision,
    )

    def grid(meta):
        return (triton.cdiv(k, meta["BK"]) * regions,)
    with _device_guard(part):
        _launch(_coeff_grad_tuned, triton_kernels.coeff_grad_kernel, grid, _INTERPRET_GRAD, args,
                fp64=dtype == torch.float64, fp64_config=_FP64_GRAD)
    return part[0] if regions == 1 else part.sum(0)


def _launch_coeff_grad_batch(x2d: torch.Tensor, g2d: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                             shape: Sequence[int], alpha: float, dtype: torch.dtype) -> torch.Tensor:
    d_out, d_in = int(shape[0]), int(shape[1])
    tokens = x2d.shape[0]
    k = rows.shape[0]
    acc = torch.float64 if torch.float64 in (dtype, x2d.dtype, g2d.dtype) else torch.float32
    device = x2d.device
    region = _INTERPRET_REGION if INTERPRETED else _REGION
    regions = max(triton.cdiv(tokens, region), 1)
    part = torch.zeros((regions, k, 2), dtype=acc, device=device) if tokens == 0 else \
        torch.empty((regions, k, 2), dtype=acc, device=device)
    if tokens > 0:
        hi, lo = _scale_parts(shape, alpha)
        args = dict(
            part_ptr=part, x_ptr=x2d, g_ptr=g2d, rows_ptr=rows.contiguous(), cols_ptr=cols.contiguous(),
            table_m_ptr=_table(d_out, acc, device), table_n_ptr=_table(d_in, acc, device),
            T=tokens, d_out=d_out, d_in=d_in, K=k, scale_hi=hi, scale_lo=lo,
            stride_xt=x2d.stride(0), stride_xn=x2d.stride(1), stride_gt=g2d.stride(0), stride_gm=g2d.stride(1),
            stride_pr=part.stride(0), stride_pk=part.stride(1),
            REGION=region, WIDE=_wide(d_out, d_in), USE_DOT=acc != torch.float64, PRECISION=_dot_precision,
            # 16-bit operands go to tensor cores as they are; the interpreter's bf16 dot is broken,
            # so there they are upcast to float32 like everything else.
            LOWP_G=_low_precision_dot(g2d.dtype, acc), LOWP_X=_low_precision_dot(x2d.dtype, acc),
        )

        def grid(meta):
            return (triton.cdiv(k, meta["BK"]) * regions,)
        with _device_guard(part):
            _launch(_coeff_grad_batch_tuned, triton_kernels.coeff_grad_batch_kernel, grid, _INTERPRET_BATCH, args,
                    fp64=acc == torch.float64, fp64_config=_FP64_BATCH)
    out = part[0] if regions == 1 else part.sum(0)
    return out.to(dtype)


# ---------------------------------------------------------------------------------------------
# the backend's kernels: fused kernel or the torch backend's FFT path, as decided
# ---------------------------------------------------------------------------------------------
def _delta_weight(coeffs, rows, cols, shape, alpha, algorithm: str) -> torch.Tensor:
    if algorithm == "separable":
        return _launch_delta_weight(coeffs, rows, cols, shape, alpha)
    return torch_kernels.delta_weight_fft(coeffs, rows, cols, shape, alpha)


def _folded_weight(weight: torch.Tensor, coeffs, rows, cols, alpha, algorithm: str) -> torch.Tensor:
    shape = tuple(weight.shape)
    if algorithm == "separable":
        return _launch_delta_weight(coeffs, rows, cols, shape, alpha, weight=weight)
    return add_delta(weight, torch_kernels.delta_weight_fft(coeffs, rows, cols, shape, alpha))


def _coeff_grad(grad_dw: torch.Tensor, rows, cols, alpha, algorithm: str) -> torch.Tensor:
    if algorithm == "separable":
        return _launch_coeff_grad(grad_dw, rows, cols, alpha)
    return torch_kernels.coeff_grad_fft(grad_dw, rows, cols, alpha)


# The batch path runs inside lfma_linear's registered backward, which torch.compile traces with
# fake tensors: it is a custom op of its own, with a fake implementation.
@torch.library.custom_op("lfma::triton_coeff_grad_batch", mutates_args=())
def _coeff_grad_batch_op(x2d: torch.Tensor, g2d: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                         d_out: int, d_in: int, alpha: float, dtype: torch.dtype) -> torch.Tensor:
    return _launch_coeff_grad_batch(x2d, g2d, rows, cols, (d_out, d_in), alpha, dtype)


@_coeff_grad_batch_op.register_fake
def _(x2d, g2d, rows, cols, d_out, d_in, alpha, dtype):
    op = "lfma::triton_coeff_grad_batch"
    trace_check_matrix(op, "x2d", x2d)
    trace_check_matrix(op, "g2d", g2d)
    trace_check_positions(op, rows, cols)
    torch._check(x2d.shape[0] == g2d.shape[0] and x2d.shape[1] == d_in and g2d.shape[1] == d_out,
                 lambda: f"{op}: x2d must be [tokens, d_in = {d_in}] and g2d [tokens, d_out = {d_out}], got "
                         f"{tuple(x2d.shape)} and {tuple(g2d.shape)}")
    return x2d.new_empty((rows.shape[0], 2), dtype=dtype)


def coeff_grad_batch_gemm(x2d: torch.Tensor, g2d: torch.Tensor, rows, cols, shape, alpha, dtype) -> torch.Tensor:
    """``dL/dcoeffs`` of a layer from its input ``x [T, d_in]`` and output gradient ``g [T, d_out]``
    without forming ``G = g^T x``: the "gemm" batch path (``P = g A``, ``Q = x B``;
    torch_kernels.coeff_grad_batch_gemm's contract), fused into one kernel."""
    return _coeff_grad_batch_op(x2d, g2d, rows, cols, int(shape[0]), int(shape[1]), float(alpha), dtype)


KERNELS = Kernels(delta_weight=_delta_weight, folded_weight=_folded_weight, coeff_grad=_coeff_grad,
                  coeff_grad_batch_gemm=coeff_grad_batch_gemm)
