#!/usr/bin/env python3
"""QLoRA-style LFMA: GPT-2 quantized to nf4 with bitsandbytes, LFMA on ``c_attn`` through PEFT, a few
Trainer steps, save, reload onto the full-precision model (the deployment path), merge.

Without ``--model`` it builds a small GPT-2 from a config (no download); ``--model gpt2`` (or any
GPT-2-family checkpoint) loads it from the hub on a machine that reaches one. bitsandbytes runs on a
CPU too (``pip install "lfma_kernels[quant]"``).

    python examples/qlfma.py                     # tiny GPT-2 from a config, CPU, seconds
    python examples/qlfma.py --model gpt2        # the real one (needs the hub)
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

import lfma_kernels.peft  # noqa: F401  (registers "lfma" with PEFT: before from_pretrained)
from lfma_kernels.peft import LfmaConfig
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import BitsAndBytesConfig, GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

TEXT = "the quick brown fox jumps over the lazy dog. "


def load_base(name: str | None, directory: str, nf4: bool) -> GPT2LMHeadModel:
    """The backbone, full precision or quantized to nf4 on loading: ``name`` from the hub, or a small
    GPT-2 from a config saved in ``directory`` (so that both load the same weights, as from the hub)."""
    path = name
    if name is None:
        path = os.path.join(directory, "backbone")
        if not os.path.isdir(path):
            torch.manual_seed(0)
            GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=64, n_embd=128, n_layer=2,
                                       n_head=4)).save_pretrained(path)
    if not nf4:
        return GPT2LMHeadModel.from_pretrained(path)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)
    return GPT2LMHeadModel.from_pretrained(path, quantization_config=quantization)


class RepeatedText(torch.utils.data.Dataset):
    """Byte-level tokens of a repeated sentence (the small model's vocabulary is bytes < 128)."""

    def __init__(self, length: int, count: int):
        ids = torch.tensor(list((TEXT * ((length + count) // len(TEXT) + 1)).encode()), dtype=torch.long)
        self.windows = [ids[i:i + length] for i in range(count)]

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.windows[i], "labels": self.windows[i]}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a GPT-2-family checkpoint (default: a small one from a config)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--k", type=int, default=512, help="frequencies per c_attn layer")
    parser.add_argument("--alpha", type=float, default=800.0, help="dW = alpha * Re(ifft2(F))")
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args(argv)
    out = args.output_dir or tempfile.mkdtemp(prefix="qlfma_")

    base = prepare_model_for_kbit_training(load_base(args.model, out, nf4=True))
    print(f"c_attn is a {type(base.transformer.h[0].attn.c_attn).__name__}")
    model = get_peft_model(base, LfmaConfig(target_modules=["c_attn"], k=args.k, alpha=args.alpha, seed=0))
    model.print_trainable_parameters()
    data = RepeatedText(length=32, count=64)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(output_dir=os.path.join(out, "trainer"), max_steps=args.steps,
                               per_device_train_batch_size=8, learning_rate=1e-1, lr_scheduler_type="constant",
                               save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
                               logging_steps=max(1, args.steps // 5), disable_tqdm=True, seed=0),
        train_dataset=data,
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    model.eval()
    probe = data[0]["input_ids"][None].to(model.device)
    adapter_dir = os.path.join(out, "adapter")
    model.save_pretrained(adapter_dir)
    with torch.no_grad():
        expected = model(input_ids=probe).logits
        reloaded = PeftModel.from_pretrained(load_base(args.model, out, nf4=True), adapter_dir).eval()
        same = torch.equal(reloaded(input_ids=probe).logits, expected)
        # The deployment path: the adapter trained on the nf4 base, served on the full-precision one.
        full = PeftModel.from_pretrained(load_base(args.model, out, nf4=False), adapter_dir).eval()
        full_logits = full(input_ids=probe).logits
        merged = full.merge_and_unload()
        merged_drift = relative(merged(input_ids=probe).logits, full_logits)
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; reloaded on nf4 identical: {same}; on the full-precision "
          f"model {relative(full_logits, expected):.1e} from the nf4 logits (the quantization's own difference); "
          f"merged into it ({type(merged.transformer.h[0].attn.c_attn).__name__}) {merged_drift:.1e}")
    return 0 if same and merged_drift <= 1e-4 and losses[-1] < losses[0] else 1


if __name__ == "__main__":
    sys.exit(main())
