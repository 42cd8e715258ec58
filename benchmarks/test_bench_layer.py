"""pytest-benchmark suite for the LFMA layer at ViT-B size (768x768, ratio 0.0003 -> K=176).

Not part of ``make test`` (pytest's testpaths is tests/). Run with

    .venv/bin/python -m pytest benchmarks/test_bench_layer.py --benchmark-only

Each group compares the paper's formulation (``reference``), the ``torch`` and ``cpp`` backends
(``cpp`` skipped where the extension is not available) and the frozen ``nn.Linear``; the
functions timed are the ones benchmarks/bench_layer.py tables.
"""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (sets up the import path of lfma_kernels as well)

pytest.importorskip("pytest_benchmark")

SHAPE = (768, 768)
RATIO = 0.0003
TOKENS = 4096
EVAL_TOKENS = 64


@pytest.fixture(scope="module")
def problem():
    k = common.lfma.num_frequencies(SHAPE, RATIO)
    assert k == 176
    return common.make_problem(SHAPE, k, ratio=RATIO)


def _need(problem, backend):
    if backend != "auto" and not common.backend_runs(problem, backend):
        pytest.skip(f"backend {backend!r} is not available here")


@pytest.mark.benchmark(group="delta_weight 768x768 K=176 forward")
@pytest.mark.parametrize("backend", ["reference", "torch", "cpp"])
def test_delta_weight_forward(benchmark, problem, backend):
    _need(problem, backend)
    benchmark(common.delta_weight_fn(problem, backend, backward=False))


@pytest.mark.benchmark(group="delta_weight 768x768 K=176 forward+backward")
@pytest.mark.parametrize("backend", ["reference", "torch", "cpp"])
def test_delta_weight_forward_backward(benchmark, problem, backend):
    _need(problem, backend)
    benchmark(common.delta_weight_fn(problem, backend, backward=True))
    assert problem.coeffs.grad is not None


@pytest.mark.benchmark(group="layer training step 768x768 K=176, 4096 tokens")
@pytest.mark.parametrize("backend", ["reference", "torch", "cpp", "frozen"])
def test_layer_train_step(benchmark, problem, backend):
    x, g = common.make_inputs(problem, TOKENS, requires_grad=True)
    if backend == "frozen":
        step = common.frozen_train_step_fn(problem, x, g)
    else:
        _need(problem, backend)
        step = common.train_step_fn(problem, backend, x, g)
    benchmark(step)
    assert x.grad is not None


@pytest.mark.benchmark(group="layer eval forward 768x768 K=176, 64 tokens")
@pytest.mark.parametrize("variant", ["paper", "cached", "frozen"])
def test_layer_eval_forward(benchmark, problem, variant):
    x, _ = common.make_inputs(problem, EVAL_TOKENS, requires_grad=False)
    if variant == "paper":
        forward = common.paper_eval_forward_fn(problem, x)   # ifft2 + second GEMM on every call
    elif variant == "cached":
        forward = common.eval_forward_fn(problem, "auto", x)  # LFMALinear.eval(): cached W + dW
    else:
        forward = common.frozen_eval_forward_fn(problem, x)
    benchmark(forward)
