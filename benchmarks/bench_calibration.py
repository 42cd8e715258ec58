#!/usr/bin/env python3
"""Does a calibration (lfma-calibrate) pick the planner's paths at least as well as the shipped table?

Two grids, each timed and then decided with the shipped CPU table and with this machine's calibration:
for layer shapes, K and token counts, the three ways a layer's backward can get ``dL/dcoeffs`` (the dense
``G = g^T x``, the gemm batch path, the fft batch path) on the backend ``auto`` runs; and, on the cpp
backend, its three algorithms for building ``dW`` and for reading ``dL/dcoeffs`` from ``G`` over shapes
and K. Reported per grid and table: the share of cells where the pick is within 5% of the fastest, and
the worst pick's ratio to the fastest.

    lfma-calibrate && python benchmarks/bench_calibration.py --output benchmarks/RESULTS.md
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Sequence

from common import lfma  # first: puts lfma_kernels (and this folder) on the path

import torch  # noqa: E402

from lfma_kernels.ops import backends, calibration, costs, dispatch, planner  # noqa: E402
from lfma_kernels.ops.decision import count_positions  # noqa: E402
from lfma_kernels.ops.library import coeff_grad_runner  # noqa: E402
from lfma_kernels.ops.linear_op import layer_coeff_grad  # noqa: E402
from report import machine_info, markdown_table, publish  # noqa: E402
from timing import interleaved_rounds  # noqa: E402

SHAPES = [(768, 768), (1024, 1024), (768, 3072)]
KS = [58, 943, 5898, 29491]  # 0.0001 and 0.0016 of 768x768 (the paper's), then 0.01 and 0.05: where G returns
TOKENS = [256, 4096]
SKIP = 20.0  # a path both tables estimate at over this many times the cheapest is not timed
ALGORITHM_KS = [16, 58, 176, 943, 5898, 29491]


def backward_cell(backend: str, shape, k: int, tokens: int, rounds: int, tables) -> dict:
    """The three backward paths timed for one layer (the paper's selection, its positions counted as a layer
    counts them), with the path each table's decision picks."""
    gen = torch.Generator().manual_seed(k + tokens)
    f = lfma.select_frequencies(torch.randn(shape, generator=gen), k)
    x = torch.randn(tokens, shape[1], generator=gen)
    g = torch.randn(tokens, shape[0], generator=gen)
    decisions = []
    for table in tables:
        with planner.using(table):
            decisions.append(dispatch.decide(backend, "cpu", torch.float32, k, shape, tokens=tokens,
                                             positions=count_positions(f.rows, f.cols, shape)))
    run = coeff_grad_runner(backend, decisions[0].grad, decisions[0].dw, "kernel")
    estimates = [d.estimates["backward"] for d in decisions]
    timed = [p for p in planner.BACKWARD_PATHS if any(e[p] <= SKIP * min(e.values()) for e in estimates)]
    fns = {path: (lambda path=path: layer_coeff_grad(backend, path, x, g, f.rows, f.cols, shape, 12.0, torch.float32,
                                                      run))
           for path in timed}
    times = interleaved_rounds(fns, rounds=rounds, warmup=1, max_wait_s=5.0)
    return {"cell": f"{shape[0]}x{shape[1]} K={k} {tokens} tokens",
            "times": {path: sorted(t)[len(t) // 2] for path, t in times.items()},
            "shipped": decisions[0].backward, "calibrated": decisions[1].backward}


def algorithm_cells(shape, rounds: int, tables) -> List[dict]:
    """The cpp backend's three algorithms for dW and for dL/dcoeffs from G, timed per K (the paper's
    selection: conjugate pairs, whose terms the cost model counts), with each table's pick."""
    from lfma_kernels.ops import cpp_ops

    cpp, ops = backends.REGISTRY["cpp"], torch.ops.lfma_ext
    codes = cpp_ops.ALGO_CODES
    gen = torch.Generator().manual_seed(shape[0] + shape[1])
    grad = torch.randn(shape, generator=gen)
    cells = []
    for k in ALGORITHM_KS:
        f = lfma.select_frequencies(torch.randn(shape, generator=gen), k)
        c, positions = torch.view_as_real(f.values).float().contiguous(), count_positions(f.rows, f.cols, shape)
        for gradient in (False, True):
            estimates = [cpp.algorithm_costs(t, k, shape, positions, gradient=gradient) for t in tables]
            timed = [a for a in codes if any(e[a] <= SKIP * min(e.values()) for e in estimates)]
            fns = {a: ((lambda a=a: ops.coeff_grad(grad, f.rows, f.cols, 1.0, codes[a])) if gradient else
                       (lambda a=a: ops.delta_weight(c, f.rows, f.cols, *shape, 1.0, codes[a]))) for a in timed}
            times = interleaved_rounds(fns, rounds=rounds, warmup=1, max_wait_s=5.0)
            cells.append({"cell": f"{shape[0]}x{shape[1]} K={k} {'dL/dcoeffs' if gradient else 'dW'}",
                          "times": {a: sorted(t)[len(t) // 2] for a, t in times.items()},
                          "shipped": costs.cheapest(estimates[0]), "calibrated": costs.cheapest(estimates[1])})
    return cells


def summary(cells: List[dict], which: str) -> List[str]:
    ratios = [c["times"].get(c[which], float("inf")) / min(c["times"].values()) for c in cells]
    within = sum(r <= 1.05 for r in ratios)
    return [which, f"{within}/{len(cells)} ({within / len(cells):.0%})", f"{max(ratios):.2f}x"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output")
    args = parser.parse_args(argv)
    data = calibration.load("cpu")
    if data is None:
        print("no calibration for this machine: run lfma-calibrate first", file=sys.stderr)
        return 2
    backend = dispatch.decide("auto", "cpu", torch.float32, 176, (768, 768)).backend
    shipped, calibrated = planner.TABLES["cpu"], planner.calibrated(planner.TABLES["cpu"], data)
    cells = []
    with torch.no_grad():
        for shape in SHAPES:
            for k in KS:
                for tokens in TOKENS:
                    if k > shape[0] * shape[1] // 2:
                        continue
                    cells.append(backward_cell(backend, shape, k, tokens, args.rounds, (shipped, calibrated)))
    algorithms = []
    if backend == "cpp":
        with torch.no_grad():
            for shape in SHAPES:
                algorithms += algorithm_cells(shape, args.rounds, (shipped, calibrated))
    lines = ["## Calibration: the planner's picks, shipped table against this machine's "
             "(benchmarks/bench_calibration.py)", ""]
    lines += [f"- {k}: {v}" for k, v in machine_info("cpu", "float32")]
    lines += [f"- calibration: {data['path']} ({data['date']}, {'quick' if data.get('quick') else 'full'})",
              f"- backend {backend}; each cell's ways timed round-robin, {args.rounds} rounds, medians in ms; "
              f"'-': not timed, both tables estimate it at over {SKIP:.0f}x the cheapest", ""]
    grids = [("the backward's path", cells, planner.BACKWARD_PATHS)]
    if algorithms:
        grids.append(("the cpp algorithm (dW, and dL/dcoeffs from G)", algorithms, calibration.CPP_ALGORITHMS))
    lines += [markdown_table(["grid", "table", "picks within 5% of the fastest", "worst pick / fastest"],
                             [[name, *summary(grid, which)] for name, grid, _ in grids
                              for which in ("shipped", "calibrated")]), ""]
    for name, grid, ways in grids:
        rows = [[c["cell"], *(f"{c['times'][w]:.2f}" if w in c["times"] else "-" for w in ways),
                 min(c["times"], key=c["times"].get), c["shipped"], c["calibrated"]] for c in grid]
        lines += [f"{name}:", "", markdown_table(["cell", *ways, "fastest", "shipped picks", "calibrated picks"],
                                                 rows, [False, True, True, True, False, False, False]), ""]
    text = "\n".join(lines)
    publish(text, args.output, "calibration cpu")
    return 0


if __name__ == "__main__":
    sys.exit(main())
