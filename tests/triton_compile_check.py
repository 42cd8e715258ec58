"""Compile the triton backend's kernels for an NVIDIA GPU on a machine without one.

Triton's own compiler and the ``ptxas`` bundled with its wheel take each kernel from Python to a
cubin (TTIR -> TTGIR -> LLVM IR -> PTX -> cubin) for a target architecture; no driver or GPU is
involved. The CPU tests run the kernels through the interpreter, which executes the Python source
and so misses anything only the compiler rejects; this closes that gap. It must run in a process
where ``TRITON_INTERPRET`` is unset (test_triton.py starts it as a subprocess).

    python tests/triton_compile_check.py [--arch 90] [--all]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _signature(fn, types, consts):
    return {name: ("constexpr" if name in consts else types[name]) for name in fn.arg_names}


def variants(everything: bool):
    """(label, kernel name, pointer/scalar types, constexprs, num_warps, num_stages)."""
    out = []
    fwd = [  # acc, out/W dtype, HAS_W, WIDE, precision, (BM, BN, BK, warps)
        ("fp32", "fp32", False, False, "ieee", (64, 64, 32, 4)),
        ("fp32", "bf16", True, False, "ieee", (128, 128, 32, 8)),
        ("fp64", "fp64", True, False, "ieee", (16, 16, 16, 4)),
    ]
    if everything:
        fwd += [("fp32", "fp16", True, True, "tf32", (64, 128, 16, 4)),
                ("fp32", "fp32", True, False, "tf32x3", (128, 64, 32, 8)),
                ("fp32", "fp64", True, False, "ieee", (64, 64, 16, 4))]
    for acc, out_t, has_w, wide, prec, (bm, bn, bk, nw) in fwd:
        types = dict(out_ptr=f"*{out_t}", w_ptr=f"*{out_t}", rows_ptr="*i64", cols_ptr="*i64", coeffs_ptr=f"*{acc}",
                     table_m_ptr=f"*{acc}", table_n_ptr=f"*{acc}", d_out="i32", d_in="i32", K="i32",
                     scale_hi="fp32", scale_lo="fp32", stride_om="i32", stride_on="i32", stride_wm="i32",
                     stride_wn="i32", stride_ck="i32", stride_cj="i32")
        consts = dict(HAS_W=has_w, WIDE=wide, USE_DOT=acc != "fp64", PRECISION=prec, BM=bm, BN=bn, BK=bk)
        out.append((f"delta_weight acc={acc} out={out_t} W={has_w} wide={wide} {prec} {bm}x{bn}x{bk}",
                    "delta_weight_kernel", types, consts, nw, 2))
    grad = [("fp32", False, "ieee", (64, 64, 32, 4)), ("fp64", False, "ieee", (16, 16, 16, 4))]
    if everything:
        grad += [("fp32", True, "ieee", (128, 128, 32, 8)), ("fp32", False, "tf32", (32, 64, 16, 4))]
    for acc, wide, prec, (bm, bn, bk, nw) in grad:
        types = dict(part_ptr=f"*{acc}", g_ptr=f"*{acc}", rows_ptr="*i64", cols_ptr="*i64", table_m_ptr=f"*{acc}",
                     table_n_ptr=f"*{acc}", d_out="i32", d_in="i32", K="i32", scale_hi="fp32", scale_lo="fp32",
                     stride_gm="i32", stride_gn="i32", stride_pr="i32", stride_pk="i32")
        consts = dict(REGION=128, WIDE=wide, USE_DOT=acc != "fp64", PRECISION=prec, BM=bm, BN=bn, BK=bk)
        out.append((f"coeff_grad acc={acc} wide={wide} {prec} {bm}x{bn}x{bk}", "coeff_grad_kernel", types, consts, nw, 2))
    batch = [("fp32", "bf16", True, False, (128, 64, 32, 8)), ("fp32", "fp32", False, False, (64, 32, 16, 4)),
             ("fp64", "fp64", False, False, (16, 16, 16, 4))]
    if everything:
        batch += [("fp32", "fp16", True, True, (64, 64, 64, 4)), ("fp64", "fp32", False, False, (16, 16, 16, 4))]
    for acc, x_t, lowp, wide, (bt, bd, bk, nw) in batch:
        types = dict(part_ptr=f"*{acc}", x_ptr=f"*{x_t}", g_ptr=f"*{x_t}", rows_ptr="*i64", cols_ptr="*i64",
                     table_m_ptr=f"*{acc}", table_n_ptr=f"*{acc}", T="i32", d_out="i32", d_in="i32", K="i32",
                     scale_hi="fp32", scale_lo="fp32", stride_xt="i32", stride_xn="i32", stride_gt="i32",
                     stride_gm="i32", stride_pr="i32", stride_pk="i32")
        consts = dict(REGION=128, WIDE=wide, USE_DOT=acc != "fp64", PRECISION="ieee", LOWP_G=lowp, LOWP_X=lowp,
                      BT=bt, BD=bd, BK=bk)
        out.append((f"coeff_grad_batch acc={acc} x={x_t} lowp={lowp} wide={wide} {bt}x{bd}x{bk}",
                    "coeff_grad_batch_kernel", types, consts, nw, 3))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (default 90: H100/H200)")
    parser.add_argument("--all", action="store_true", help="more variants (tf32, int64 phases, fp16)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter replaces the compiler", file=sys.stderr)
        return 2
    sys.path.insert(0, _ROOT)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lfma_kernels.ops import triton_kernels

    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    for label, name, types, consts, warps, stages in variants(args.all):
        fn = getattr(triton_kernels, name)
        start = time.perf_counter()
        try:
            triton.compile(ASTSource(fn, _signature(fn, types, consts), consts), target=target,
                           options={"num_warps": warps, "num_stages": stages})
            print(f"ok    sm_{args.arch} {label} ({time.perf_counter() - start:.1f} s)", flush=True)
        except Exception as exc:
            failures += 1
            print(f"FAIL  sm_{args.arch} {label}: {type(exc).__name__}: {exc}", flush=True)
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
