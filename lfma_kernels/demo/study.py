"""The grid of runs (worker processes), the sweep, the report, and the command line."""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import asdict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .._format import markdown_table
from .config import (ADAPT_EPOCHS, BUDGETS, HIDDEN, LAYERS, LEAN_BUDGETS, LEAN_METHODS, PRETRAIN_EPOCHS, QUICK_BUDGETS,
                     QUICK_EPOCHS, SEEDS)
from .data_model import Data, accuracy, build_vit, load_digits_splits, pretrain
from .methods import LEARNING_RATES, METHODS, RunResult, SWEEP_GRID, run_method

# ------------------------------------------------------------------------------------ the grid
Task = Tuple[str, int, float, int, int]  # method, budget, learning rate, epochs, seed
_worker: Dict[str, object] = {}


def _init_worker(backbone_state: dict, data: Data) -> None:
    torch.set_num_threads(1)
    backbone = build_vit(seed=0)
    backbone.load_state_dict(backbone_state)
    _worker.update(backbone=backbone, data=data)


def _run_task(task: Task) -> RunResult:
    method, budget, lr, epochs, seed = task
    return run_method(method, budget, _worker["backbone"], _worker["data"], lr=lr, epochs=epochs, seed=seed)


def run_grid(tasks: Sequence[Task], backbone: nn.Module, data: Data, *, jobs: int, quiet: bool) -> List[RunResult]:
    """Every task's result, in order; ``jobs`` worker processes (1: here, in this process). Every
    run uses one thread, so the results do not depend on ``jobs`` (a thread count changes the
    rounding of the parallel reductions, and 30 epochs can amplify it into another accuracy)."""
    if jobs <= 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            _worker.update(backbone=backbone, data=data)
            return [_run_task(t) for t in tasks]
        finally:
            torch.set_num_threads(threads)
    context = multiprocessing.get_context("spawn")  # no fork of a process that has torch threads running
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker,
                                                initargs=(backbone.state_dict(), data)) as pool:
        futures = [pool.submit(_run_task, t) for t in tasks]
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            future.result()  # raise a worker's error here, early
            if not quiet and done % 10 == 0:
                print(f"  {done}/{len(tasks)} runs", file=sys.stderr, flush=True)
        return [f.result() for f in futures]


# ---------------------------------------------------------------------------------------- report
def sweep(backbone: nn.Module, data: Data, methods: Sequence[str], budgets: Sequence[int], epochs: int, jobs: int,
          quiet: bool) -> Dict[str, Dict[int, float]]:
    """Validation accuracy for every learning rate of ``SWEEP_GRID``, seed 0; prints the grid and
    returns the best rate per method and budget (ties: the smaller rate)."""
    points = [(m, b) for m in methods for b in METHODS[m].budgets if b in budgets or b == 0]
    tasks = [(m, b, lr, epochs, 0) for m, b in points for lr in SWEEP_GRID]
    results = iter(run_grid(tasks, backbone, data, jobs=jobs, quiet=quiet))
    chosen: Dict[str, Dict[int, float]] = {}
    print(f"{'method':<24}{'size':>7}" + "".join(f"{lr:>8.0e}" for lr in SWEEP_GRID) + "    best")
    for method, budget in points:
        scores = [next(results).val for _ in SWEEP_GRID]
        best = SWEEP_GRID[max(range(len(scores)), key=lambda i: (scores[i], -i))]
        chosen.setdefault(method, {})[budget] = best
        print(f"{method:<24}{METHODS[method].size(budget):>7}" + "".join(f"{100 * s:>8.1f}" for s in scores)
              + f"   {best:.0e}", flush=True)
    return chosen


def format_table(records: List[dict]) -> str:
    head = ("method", "size", "real trained", "complex coeffs", "test acc % (mean +- std)", "step ms", "lr",
            "backend")
    rows = [head]
    for r in records:
        rows.append((r["method"], r["size"], f"{r['trainable_real']:,}",
                     f"{r['coefficients']:,}" if r["coefficients"] is not None else "-",
                     f"{100 * r['accuracy_mean']:.1f} +- {100 * r['accuracy_std']:.1f}", f"{r['step_ms']:.2f}",
                     f"{r['learning_rate']:.0e}", r["backend"]))
    return markdown_table(rows[0], rows[1:])


