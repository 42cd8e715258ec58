#!/usr/bin/env python3
"""The C++/CUDA extension (backends "cpp" and "cuda"): acceptance timings and the crossovers behind
the CPU kernels' choices.

Default: the acceptance comparisons of issue 4, median milliseconds side by side.
  delta_weight   lfma.delta_weight (no grad) with backend reference (the paper's torch.fft
                 formulation), torch and cpp, at 768x768 (K=176, 943) and 1024x1024 (K=104, 524);
                 the target is reference/cpp >= 2. Also each backend's float32 error against the
                 float64 oracle.
  training step  LFMALinear forward + backward at --tokens tokens with each backend and auto; the
                 target is auto no slower than the best single backend.
--device cuda: the same tables on a GPU for backend cuda against reference, torch and triton
  (targets: cuda within 1.5x of triton, float32 error <= 1e-5).

--batch-grad: the backward's three ways to dL/dcoeffs (dense G, gemm, fft batch path) on CPU over
  shapes, token counts and K; the cost per (token, frequency) pair of the planner's CPU table
  (lfma_kernels/ops/cost_tables.py, batch_pair_s["cpp"]) comes from here.

--crossover: every CPU algorithm of the extension (separable, hybrid, fft2; csrc/cpu_kernels.cpp)
  for dW and for dL/dcoeffs from G, against the torch backend, over K and shapes; the columns
  "best" and "model" show the fastest measured and what the cpp backend's cost model
  (lfma_kernels/ops/backends/cpp.py) picks. Its constants (lfma_kernels/ops/cost_tables.py,
  CompiledCpuCosts) and the cpp/torch order of the planner's CPU table come from here.

Candidates are timed round-robin (one run of each per round, in a random order, medians over the
rounds), so load from other processes falls on all of them alike; a comparison is repeated while
other processes use the CPUs, and reported if it never ran on a quiet machine.

    python benchmarks/bench_cpp.py                 # acceptance tables (about two minutes on 2 cores)
    python benchmarks/bench_cpp.py --device cuda   # the same for backend cuda on a GPU
    python benchmarks/bench_cpp.py --crossover
    python benchmarks/bench_cpp.py --batch-grad --shapes 768x768,1024x1024,768x3072 --ks 16,32,58,104,176,943,5000,29491
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import sys
import warnings
from typing import List, Optional, Sequence

from common import ALPHA, delta_weight_fn, lfma, make_inputs, make_problem, parse_shapes, train_step_fn  # first

import torch  # noqa: E402

from lfma_kernels.ops import dispatch  # noqa: E402
from report import fmt_ms, machine_info, markdown_table, write_section  # noqa: E402
from timing import interleaved_ms  # noqa: E402

ACCEPTANCE = [((768, 768), 176), ((768, 768), 943), ((1024, 1024), 104), ((1024, 1024), 524)]
CROSSOVER_SHAPES = "768x768,1024x1024,768x3072,3072x768,4096x4096"
CROSSOVER_KS = "1,2,4,8,16,32,64,104,176,524,943,2000,5000,29491"
ALGOS = ("separable", "hybrid", "fft")


def fmt(ms: Optional[float]) -> str:
    return "-" if ms is None else fmt_ms(ms)


def table(headers: Sequence[str], rows: List[Sequence[str]]) -> str:
    return markdown_table(headers, rows, [False, True] + [True] * (len(headers) - 2))


def header(args: argparse.Namespace) -> str:
    lines = [f"- {k}: {v}" for k, v in machine_info(args.device, "float32")]
    return "\n".join(lines + [f"- cpp extension: {_extension_how()}",
                              f"- command: python benchmarks/bench_cpp.py {' '.join(args.argv)}"])


def _extension_how() -> str:
    from lfma_kernels.ops import extension
    try:
        return extension.load("cpp")
    except RuntimeError as exc:
        return f"not available ({exc})"


# ---------------------------------------------------------------------------------------------
# acceptance
# ---------------------------------------------------------------------------------------------
def _accuracy(p, backend: str) -> float:
    """||dW - oracle|| / ||oracle|| for the problem's float32 coefficients, oracle in float64 on CPU."""
    with torch.no_grad():
        out = lfma.delta_weight(p.coeffs, p.rows, p.cols, p.shape, ALPHA, backend=backend).double().cpu()
        ref = lfma.reference.delta_weight(p.coeffs.detach().double().cpu(), p.rows.cpu(), p.cols.cpu(), p.shape,
                                          ALPHA)
    return float((out - ref).norm() / ref.norm())


