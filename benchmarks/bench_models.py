#!/usr/bin/env python3
"""Model-level comparison: LFMA against the peers people use, on real transformers models.

``transformers``' ViT-B/16, RoBERTa-base and GPT-2 (sequence classification) are built from their
configs with random weights (no download). Adapters go on the query and value projections (GPT-2:
its fused ``c_attn``, a transformers ``Conv1D``); side by side in one run:

  frozen                 backbone frozen, classifier head trained: no backward through the backbone
  frozen, full backward  the same, but dL/dx flows back through every layer (the embeddings' output
                         requires grad): the backward every adapter must pay, the true cost floor
  LoRA r=8               ``peft`` LoRA, lora_alpha 8
  FourierFT n=1000       ``peft`` FourierFT (dense spectrum + ifft2 on every forward)
  LFMA paper             ``LFMAConfig(backend="reference")``: the paper's formulation in training
  LFMA auto              ``LFMAConfig(backend="auto")``: this package
  LFMA via PEFT          the same adapter through ``lfma_kernels.peft`` (``get_peft_model``)

at the paper's sparsities (ViT-B: top_k_ratio 0.0003; RoBERTa-base: 0.0016; GPT-2: 0.0003). The LFMA rows
evaluate through the layer's eval cache (``W + dW`` kept between forwards); the paper's layer
recomputes ``ifft2`` on every forward (bench_layer.py's "paper" column measures that).

All variants of a model live in one process and are timed round-robin: one training step (AdamW
zero_grad + forward + loss + backward + step) or one eval forward (``no_grad``) of each per round,
in a fresh random order. Times are medians over the rounds; ratios between two timed rows are
medians of their per-round ratios (both timed in the same round), so they hold while the machine
drifts. Peak memory is taken before the timing: ``max_memory_allocated`` on a GPU; on CPU the peak
RSS of two training steps above the built model, in a fresh process per variant. Everything is
also given as a ratio to LoRA, and each training step as a ratio to the "frozen, full backward"
row (step / floor). A peer whose package is missing gets a row marked so. On CPU the
full models do not fit the time budget: by default 2 layers and a small batch, said in the table;
``--layers 12`` and a larger batch on a GPU.

With ``--quantized nf4`` (or ``int8``) every linear layer of the backbone but the classifier head is
quantized by transformers' bitsandbytes integration (the QLoRA setting) and the rows are the frozen nf4
model, PEFT's LoRA and FourierFT on it, and LFMA (native and through PEFT) beside the quantized
layers; the paper's formulation is left out there.

    python benchmarks/bench_models.py                       # CPU, float32
    python benchmarks/bench_models.py --quantized nf4 --models GPT-2,RoBERTa-base
    python benchmarks/bench_models.py --device cuda --dtype bfloat16 --layers 12 --batch 32
"""
from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import os
import resource
import statistics
import sys
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

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

from lfma_kernels.model import attention_targets
from report import fmt_ms, fmt_ratio, machine_info, markdown_table, noisy_lines, publish
from timing import interleaved_rounds, paired_ratio

FLOOR = "frozen, full backward"
VARIANTS = ("frozen", FLOOR, "LoRA r=8", "FourierFT n=1000", "LFMA paper", "LFMA auto", "LFMA via PEFT")
# On a quantized backbone: the paper's formulation has nothing to add to the delta path's comparison.
QUANTIZED_VARIANTS = tuple(v for v in VARIANTS if v != "LFMA paper")
LORA_R, FOURIERFT_N, FOURIERFT_SCALING, LFMA_ALPHA = 8, 1000, 150.0, 12.0


class ModelSpec(NamedTuple):
    ratio: float                                  # LFMA top_k_ratio (the paper's for ViT-B and RoBERTa-base)
    head: str                                     # the fresh classifier, trained and saved with every adapter
    targets: Callable[[nn.Module], List[str]]     # the adapted projections
    embeddings: Callable[[nn.Module], nn.Module]  # whose output starts the full backward of the floor row


MODELS: Dict[str, ModelSpec] = {
    "ViT-B/16": ModelSpec(0.0003, "classifier", attention_targets, lambda m: m.base_model.embeddings),
    "RoBERTa-base": ModelSpec(0.0016, "classifier", attention_targets, lambda m: m.base_model.embeddings),
    # GPT-2's fused q/k/v projection is a transformers Conv1D, 768 -> 2304, weight stored (in, out).
    "GPT-2": ModelSpec(0.0003, "score", lambda m: ["c_attn"], lambda m: m.transformer.drop),
}


def quantized_copy(model: nn.Module, head: str, bits: str) -> nn.Module:
    """``model`` with every linear layer but ``head`` quantized by transformers' bitsandbytes
    integration (saved and loaded again, as a quantized checkpoint is): nf4 with double quantization
    and float32 compute, or LLM.int8."""
    import tempfile

    from transformers import BitsAndBytesConfig

    config = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=[head])
              if bits == "nf4" else BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=[head]))
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        return type(model).from_pretrained(directory, quantization_config=config)


