"""The main job: which adapter should a user pick, at which budget? A budget study on real data.

A small Hugging Face ViT (1 channel, 8x8 images, 2x2 patches) is pretrained on scikit-learn's
digits 0-4, then adapted to digits 5-9 with a fresh classifier head and each method at several
budgets of real trained scalars per adapted projection (query and value of every layer): LoRA,
FourierFT, LFMA with the paper's start (top-K of a random probe, ``c = fft2(D)``), LFMA with the
official code's start (support from the weight's energy, ``D = 0.01 W``), LFMA with the weight's
support and a zero start, and LFMA ``hermitian=True``; head-only and full fine-tuning are the
reference lines. Learning rates were picked per method and budget on the validation split
(``--sweep``; the rates are ``methods.LEARNING_RATES``, the sweep's table is in docs/demo.md), accuracy is reported on the test split only,
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

from .config import LAYERS, QUICK_BUDGETS
from ..model import attention_targets
from .data_model import load_digits_splits, pretrain
from .methods import LEARNING_RATES, METHODS, SWEEP_GRID
from .study import main, run_grid

__all__ = ["main", "load_digits_splits", "pretrain", "attention_targets", "run_grid", "METHODS", "LEARNING_RATES",
           "SWEEP_GRID", "LAYERS", "QUICK_BUDGETS"]
