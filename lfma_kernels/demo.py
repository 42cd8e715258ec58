"""The main job: which adapter should a user pick, at which budget? A budget study on real data.

A small Hugging Face ViT (1 channel, 8x8 images, 2x2 patches) is pretrained on scikit-learn's
digits 0-4, then adapted to digits 5-9 with a fresh classifier head and each method at several
budgets of real trained scalars per adapted projection (query and value of every layer): LoRA,
FourierFT, LFMA with the paper's start (top-K of a random probe, ``c = fft2(D)``), LFMA with the
official code's start (support from the weight's energy, ``D = 0.01 W``), LFMA with the weight's
support and a zero start, and LFMA ``hermitian=True``; head-only and full fine-tuning are the
reference lines. Learning rates were picked per method and budget on the validation split
(``--sweep``; the table is in ``LEARNING_RATES``), accuracy is reported on the test split only,
mean +- std over ``SEEDS``.

    lfma-demo            # or: python -m lfma_kernels.demo, or: make demo (the lean grid, ~2.5 min)
    lfma-demo --full     # every method at every budget (~5 min on 2 cores)
    lfma-demo --quick    # one seed, few epochs, two budgets: the smoke run of the tests
    lfma-demo --sweep    # the learning-rate sweep on the validation split (with --full: every point)

Runs go to ``--jobs`` worker processes (one thread each: the model is small enough that a run
is bound by per-call overhead, so two processes on two cores finish the grid twice as fast as two
threads). Writes a table to stdout, ``results/demo.json`` (one record per method and budget) and
``results/demo.png`` (accuracy against real trained scalars).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import copy
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ._format import markdown_table
from .baselines import FourierFTLinear, LoRALinear
from .layers import LFMALinear
from .targets import set_submodule
from .model import LFMAConfig, apply_lfma, lfma_layers

# The model: small enough to train in seconds on 2 CPU cores, shaped like a real ViT.
HIDDEN, LAYERS, HEADS, MLP = 64, 4, 4, 128
# Budgets: real trained scalars per adapted projection (d_in = d_out = 64), 16x from end to end:
# LoRA r * (d_in + d_out) = 128 r (r = 1 .. 16); FourierFT n real coefficients; LFMA 2K (K complex).
BUDGETS = (128, 256, 512, 1024, 2048)
# `make demo`'s default grid fits in 5 minutes on the 2-core CPU machine (42 runs, 148 s there on
# 2026-11-30); --full runs every method at every budget (96 runs, 309 s).
LEAN_METHODS = ("head only", "LoRA", "FourierFT", "LFMA", "full fine-tuning")
LEAN_BUDGETS = (128, 256, 512, 1024)
QUICK_BUDGETS = (128, 512)
ALPHA = {"lfma": 120.0, "fourierft": 150.0}
PRETRAIN_EPOCHS, ADAPT_EPOCHS, QUICK_EPOCHS = 30, 30, 4
BATCH = 32
SEEDS = (0, 1, 2)
HEAD = "classifier"
# ------------------------------------------------------------------------------------------ data
@dataclass
class Split:
    x: torch.Tensor  # [n, 1, 8, 8] float32, standardised
    y: torch.Tensor  # [n] int64 in 0..4


@dataclass
class Data:
    pretrain_train: Split
    pretrain_val: Split
    train: Split
    val: Split
    test: Split


def load_digits_splits(seed: int = 0) -> Data:
    """scikit-learn's bundled digits (1,797 real 8x8 images; no download), fixed stratified splits:
    digits 0-4 for pretraining (80/20), digits 5-9 relabelled 0-4 for adaptation (50/20/30)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    images = (images - images.mean()) / images.std()
    labels = torch.tensor(digits.target, dtype=torch.int64)

    def split(index, sizes, stratify):
        first, rest = train_test_split(index, train_size=sizes[0], random_state=seed, stratify=stratify[index])
        if len(sizes) == 1:
            return first, rest
        second, third = train_test_split(rest, train_size=sizes[1] / (1 - sizes[0]), random_state=seed,
                                         stratify=stratify[rest])
        return first, second, third

    def make(index, offset):
        return Split(images[index], labels[index] - offset)

    low = torch.nonzero(labels < 5).flatten().numpy()
    high = torch.nonzero(labels >= 5).flatten().numpy()
    pre_train, pre_val = split(low, (0.8,), labels.numpy())
    train, val, test = split(high, (0.5, 0.2), labels.numpy())
    return Data(make(pre_train, 0), make(pre_val, 0), make(train, 5), make(val, 5), make(test, 5))


