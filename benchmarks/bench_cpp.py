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

--crossover: every CPU algorithm of the extension (separable, hybrid, fft2; csrc/cpu_kernels.cpp)
  for dW and for dL/dcoeffs from G, against the torch backend, over K and shapes; the columns
  "best" and "model" show the fastest measured and what the kernels' cost model picks. The cost
  model constants and the cpp/torch crossover of lfma_kernels/ops/dispatch.py come from here.

Candidates are timed round-robin (one run of each per round, in a random order, medians over the
rounds), so load from other processes falls on all of them alike; a comparison is repeated while
other processes use the CPUs, and reported if it never ran on a quiet machine.

    python benchmarks/bench_cpp.py                 # acceptance tables (about two minutes on 2 cores)
    python benchmarks/bench_cpp.py --device cuda   # the same for backend cuda on a GPU
    python benchmarks/bench_cpp.py --crossover
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
import bench_layer as B  # noqa: E402  (also puts the source tree on sys.path if needed)

import torch  # noqa: E402

lfma = B.lfma
from lfma_kernels.ops import dispatch  # noqa: E402
from report import fmt_ms, machine_info, markdown_table  # noqa: E402

ACCEPTANCE = [((768, 768), 176), ((768, 768), 943), ((1024, 1024), 104), ((1024, 1024), 524)]
CROSSOVER_SHAPES = "768x768,1024x1024,768x3072,3072x768,4096x4096"
CROSSOVER_KS = "1,2,4,8,16,32,64,104,176,524,943,2000,5000,29491"
ALGOS = ("separable", "hybrid", "fft2")


def _system_cpu_s() -> Tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat (Linux)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values) - idle) / tick, sum(values) / tick


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def other_load(fn: Callable[[], object]) -> Tuple[object, float]:
    """Run ``fn``; return its result and the fraction of the machine's CPU time that other
    processes used meanwhile (0 when /proc/stat is not there)."""
    try:
        busy0, total0 = _system_cpu_s()
    except OSError:
        return fn(), 0.0
    own0 = _own_cpu_s()
    result = fn()
    busy1, total1 = _system_cpu_s()
    others = (busy1 - busy0) - (_own_cpu_s() - own0)
    return result, max(0.0, others) / max(total1 - total0, 1e-9)


def wait_for_quiet(max_wait_s: float, threshold: float = 0.1) -> bool:
    """Wait (up to ``max_wait_s``) until other processes use under ``threshold`` of the CPUs."""
    deadline = time.time() + max_wait_s
    while True:
        _, load = other_load(lambda: time.sleep(0.5))
        if load < threshold:
            return True
        if time.time() > deadline:
            return False
        time.sleep(2.0)


def interleaved_ms(fns: Dict[str, Callable[[], object]], *, rounds: int, warmup: int = 2,
                   min_time_s: float = 0.0, tries: int = 4, max_wait_s: float = 120.0,
                   noisy: Optional[List[str]] = None, label: str = "",
                   sync: Optional[Callable[[], None]] = None) -> Dict[str, float]:
    """Median ms of each function, timed round-robin: ``rounds`` rounds (more while under
    ``min_time_s``), one call of every function per round, in a random order each round.

    On a shared machine, other processes' load distorts the medians badly (OpenMP threads wait
    whole scheduler slices for a descheduled peer), so the measurement waits for a quiet machine
    and is repeated (up to ``tries`` times) while others used over 10% of the CPUs; a result
    still measured under load is reported in ``noisy``. ``sync`` (torch.cuda.synchronize on a
    GPU) runs after every call, inside the timed region."""
    names = list(fns)
    sync = sync or (lambda: None)

    def measure() -> Dict[str, float]:
        for _ in range(warmup):
            for name in names:
                fns[name]()
        sync()
        times: Dict[str, List[float]] = {name: [] for name in names}
        start_all, r = time.perf_counter(), 0
        order_rng = random.Random(0)
        while r < rounds or time.perf_counter() - start_all < min_time_s:
            # A fresh order every round: with a fixed or rotating order each function would always
            # follow the same predecessor and inherit its effect on the caches.
            order = order_rng.sample(names, len(names))
            for name in order:
                start = time.perf_counter()
                fns[name]()
                sync()
                times[name].append((time.perf_counter() - start) * 1e3)
            r += 1
        return {name: statistics.median(t) for name, t in times.items()}

    for attempt in range(tries):
        wait_for_quiet(max_wait_s)
        result, load = other_load(measure)
        if load < 0.1:
            return result
        print(f"  {label}: other processes used {load:.0%} of the CPUs; measuring again", file=sys.stderr)
    if noisy is not None:
        noisy.append(f"{label} (other processes used {load:.0%} of the CPUs)")
    return result


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
        return extension.load("cpu")
    except RuntimeError as exc:
        return f"not available ({exc})"