def acceptance(args: argparse.Namespace) -> None:
    """delta_weight and the layer training step, every candidate backend side by side."""
    device = torch.device(args.device)
    ext = "cuda" if device.type == "cuda" else "cpp"
    # The compiled backend against the paper's formulation, the torch backend and (GPU) triton.
    candidates = ["reference", "torch"] + (["triton"] if device.type == "cuda" else []) + [ext]
    available = lfma.available_backends()
    backends = [b for b in candidates if b in available]
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    others = [b for b in backends if b != "reference"]
    dw_rows, train_rows, noisy = [], [], []
    for shape, k in ACCEPTANCE:
        p = make_problem(shape, k, device=device)
        print(f"{shape[0]}x{shape[1]} K={k}", file=sys.stderr, flush=True)
        ms = interleaved_ms({b: delta_weight_fn(p, b, backward=False) for b in backends},
                            rounds=args.rounds, min_time_s=args.min_time, noisy=noisy, sync=sync,
                            label=f"delta_weight {shape[0]}x{shape[1]} K={k}")
        auto = dispatch.decide("auto", p.device, p.coeffs.dtype, k, shape).backend
        ratios = [f"{ms['reference'] / ms[ext]:.1f}x" if ext in ms else "-"]
        ratios += [f"{ms[b] / ms[ext]:.2f}" if ext in ms else "-" for b in others if b != ext]
        errors = [f"{_accuracy(p, b):.1e}" for b in others]
        dw_rows.append([f"{shape[0]}x{shape[1]}", str(k)] + [fmt(ms.get(b)) for b in backends] + ratios + errors
                       + [auto])

        x, g = make_inputs(p, args.tokens, requires_grad=True)
        layers = others + ["auto"]
        ms = interleaved_ms({b: train_step_fn(p, b, x, g) for b in layers},
                            rounds=args.rounds, min_time_s=args.min_time, noisy=noisy, sync=sync,
                            label=f"training step {shape[0]}x{shape[1]} K={k}")
        best = min(others, key=ms.get)
        auto = dispatch.decide("auto", p.device, p.dtype, k, shape).backend
        train_rows.append([f"{shape[0]}x{shape[1]}", str(k)] + [fmt(ms.get(b)) for b in layers]
                          + [auto, best, f"{ms['auto'] / ms[best]:.2f}"])
    print(header(args) + "\n")
    print(f"## delta_weight on {device.type}, no grad: median ms (reference = the paper's torch.fft formulation; "
          f"err = float32 result against the float64 oracle)\n")
    print(table(["shape", "K"] + backends + [f"reference/{ext}"] + [f"{b}/{ext}" for b in others if b != ext]
                + [f"err {b}" for b in others] + ["auto picks"], dw_rows))
    print(f"\n## LFMALinear training step (forward + backward) on {device.type}, {args.tokens} tokens: median ms\n")
    print(table(["shape", "K"] + layers + ["auto picks", "best single", "auto/best"], train_rows))
    _print_noisy(noisy)


def _print_noisy(noisy: List[str]) -> None:
    if noisy:
        print("\nMeasured while other processes loaded the machine (treat with care):")
        for item in noisy:
            print(f"- {item}")