# ----------------------------------------------------------------------------------------- model
def build_vit(seed: int) -> nn.Module:
    """``ViTForImageClassification`` from a small config (no download), dropout off."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                       num_attention_heads=HEADS, intermediate_size=MLP, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, num_labels=5)
    return ViTForImageClassification(config)


def attention_targets(model: nn.Module) -> List[str]:
    """Query and value projections: ``q_proj``/``v_proj`` in current transformers, ``query``/``value``
    in older releases."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for pair in (["q_proj", "v_proj"], ["query", "value"]):
        if set(pair) <= names:
            return pair
    raise RuntimeError(f"no query/value projections found among {sorted(names)}")


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=x).logits


def accuracy(model: nn.Module, split: Split) -> float:
    model.eval()
    with torch.no_grad():
        return (logits(model, split.x).argmax(-1) == split.y).float().mean().item()


def train(model: nn.Module, data: Split, *, lr: float, epochs: int, seed: int, desc: str,
          quiet: bool = False) -> List[float]:
    """AdamW (weight decay 1e-4, as the paper), constant learning rate; returns step times in ms."""
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(data.y) / BATCH)
    times: List[float] = []
    model.train()
    with tqdm(total=epochs * steps_per_epoch, desc=desc, leave=False, disable=quiet, file=sys.stderr) as bar:
        for _ in range(epochs):
            order = torch.randperm(len(data.y), generator=gen)
            for i in range(steps_per_epoch):
                batch = order[i * BATCH:(i + 1) * BATCH]
                start = time.perf_counter()
                loss = nn.functional.cross_entropy(logits(model, data.x[batch]), data.y[batch])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                times.append((time.perf_counter() - start) * 1e3)
                bar.update()
    return times


def pretrain(data: Data, *, epochs: int, quiet: bool) -> nn.Module:
    model = build_vit(seed=0)
    train(model, data.pretrain_train, lr=1e-3, epochs=epochs, seed=0, desc="pretrain on digits 0-4", quiet=quiet)
    return model


# --------------------------------------------------------------------------------------- methods
def _fresh_head(model: nn.Module, seed: int) -> None:
    torch.manual_seed(1000 + seed)
    model.classifier = nn.Linear(model.classifier.in_features, 5)


def _freeze_all_but_head(model: nn.Module) -> None:
    model.requires_grad_(False)
    model.classifier.requires_grad_(True)


def _target_names(model: nn.Module) -> List[str]:
    suffixes = attention_targets(model)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in suffixes]


def _backend_of(model: nn.Module) -> str:
    """What the model's first adapted projection runs: its plan (for the weight's device and dtype)."""
    return next(m for m in model.modules() if isinstance(m, (LFMALinear, FourierFTLinear))).plan().backend


def setup_head_only(model: nn.Module, budget: int, seed: int) -> str:
    _freeze_all_but_head(model)
    return "-"


def setup_full(model: nn.Module, budget: int, seed: int) -> str:
    model.requires_grad_(True)
    return "-"


def setup_lora(model: nn.Module, budget: int, seed: int) -> str:
    r = budget // (2 * HIDDEN)
    targets = attention_targets(model)
    _freeze_all_but_head(model)
    torch.manual_seed(seed)
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        for name in _target_names(model):
            set_submodule(model, name, LoRALinear(model.get_submodule(name), r, alpha=r))
        return "local LoRA"
    inject_adapter_in_model(LoraConfig(r=r, lora_alpha=r, target_modules=targets), model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or name.startswith(HEAD + "."))
    return "peft"