# ---------------------------------------------------------------------------------------------
# acceptance
# ---------------------------------------------------------------------------------------------
def _accuracy(p, backend: str) -> float:
    """||dW - oracle|| / ||oracle|| for the problem's float32 coefficients, oracle in float64 on CPU."""
    with torch.no_grad():
        out = lfma.delta_weight(p.coeffs, p.rows, p.cols, p.shape, B.ALPHA, backend=backend).double().cpu()
        ref = lfma.reference.delta_weight(p.coeffs.detach().double().cpu(), p.rows.cpu(), p.cols.cpu(), p.shape,
                                          B.ALPHA)
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
        p = B.make_problem(shape, k, device=device)
        print(f"{shape[0]}x{shape[1]} K={k}", file=sys.stderr, flush=True)
        ms = interleaved_ms({b: B.delta_weight_fn(p, b, backward=False) for b in backends},
                            rounds=args.rounds, min_time_s=args.min_time, noisy=noisy, sync=sync,
                            label=f"delta_weight {shape[0]}x{shape[1]} K={k}")
        auto = dispatch.auto_backend(p.device, p.coeffs.dtype, k, shape)
        ratios = [f"{ms['reference'] / ms[ext]:.1f}x" if ext in ms else "-"]
        ratios += [f"{ms[b] / ms[ext]:.2f}" if ext in ms else "-" for b in others if b != ext]
        errors = [f"{_accuracy(p, b):.1e}" for b in others]
        dw_rows.append([f"{shape[0]}x{shape[1]}", str(k)] + [fmt(ms.get(b)) for b in backends] + ratios + errors
                       + [auto])

        x, g = B.make_inputs(p, args.tokens, requires_grad=True)
        layers = others + ["auto"]
        ms = interleaved_ms({b: B.train_step_fn(p, b, x, g) for b in layers},
                            rounds=args.rounds, min_time_s=args.min_time, noisy=noisy, sync=sync,
                            label=f"training step {shape[0]}x{shape[1]} K={k}")
        best = min(others, key=ms.get)
        auto = dispatch.auto_backend(p.device, p.dtype, k, shape)
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
    codes = cpp_ops.ALGOS
    shapes = B.parse_shapes(args.shapes)
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
            fns = {a: (lambda a=a: ops.delta_weight(c, rows, cols, d_out, d_in, 1.0, codes[a])) for a in algos}
            fns["torch"] = lambda: torch_ops._delta_weight(c, rows, cols, shape, 1.0)
            ms = interleaved_ms(fns, rounds=args.rounds, noisy=noisy, label=f"dW {d_out}x{d_in} K={k}")
            best = min(algos, key=ms.get)
            model = ALGOS[_model_pick(k, shape, True)]
            rows_dw.append([f"{d_out}x{d_in}", str(k)] + [fmt(ms.get(a)) for a in ALGOS] + [fmt(ms["torch"]), best,
                           model, f"{ms[model] / ms[best]:.2f}" if model in ms else "-",
                           f"{ms['torch'] / ms[model]:.2f}" if model in ms else "-"])
            fns = {a: (lambda a=a: ops.coeff_grad(grad, rows, cols, 1.0, codes[a])) for a in algos}
            fns["torch"] = lambda: torch_ops._coeff_grad(grad, rows, cols, 1.0)
            ms = interleaved_ms(fns, rounds=args.rounds, noisy=noisy, label=f"grad {d_out}x{d_in} K={k}")
            best = min(algos, key=ms.get)
            model = ALGOS[_model_pick(k, shape, False)]
            rows_g.append([f"{d_out}x{d_in}", str(k)] + [fmt(ms.get(a)) for a in ALGOS] + [fmt(ms["torch"]), best,
                          model, f"{ms[model] / ms[best]:.2f}" if model in ms else "-",
                          f"{ms['torch'] / ms[model]:.2f}" if model in ms else "-"])
    cols = ["shape", "K"] + list(ALGOS) + ["torch", "best", "model", "model/best", "torch/model"]
    print(header(args) + "\n")
    print("## dW (lfma_ext.delta_weight per algorithm; torch = the torch backend's kernel): median ms\n")
    print(table(cols, rows_dw))
    print("\n## dL/dcoeffs from G (lfma_ext.coeff_grad per algorithm): median ms\n")
    print(table(cols, rows_g))
    _print_noisy(noisy)


def _model_pick(k: int, shape: Tuple[int, int], inverse: bool) -> int:
    """The algorithm algo=-1 resolves to: the kernels' cost model (csrc/cpu_kernels.cpp choose_algo)."""
    return int(torch.ops.lfma_ext.choose_algo(k, shape[0], shape[1], inverse))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--crossover", action="store_true", help="time every CPU algorithm over K and shapes")
    parser.add_argument("--shapes", default=CROSSOVER_SHAPES, help=f"--crossover shapes (default {CROSSOVER_SHAPES})")
    parser.add_argument("--ks", default=CROSSOVER_KS, help=f"--crossover K values (default {CROSSOVER_KS})")
    parser.add_argument("--device", default="cpu",
                        help="cpu (backend cpp) or cuda (backend cuda against triton) for the acceptance tables")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per training step (default 4096)")
    parser.add_argument("--rounds", type=int, default=21, help="timed rounds per comparison (default 21)")
    parser.add_argument("--min-time", type=float, default=1.0, help="at least this many seconds per comparison")
    parser.add_argument("--max-sep-macs", type=float, default=4e9,
                        help="--crossover: skip the separable product beyond this many multiply-adds")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    ext = "cuda" if args.device.startswith("cuda") else "cpp"
    if args.crossover and ext == "cuda":
        parser.error("--crossover times the CPU algorithms; use it with --device cpu")
    if ext not in lfma.available_backends():
        print(f"backend {ext!r} is not available: {dispatch.unavailable_reason(ext)}", file=sys.stderr)
        return 2
    warnings.simplefilter("ignore", UserWarning)
    crossover(args) if args.crossover else acceptance(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