# ---------------------------------------------------------------------------------------------
# crossover
# ---------------------------------------------------------------------------------------------
def crossover(args: argparse.Namespace) -> None:
    from lfma_kernels.ops import cpp_ops, torch_ops

    ops = torch.ops.lfma_ext
    codes = cpp_ops.ALGO_CODES
    shapes = parse_shapes(args.shapes)
    ks = [int(k) for k in args.ks.split(",")]
    rows_dw, rows_g, noisy = [], [], []
    for shape in shapes:
        d_out, d_in = shape
        gen = torch.Generator().manual_seed(0)
        grad = torch.randn(shape, generator=gen)
        for k in ks:
            if k > d_out * d_in:
                continue
            rows = torch.randint(0, d_out, (k,), generator=gen)
            cols = torch.randint(0, d_in, (k,), generator=gen)
            c = torch.randn(k, 2, generator=gen)
            print(f"{d_out}x{d_in} K={k}", file=sys.stderr, flush=True)
            # The separable product costs 2K*M*N: skip it where it would take seconds.
            algos = [a for a in ALGOS if a != "separable" or 2 * k * d_out * d_in <= args.max_sep_macs]

            def row(label: str, what: str, fns: dict) -> List[str]:
                """Time every algorithm and the torch kernel; the table row, with the cost model's pick."""
                ms = interleaved_ms(fns, rounds=args.rounds, noisy=noisy, label=f"{label} {d_out}x{d_in} K={k}")
                best = min(algos, key=ms.get)
                decided = dispatch.decide("cpp", "cpu", torch.float32, k, shape)
                model = decided.dw if what == "dw" else decided.grad
                return ([f"{d_out}x{d_in}", str(k)] + [fmt(ms.get(a)) for a in ALGOS]
                        + [fmt(ms["torch"]), best, model, f"{ms[model] / ms[best]:.2f}" if model in ms else "-",
                           f"{ms['torch'] / ms[model]:.2f}" if model in ms else "-"])

            fns = {a: (lambda a=a: ops.delta_weight(c, rows, cols, d_out, d_in, 1.0, codes[a])) for a in algos}
            torch_way = dispatch.decide("torch", "cpu", torch.float32, k, shape)
            fns["torch"] = lambda: torch_ops.KERNELS.delta_weight(c, rows, cols, shape, 1.0, torch_way.dw)
            rows_dw.append(row("dW", "dw", fns))
            fns = {a: (lambda a=a: ops.coeff_grad(grad, rows, cols, 1.0, codes[a])) for a in algos}
            fns["torch"] = lambda: torch_ops.KERNELS.coeff_grad(grad, rows, cols, 1.0, torch_way.grad)
            rows_g.append(row("grad", "grad", fns))
    cols = ["shape", "K"] + list(ALGOS) + ["torch", "best", "model", "model/best", "torch/model"]
    print(header(args) + "\n")
    print("## dW (lfma_ext.delta_weight per algorithm; torch = the torch backend's kernel): median ms\n")
    print(table(cols, rows_dw))
    print("\n## dL/dcoeffs from G (lfma_ext.coeff_grad per algorithm): median ms\n")
    print(table(cols, rows_g))
    _print_noisy(noisy)


