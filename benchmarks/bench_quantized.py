#!/usr/bin/env python3
"""One layer on a quantized base: each way LFMA can run beside it, timed alone, against the base and LoRA.

For each shape, quantization (bitsandbytes nf4 / int8) and K, side by side in one process, round-robin
(one call of each per round, a fresh random order each round; medians, and ratios as medians of
per-round ratios), a layer's training step (forward, then the backward for ``x`` and the trained
parameters, with a random ``dL/dout``) at ``--tokens`` tokens:

  base        the quantized layer alone, frozen (forward + dL/dx): what every adapter adds to
  LoRA r=8    PEFT's LoRA on the bitsandbytes layer (lora_alpha 8)
  FourierFT   PEFT's FourierFT, n=1000 (a dense spectrum and ifft2, then a second GEMM)
  fold        LFMA, W dequantized into a transient copy, dW folded in, one GEMM (again in the backward)
  rows        LFMA, the base plus x dW^T by row FFTs
  separable   LFMA, the base plus x dW^T through the exact-phase tables
  dense       LFMA, the base plus x dW^T with a dense dW and a second GEMM
  auto        LFMA as the planner chooses (the path in the note)

    python benchmarks/bench_quantized.py --output benchmarks/RESULTS.md
"""
from __future__ import annotations

import argparse
import sys
import warnings
from typing import Callable, Dict, List, Optional, Sequence

from common import lfma  # first: puts lfma_kernels (and this folder) on the path

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from lfma_kernels.ops import planner  # noqa: E402
from report import fmt_ms, fmt_ratio, machine_info, markdown_table, noisy_lines, publish  # noqa: E402
from timing import interleaved_rounds, paired_ratio  # noqa: E402

PATHS = ("fold", "rows", "separable", "dense")


def quantized_linear(d_out: int, d_in: int, kind: str) -> nn.Module:
    import bitsandbytes as bnb

    torch.manual_seed(0)
    dense = nn.Linear(d_in, d_out)
    layer = (bnb.nn.Linear4bit(d_in, d_out, compute_dtype=torch.float32, quant_type="nf4") if kind == "nf4"
             else bnb.nn.Linear8bitLt(d_in, d_out, has_fp16_weights=False))
    layer.load_state_dict(dense.state_dict())
    return layer.to("cpu").requires_grad_(False)


def peft_layer(d_out: int, d_in: int, kind: str, method: str) -> nn.Module:
    """PEFT's ``method`` ("LoRA r=8" or "FourierFT") on a quantized layer, as get_peft_model builds it."""
    from peft import FourierFTConfig, LoraConfig, get_peft_model

    config = (LoraConfig(r=8, lora_alpha=8, target_modules=["0"]) if method == "LoRA r=8" else
              FourierFTConfig(n_frequency=1000, scaling=150.0, target_modules=["0"]))
    return get_peft_model(nn.Sequential(quantized_linear(d_out, d_in, kind)), config)


def step_fn(layer: nn.Module, x: torch.Tensor, g: torch.Tensor, path: Optional[str]) -> Callable[[], None]:
    params = [p for p in layer.parameters() if p.requires_grad]

    def step() -> None:
        with planner.force(delta=path) if path else _nothing():
            out = layer(x)
            torch.autograd.grad(out, [x, *params], g)
    return step


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def measure(shape: Sequence[int], kind: str, k: int, tokens: int, rounds: int, noisy: List[str]) -> List[dict]:
    d_out, d_in = shape
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, d_in, generator=gen).requires_grad_(True)
    g = torch.randn(tokens, d_out, generator=gen)
    base = quantized_linear(d_out, d_in, kind)
    adapted = lfma.LFMALinear(quantized_linear(d_out, d_in, kind), k=k)
    fns: Dict[str, Callable[[], None]] = {
        "base": step_fn(base, x, g, None),
        "LoRA r=8": step_fn(peft_layer(d_out, d_in, kind, "LoRA r=8"), x, g, None),
        "FourierFT": step_fn(peft_layer(d_out, d_in, kind, "FourierFT"), x, g, None),
        "auto": step_fn(adapted, x, g, None),
    }
    for path in PATHS:
        fns[path] = step_fn(adapted, x, g, path)
    times = interleaved_rounds(fns, rounds=rounds, warmup=2, noisy=noisy, label=f"{kind} {d_out}x{d_in} K={k}")
    auto = adapted.plan(x).delta
    rows = []
    for name, t in times.items():
        rows.append({"name": name, "ms": sorted(t)[len(t) // 2], "rounds": t,
                     "note": f"planner: {auto}" if name == "auto" else ""})
    return rows


def table(rows: List[dict]) -> str:
    by = {r["name"]: r for r in rows}
    headers = ["way", "step ms", "/ base", "/ LoRA r=8", "/ FourierFT", "/ fold", "note"]
    out = [[r["name"], fmt_ms(r["ms"])] + [fmt_ratio(paired_ratio(r["rounds"], by[other]["rounds"]), 1.0)
                                           for other in ("base", "LoRA r=8", "FourierFT", "fold")] + [r["note"]]
           for r in rows]
    return markdown_table(headers, out, [False, True, True, True, True, True, False])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="768x768,2304x768", help="d_out x d_in (2304x768: GPT-2's c_attn)")
    parser.add_argument("--kinds", default="nf4,int8")
    parser.add_argument("--ks", default="176,943", help="K: 0.0003 and 0.0016 of 768x768")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--output", help="write a section of this Markdown results file")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    noisy: List[str] = []
    lines = ["## Quantized base, one layer: cpu, float32 (benchmarks/bench_quantized.py)", ""]
    lines += [f"- {k}: {v}" for k, v in machine_info("cpu", "float32")]
    lines += [f"- command: `python benchmarks/bench_quantized.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
              f"- a layer's training step (forward, then dL/dx and the trained parameters' gradients for a random "
              f"dL/dout) at {args.tokens} tokens, every way round-robin in one process ({args.rounds} rounds, "
              "a fresh order each); ratios are medians of per-round ratios", ""]
    for shape in args.shapes.split(","):
        d_out, d_in = (int(v) for v in shape.split("x"))
        for kind in args.kinds.split(","):
            for k in (int(v) for v in args.ks.split(",")):
                print(f"{kind} {d_out}x{d_in} K={k}", file=sys.stderr, flush=True)
                lines += [f"### {kind}, {d_out}x{d_in}, K={k}", "",
                          table(measure((d_out, d_in), kind, k, args.tokens, args.rounds, noisy)), ""]
    lines += noisy_lines(noisy)
    text = "\n".join(lines)
    publish(text, args.output, "quantized layer cpu")
    return 0


if __name__ == "__main__":
    sys.exit(main())