def setup_fourierft(model: nn.Module, budget: int, seed: int) -> str:
    _freeze_all_but_head(model)
    for name in _target_names(model):
        set_submodule(model, name, FourierFTLinear(model.get_submodule(name), budget, alpha=ALPHA["fourierft"],
                                                    seed=777 + seed))
    return _backend_of(model)


def setup_lfma(**options) -> Callable[[nn.Module, int, int], str]:
    def setup(model: nn.Module, budget: int, seed: int) -> str:
        apply_lfma(model, LFMAConfig(attention_targets(model), k=budget // 2, alpha=ALPHA["lfma"], seed=seed,
                                     modules_to_save=[HEAD], **options))
        return _backend_of(model)
    return setup


@dataclass(frozen=True)
class Method:
    setup: Callable[[nn.Module, int, int], str]  # (model, budget, seed) -> the backend it runs
    size: Callable[[int], str]                   # the budget in the method's own terms
    budgets: Tuple[int, ...] = BUDGETS           # (0,): a reference line, no adapter


def _reference(setup) -> Method:
    return Method(setup, lambda budget: "-", budgets=(0,))


METHODS: Dict[str, Method] = {
    "head only": _reference(setup_head_only),
    "LoRA": Method(setup_lora, lambda b: f"r={b // (2 * HIDDEN)}"),
    "FourierFT": Method(setup_fourierft, lambda b: f"n={b}"),
    "LFMA": Method(setup_lfma(), lambda b: f"K={b // 2}"),
    "LFMA official start": Method(setup_lfma(init="weight", init_scale=0.01), lambda b: f"K={b // 2}"),
    "LFMA zero start": Method(setup_lfma(init="weight", init_scale=0.0), lambda b: f"K={b // 2}"),
    "LFMA hermitian": Method(setup_lfma(hermitian=True), lambda b: f"K={b // 2}"),
    "full fine-tuning": _reference(setup_full),
}

