#!/usr/bin/env python3
"""Model-level comparison: LFMA against the peers people use, on real transformers models.

``transformers``' ViT-B/16 and RoBERTa-base are built from their configs with random weights (no
download). Adapters go on the query and value projections; side by side in one run:

  frozen             backbone frozen, classifier head trained (the cost floor)
  LoRA r=8           ``peft`` LoRA, lora_alpha 8
  FourierFT n=1000   ``peft`` FourierFT (dense spectrum + ifft2 on every forward)
  LFMA paper         ``LFMAConfig(backend="reference")``: the paper's formulation
  LFMA auto          ``LFMAConfig(backend="auto")``: this package

at the paper's sparsities (ViT-B: top_k_ratio 0.0003; RoBERTa-base: 0.0016). Reported: median
training step (AdamW, forward + loss + backward + step), median eval forward (``no_grad``), peak
memory (``max_memory_allocated`` on GPU; on CPU the peak RSS growth of a fresh process per variant
over the model build), each also as a ratio to LoRA. A peer whose package is missing gets a row
marked so. On CPU the full models do not fit the time budget: by default 2 layers and a small
batch, said in the table; ``--layers 12`` and a larger batch on a GPU.

    python benchmarks/bench_models.py                       # CPU, float32
    python benchmarks/bench_models.py --device cuda --dtype bfloat16 --layers 12 --batch 32
"""
from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import os
import resource
import sys
from typing import Dict, List, Optional, Sequence, Tuple

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
try:
    import lfma_kernels as lfma
except ImportError:  # not installed: use the source tree this script lives in
    sys.path.insert(0, os.path.dirname(_HERE))
    import lfma_kernels as lfma

import torch
import torch.nn as nn

from lfma_kernels.demo import attention_targets
from report import fmt_ms, fmt_ratio, machine_info, markdown_table, write_section
from timing import median_ms

VARIANTS = ("frozen", "LoRA r=8", "FourierFT n=1000", "LFMA paper", "LFMA auto")
RATIOS = {"ViT-B/16": 0.0003, "RoBERTa-base": 0.0016}
LORA_R, FOURIERFT_N, FOURIERFT_SCALING, LFMA_ALPHA = 8, 1000, 150.0, 12.0


