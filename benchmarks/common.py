"""What the benchmark scripts share: the import path (the source tree this folder sits in when
lfma_kernels is not installed), the problems they time and the functions timed on them, the
floor of docs/math.md, and the command-line parsers of shapes and ratios.

    import common                 # first: puts lfma_kernels on the path
    from common import make_problem, train_step_fn, ...
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)  # report.py, timing.py, costfit.py
try:
    import lfma_kernels as lfma
except ImportError:  # not installed: use the source tree this folder lives in
    sys.path.insert(0, _ROOT)
    import lfma_kernels as lfma

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from lfma_kernels.ops import dispatch  # noqa: E402
from lfma_kernels.selection import init_matrix  # noqa: E402

__all__ = ["lfma", "ALPHA", "PAPER", "FULL_RATIOS", "QUICK_SHAPES", "Shape", "Problem", "make_problem", "backend_runs", "build_layer", "make_inputs",
           "delta_weight_fn", "train_step_fn", "frozen_train_step_fn", "eval_forward_fn", "paper_eval_forward_fn",
           "frozen_eval_forward_fn", "training_floor", "cases", "parse_shapes", "parse_ratios"]

ALPHA = 12.0
PAPER = "reference"
# The layer tables' default ratios (the paper's 0.0001-0.0016 and a dense 0.05), and the shapes of
# a quick run: ViT-B / RoBERTa-base (768x768) and RoBERTa-large (1024x1024).
FULL_RATIOS = "0.0001,0.0003,0.0016,0.05"
QUICK_SHAPES = "768x768,1024x1024"

Shape = Tuple[int, int]


# ---------------------------------------------------------------------------------------------
# problems and the functions that are timed
# ---------------------------------------------------------------------------------------------
@dataclass
class Problem:
    """A frozen nn.Linear and K coefficients at the K strongest frequencies of the default init."""
    shape: Shape                 # (d_out, d_in)
    ratio: Optional[float]
    k: int
    linear: nn.Linear            # frozen, on device, in dtype
    coeffs: torch.Tensor         # [K, 2] float32 leaf, requires grad
    rows: torch.Tensor
    cols: torch.Tensor
    device: torch.device
    dtype: torch.dtype
    seed: int = 0


def make_problem(shape: Shape, k: int, *, ratio: Optional[float] = None, device="cpu",
                 dtype: torch.dtype = torch.float32, seed: int = 0) -> Problem:
    d_out, d_in = shape
    device = torch.device(device)
    torch.manual_seed(seed)
    linear = nn.Linear(d_in, d_out).to(device=device, dtype=dtype).requires_grad_(False)
    # The same selection LFMALinear(init="random", seed=seed) makes, so every column sees the
    # same frequencies.
    freqs = lfma.select_frequencies(init_matrix("random", linear.weight, seed=seed), k)
    coeffs = torch.view_as_real(freqs.values).float().to(device).clone().requires_grad_(True)
    return Problem(tuple(shape), ratio, k, linear, coeffs, freqs.rows.to(device), freqs.cols.to(device),
                   device, dtype, seed)


def backend_runs(p: Problem, backend: str) -> bool:
    """Whether ``backend`` can run this problem here (available, and on this device)."""
    return dispatch.why_not(backend, p.device.type) is None


def build_layer(p: Problem, backend: str) -> nn.Module:
    """``lfma.LFMALinear`` around the problem's frozen nn.Linear: what users run."""
    return lfma.LFMALinear(p.linear, k=p.k, alpha=ALPHA, seed=p.seed, backend=backend)


