#!/usr/bin/env python3
"""LFMA on GPT-2's attention (transformers ``Conv1D`` layers, weight stored ``(in, out)``) through
PEFT: a few causal-LM steps with the Trainer, save, reload, merge.

Without ``--model`` it builds a small GPT-2 from a config (no download) and trains it to continue
a repeated sentence; ``--model gpt2`` (or any GPT-2-family checkpoint) loads it from the hub on a
machine that reaches one.

    python examples/gpt2_lfma.py                 # tiny GPT-2 from a config, CPU, seconds
    python examples/gpt2_lfma.py --model gpt2    # the real one (needs the hub)
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

import lfma_kernels.peft  # noqa: F401  (registers "lfma" with PEFT: before from_pretrained)
from lfma_kernels.peft import LfmaConfig
from peft import PeftModel, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

TEXT = "the quick brown fox jumps over the lazy dog. "


def load_base(name: str | None, directory: str) -> GPT2LMHeadModel:
    """The backbone: ``name`` from the hub, or a small GPT-2 from a config saved in ``directory``
    (so that the reload below starts from the same weights, as it would from the hub)."""
    if name:
        return GPT2LMHeadModel.from_pretrained(name)
    path = os.path.join(directory, "backbone")
    if not os.path.isdir(path):
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4)).save_pretrained(path)
    return GPT2LMHeadModel.from_pretrained(path)


class RepeatedText(torch.utils.data.Dataset):
    """Byte-level tokens of a repeated sentence (the small model's vocabulary is bytes < 128)."""

    def __init__(self, length: int, count: int):
        ids = torch.tensor(list((TEXT * ((length + count) // len(TEXT) + 1)).encode()), dtype=torch.long)
        self.windows = [ids[i:i + length] for i in range(count)]

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.windows[i], "labels": self.windows[i]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a GPT-2-family checkpoint (default: a small one from a config)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--k", type=int, default=256, help="frequencies per c_attn layer")
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args(argv)
    out = args.output_dir or tempfile.mkdtemp(prefix="lfma_gpt2_")

    model = get_peft_model(load_base(args.model, out),
                           LfmaConfig(target_modules=["c_attn"], k=args.k, alpha=100.0, fan_in_fan_out=True))
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
    with torch.no_grad():
        expected = model(input_ids=probe).logits
    model.save_pretrained(os.path.join(out, "adapter"))
    reloaded = PeftModel.from_pretrained(load_base(args.model, out), os.path.join(out, "adapter")).to(model.device)
    with torch.no_grad():
        same = torch.equal(reloaded.eval()(input_ids=probe).logits, expected)
        merged = reloaded.merge_and_unload()
        drift = ((merged(input_ids=probe).logits - expected).norm() / expected.norm()).item()
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; reloaded outputs identical: {same}; "
          f"merged ({type(merged.transformer.h[0].attn.c_attn).__name__}) relative difference {drift:.1e}")
    return 0 if same and drift <= 1e-4 and losses[-1] < losses[0] else 1


if __name__ == "__main__":
    sys.exit(main())