def build(model_name: str, layers: int, batch: int, seq: int, device: str, dtype: torch.dtype
          ) -> Tuple[nn.Module, Dict[str, torch.Tensor]]:
    """The model (random weights, dropout off) and one batch of inputs with labels."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if model_name == "ViT-B/16":
        from transformers import ViTConfig, ViTForImageClassification
        config = ViTConfig(hidden_size=768, num_hidden_layers=layers, num_attention_heads=12, intermediate_size=3072,
                           image_size=224, patch_size=16, num_labels=10, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
        model = ViTForImageClassification(config)
        inputs = {"pixel_values": torch.randn(batch, 3, 224, 224, generator=gen).to(device, dtype),
                  "labels": torch.randint(0, 10, (batch,), generator=gen).to(device)}
    else:
        from transformers import RobertaConfig, RobertaForSequenceClassification
        config = RobertaConfig(vocab_size=50265, hidden_size=768, num_hidden_layers=layers, num_attention_heads=12,
                               intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1, num_labels=2,
                               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        model = RobertaForSequenceClassification(config)
        inputs = {"input_ids": torch.randint(3, 50000, (batch, seq), generator=gen).to(device),
                  "labels": torch.randint(0, 2, (batch,), generator=gen).to(device)}
    return model.to(device, dtype), inputs


def adapt(model: nn.Module, variant: str, ratio: float) -> Tuple[nn.Module, str]:
    """Apply ``variant`` to the query/value projections; returns the model and a note."""
    targets = attention_targets(model)
    if variant == "frozen":
        model.requires_grad_(False)
        model.classifier.requires_grad_(True)
        return model, "head only"
    if variant.startswith("LFMA"):
        backend = "reference" if variant == "LFMA paper" else "auto"
        lfma.apply_lfma(model, lfma.LFMAConfig(targets, top_k_ratio=ratio, alpha=LFMA_ALPHA, backend=backend,
                                               modules_to_save=["classifier"]))
        k = next(iter(lfma.model.lfma_layers(model).values())).k
        picked = lfma.ops.dispatch.auto_backend(next(model.parameters()).device, torch.float32, k, (768, 768))
        return model, f"K={k}" + (f", {picked}" if backend == "auto" else "")
    from peft import FourierFTConfig, LoraConfig, get_peft_model
    if variant == "LoRA r=8":
        config = LoraConfig(r=LORA_R, lora_alpha=LORA_R, target_modules=targets, modules_to_save=["classifier"])
    else:
        config = FourierFTConfig(n_frequency=FOURIERFT_N, scaling=FOURIERFT_SCALING, target_modules=targets,
                                 modules_to_save=["classifier"])
    return get_peft_model(model, config), "peft"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(model_name: str, variant: str, args: argparse.Namespace) -> dict:
    """One variant, timed and its peak memory taken; run in a fresh process on CPU."""
    device, dtype = args.device, getattr(torch, args.dtype)
    model, inputs = build(model_name, args.layers, args.batch, args.seq, device, dtype)
    model, note = adapt(model, variant, RATIOS[model_name])
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4)
    eval_inputs = {k: v for k, v in inputs.items() if k != "labels"}

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()
        opt.step()

    def forward() -> None:
        with torch.no_grad():
            model(**eval_inputs)

    model.train()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    step()  # first step allocates optimizer state and gradients
    step_ms = median_ms(step, repeats=args.repeats, warmup=1, device=device)
    peak = (torch.cuda.max_memory_allocated() if device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - base
    model.eval()
    eval_ms = median_ms(forward, repeats=args.repeats, warmup=2, device=device)
    return {"variant": variant, "note": note, "trainable": trainable, "step_ms": step_ms, "eval_ms": eval_ms,
            "peak_mb": peak / 2**20}


def _missing_peer(variant: str) -> Optional[str]:
    if variant in ("LoRA r=8", "FourierFT n=1000"):
        if importlib.util.find_spec("peft") is None:
            return "peft not installed (pip install -e '.[bench]')"
    return None


def run(args: argparse.Namespace) -> Dict[str, List[dict]]:
    results: Dict[str, List[dict]] = {}
    ctx = multiprocessing.get_context("spawn")
    for model_name in args.models:
        rows = []
        for variant in VARIANTS:
            missing = _missing_peer(variant)
            if missing:
                rows.append({"variant": variant, "note": missing})
                continue
            print(f"{model_name}: {variant}", file=sys.stderr, flush=True)
            if args.device == "cpu":  # a fresh process per variant: its peak RSS is its own
                with ctx.Pool(1) as pool:
                    rows.append(pool.apply(measure, (model_name, variant, args)))
            else:
                rows.append(measure(model_name, variant, args))
                torch.cuda.empty_cache()
        results[model_name] = rows
    return results


def table(rows: List[dict]) -> str:
    by = {r["variant"]: r for r in rows}
    lora, frozen = by.get("LoRA r=8", {}), by.get("frozen", {})
    headers = ["variant", "trainable", "train step ms", "eval ms", "peak MB", "step / LoRA", "eval / LoRA",
               "memory / LoRA", "eval / frozen", "note"]
    out = []
    for r in rows:
        if "step_ms" not in r:
            out.append([r["variant"], "-", "missing", "missing", "missing", "-", "-", "-", "-", r["note"]])
            continue
        out.append([r["variant"], f"{r['trainable']:,}", fmt_ms(r["step_ms"]), fmt_ms(r["eval_ms"]),
                    f"{r['peak_mb']:.0f}", fmt_ratio(r["step_ms"], lora.get("step_ms")),
                    fmt_ratio(r["eval_ms"], lora.get("eval_ms")), fmt_ratio(r["peak_mb"], lora.get("peak_mb")),
                    fmt_ratio(r["eval_ms"], frozen.get("eval_ms")), r["note"]])
    return markdown_table(headers, out, [False, True, True, True, True, True, True, True, True, False])


def bar_charts(results: Dict[str, List[dict]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("step_ms", "training step (ms)"), ("eval_ms", "eval forward (ms)"), ("peak_mb", "peak memory (MB)")]
    fig, axes = plt.subplots(len(results), len(metrics), figsize=(13, 3.2 * len(results)), squeeze=False)
    for row, (model_name, rows) in enumerate(results.items()):
        measured = [r for r in rows if "step_ms" in r]
        for col, (key, label) in enumerate(metrics):
            ax = axes[row][col]
            ax.barh([r["variant"] for r in measured], [r[key] for r in measured],
                    color=["tab:orange" if r["variant"] == "LFMA auto" else "tab:gray" for r in measured])
            ax.set_title(f"{model_name}: {label}", fontsize=9)
            ax.invert_yaxis()
            ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(args: argparse.Namespace, results: Dict[str, List[dict]]) -> str:
    lines = [f"## Model level: {args.device}, {args.dtype} (benchmarks/bench_models.py)", ""]
    lines += [f"- {k}: {v}" for k, v in machine_info(args.device, args.dtype)]
    lines += [f"- command: `python benchmarks/bench_models.py {' '.join(args.argv)}`",
              f"- models: random weights from the configs, **{args.layers} encoder layer(s)**, batch {args.batch}"
              f" (ViT: 224x224 images, 197 tokens each; RoBERTa: {args.seq} tokens each); adapters on query + value;"
              f" LFMA top_k_ratio {RATIOS['ViT-B/16']} (ViT-B) and {RATIOS['RoBERTa-base']} (RoBERTa-base), alpha "
              f"{LFMA_ALPHA}; LoRA r={LORA_R}; FourierFT n={FOURIERFT_N}, scaling {FOURIERFT_SCALING}",
              f"- medians of {args.repeats} runs; training step = AdamW zero_grad + forward + loss + backward + step;"
              " peak memory: " + ("`torch.cuda.max_memory_allocated` over the training steps, above the model"
                                  if args.device.startswith("cuda") else
                                  "peak RSS growth of a fresh process over the built model (training steps, "
                                  "optimizer state included)"), ""]
    for model_name, rows in results.items():
        lines += [f"### {model_name}", "", table(rows), ""]
    if args.charts:
        lines += [f"![model-level bar charts]({os.path.basename(args.charts)})", ""]
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="ViT-B/16,RoBERTa-base")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--layers", type=int, default=2, help="encoder layers (12 is the full model)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256, help="RoBERTa tokens per sequence")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--output", help="write a section of this Markdown results file")
    parser.add_argument("--charts", help="write PNG bar charts here")
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in RATIOS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {list(RATIOS)}")
    if args.repeats < 5:
        parser.error("--repeats must be at least 5")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    results = run(args)
    if args.charts:
        bar_charts(results, args.charts)
    text = render(args, results)
    if args.output:
        write_section(args.output, f"models {args.device} {args.dtype}", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
