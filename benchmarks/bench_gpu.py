#!/usr/bin/env python3
"""GPU benchmark of the triton backend against the paper's formulation, the torch backend, a frozen
nn.Linear and the analytic floor: triton.testing.do_bench medians, all columns measured in one run.

Three tables (shapes 768x768, 1024x1024, 768x3072, 3072x768, 4096x4096; ratios 0.0001, 0.0003,
0.0016, 0.05; K = lfma.num_frequencies(shape, ratio)):

  delta_weight   dW = alpha Re(ifft2(F)): forward (no grad) and forward + backward
  training step  LFMALinear forward + backward, 4096 and 16384 tokens, bfloat16 and float32
                 activations/weight (float32 coefficients); triton also replayed as a CUDA graph
  eval forward   LFMALinear.eval() under no_grad (cached W + dW), 4096 tokens

then the acceptance checks of the Triton issue (PASS/FAIL per figure), and the table printed last.
The problems and timed functions are benchmarks/common.py's (bench_layer.py's too); "paper" is
lfma_kernels.reference (dense complex spectrum, ifft2, second GEMM, autograd through ifft2). "auto" resolves to triton
on CUDA; triton itself runs its fused kernel or the FFT path per K, as the planner says
(lfma_kernels/ops/cost_tables.py, the CUDA table).

    PYTHONPATH=. python benchmarks/bench_gpu.py --output $OUT/RESULTS_GPU.md       # full run
    PYTHONPATH=. python benchmarks/bench_gpu.py --quick                            # 768x768, 1024x1024
    PYTHONPATH=. python benchmarks/bench_gpu.py --crossover                        # cost-model constants

--output writes (or replaces) the section "gpu triton" of a results file in benchmarks/RESULTS.md's
format (benchmarks/report.py); the file is rewritten after every shape, so a run cut short keeps
what it measured. --crossover times the fused kernels against the FFT path over K and prints the
crossover K per shape and the triton entries of the planner's CUDA cost table
(lfma_kernels/ops/cost_tables.py) that reproduce it (which replace the estimates there), and the three
coefficient-gradient paths of a layer's backward (what a decision's `backward` chooses between);
--json writes the same entries, crossovers and gradient paths machine-readably. Both modes start no new shape (tables:
no new case) once --budget-s has passed.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from common import (FULL_RATIOS, PAPER, QUICK_SHAPES, Problem, backend_runs, cases, delta_weight_fn,
                    eval_forward_fn, frozen_eval_forward_fn, frozen_train_step_fn, make_inputs, make_problem,
                    paper_eval_forward_fn, parse_ratios, parse_shapes, train_step_fn, training_floor)  # first: puts lfma_kernels on the path

import torch  # noqa: E402

from costfit import crossover_k, describe, fit_nlogn, write_json  # noqa: E402
from lfma_kernels.ops import dispatch, torch_kernels  # noqa: E402
from report import fmt_ms, fmt_ratio, machine_info, markdown_table, write_section  # noqa: E402

FULL_SHAPES = "768x768,1024x1024,768x3072,3072x768,4096x4096"
TRAIN_TOKENS = "4096,16384"
EVAL_TOKENS = 4096
DTYPES = "bfloat16,float32"
SECTION = "gpu triton"
COLUMNS = [PAPER, "torch", "triton"]          # measured LFMA columns ("auto" = whichever it picks)

# Acceptance figures of the Triton issue.
HEADLINE = {(768, 768): 176, (1024, 1024): 314}   # delta_weight >= 5x the reference up to these K
DW_SPEEDUP, TRAIN_TOKENS_GATE, FLOOR_FACTOR, PAPER_FACTOR, EVAL_FACTOR = 5.0, 16384, 1.15, 1.8, 1.05

Shape = Tuple[int, int]


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
def cuda_graph(step: Callable[[], None]) -> Callable[[], None]:
    """``step`` captured once in a CUDA graph (after a warmup on a side stream, which also runs
    Triton's autotuning and builds the phase tables); returns the replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


@dataclass
class Bench:
    warmup_ms: int
    rep_ms: int
    errors: List[str] = field(default_factory=list)

    def __call__(self, label: str, make: Callable[[], Callable[[], None]], *, graph: bool = False) -> Optional[float]:
        """Median ms (triton.testing.do_bench) of the function ``make()`` builds; None if it raises."""
        from triton.testing import do_bench
        try:
            fn = make()
            fn()  # first call outside the timing: autotuning, tables, caches
            if graph:
                fn = cuda_graph(fn)
            return float(do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median"))
        except Exception as exc:  # one broken cell must not lose the table
            message = f"{label}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            self.errors.append(message)
            print(f"  ERROR {message}", file=sys.stderr, flush=True)
            return None
        finally:
            gc.collect()
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# the main tables
# ---------------------------------------------------------------------------------------------
@dataclass
class Results:
    delta_weight: List[dict] = field(default_factory=list)
    train: List[dict] = field(default_factory=list)
    eval: List[dict] = field(default_factory=list)


def _columns(p: Problem) -> List[str]:
    return [c for c in COLUMNS if backend_runs(p, c)]


def _auto(p: Problem, dtype: torch.dtype) -> str:
    return dispatch.decide("auto", p.device, dtype, p.k, p.shape).backend


def _path(p: Problem) -> str:
    return "kernel" if dispatch.decide("triton", p.device, p.dtype, p.k, p.shape).dw == "separable" else "fft"


def run_delta_weight(p: Problem, bench: Bench, res: Results) -> None:
    tag = f"{p.shape[0]}x{p.shape[1]} K={p.k}"
    for backward in (False, True):
        row = {"shape": p.shape, "ratio": p.ratio, "k": p.k, "kind": "fwd+bwd" if backward else "fwd",
               "auto": _auto(p, p.coeffs.dtype), "path": _path(p), "ms": {}}
        for name in _columns(p):
            row["ms"][name] = bench(f"{tag} delta_weight {row['kind']} {name}",
                                    lambda: delta_weight_fn(p, name, backward=backward))
        res.delta_weight.append(row)


def run_layer(p: Problem, tokens_list: Sequence[int], bench: Bench, res: Results) -> None:
    dtype_name = str(p.dtype).replace("torch.", "")
    tag = f"{p.shape[0]}x{p.shape[1]} K={p.k} {dtype_name}"
    for tokens in tokens_list:
        x, g = make_inputs(p, tokens, requires_grad=True)
        row = {"shape": p.shape, "ratio": p.ratio, "k": p.k, "tokens": tokens, "dtype": dtype_name,
               "auto": _auto(p, p.dtype), "floor": training_floor(p.shape, p.k), "ms": {},
               "grad": dispatch.decide("triton", p.device, p.dtype, p.k, p.shape, tokens=tokens).backward}
        for name in _columns(p):
            row["ms"][name] = bench(f"{tag} train {tokens} {name}", lambda: train_step_fn(p, name, x, g))
        if "triton" in row["ms"]:
            row["ms"]["triton+graph"] = bench(f"{tag} train {tokens} triton+graph",
                                              lambda: train_step_fn(p, "triton", x, g), graph=True)
        row["ms"]["frozen"] = bench(f"{tag} train {tokens} frozen", lambda: frozen_train_step_fn(p, x, g))
        res.train.append(row)
    x, _ = make_inputs(p, EVAL_TOKENS, requires_grad=False)
    row = {"shape": p.shape, "ratio": p.ratio, "k": p.k, "tokens": EVAL_TOKENS, "dtype": dtype_name,
           "auto": _auto(p, p.dtype), "floor": 1.0, "ms": {}}
    row["ms"][PAPER] = bench(f"{tag} eval paper", lambda: paper_eval_forward_fn(p, x))
    for name in _columns(p):
        if name != PAPER:
            row["ms"][name] = bench(f"{tag} eval {name}", lambda: eval_forward_fn(p, name, x))
    row["ms"]["frozen"] = bench(f"{tag} eval frozen", lambda: frozen_eval_forward_fn(p, x))
    res.eval.append(row)


def _start(row: dict) -> List[str]:
    ratio = "-" if row["ratio"] is None else f"{row['ratio']:g}"
    return [f"{row['shape'][0]}x{row['shape'][1]}", ratio, str(row["k"])]


def delta_weight_table(res: Results) -> str:
    headers = ["shape", "ratio", "K", "pass", "paper", "torch", "triton", "triton path", "paper/triton",
               "paper/auto"]
    rows = []
    for r in res.delta_weight:
        ms = r["ms"]
        rows.append(_start(r) + [r["kind"]] + [fmt_ms(ms.get(c)) if c in ms else "n/a" for c in COLUMNS]
                    + [r["path"], fmt_ratio(ms.get(PAPER), ms.get("triton")),
                       fmt_ratio(ms.get(PAPER), ms.get(r["auto"]))])
    return markdown_table(headers, rows, [False, True, True, False] + [True] * 3 + [False, True, True])


def train_table(res: Results) -> str:
    headers = ["shape", "ratio", "K", "tokens", "dtype", "paper", "torch", "triton", "triton+graph", "frozen",
               "grad path", "floor", "triton/frozen", "graph/frozen", "triton/floor", "paper/triton"]
    rows = []
    for r in res.train:
        ms = r["ms"]
        frozen = ms.get("frozen")
        floor_ms = None if frozen is None else frozen * r["floor"]
        rows.append(_start(r) + [str(r["tokens"]), r["dtype"]]
                    + [fmt_ms(ms.get(c)) if c in ms else "n/a" for c in COLUMNS + ["triton+graph", "frozen"]]
                    + [r["grad"], f"{r['floor']:.2f}x", fmt_ratio(ms.get("triton"), frozen),
                       fmt_ratio(ms.get("triton+graph"), frozen), fmt_ratio(ms.get("triton"), floor_ms),
                       fmt_ratio(ms.get(PAPER), ms.get("triton"))])
    right = [False, True, True, True, False] + [True] * 5 + [False] + [True] * 5
    return markdown_table(headers, rows, right)


def eval_table(res: Results) -> str:
    headers = ["shape", "ratio", "K", "dtype", "paper", "torch", "triton", "frozen", "triton/frozen", "paper/frozen"]
    rows = []
    for r in res.eval:
        ms = r["ms"]
        rows.append(_start(r) + [r["dtype"]] + [fmt_ms(ms.get(c)) if c in ms else "n/a" for c in COLUMNS + ["frozen"]]
                    + [fmt_ratio(ms.get("triton"), ms.get("frozen")), fmt_ratio(ms.get(PAPER), ms.get("frozen"))])
    return markdown_table(headers, rows, [False, True, True, False] + [True] * 6)


def acceptance(res: Results) -> List[str]:
    """The issue's GPU acceptance figures, each with PASS/FAIL (or "not measured")."""
    lines = []

    def check(ok: Optional[bool], text: str) -> None:
        lines.append(f"- {'not measured' if ok is None else ('PASS' if ok else 'FAIL')}: {text}")

    for shape, k_max in HEADLINE.items():
        rows = [r for r in res.delta_weight if r["shape"] == shape and r["k"] <= k_max and r["kind"] == "fwd"]
        ratios = [r["ms"][PAPER] / r["ms"]["triton"] for r in rows if r["ms"].get(PAPER) and r["ms"].get("triton")]
        check(min(ratios) >= DW_SPEEDUP if ratios else None,
              f"delta_weight {shape[0]}x{shape[1]}, K <= {k_max}: paper/triton >= {DW_SPEEDUP:g}x "
              f"(min {min(ratios):.2f}x)" if ratios else f"delta_weight {shape[0]}x{shape[1]}, K <= {k_max}")
    slower = [r for r in res.delta_weight
              if r["ms"].get(PAPER) and r["ms"].get(r["auto"]) and r["ms"][r["auto"]] > r["ms"][PAPER]]
    measured = [r for r in res.delta_weight if r["ms"].get(PAPER) and r["ms"].get(r["auto"])]
    check(not slower if measured else None,
          "auto never slower than the reference for delta_weight"
          + "".join(f"; slower at {r['shape'][0]}x{r['shape'][1]} K={r['k']} {r['kind']}" for r in slower))
    for r in res.train:
        if r["tokens"] != TRAIN_TOKENS_GATE or r["dtype"] != "bfloat16":
            continue
        ms = r["ms"]
        best = min([v for v in (ms.get("triton"), ms.get("triton+graph")) if v], default=None)
        tag = f"train {r['shape'][0]}x{r['shape'][1]} K={r['k']} {TRAIN_TOKENS_GATE} tokens bf16"
        if best is None or not ms.get("frozen") or not ms.get(PAPER):
            check(None, tag)
            continue
        to_floor = best / (ms["frozen"] * r["floor"])
        speedup = ms[PAPER] / best
        check(to_floor <= FLOOR_FACTOR and speedup >= PAPER_FACTOR,
              f"{tag}: {to_floor:.2f}x the floor (<= {FLOOR_FACTOR}), {speedup:.2f}x faster than the paper "
              f"(>= {PAPER_FACTOR})")
    for r in res.eval:
        ms = r["ms"]
        tag = f"eval {r['shape'][0]}x{r['shape'][1]} K={r['k']} {r['tokens']} tokens {r['dtype']}"
        if ms.get("triton") and ms.get("frozen"):
            ratio = ms["triton"] / ms["frozen"]
            check(ratio <= EVAL_FACTOR, f"{tag}: triton/frozen {ratio:.3f} (<= {EVAL_FACTOR})")
        else:
            check(None, tag)
    return lines


def summary_table(res: Results) -> str:
    """One row per (shape, ratio): the figures the acceptance checks read, compact enough to be the
    last thing the run prints."""
    headers = ["shape", "ratio", "K", "dW paper/triton", "train bf16 16k: triton/floor", "graph/floor",
               "paper/triton", "eval triton/frozen"]
    rows = []
    for dw in [r for r in res.delta_weight if r["kind"] == "fwd"]:
        key = (dw["shape"], dw["k"])
        train = next((r for r in res.train if (r["shape"], r["k"]) == key and r["tokens"] == TRAIN_TOKENS_GATE
                      and r["dtype"] == "bfloat16"), None)
        ev = [r for r in res.eval if (r["shape"], r["k"]) == key]
        cells = [fmt_ratio(dw["ms"].get(PAPER), dw["ms"].get("triton"))]
        if train:
            ms = train["ms"]
            floor_ms = ms["frozen"] * train["floor"] if ms.get("frozen") else None
            cells += [fmt_ratio(ms.get("triton"), floor_ms), fmt_ratio(ms.get("triton+graph"), floor_ms),
                      fmt_ratio(ms.get(PAPER), ms.get("triton"))]
        else:
            cells += ["-", "-", "-"]
        cells.append(" / ".join(fmt_ratio(r["ms"].get("triton"), r["ms"].get("frozen")) for r in ev) or "-")
        rows.append(_start(dw) + cells)
    return markdown_table(headers, rows, [False, True, True] + [True] * 5)


def render(args: argparse.Namespace, res: Results, errors: List[str], done: bool) -> Tuple[str, str]:
    from lfma_kernels.ops import triton_ops
    header = ["## Triton backend on the GPU (benchmarks/bench_gpu.py)", ""]
    header += [f"- {k}: {v}" for k, v in machine_info(args.device, ", ".join(args.dtypes) + " activations")]
    header += [f"- command: `python benchmarks/bench_gpu.py {' '.join(args.argv)}`",
               f"- triton dot precision: {triton_ops.get_dot_precision()}; run "
               f"{'complete' if done else 'INCOMPLETE (cut short; tables hold what was measured)'}", ""]
    header += [
        "Median milliseconds from `triton.testing.do_bench` (L2 flushed between runs), all columns measured "
        "in this run. `paper`: `lfma_kernels.reference`; `torch`/`triton`: `LFMALinear(..., backend=...)`; "
        "`auto` is triton on CUDA. `triton path`: the fused kernel or the FFT path (the decision's `dw`). "
        "`triton+graph`: the same training step replayed as a CUDA graph. `frozen`: the `nn.Linear` alone "
        "(training = forward + dL/dx). `floor` (docs/math.md, the cost floor): "
        "`1 + min(d_out*d_in, 2K(d_out+d_in)) / (2*d_out*d_in)` times the frozen step; eval floor 1.",
    ]
    body = ["### Acceptance (Triton issue)", ""] + acceptance(res) + [""]
    body += ["### delta_weight", "", delta_weight_table(res), ""]
    body += ["### Layer training step (forward + backward)", "", train_table(res), ""]
    body += [f"### Layer eval forward, {EVAL_TOKENS} tokens, no_grad, cached W + dW", "", eval_table(res), ""]
    if errors:
        body += ["### Errors", ""] + [f"- {e}" for e in errors] + [""]
    body += [f"### Summary (eval: {' / '.join(args.dtypes)})", "", summary_table(res), ""]
    return "\n".join(header) + "\n", "\n".join(body)


def run_tables(args: argparse.Namespace) -> int:
    bench = Bench(args.warmup_ms, args.rep_ms)
    res = Results()
    start = time.perf_counter()
    done = True

    def over_budget(left) -> bool:
        nonlocal done
        if time.perf_counter() - start <= args.budget_s:
            return False
        names = ", ".join(f"{s[0]}x{s[1]}@{r:g}" for s, r in left)
        print(f"time budget of {args.budget_s:.0f} s spent; not measured: {names} "
              f"(run them with --shapes/--ratios)", file=sys.stderr)
        bench.errors.append(f"not measured (time budget): {names}")
        done = False
        return True

    for shape, ratio, k in cases(args.shapes, args.ratios, stop=over_budget):
        for j, dtype_name in enumerate(args.dtypes):
            p = make_problem(shape, k, ratio=ratio, device=args.device, dtype=getattr(torch, dtype_name))
            if j == 0:
                run_delta_weight(p, bench, res)
            run_layer(p, args.tokens, bench, res)
            del p
            gc.collect()
            torch.cuda.empty_cache()
        if args.output:  # keep what was measured if the run is cut short
            header, body = render(args, res, bench.errors, done=False)
            write_section(args.output, SECTION, header + "\n" + body)
    header, body = render(args, res, bench.errors, done=done)
    if args.output:
        write_section(args.output, SECTION, header + "\n" + body)
        print(f"wrote section '{SECTION}' of {args.output}", file=sys.stderr)
    print(f"done in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    print(header)
    print(body, end="")
    return 1 if bench.errors else 0


# ---------------------------------------------------------------------------------------------
# crossover mode: the planner's triton entries (CUDA table) and the backward's gradient paths
# ---------------------------------------------------------------------------------------------
def _random_problem(shape: Shape, k: int, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, shape[0], (k,), generator=gen).to(device)
    cols = torch.randint(0, shape[1], (k,), generator=gen).to(device)
    coeffs = torch.randn(k, 2, generator=gen).to(device)
    return coeffs, rows, cols


def _over_budget(args: argparse.Namespace, start: float, what: str, skipped: List[str]) -> bool:
    """Whether the time budget is spent; if so, ``what`` is recorded as not measured."""
    if time.perf_counter() - start <= args.budget_s:
        return False
    skipped.append(what)
    print(f"time budget of {args.budget_s:.0f} s spent; not measured: {what}", file=sys.stderr, flush=True)
    return True


def run_crossover(args: argparse.Namespace) -> int:
    from lfma_kernels.ops import triton_ops
    bench = Bench(args.warmup_ms, args.rep_ms)
    dev = args.device
    start = time.perf_counter()
    ks = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
    lines = [f"# triton kernel vs FFT path ({torch.cuda.get_device_name(torch.device(dev))}, "
             f"dot precision {triton_ops.get_dot_precision()}, median ms)", ""]
    rows, rates, fft_fwd, fft_bwd, skipped = [], [], [], [], []
    summary, times_json, crossovers = [], [], {}
    for shape in args.shapes:
        spec = f"{shape[0]}x{shape[1]}"
        if _over_budget(args, start, f"crossover {spec}", skipped):
            continue
        print(f"crossover {spec} ({time.perf_counter() - start:.0f} s elapsed)", file=sys.stderr, flush=True)
        n = shape[0] * shape[1]
        g = torch.randn(shape, device=dev)
        times: Dict[str, List[Optional[float]]] = {"kern": [], "fft": [], "gkern": [], "gfft": []}
        used = [k for k in ks if k <= n]
        for k in used:
            c, r, cl = _random_problem(shape, k, dev)
            t = {
                "kern": bench(f"{shape} K={k} kernel", lambda: lambda: triton_ops._launch_delta_weight(c, r, cl, shape, 1.0)),
                "fft": bench(f"{shape} K={k} fft", lambda: lambda: torch_kernels.delta_weight_fft(c, r, cl, shape, 1.0)),
                "gkern": bench(f"{shape} K={k} grad kernel", lambda: lambda: triton_ops._launch_coeff_grad(g, r, cl, 1.0)),
                "gfft": bench(f"{shape} K={k} grad fft", lambda: lambda: torch_kernels.coeff_grad_fft(g, r, cl, 1.0)),
            }
            for key, v in t.items():
                times[key].append(v)
            if t["kern"] and k >= 64:
                rates.append(2.0 * k * n / (t["kern"] * 1e-3))
            decided = dispatch.decide("triton", "cuda", torch.float32, k, shape)
            model = ["kernel" if decided.dw == "separable" else "fft", "kernel" if decided.grad == "separable" else "fft"]
            rows.append([spec, str(k)] + [fmt_ms(t[key]) for key in ("kern", "fft", "gkern", "gfft")] + model)
            times_json.append({"shape": spec, "k": k, "kernel_ms": t["kern"], "fft_ms": t["fft"],
                               "grad_kernel_ms": t["gkern"], "grad_fft_ms": t["gfft"], "model_dW": model[0],
                               "model_grad": model[1]})
        fwd = [v for v in times["fft"] if v]
        bwd = [v for v in times["gfft"] if v]
        if fwd:
            fft_fwd.append((n, statistics.median(fwd)))
        if bwd:
            fft_bwd.append((n, statistics.median(bwd)))
        crossovers[spec] = {"dW": crossover_k(used, times["kern"], times["fft"]),
                            "grad": crossover_k(used, times["gkern"], times["gfft"])}
        summary.append([spec, describe(crossovers[spec]["dW"]), describe(crossovers[spec]["grad"])])
    lines += [markdown_table(["shape", "K", "kernel dW", "fft dW", "kernel grad", "fft grad", "model dW", "model grad"],
                             rows, [False, True, True, True, True, True, False, False]), ""]
    lines += ["Measured crossover K (the FFT path is faster from there on):", "",
              markdown_table(["shape", "dW", "grad"], summary, [False, True, True]), ""]

    a_f, b_f = fit_nlogn(fft_fwd)
    a_g, b_g = fit_nlogn(fft_bwd)
    rate = statistics.median(rates) if rates else float("nan")
    constants = {"triton_macs_per_s": rate, "triton_fft_fixed_s": a_f, "triton_fft_grad_fixed_s": a_g,
                 "triton_fft_s": b_f, "triton_fft_grad_s": b_g}
    lines += ["Entries of the planner's CUDA table (lfma_kernels/ops/cost_tables.py; replace the estimates there):", "",
              f"    triton_mac_s = 1 / {rate:.3g}",
              f"    triton_fft_fixed_s = {a_f:.3g}",
              f"    triton_fft_grad_fixed_s = {a_g:.3g}",
              f"    triton_fft_s = {b_f:.3g}   # (gradient fit: {b_g:.3g})", ""]

    # The backward's three ways to dL/dcoeffs (the CUDA table's backward entries are the CPU's multiples).
    grad_rows, grad_json = [], []
    for shape in args.shapes:
        spec = f"{shape[0]}x{shape[1]}"
        if _over_budget(args, start, f"coefficient-gradient paths {spec}", skipped):
            continue
        print(f"gradient paths {spec} ({time.perf_counter() - start:.0f} s elapsed)", file=sys.stderr, flush=True)
        for tokens in args.tokens:
            for k in (16, 64, 176, 512, 2048):
                if k > shape[0] * shape[1]:
                    continue
                c, r, cl = _random_problem(shape, k, dev)
                x = torch.randn(tokens, shape[1], device=dev, dtype=torch.bfloat16)
                gy = torch.randn(tokens, shape[0], device=dev, dtype=torch.bfloat16)
                decided = dispatch.decide("triton", "cuda", torch.float32, k, shape, tokens=tokens)
                dense = bench(f"{shape} {tokens} K={k} dense", lambda: lambda: triton_ops.KERNELS.coeff_grad(
                    (gy.T @ x).float(), r, cl, 1.0, decided.grad))
                gemm = bench(f"{shape} {tokens} K={k} gemm", lambda: lambda: triton_ops.coeff_grad_batch_gemm(
                    x, gy, r, cl, shape, 1.0, torch.float32))
                fft = bench(f"{shape} {tokens} K={k} fft", lambda: lambda: torch_kernels.coeff_grad_batch_fft(
                    x, gy, r, cl, shape, 1.0, torch.float32))
                measured = {"dense": dense, "gemm": gemm, "fft": fft}
                best = min((v, name) for name, v in measured.items() if v is not None)[1] if any(measured.values()) else "-"
                model = decided.backward
                grad_rows.append([spec, str(tokens), str(k), fmt_ms(dense), fmt_ms(gemm), fmt_ms(fft), best, model])
                grad_json.append({"shape": spec, "tokens": tokens, "k": k, "dense_ms": dense, "gemm_ms": gemm,
                                  "fft_ms": fft, "fastest": best, "model": model})
    lines += ["Coefficient gradient of a layer's backward, bf16 activations (dense: G = g^T x then the "
              "triton gradient; gemm: the fused batch kernel; fft: torch_kernels.coeff_grad_batch_fft):", "",
              markdown_table(["shape", "tokens", "K", "dense", "gemm", "fft", "fastest", "decision picks"],
                             grad_rows, [False, True, True, True, True, True, False, False]), ""]
    if skipped:
        lines += ["Not measured (time budget): " + ", ".join(skipped), ""]
    if bench.errors:
        lines += ["Errors:", ""] + [f"- {e}" for e in bench.errors]
    text = "\n".join(lines)
    if args.output:
        write_section(args.output, SECTION + " crossover", text)
        print(f"wrote section '{SECTION} crossover' of {args.output}", file=sys.stderr)
    if args.json:
        write_json(args.json, {"script": f"benchmarks/bench_gpu.py {' '.join(args.argv)}",
                               "device": torch.cuda.get_device_name(torch.device(dev)),
                               "dot_precision": triton_ops.get_dot_precision(), "triton": constants,
                               "crossover_k": crossovers, "times": times_json, "coeff_grad_paths": grad_json,
                               "not_measured": skipped, "errors": bench.errors})
        print(f"wrote {args.json}", file=sys.stderr)
    print(text)
    return 1 if bench.errors else 0


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--quick", action="store_true", help=f"shapes {QUICK_SHAPES} only")
    parser.add_argument("--crossover", action="store_true", help="cost-model crossover mode (see above)")
    parser.add_argument("--shapes", type=parse_shapes, default=None, help=f"default {FULL_SHAPES}")
    parser.add_argument("--ratios", type=parse_ratios, default=None, help=f"default {FULL_RATIOS}")
    parser.add_argument("--tokens", default=TRAIN_TOKENS, help=f"training-step tokens (default {TRAIN_TOKENS})")
    parser.add_argument("--dtypes", default=DTYPES, help=f"activation/weight dtypes (default {DTYPES})")
    parser.add_argument("--precision", choices=("ieee", "tf32x3", "tf32"), default=None,
                        help="triton float32 dot precision (default: the library's, ieee)")
    parser.add_argument("--device", default="cuda", help="cuda or cuda:N (default cuda)")
    parser.add_argument("--warmup-ms", type=int, default=10, help="do_bench warmup (ms, default 10)")
    parser.add_argument("--rep-ms", type=int, default=50, help="do_bench measuring time (ms, default 50)")
    parser.add_argument("--budget-s", type=float, default=500.0,
                        help="start no new (shape, ratio) case, or crossover shape, after this many seconds (default "
                             "500: the whole run then fits one 10-minute call); the rest is listed as not measured")
    parser.add_argument("--output", metavar="PATH", help="write the tables as a section of this Markdown file")
    parser.add_argument("--json", metavar="PATH",
                        help="--crossover: also write the constants, crossovers and times as JSON here")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.shapes = args.shapes or parse_shapes(QUICK_SHAPES if args.quick else FULL_SHAPES)
    args.ratios = args.ratios or parse_ratios(FULL_RATIOS)
    try:
        args.tokens = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        parser.error(f"--tokens: comma-separated integers, got {args.tokens!r}")
    args.dtypes = [d.strip() for d in args.dtypes.split(",")]
    if any(d not in ("bfloat16", "float16", "float32") for d in args.dtypes):
        parser.error(f"--dtypes: bfloat16, float16 or float32, got {args.dtypes}")
    if not args.device.startswith("cuda"):
        parser.error("this benchmark needs a CUDA device (--device cuda[:N])")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(f"bench_gpu.py needs a CUDA GPU; torch {torch.__version__} sees none. Nothing was measured.",
              file=sys.stderr)
        return 2
    reason = dispatch.unavailable_reason("triton")
    if reason is not None:
        print(f"the triton backend is not available: {reason}", file=sys.stderr)
        return 2
    torch.cuda.set_device(torch.device(args.device))
    if args.precision:
        from lfma_kernels.ops import triton_ops
        triton_ops.set_dot_precision(args.precision)
    return run_crossover(args) if args.crossover else run_tables(args)


if __name__ == "__main__":
    sys.exit(main())
