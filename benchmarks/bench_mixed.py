#!/usr/bin/env python3
"""Mixed-adapter batches in eval: LFMA against PEFT's LoRA, and against the merged single adapter.

A batch of sequences spread over 1, 4 and 16 adapters (sequence ``i`` gets adapter ``i mod N``), one
eval forward (``no_grad``) of the whole batch with ``adapter_names=`` per variant, timed round-robin
in one process:

  merged (floor)        one LFMA adapter merged into the weights (``merge_and_unload``): the cost floor
  LoRA r=8 mixed        PEFT LoRA, N adapters (random A and B), ``adapter_names=``
  LFMA mixed            lfma_kernels.peft, N adapters, default settings (W + dW kept for 4 adapters per layer)
  LFMA mixed, all kept  the same with ``set_mixed_batch_folds(16)`` (memory: one weight copy per adapter
                        and adapted layer, as 16 merged models would hold)

Models as bench_models.py (random weights from the configs, 2 layers on CPU; adapters on query + value,
or GPT-2's fused c_attn), at the paper's sparsities. ``--seq 1`` times a decoding-shaped call (one token
per sequence), where the delta path serves every adapter.

    python benchmarks/bench_mixed.py --output benchmarks/RESULTS.md
    python benchmarks/bench_mixed.py --seq 1 --output benchmarks/RESULTS.md
"""
from __future__ import annotations

import argparse
import copy
import sys
import warnings
from typing import Dict, List, Optional, Sequence

import common  # noqa: F401  (first: puts lfma_kernels and this folder on the path)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from bench_models import LFMA_ALPHA, LORA_R, MODELS, build  # noqa: E402
from report import fmt_ms, fmt_ratio, machine_info, markdown_table, noisy_lines, publish  # noqa: E402
from timing import interleaved_rounds, paired_ratio  # noqa: E402

FLOOR, LORA, LFMA, LFMA_ALL = "merged (floor)", "LoRA r=8 mixed", "LFMA mixed", "LFMA mixed, all kept"


def adapted(model: nn.Module, method: str, n: int, spec, targets: List[str]) -> nn.Module:
    """``model`` (copied) with ``n`` adapters ``a0 .. a{n-1}`` of ``method``, in eval mode."""
    from peft import LoraConfig, get_peft_model

    from lfma_kernels.peft import LfmaConfig  # registers LFMA with PEFT

    def config():
        if method == "lora":  # random B too, so every adapter changes the outputs
            return LoraConfig(r=LORA_R, lora_alpha=LORA_R, target_modules=targets, init_lora_weights=False)
        return LfmaConfig(target_modules=targets, top_k_ratio=spec.ratio, alpha=LFMA_ALPHA)

    peft_model = get_peft_model(copy.deepcopy(model), config(), adapter_name="a0")
    for i in range(1, n):
        peft_model.add_adapter(f"a{i}", config())
    return peft_model.eval()


def kept_mb(model: nn.Module) -> float:
    """Memory of the W + dW that LFMA layers keep for mixed batches."""
    from lfma_kernels.peft import LfmaLayer
    total = 0
    for m in model.modules():
        if isinstance(m, LfmaLayer):
            for cache in m._folds._caches.values():
                entry = cache._entry
                total += 0 if entry is None else entry[2].numel() * entry[2].element_size()
    return total / 2**20