def plot(records: List[dict], path: str) -> None:
    """Accuracy against real trained scalars (log x): a line with error bars per adapter method,
    the reference methods (one point each) as horizontal lines with their spread shaded. The y
    range fits the adapters; a reference line below it is named at the bottom edge instead."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    by_method: Dict[str, List[dict]] = {}
    for r in records:
        by_method.setdefault(r["method"], []).append(r)
    curves = [p for points in by_method.values() if points[0]["budget"] != 0 for p in points]
    low = min((100 * (p["accuracy_mean"] - p["accuracy_std"]) for p in curves), default=0.0) - 1.0
    high = max(100 * (p["accuracy_mean"] + p["accuracy_std"]) for p in records) + 1.0
    markers = "osD^v<>p"
    for i, (method, points) in enumerate(by_method.items()):
        mean = [100 * p["accuracy_mean"] for p in points]
        std = [100 * p["accuracy_std"] for p in points]
        label = f"{method}: {mean[0]:.1f} +- {std[0]:.1f}% ({points[0]['trainable_real']:,} scalars)"
        if points[0]["budget"] != 0:
            ax.errorbar([p["trainable_real"] for p in points], mean, yerr=std, marker=markers[i % len(markers)],
                        capsize=3, color=f"C{i}", label=method)
        elif mean[0] >= low:
            ax.axhline(mean[0], linestyle="--", linewidth=1, color=f"C{i}", label=label)
            ax.axhspan(mean[0] - std[0], mean[0] + std[0], color=f"C{i}", alpha=0.1)
        else:
            ax.annotate(f"below: {label}", xy=(0.01, 0.01), xycoords="axes fraction", fontsize=8, color=f"C{i}")
    ax.set_ylim(low, high)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_xscale("log")
    ax.set_xlabel("real trained scalars (adapters + classifier head, log scale)")
    ax.set_ylabel("test accuracy, digits 5-9 (%)")
    ax.set_title(f"ViT ({LAYERS} layers, d={HIDDEN}) pretrained on digits 0-4, adapted to 5-9; "
                 f"mean +- std over {len(records[0]['seeds'])} seed(s)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="lfma-demo", description="Accuracy against trained parameters: LFMA, LoRA, "
                                     "FourierFT, head-only and full fine-tuning of a small ViT on scikit-learn's digits.")
    parser.add_argument("--quick", action="store_true", help="one seed, few epochs, two budgets (the smoke run)")
    parser.add_argument("--full", action="store_true", help="every method at every budget (default: the lean grid, "
                                                           f"{', '.join(LEAN_METHODS)} at {LEAN_BUDGETS})")
    parser.add_argument("--sweep", action="store_true", help="learning-rate sweep on the validation split")
    parser.add_argument("--methods", default=None, help="comma-separated methods (default: the grid's)")
    parser.add_argument("--budgets", default=None, help="comma-separated real scalars per projection (default: the "
                                                        "grid's)")
    parser.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 4),
                        help="worker processes (default: the CPU count, at most 4)")
    parser.add_argument("--output-dir", default="results", help="where demo.json and demo.png go")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
        import sklearn  # noqa: F401
        import tqdm  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        parser.error(f"the demo needs the 'demo' extra ({e.name} is missing): pip install -e '.[demo]'")
    methods = ([m.strip() for m in args.methods.split(",") if m.strip()] if args.methods
               else list(METHODS) if args.full or args.quick else list(LEAN_METHODS))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    budgets = (tuple(int(b) for b in args.budgets.split(",")) if args.budgets
               else QUICK_BUDGETS if args.quick else BUDGETS if args.full else LEAN_BUDGETS)
    odd = [b for b in budgets if b not in BUDGETS]
    if odd:
        parser.error(f"budgets {odd} are not in the study's grid {BUDGETS} (learning rates were swept for those)")

    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    start = time.perf_counter()
    data = load_digits_splits()
    # --quick shortens the adaptation runs only: a weak backbone would make the smoke run meaningless.
    backbone = pretrain(data, epochs=PRETRAIN_EPOCHS, quiet=args.quiet)
    print(f"backbone: {accuracy(backbone, data.pretrain_val) * 100:.1f}% on held-out digits 0-4 "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
    epochs = QUICK_EPOCHS if args.quick else ADAPT_EPOCHS
    if args.sweep:
        sweep(backbone, data, methods, budgets, epochs, args.jobs, args.quiet)
        return 0

    seeds = SEEDS[:1] if args.quick else SEEDS
    points = [(m, b) for m in methods for b in METHODS[m].budgets if b in budgets or b == 0]
    # Seed-major order: every method's runs spread over the whole grid, so a drift in the
    # machine's load shifts the step times of all methods alike.
    tasks = [(m, b, LEARNING_RATES[m][b], epochs, seed) for seed in seeds for m, b in points]
    print(f"{len(tasks)} runs ({len(points)} points x {len(seeds)} seeds) on {args.jobs} worker(s)", flush=True)
    by_task = dict(zip(tasks, run_grid(tasks, backbone, data, jobs=args.jobs, quiet=args.quiet)))
    records = []
    for method, budget in points:
        runs = [by_task[(method, budget, LEARNING_RATES[method][budget], epochs, seed)] for seed in seeds]
        tests = [r.test for r in runs]
        records.append({
            "method": method,
            "budget": budget,
            "size": METHODS[method].size(budget),
            "trainable_real": runs[0].trainable_real,
            "coefficients": runs[0].coefficients,
            "accuracy_mean": statistics.mean(tests),
            "accuracy_std": statistics.stdev(tests) if len(tests) > 1 else 0.0,
            "accuracy_runs": tests,
            "seeds": list(seeds),
            "runs": [asdict(r) for r in runs],
            "step_ms": statistics.median(r.step_ms for r in runs),
            "backend": runs[0].backend,
            "learning_rate": LEARNING_RATES[method][budget],
        })

    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "demo.json"), "w") as f:
        json.dump(records, f, indent=2)
    plot(records, os.path.join(args.output_dir, "demo.png"))
    print()
    print(f"Digits 5-9, test split ({len(data.test.y)} images), {len(seeds)} seed(s), {epochs} epochs; real trained "
          f"scalars include the 325-scalar head; budgets are real scalars per adapted projection "
          f"({2 * LAYERS} projections).")
    print(format_table(records))
    print(f"\nwrote {args.output_dir}/demo.json and {args.output_dir}/demo.png in {time.perf_counter() - start:.0f} s")
    return 0