def build(model_name: str, layers: int, batch: int, seq: int, device: str, dtype: torch.dtype,
          quantized: Optional[str] = None) -> Tuple[nn.Module, Dict[str, torch.Tensor]]:
    """The model (random weights, dropout off; its linear layers quantized if asked) and one batch of
    inputs with labels."""
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
    elif model_name == "GPT-2":
        from transformers import GPT2Config, GPT2ForSequenceClassification
        config = GPT2Config(n_embd=768, n_layer=layers, n_head=12, n_positions=1024, num_labels=2, pad_token_id=50256,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = GPT2ForSequenceClassification(config)
        inputs = {"input_ids": torch.randint(0, 50000, (batch, seq), generator=gen).to(device),
                  "labels": torch.randint(0, 2, (batch,), generator=gen).to(device)}
    else:
        from transformers import RobertaConfig, RobertaForSequenceClassification
        config = RobertaConfig(vocab_size=50265, hidden_size=768, num_hidden_layers=layers, num_attention_heads=12,
                               intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1, num_labels=2,
                               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        model = RobertaForSequenceClassification(config)
        inputs = {"input_ids": torch.randint(3, 50000, (batch, seq), generator=gen).to(device),
                  "labels": torch.randint(0, 2, (batch,), generator=gen).to(device)}
    if quantized:
        return quantized_copy(model, MODELS[model_name].head, quantized), inputs
    return model.to(device, dtype), inputs


def _require_grad(module: nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: in grad mode, the module's output becomes a leaf that requires grad, so the
    backward runs dL/dx through everything after it (and no weight gradient before the head)."""
    return output.requires_grad_() if torch.is_grad_enabled() else output


def adapt(model: nn.Module, variant: str, spec: ModelSpec) -> Tuple[nn.Module, str]:
    """Apply ``variant`` to the model's projections (``spec.targets``); returns the model and a note."""
    targets = spec.targets(model)
    if variant in ("frozen", FLOOR):
        model.requires_grad_(False)
        model.get_submodule(spec.head).requires_grad_(True)
        if variant == "frozen":
            return model, "head only"
        # An adapter on layer 0's query needs dL/dx of every layer above it; head-only training
        # skips all of that backward, so it is no floor for adapters. This row pays it and nothing else.
        spec.embeddings(model).register_forward_hook(_require_grad)
        return model, "head only, dL/dx through every layer"
    if variant in ("LFMA paper", "LFMA auto"):
        backend = "reference" if variant == "LFMA paper" else "auto"
        lfma.apply_lfma(model, lfma.LFMAConfig(targets, top_k_ratio=spec.ratio, alpha=LFMA_ALPHA, backend=backend,
                                               modules_to_save=[spec.head]))
        layer = next(iter(lfma.model.lfma_layers(model).values()))
        return model, f"K={layer.k}" + (f", {layer.plan().backend}" if backend == "auto" else "")
    import warnings

    from peft import FourierFTConfig, LoraConfig, get_peft_model
    # GPT-2: PEFT sets fan_in_fan_out for its Conv1D layers (with a warning); quantized, they are Linear4bit
    conv1d = any(lfma.targets.is_conv1d(m) for n, m in model.named_modules() if n.endswith(targets[0]))
    if variant == "LFMA via PEFT":
        from lfma_kernels.peft import LfmaConfig, LfmaLinear
        # seed=0: the native row's selection (the PEFT config's default draws from the global RNG)
        config = LfmaConfig(target_modules=targets, top_k_ratio=spec.ratio, alpha=LFMA_ALPHA, seed=0,
                            modules_to_save=[spec.head], fan_in_fan_out=conv1d)
    elif variant == "LoRA r=8":
        config = LoraConfig(r=LORA_R, lora_alpha=LORA_R, target_modules=targets, modules_to_save=[spec.head],
                            fan_in_fan_out=conv1d)
    else:
        config = FourierFTConfig(n_frequency=FOURIERFT_N, scaling=FOURIERFT_SCALING, target_modules=targets,
                                 modules_to_save=[spec.head], fan_in_fan_out=conv1d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(model, config)
    if variant != "LFMA via PEFT":
        return model, "peft"
    layer = next(m for m in model.modules() if isinstance(m, LfmaLinear))
    return model, f"K={layer.lfma_coeffs['default'].shape[0]}, {layer.plan().backend}, peft"


class Prepared(NamedTuple):
    """One variant, built and adapted, with its optimizer, ready to time."""
    model: nn.Module
    note: str
    trainable: int
    step: Callable[[], None]     # AdamW zero_grad + forward + loss + backward + step
    forward: Callable[[], None]  # no_grad forward without labels


def prepare(model_name: str, variant: str, args: argparse.Namespace) -> Prepared:
    model, inputs = build(model_name, args.layers, args.batch, args.seq, args.device, getattr(torch, args.dtype),
                          args.quantized)
    model, note = adapt(model, variant, MODELS[model_name])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    eval_inputs = {k: v for k, v in inputs.items() if k != "labels"}

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()
        opt.step()

    def forward() -> None:
        with torch.no_grad():
            model(**eval_inputs)

    return Prepared(model, note, sum(p.numel() for p in params), step, forward)


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_memory_mb(p: Prepared, device: str) -> float:
    """Peak memory of two training steps (the first allocates gradients and optimizer state) above
    what the built model holds: ``max_memory_allocated`` on a GPU; on CPU the peak RSS, its mark
    reset after the build (or, where it cannot be, the process's lifetime peak)."""
    p.model.train()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        p.step()
        p.step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    base = _rss_kb("VmRSS")
    peak_field = "VmHWM" if _reset_peak_rss() else None
    p.step()
    p.step()
    peak = _rss_kb(peak_field) if peak_field else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak - base) / 1024


def _memory_in_fresh_process(model_name: str, variant: str, args: argparse.Namespace) -> float:
    return peak_memory_mb(prepare(model_name, variant, args), "cpu")


def _missing_peer(variant: str) -> Optional[str]:
    if variant in ("LoRA r=8", "FourierFT n=1000", "LFMA via PEFT"):
        if importlib.util.find_spec("peft") is None:
            return "peft not installed (pip install -e '.[bench]')"
    if variant == "LFMA via PEFT" and importlib.util.find_spec("aenum") is None:
        return "aenum not installed (pip install -e '.[peft]')"
    return None


def run(args: argparse.Namespace) -> Tuple[Dict[str, List[dict]], List[str]]:
    """Every variant of each model built in this process and timed round-robin (one training step,
    or one eval forward, of each per round, in a fresh random order), so load from elsewhere and the
    machine's drift fall on all of them alike; peak memory measured before the timing, on CPU in a
    fresh process per variant (RSS is per process)."""
    results: Dict[str, List[dict]] = {}
    noisy: List[str] = []
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else None
    ctx = multiprocessing.get_context("spawn")
    for model_name in args.models:
        rows: Dict[str, dict] = {}
        prepared: Dict[str, Prepared] = {}
        variants = QUANTIZED_VARIANTS if args.quantized else VARIANTS
        for variant in variants:
            missing = _missing_peer(variant)
            if missing:
                rows[variant] = {"variant": variant, "note": missing}
                continue
            print(f"{model_name}: {variant}: build, peak memory", file=sys.stderr, flush=True)
            prepared[variant] = prepare(model_name, variant, args)
            if cuda:
                peak = peak_memory_mb(prepared[variant], args.device)
            else:
                with ctx.Pool(1) as pool:
                    peak = pool.apply(_memory_in_fresh_process, (model_name, variant, args))
            p = prepared[variant]
            rows[variant] = {"variant": variant, "note": p.note, "trainable": p.trainable, "peak_mb": peak}
        print(f"{model_name}: timing {len(prepared)} variants round-robin", file=sys.stderr, flush=True)
        for p in prepared.values():
            p.model.train()
        steps = interleaved_rounds({v: p.step for v, p in prepared.items()}, rounds=args.repeats, warmup=1,
                                   sync=sync, noisy=noisy, label=f"{model_name} training steps")
        for p in prepared.values():
            p.model.eval()
        evals = interleaved_rounds({v: p.forward for v, p in prepared.items()}, rounds=args.repeats, warmup=2,
                                   sync=sync, noisy=noisy, label=f"{model_name} eval forwards")
        for v in prepared:
            rows[v].update(step_ms=statistics.median(steps[v]), eval_ms=statistics.median(evals[v]),
                           step_rounds=steps[v], eval_rounds=evals[v])
        results[model_name] = [rows[v] for v in variants]
        del prepared
        if cuda:
            torch.cuda.empty_cache()
    return results, noisy


def _ratio(row: dict, other: dict, key: str) -> str:
    """``row`` over ``other`` in ``key`` ("step", "eval" or "peak"): the median of per-round ratios
    where both have their rounds, else the ratio of the values."""
    if f"{key}_rounds" in row and f"{key}_rounds" in other:
        return fmt_ratio(paired_ratio(row[f"{key}_rounds"], other[f"{key}_rounds"]), 1.0)
    unit = "mb" if key == "peak" else "ms"
    return fmt_ratio(row.get(f"{key}_{unit}"), other.get(f"{key}_{unit}"))


def table(rows: List[dict]) -> str:
    by = {r["variant"]: r for r in rows}
    lora, frozen, floor = by.get("LoRA r=8", {}), by.get("frozen", {}), by.get(FLOOR, {})
    fourierft, native = by.get("FourierFT n=1000", {}), by.get("LFMA auto", {})
    headers = ["variant", "trainable", "train step ms", "step / floor", "eval ms", "peak MB", "step / LoRA",
               "step / FourierFT", "step / LFMA auto", "eval / LoRA", "memory / LoRA", "eval / frozen", "note"]
    out = []
    for r in rows:
        if "step_ms" not in r:
            out.append([r["variant"], "-", "missing"] + ["-"] * 9 + [r["note"]])
            continue
        out.append([r["variant"], f"{r['trainable']:,}", fmt_ms(r["step_ms"]), _ratio(r, floor, "step"),
                    fmt_ms(r["eval_ms"]), f"{r['peak_mb']:.0f}", _ratio(r, lora, "step"),
                    _ratio(r, fourierft, "step"), _ratio(r, native, "step"), _ratio(r, lora, "eval"),
                    _ratio(r, lora, "peak"), _ratio(r, frozen, "eval"), r["note"]])
    return markdown_table(headers, out, [False] + [True] * 11 + [False])


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
                    color=["tab:orange" if r["variant"] in ("LFMA auto", "LFMA via PEFT") else "tab:gray"
                           for r in measured])
            ax.set_title(f"{model_name}: {label}", fontsize=9)
            ax.invert_yaxis()
            ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(args: argparse.Namespace, results: Dict[str, List[dict]], noisy: Sequence[str]) -> str:
    base = f", {args.quantized} backbone" if args.quantized else ""
    lines = [f"## Model level: {args.device}, {args.dtype}{base} (benchmarks/bench_models.py)", ""]
    lines += [f"- {k}: {v}" for k, v in machine_info(args.device, args.dtype)]
    lines += [f"- command: `python benchmarks/bench_models.py {' '.join(args.argv)}`",
              f"- models: random weights from the configs, **{args.layers} layer(s)**, batch {args.batch}"
              f" (ViT: 224x224 images, 197 tokens each; RoBERTa and GPT-2: {args.seq} tokens each); adapters on "
              "query + value (ViT, RoBERTa) or GPT-2's fused c_attn (a transformers Conv1D, 768 -> 2304); LFMA "
              + ", ".join(f"top_k_ratio {MODELS[m].ratio} ({m})" for m in args.models) +
              f", alpha {LFMA_ALPHA}; LoRA r={LORA_R}; FourierFT n={FOURIERFT_N}, scaling {FOURIERFT_SCALING}; "
              "\"LFMA via PEFT\" is LFMA auto's adapter through lfma_kernels.peft (get_peft_model)"
              + (f"; every linear layer but the head quantized to {args.quantized} by transformers' bitsandbytes "
                 "integration (nf4: double quantization, float32 compute)" if args.quantized else ""),
              f"- all variants in one process, timed round-robin: {args.repeats} rounds, one call of each variant per "
              "round in a random order; times are medians over the rounds, ratios (x) medians of the per-round "
              "ratios; training step = AdamW zero_grad + forward + loss + backward + step; "
              "eval = no_grad forward (both LFMA rows through the layer's eval cache" +
              ("; on a quantized backbone there is none: the planner's delta path)" if args.quantized else ")"),
              f"- step / floor: training step over the \"{FLOOR}\" row's, in which only the head trains but "
              "dL/dx flows back through every layer (the embeddings' output requires grad): the backward every "
              "adapter pays before any work of its own; \"frozen\" (head only) skips that backward",
              "- peak memory of two training steps above the built model (gradients, optimizer state and "
              "activations): " + ("`torch.cuda.max_memory_allocated`" if args.device.startswith("cuda") else
                                  "peak RSS, in a fresh process per variant"), ""]
    for model_name, rows in results.items():
        lines += [f"### {model_name}", "", table(rows), ""]
    if args.charts:
        lines += [f"![model-level bar charts]({os.path.basename(args.charts)})", ""]
    lines += noisy_lines(noisy)
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--layers", type=int, default=2, help="encoder layers (12 is the full model)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256, help="RoBERTa / GPT-2 tokens per sequence")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds")
    parser.add_argument("--quantized", choices=["nf4", "int8"], help="quantize the backbone with bitsandbytes")
    parser.add_argument("--output", help="write a section of this Markdown results file")
    parser.add_argument("--charts", help="write PNG bar charts here")
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {list(MODELS)}")
    if args.repeats < 5:
        parser.error("--repeats must be at least 5")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    results, noisy = run(args)
    if args.charts:
        bar_charts(results, args.charts)
    text = render(args, results, noisy)
    publish(text, args.output, f"models {args.device} {args.dtype}" + (f" {args.quantized}" if args.quantized else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