# Learning rates chosen on the validation split by ``--sweep`` (seed 0, ADAPT_EPOCHS epochs, AdamW),
# the best of SWEEP_GRID per method and budget (ties: the smaller rate). One seed makes the
# curves jagged (one validation image is 0.56 points): a choice is a good rate, not the optimum.
SWEEP_GRID = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
LEARNING_RATES: Dict[str, Dict[int, float]] = {
    "head only": {0: 1e-1},
    "LoRA": {128: 1e-2, 256: 1e-2, 512: 3e-3, 1024: 3e-3, 2048: 3e-3},
    "FourierFT": {128: 3e-2, 256: 1e-2, 512: 3e-3, 1024: 1e-2, 2048: 3e-3},
    "LFMA": {128: 1e-1, 256: 1e-1, 512: 1e-1, 1024: 3e-3, 2048: 1e-2},
    "LFMA official start": {128: 3e-2, 256: 3e-2, 512: 3e-2, 1024: 1e-2, 2048: 3e-2},
    "LFMA zero start": {128: 3e-2, 256: 3e-3, 512: 1e-2, 1024: 3e-3, 2048: 3e-3},
    "LFMA hermitian": {128: 3e-2, 256: 1e-2, 512: 3e-2, 1024: 1e-2, 2048: 3e-3},
    "full fine-tuning": {0: 1e-3},
}
# The sweep (validation accuracy %, seed 0), run 2026-11-30 on the 2-core CPU machine with
# `lfma-demo --sweep` (2 worker processes, about 18 minutes next to other jobs):
#   method                     size   3e-04   1e-03   3e-03   1e-02   3e-02   1e-01   3e-01    best
#   head only                     -    46.9    59.2    68.2    73.2    74.9    76.0    75.4   1e-01
#   LoRA                        r=1    63.1    81.6    84.9    90.5    90.5    70.4    65.4   1e-02
#   LoRA                        r=2    68.7    81.0    91.1    93.9    92.7    86.6    51.4   1e-02
#   LoRA                        r=4    78.2    90.5    92.2    91.1    89.9    86.6    69.8   3e-03
#   LoRA                        r=8    83.2    93.3    95.5    94.4    91.6    72.1    40.2   3e-03
#   LoRA                       r=16    91.6    93.3    94.4    91.6    72.6    65.4    73.7   3e-03
#   FourierFT                 n=128    59.8    82.1    90.5    92.2    95.0    91.1    89.9   3e-02
#   FourierFT                 n=256    67.6    86.0    89.9    93.3    93.3    92.2    84.4   1e-02
#   FourierFT                 n=512    79.3    89.4    92.7    89.9    92.2    91.1    89.4   3e-03
#   FourierFT                n=1024    87.2    92.2    92.7    93.9    92.7    88.3    82.7   1e-02
#   FourierFT                n=2048    90.5    92.7    94.4    93.3    89.9    88.8    85.5   3e-03
#   LFMA                       K=64    54.7    80.4    91.6    93.9    94.4    95.0    93.3   1e-01
#   LFMA                      K=128    63.1    88.8    95.0    93.9    92.7    95.5    88.3   1e-01
#   LFMA                      K=256    81.6    88.8    92.7    93.9    93.9    95.0    87.7   1e-01
#   LFMA                      K=512    88.8    93.9    96.1    91.6    95.0    87.7    77.7   3e-03
#   LFMA                     K=1024    90.5    89.4    94.4    95.5    94.4    93.9    83.2   1e-02
#   LFMA official start        K=64    60.9    79.3    89.9    92.2    93.9    93.3    86.0   3e-02
#   LFMA official start       K=128    64.2    85.5    91.6    92.7    93.9    91.1    89.9   3e-02
#   LFMA official start       K=256    73.2    87.7    91.6    95.5    96.1    90.5    89.9   3e-02
#   LFMA official start       K=512    81.0    88.8    92.7    95.5    91.6    86.0    89.4   1e-02
#   LFMA official start      K=1024    87.2    92.2    92.2    87.7    95.5    88.8    89.9   3e-02
#   LFMA zero start            K=64    57.0    79.9    92.7    92.7    93.9    92.2    84.4   3e-02
#   LFMA zero start           K=128    63.1    87.2    94.4    91.1    93.9    89.4    92.7   3e-03
#   LFMA zero start           K=256    73.7    92.7    94.4    96.1    95.5    92.7    90.5   1e-02
#   LFMA zero start           K=512    88.3    94.4    96.6    93.9    90.5    80.4    83.8   3e-03
#   LFMA zero start          K=1024    93.3    93.3    94.4    92.7    89.9    83.8    74.9   3e-03
#   LFMA hermitian             K=64    53.6    81.0    90.5    93.9    95.0    91.1    89.9   3e-02
#   LFMA hermitian            K=128    63.7    87.7    92.7    95.0    94.4    94.4    87.7   1e-02
#   LFMA hermitian            K=256    76.0    91.6    93.9    94.4    95.5    95.0    92.2   3e-02
#   LFMA hermitian            K=512    83.8    90.5    94.4    96.1    95.5    86.0    88.3   1e-02
#   LFMA hermitian           K=1024    91.6    93.9    94.4    92.2    91.6    87.7    85.5   3e-03
#   full fine-tuning              -    97.2    97.8    96.6    67.0    17.3    54.2    21.8   1e-03


@dataclass
class RunResult:
    val: float
    test: float
    step_ms: float
    trainable_real: int
    coefficients: Optional[int]
    backend: str


def run_method(method: str, budget: int, backbone: nn.Module, data: Data, *, lr: float, epochs: int, seed: int,
               quiet: bool = True) -> RunResult:
    model = copy.deepcopy(backbone)
    _fresh_head(model, seed)
    backend = METHODS[method].setup(model, budget, seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    layers = lfma_layers(model)
    coefficients = sum(m.k for m in layers.values()) if layers else None
    times = train(model, data.train, lr=lr, epochs=epochs, seed=seed, desc=f"{method} {budget} seed {seed}",
                  quiet=quiet)
    return RunResult(accuracy(model, data.val), accuracy(model, data.test), statistics.median(times), trainable,
                     coefficients, backend)


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
    parser = argparse.ArgumentParser(description="Accuracy against trained parameters: LFMA, LoRA, FourierFT, "
                                                 "head-only and full fine-tuning of a small ViT on scikit-learn's "
                                                 "digits.")
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


if __name__ == "__main__":
    sys.exit(main())