# ---------------------------------------------------------------------------------------------
# batch gradient paths
# ---------------------------------------------------------------------------------------------
def batch_grad(args: argparse.Namespace) -> None:
    """dL/dcoeffs of a linear layer from x and g = dL/dout by each path of the cpp backend's backward:
    dense (G = g^T x, then lfma_ext.coeff_grad), gemm (torch_kernels.coeff_grad_batch_gemm) and fft
    (lfma_ext.coeff_grad_batch), plus the two row FFTs alone. The fft path's cost per (token,
    frequency) pair beyond its FFTs, in GEMM multiply-adds, times the GEMM's, is the planner's CPU
    batch_pair_s["cpp"]."""
    from lfma_kernels.ops import torch_kernels

    ops = torch.ops.lfma_ext
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(1024, 768, generator=gen), torch.randn(768, 768, generator=gen)
    gemm_ms = interleaved_ms({"gemm": lambda: a @ b}, rounds=args.rounds)["gemm"]
    mac_ps = gemm_ms * 1e9 / (1024 * 768 * 768)
    out, noisy = [], []
    for shape in parse_shapes(args.shapes):
        d_out, d_in = shape
        for tokens in [int(t) for t in args.token_counts.split(",")]:
            x = torch.randn(tokens, d_in, generator=gen)
            g = torch.randn(tokens, d_out, generator=gen)
            for k in [int(k) for k in args.ks.split(",")]:
                if k > d_out * d_in:
                    continue
                # Top-K of a random matrix: conjugate pairs, as the paper's selection picks them.
                sel = lfma.select_frequencies(torch.randn(shape, generator=gen), k)
                rows, cols = sel.rows, sel.cols
                print(f"{d_out}x{d_in} tokens={tokens} K={k}", file=sys.stderr, flush=True)
                fns = {"dense": lambda: ops.coeff_grad(g.T @ x, rows, cols, 1.0, 0),
                       "fft": lambda: ops.coeff_grad_batch(x, g, rows, cols, 1.0),
                       "row ffts": lambda: (torch.fft.rfft(x, dim=1), torch.fft.rfft(g, dim=1))}
                if 2 * k * tokens * (d_out + d_in) <= args.max_sep_macs:
                    fns["gemm"] = lambda: torch_kernels.coeff_grad_batch_gemm(x, g, rows, cols, shape, 1.0,
                                                                              torch.float32)
                ms = interleaved_ms(fns, rounds=args.rounds, noisy=noisy,
                                    label=f"{d_out}x{d_in} tokens={tokens} K={k}")
                pair = (ms["fft"] - ms["row ffts"]) * 1e9 / mac_ps / (tokens * k)
                best = min(("dense", "gemm", "fft"), key=lambda p: ms.get(p, math.inf))
                model = dispatch.decide("cpp", "cpu", torch.float32, k, shape, tokens=tokens).backward
                out.append([f"{d_out}x{d_in}", str(tokens), str(k)]
                           + [fmt(ms.get(p)) for p in ("dense", "gemm", "fft", "row ffts")]
                           + [f"{pair:.0f}", best, model, f"{ms[model] / ms[best]:.2f}"])
    print(header(args) + "\n")
    print(f"## dL/dcoeffs of a linear layer by backward path (cpp backend): median ms; GEMM {mac_ps:.1f} ps per "
          f"multiply-add; pair = (fft - row ffts) per token and frequency, in GEMM multiply-adds\n")
    print(markdown_table(["shape", "tokens", "K", "dense", "gemm", "fft", "row ffts", "pair", "best", "model",
                          "model/best"], out, [False] + [True] * 7 + [False, False, True]))
    _print_noisy(noisy)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--crossover", action="store_true", help="time every CPU algorithm over K and shapes")
    parser.add_argument("--batch-grad", action="store_true",
                        help="time the backward's dL/dcoeffs paths (dense, gemm, fft) over shapes, tokens and K")
    parser.add_argument("--shapes", default=CROSSOVER_SHAPES,
                        help=f"--crossover/--batch-grad shapes (default {CROSSOVER_SHAPES})")
    parser.add_argument("--ks", default=CROSSOVER_KS, help=f"--crossover/--batch-grad K values (default {CROSSOVER_KS})")
    parser.add_argument("--token-counts", default="256,1024,4096", help="--batch-grad token counts")
    parser.add_argument("--device", default="cpu",
                        help="cpu (backend cpp) or cuda (backend cuda against triton) for the acceptance tables")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per training step (default 4096)")
    parser.add_argument("--rounds", type=int, default=21, help="timed rounds per comparison (default 21)")
    parser.add_argument("--min-time", type=float, default=1.0, help="at least this many seconds per comparison")
    parser.add_argument("--output", help="also write the tables as a section of this Markdown results file")
    parser.add_argument("--max-sep-macs", type=float, default=4e9,
                        help="--crossover: skip the separable product beyond this many multiply-adds")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    ext = "cuda" if args.device.startswith("cuda") else "cpp"
    if (args.crossover or args.batch_grad) and ext == "cuda":
        parser.error("--crossover and --batch-grad time the CPU kernels; use them with --device cpu")
    if ext not in lfma.available_backends():
        print(f"backend {ext!r} is not available: {dispatch.unavailable_reason(ext)}", file=sys.stderr)
        return 2
    warnings.simplefilter("ignore", UserWarning)
    mode, run = (("crossover", crossover) if args.crossover else ("batch-grad", batch_grad) if args.batch_grad
                 else ("acceptance", acceptance))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        run(args)
    print(printed.getvalue(), end="")
    if args.output:
        title = f"## C++/CUDA extension, {mode}: {args.device} (benchmarks/bench_cpp.py)\n\n"
        write_section(args.output, f"cpp {mode} {args.device}", title + printed.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