def make_inputs(p: Problem, tokens: int, *, requires_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """``x [tokens, d_in]`` and a fixed upstream gradient ``g [tokens, d_out]``."""
    gen = torch.Generator().manual_seed(p.seed + 1)
    x = torch.randn(tokens, p.shape[1], generator=gen).to(p.device, p.dtype).requires_grad_(requires_grad)
    g = torch.randn(tokens, p.shape[0], generator=gen).to(p.device, p.dtype)
    return x, g


def delta_weight_fn(p: Problem, backend: str, *, backward: bool) -> Callable[[], None]:
    """``lfma.delta_weight(..., backend=backend)``: forward under no_grad, or forward + backward
    with a fixed random ``dL/d(dW)``."""
    coeffs, rows, cols, shape = p.coeffs, p.rows, p.cols, p.shape
    if not backward:
        def forward() -> None:
            with torch.no_grad():
                lfma.delta_weight(coeffs, rows, cols, shape, ALPHA, backend=backend)
        return forward
    gen = torch.Generator().manual_seed(p.seed + 2)
    grad = torch.randn(shape, generator=gen).to(p.device)

    def forward_backward() -> None:
        coeffs.grad = None
        lfma.delta_weight(coeffs, rows, cols, shape, ALPHA, backend=backend).backward(grad)
    return forward_backward


def train_step_fn(p: Problem, backend: str, x: torch.Tensor, g: torch.Tensor) -> Callable[[], None]:
    """One training step of the layer: grads set to None (as ``zero_grad()`` does), forward,
    ``backward(g)`` into ``x.grad`` and ``coeffs.grad``."""
    layer = build_layer(p, backend).train()
    coeffs = layer.coeffs

    def step() -> None:
        x.grad = None
        coeffs.grad = None
        layer(x).backward(g)
    return step


def own_copy(linear: nn.Linear) -> nn.Linear:
    """The frozen layer's own weight: timed round-robin, a column that shared ``p.linear.weight``
    with the paper's column (which reads it just before, in some rounds) would find it in cache,
    while an LFMA layer in eval reads its own cached ``W + dW`` (a 13% bias at 768x768, 64 tokens)."""
    return copy.deepcopy(linear)


def frozen_train_step_fn(p: Problem, x: torch.Tensor, g: torch.Tensor) -> Callable[[], None]:
    """The frozen nn.Linear's training step: forward and ``dL/dx`` only."""
    linear = own_copy(p.linear)

    def step() -> None:
        x.grad = None
        linear(x).backward(g)
    return step


def eval_forward_fn(p: Problem, backend: str, x: torch.Tensor) -> Callable[[], None]:
    """The layer in eval mode under no_grad: one GEMM with the cached ``W + dW`` (built on the
    first call, i.e. during warmup)."""
    layer = build_layer(p, backend).eval()

    def forward() -> None:
        with torch.no_grad():
            layer(x)
    return forward


def paper_eval_forward_fn(p: Problem, x: torch.Tensor) -> Callable[[], None]:
    """The paper's layer in eval: dense spectrum, ifft2 and a second GEMM on every forward."""
    w, b, coeffs, rows, cols = p.linear.weight, p.linear.bias, p.coeffs, p.rows, p.cols

    def forward() -> None:
        with torch.no_grad():
            lfma.reference.lfma_linear(x, w, b, coeffs, rows, cols, ALPHA)
    return forward


def frozen_eval_forward_fn(p: Problem, x: torch.Tensor) -> Callable[[], None]:
    linear = own_copy(p.linear)

    def forward() -> None:
        with torch.no_grad():
            linear(x)
    return forward


def training_floor(shape: Shape, k: int) -> float:
    """The cost floor (docs/math.md): ``1 + min(d_out*d_in, 2K(d_out+d_in)) / (2*d_out*d_in)``."""
    d_out, d_in = shape
    return 1.0 + min(d_out * d_in, 2 * k * (d_out + d_in)) / (2 * d_out * d_in)


def cases(shapes: Sequence[Shape], ratios: Sequence[float], *,
          stop: Optional[Callable[[List[Tuple[Shape, float]]], bool]] = None) -> Iterator[Tuple[Shape, float, int]]:
    """``(shape, ratio, K)`` for every shape and ratio in order, with progress on stderr; a pair that
    selects no frequency is skipped (said why). ``stop(left)`` is asked before each case with the
    cases left, this one first: True ends the run."""
    todo = [(shape, ratio) for shape in shapes for ratio in ratios]
    start = time.perf_counter()
    for i, (shape, ratio) in enumerate(todo, 1):
        if stop is not None and stop(todo[i - 1:]):
            return
        try:
            k = lfma.num_frequencies(shape, ratio)
        except ValueError as exc:
            print(f"[{i}/{len(todo)}] {shape[0]}x{shape[1]} ratio {ratio}: skipped ({exc})", file=sys.stderr)
            continue
        print(f"[{i}/{len(todo)}] {shape[0]}x{shape[1]} ratio {ratio} K={k}  "
              f"({time.perf_counter() - start:.0f} s elapsed)", file=sys.stderr, flush=True)
        yield shape, ratio, k


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def parse_shapes(text: str) -> List[Shape]:
    shapes = []
    for spec in text.split(","):
        try:
            d_out, d_in = (int(s) for s in spec.lower().strip().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"shapes are d_outxd_in, comma separated (768x3072), got {spec!r}")
        if d_out < 1 or d_in < 1:
            raise argparse.ArgumentTypeError(f"shape sizes must be positive, got {spec!r}")
        shapes.append((d_out, d_in))
    return shapes


def parse_ratios(text: str) -> List[float]:
    try:
        ratios = [float(r) for r in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"ratios are comma-separated numbers in (0, 1], got {text!r}")
    if any(not 0 < r <= 1 for r in ratios):
        raise argparse.ArgumentTypeError(f"ratios must lie in (0, 1], got {text!r}")
    return ratios