def run_model(model_name: str, args: argparse.Namespace, noisy: List[str]) -> List[dict]:
    spec = MODELS[model_name]
    torch.manual_seed(0)
    base, inputs = build(model_name, args.layers, args.batch, args.seq, args.device, torch.float32)
    inputs = {k: v for k, v in inputs.items() if k != "labels"}
    base.eval()
    targets = spec.targets(base)
    most = max(args.adapters)
    print(f"{model_name}: building {most} LoRA and LFMA adapters", file=sys.stderr)
    lora = adapted(base, "lora", most, spec, targets)
    lfma_model = adapted(base, "lfma", most, spec, targets)
    lfma_all = adapted(base, "lfma", most, spec, targets)
    lfma_all.set_mixed_batch_folds(most)
    merged = adapted(base, "lfma", 1, spec, targets).merge_and_unload().eval()
    rows = []
    for n in args.adapters:
        names = [f"a{i % n}" for i in range(args.batch)]
        fns = {FLOOR: lambda: merged(**inputs),
               LORA: lambda: lora(**inputs, adapter_names=names),
               LFMA: lambda: lfma_model(**inputs, adapter_names=names),
               LFMA_ALL: lambda: lfma_all(**inputs, adapter_names=names)}
        print(f"{model_name}: {n} adapter(s), timing {len(fns)} variants round-robin", file=sys.stderr)
        with torch.no_grad():
            times = interleaved_rounds(fns, rounds=args.repeats, label=f"{model_name}, {n} adapters", noisy=noisy)
        for name, t in times.items():
            rows.append({"adapters": n, "variant": name, "ms": sorted(t)[len(t) // 2],
                         "/ LoRA": paired_ratio(t, times[LORA]), "/ floor": paired_ratio(t, times[FLOOR]),
                         "spread": _spread(t, times[LORA]),
                         "kept MB": kept_mb(lfma_model if name == LFMA else lfma_all) if name in (LFMA, LFMA_ALL) else None})
    return rows


def _spread(num: Sequence[float], den: Sequence[float]) -> str:
    """The middle half (quartiles) of the per-round ratios: the run-to-run spread of ``/ LoRA``."""
    ratios = sorted(a / b for a, b in zip(num, den))
    q = len(ratios) // 4
    return f"{ratios[q]:.2f}-{ratios[-1 - q]:.2f}"


def table(rows: List[dict]) -> str:
    header = ["adapters", "variant", "eval ms", "/ LoRA mixed", "/ LoRA, middle half", "/ merged", "kept W + dW"]
    body = [[str(r["adapters"]), r["variant"], fmt_ms(r["ms"]), fmt_ratio(r["/ LoRA"], 1.0), r["spread"],
             fmt_ratio(r["/ floor"], 1.0), "" if r["kept MB"] is None else f"{r['kept MB']:.0f} MB"] for r in rows]
    return markdown_table(header, body, [True, False, True, True, True, True, True])


def render(args: argparse.Namespace, results: Dict[str, List[dict]], noisy: Sequence[str]) -> str:
    lines = [f"## Mixed-adapter batches: {args.device}, float32, {args.seq} token(s) per sequence "
             "(benchmarks/bench_mixed.py)", ""]
    lines += [f"- {k}: {v}" for k, v in machine_info(args.device, "float32")]
    lines += [f"- command: `python benchmarks/bench_mixed.py {' '.join(args.argv)}`",
              f"- models: random weights from the configs, **{args.layers} layer(s)**, {args.batch} sequences of "
              f"{args.seq} token(s), sequence i through adapter i mod N; adapters on query + value (RoBERTa) or "
              "GPT-2's fused c_attn (Conv1D 768 -> 2304); LFMA at the paper's top_k_ratio (" +
              ", ".join(f"{MODELS[m].ratio} for {m}" for m in args.models) + f"), alpha {LFMA_ALPHA}; LoRA "
              f"r={LORA_R} with random A and B; merged = one LFMA adapter merged into the weights",
              f"- eval forwards (no_grad) round-robin: {args.repeats} rounds, a fresh order each; times are medians, "
              "ratios medians of per-round ratios, with the quartiles of the per-round ratio to LoRA (the spread)",
              "- kept W + dW: memory of the per-adapter folded weights the LFMA layers keep after the run", ""]
    for model_name, rows in results.items():
        lines += [f"### {model_name}", "", table(rows), ""]
    lines += noisy_lines(noisy)
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="GPT-2,RoBERTa-base")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16, help="sequences per batch")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--adapters", default="1,4,16", help="adapter counts")
    parser.add_argument("--repeats", type=int, default=11, help="timed rounds")
    parser.add_argument("--output", help="write a section of this Markdown results file")
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS or m == "ViT-B/16"]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from GPT-2, RoBERTa-base")
    args.adapters = [int(a) for a in args.adapters.split(",")]
    if min(args.adapters) < 1 or max(args.adapters) > args.batch:
        parser.error("--adapters: each count between 1 and --batch")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
    noisy: List[str] = []
    results = {m: run_model(m, args, noisy) for m in args.models}
    text = render(args, results, noisy)
    publish(text, args.output, f"mixed {args.device} seq {args.seq}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
