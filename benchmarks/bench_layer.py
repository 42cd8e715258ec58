#!/usr/bin/env python3
"""LFMA against the paper's formulation and a frozen nn.Linear: median milliseconds, side by side.

Three tables, one row per (shape, top_k ratio), K = lfma.num_frequencies(shape, ratio):

  delta_weight   building dW = alpha * Re(ifft2(F)) (no grad), and forward + backward
  training step  LFMALinear forward + backward at --tokens tokens (default 4096)
  eval forward   LFMALinear.eval() under torch.no_grad() at --eval-tokens tokens (default 64)

"paper" is the paper's formulation, lfma_kernels.reference: a dense complex spectrum, ifft2 and a
second GEMM with dW, autograd through ifft2 (in training: LFMALinear(backend="reference"); in eval:
reference.lfma_linear, which recomputes ifft2 on every call as the paper's layer does). "auto"
and the other backends are LFMALinear(nn.Linear(d_in, d_out), k=K, backend=...), what users run.
"frozen" is the nn.Linear alone with its weight frozen (training: forward + dL/dx only).
"floor" is the analytic limit of docs/math.md (the cost floor) as a ratio to the frozen layer.

    python benchmarks/bench_layer.py --quick                 # about a minute on 2 CPU cores
    python benchmarks/bench_layer.py --output benchmarks/RESULTS.md
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from common import (FULL_RATIOS, PAPER, QUICK_SHAPES, Problem, Shape, backend_runs, cases, delta_weight_fn,
                    eval_forward_fn, frozen_eval_forward_fn, frozen_train_step_fn, lfma, make_inputs, make_problem, paper_eval_forward_fn, parse_ratios,
                    parse_shapes, train_step_fn, training_floor)  # first: puts lfma_kernels on the path

import torch  # noqa: E402

from lfma_kernels.ops import dispatch  # noqa: E402
from report import fmt_ms, fmt_ratio, machine_info, markdown_table, noisy_lines, write_section  # noqa: E402
from timing import interleaved_ms  # noqa: E402

FULL_SHAPES = "768x768,1024x1024,768x3072,4096x4096"
QUICK_RATIOS = "0.0003,0.0016"
# From this many weight entries on, a shape counts as large: fewer repeats (still >= 5), one warmup.
LARGE_NUMEL = 1 << 23
MIN_REPEATS = 5


# ---------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------
@dataclass
class Timer:
    repeats: int
    warmup: int
    min_time_s: float
    device: str
    errors: List[str]
    noisy: List[str]

    def __call__(self, label: str, makers: Dict[str, Callable[[], Callable[[], None]]], *,
                 min_time_s: Optional[float] = None) -> Dict[str, Optional[float]]:
        """Median ms of each function ``makers[name]()`` builds, all timed round-robin (one call of
        each per round, for at least ``min_time_s``, default the timer's), so the columns of a row
        see the same machine; None for a column whose build or first call raised (the error
        recorded: one broken cell must not lose the table)."""
        fns: Dict[str, Callable[[], None]] = {}
        out: Dict[str, Optional[float]] = {name: None for name in makers}
        for name, make in makers.items():
            try:
                fn = make()
                fn()  # the first call also builds caches, compiles, allocates
                fns[name] = fn
            except Exception as exc:
                message = f"{label} {name}: {type(exc).__name__}: {exc}"
                self.errors.append(message)
                print(f"  ERROR {message}", file=sys.stderr)
        if fns:
            sync = torch.cuda.synchronize if self.device.startswith("cuda") else None
            out.update(interleaved_ms(fns, rounds=self.repeats, warmup=self.warmup - 1, sync=sync, noisy=self.noisy,
                                      min_time_s=self.min_time_s if min_time_s is None else min_time_s, label=label))
        del fns
        gc.collect()
        return out


def timer_for(shape: Shape, args: argparse.Namespace, errors: List[str], noisy: List[str]) -> Timer:
    large = shape[0] * shape[1] >= LARGE_NUMEL
    repeats = args.repeats or (MIN_REPEATS if (args.quick or large) else 7)
    return Timer(repeats=repeats, warmup=1 if (args.quick or large) else 2,
                 min_time_s=0.1 if args.quick else 0.3, device=args.device, errors=errors, noisy=noisy)


@dataclass
class Results:
    backends: List[str]          # the non-paper columns: "auto" then the other available backends
    delta_weight: List[dict]
    train: List[dict]
    eval: List[dict]
    errors: List[str]
    noisy: List[str]             # comparisons measured while other processes loaded the machine


def run_case(p: Problem, backends: Sequence[str], args: argparse.Namespace, timer: Timer
             ) -> Tuple[List[dict], dict, dict]:
    """All measurements for one (shape, K): delta_weight rows, the training row, the eval row."""
    tag = f"{p.shape[0]}x{p.shape[1]} K={p.k}"
    runnable = [b for b in backends if b == "auto" or backend_runs(p, b)]
    base = {"shape": p.shape, "ratio": p.ratio, "k": p.k,
            "auto": dispatch.decide("auto", p.device, p.dtype, p.k, p.shape).backend}

    dw_rows = []
    for backward in (False, True):
        # delta_weight dispatches on the coefficients' dtype (float32), the layer on x's.
        row = dict(base, auto=dispatch.decide("auto", p.device, p.coeffs.dtype, p.k, p.shape).backend,
                   kind="fwd+bwd" if backward else "fwd")
        row["ms"] = timer(f"{tag} delta_weight {row['kind']}",
                          {name: (lambda name=name: delta_weight_fn(p, name, backward=backward))
                           for name in [PAPER] + runnable})
        dw_rows.append(row)

    x, g = make_inputs(p, args.tokens, requires_grad=True)
    makers = {name: (lambda name=name: train_step_fn(p, name, x, g)) for name in [PAPER] + runnable}
    makers["frozen"] = lambda: frozen_train_step_fn(p, x, g)
    train = dict(base, ms=timer(f"{tag} train", makers), floor=training_floor(p.shape, p.k))

    x, _ = make_inputs(p, args.eval_tokens, requires_grad=False)
    makers = {PAPER: lambda: paper_eval_forward_fn(p, x)}
    makers.update({name: (lambda name=name: eval_forward_fn(p, name, x)) for name in runnable})
    makers["frozen"] = lambda: frozen_eval_forward_fn(p, x)
    # Eval forwards at 64 tokens take well under a millisecond at the paper's shapes, where a few
    # rounds leave +-10% of scheduler noise: time them for longer (hundreds of rounds).
    ev = dict(base, ms=timer(f"{tag} eval", makers, min_time_s=timer.min_time_s * 5), floor=1.0)
    return dw_rows, train, ev


def run(args: argparse.Namespace) -> Results:
    dtype = getattr(torch, args.dtype)
    backends = ["auto"] + [b for b in lfma.available_backends() if b != PAPER]
    errors: List[str] = []
    noisy: List[str] = []
    results = Results(backends, [], [], [], errors, noisy)
    start = time.perf_counter()
    for shape, ratio, k in cases(args.shapes, args.ratios):
        p = make_problem(shape, k, ratio=ratio, device=args.device, dtype=dtype)
        dw_rows, train, ev = run_case(p, backends, args, timer_for(shape, args, errors, noisy))
        results.delta_weight.extend(dw_rows)
        results.train.append(train)
        results.eval.append(ev)
        del p
        gc.collect()
    print(f"done in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return results


# ---------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------
def _row_start(row: dict) -> List[str]:
    ratio = "-" if row["ratio"] is None else f"{row['ratio']:g}"
    return [f"{row['shape'][0]}x{row['shape'][1]}", ratio, str(row["k"])]


def _backend_headers(backends: Sequence[str]) -> List[str]:
    return ["paper"] + list(backends)


def delta_weight_table(res: Results) -> str:
    headers = ["shape", "ratio", "K", "pass"] + _backend_headers(res.backends) + ["auto picks", "speedup"]
    rows = []
    for r in res.delta_weight:
        ms = r["ms"]
        rows.append(_row_start(r) + [r["kind"]] + [fmt_ms(ms.get(b)) if b in ms else "n/a"
                                                   for b in [PAPER] + res.backends]
                    + [r["auto"], fmt_ratio(ms.get(PAPER), ms.get("auto"))])
    right = [False, True, True, False] + [True] * (len(res.backends) + 1) + [False, True]
    return markdown_table(headers, rows, right)


def layer_table(res: Results, rows_in: Sequence[dict]) -> str:
    headers = (["shape", "ratio", "K"] + _backend_headers(res.backends)
               + ["frozen", "auto picks", "speedup", "auto/frozen", "paper/frozen", "floor"])
    rows = []
    for r in rows_in:
        ms = r["ms"]
        frozen = ms.get("frozen")
        rows.append(_row_start(r) + [fmt_ms(ms.get(b)) if b in ms else "n/a" for b in [PAPER] + res.backends]
                    + [fmt_ms(frozen), r["auto"], fmt_ratio(ms.get(PAPER), ms.get("auto")),
                       fmt_ratio(ms.get("auto"), frozen), fmt_ratio(ms.get(PAPER), frozen), f"{r['floor']:.2f}x"])
    right = [False, True, True] + [True] * (len(res.backends) + 2) + [False] + [True] * 4
    return markdown_table(headers, rows, right)


def notes(args: argparse.Namespace, res: Results) -> List[str]:
    layer = "`lfma.LFMALinear(nn.Linear(d_in, d_out), k=K, backend=...)`"
    return [
        "Median milliseconds: the columns of each row timed round-robin (one call of each per round, a fresh "
        "random order every round, at least 5 rounds), so a row's ratios see the same machine. Shapes are "
        "`d_out x d_in`; K = `int(d_out * d_in * ratio)`.",
        "`paper`: the paper's formulation (`lfma_kernels.reference`: dense complex spectrum, `ifft2`, "
        "a second GEMM with dW, autograd through `ifft2`). "
        f"Other columns: {layer}; `auto picks` is the backend `auto` resolved to.",
        "`frozen`: the `nn.Linear` alone, weight frozen (training step = forward + dL/dx).",
        "`speedup` = paper / auto; `auto/frozen` and `paper/frozen` are cost ratios to the frozen layer; "
        "`floor` is the analytic limit of auto/frozen: training (fold dW into W, then the cheaper "
        "of `G = g^T x` and the separable batch gradient) "
        "`1 + min(d_out*d_in, 2K(d_out+d_in)) / (2*d_out*d_in)`, eval 1.",
        f"Training step: x `[{args.tokens}, d_in]` with requires_grad, grads set to None, forward, "
        f"`out.backward(g)` with a fixed random g. Eval: `layer.eval()` under `torch.no_grad()` at "
        f"{args.eval_tokens} tokens, W + dW cached by the layer (the paper's layer recomputes `ifft2` "
        "on every forward).",
    ]


def render(args: argparse.Namespace, res: Results) -> Tuple[str, str]:
    """(header, tables) as Markdown."""
    header = [f"## LFMA layer: {args.device}, {args.dtype} (benchmarks/bench_layer.py)", ""]
    header += [f"- {k}: {v}" for k, v in machine_info(args.device, args.dtype)]
    command = " ".join(["python", "benchmarks/bench_layer.py"] + args.argv)
    header += [f"- command: `{command}`", ""]
    header += [f"{n}" for n in notes(args, res)]
    body = [
        "### delta_weight (dW = alpha Re(ifft2(F)); fwd under no_grad, fwd+bwd with a fixed dL/d(dW))", "",
        delta_weight_table(res), "",
        f"### Layer training step, forward + backward, {args.tokens} tokens", "",
        layer_table(res, res.train), "",
        f"### Layer eval forward, {args.eval_tokens} tokens, no_grad", "",
        layer_table(res, res.eval), "",
    ]
    if res.errors:
        body += ["### Errors", ""] + [f"- {e}" for e in res.errors] + [""]
    body += noisy_lines(res.noisy)
    return "\n".join(header) + "\n", "\n".join(body)


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--quick", action="store_true",
                        help=f"shapes {QUICK_SHAPES}, ratios {QUICK_RATIOS}, {MIN_REPEATS} repeats")
    parser.add_argument("--shapes", type=parse_shapes, default=None,
                        help=f"comma-separated d_outxd_in (default {FULL_SHAPES})")
    parser.add_argument("--ratios", type=parse_ratios, default=None,
                        help=f"comma-separated top_k ratios (default {FULL_RATIOS})")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per training step (default 4096)")
    parser.add_argument("--eval-tokens", type=int, default=64, help="tokens per eval forward (default 64)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="activations and frozen weight (coefficients stay float32)")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"timed runs per cell (>= {MIN_REPEATS}; default 7, or {MIN_REPEATS} for "
                             "--quick and large shapes)")
    parser.add_argument("--output", metavar="PATH", help="also write the tables as Markdown to PATH")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.shapes is None:
        args.shapes = parse_shapes(QUICK_SHAPES if args.quick else FULL_SHAPES)
    if args.ratios is None:
        args.ratios = parse_ratios(QUICK_RATIOS if args.quick else FULL_RATIOS)
    if args.repeats is not None and args.repeats < MIN_REPEATS:
        parser.error(f"--repeats must be at least {MIN_REPEATS} (medians of at least {MIN_REPEATS} runs)")
    if args.tokens < 1 or args.eval_tokens < 1:
        parser.error("--tokens and --eval-tokens must be positive")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available in this torch ({torch.__version__})")
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        parser.error(f"--device must be cpu or cuda[:N], got {args.device!r}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(args.device))
    res = run(args)
    if not res.train:
        print("no (shape, ratio) case selects a frequency; nothing was measured", file=sys.stderr)
        return 2
    header, body = render(args, res)
    if args.output:
        write_section(args.output, f"layer {args.device} {args.dtype}", header + "\n" + body)
        print(f"wrote section 'layer {args.device} {args.dtype}' of {args.output}", file=sys.stderr)
    print(header)
    print(body, end="")
    if res.errors:
        print(f"{len(res.errors)} measurement(s) failed; see the Errors section", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
