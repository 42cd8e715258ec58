#!/usr/bin/env python3
"""LFMA through PEFT and the transformers Trainer, end to end, on CPU in under a minute.

The demo's small ViT (``lfma_kernels.demo``: pretrained on scikit-learn's digits 0-4, built from a
config, no download) is adapted to digits 5-9 with an LFMA adapter on its query/value
projections and a fresh classifier head, trained with ``transformers.Trainer``, saved with
``save_pretrained``, reloaded with ``PeftModel.from_pretrained`` into a freshly loaded backbone,
evaluated, then merged with ``merge_and_unload`` and evaluated again (same accuracy: the merged
model is a plain ViT).

    python examples/peft_trainer.py                   # 20 epochs
    python examples/peft_trainer.py --epochs 2        # a smoke run
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

import lfma_kernels.peft  # noqa: F401  (registers "lfma" with PEFT: before from_pretrained)
from lfma_kernels.demo import load_digits_splits, pretrain
from lfma_kernels.model import attention_targets
from lfma_kernels.peft import LfmaConfig
from peft import PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments, ViTForImageClassification


class Digits(torch.utils.data.Dataset):
    """The Trainer's view of a split: a dict per example, ``labels`` for the built-in loss."""

    def __init__(self, split):
        self.split = split

    def __len__(self) -> int:
        return len(self.split.y)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.split.x[i], "labels": self.split.y[i]}


def accuracy(model: torch.nn.Module, split) -> float:
    model.eval()
    with torch.no_grad():
        return (model(pixel_values=split.x).logits.argmax(-1) == split.y).float().mean().item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--pretrain-epochs", type=int, default=30)
    parser.add_argument("--output-dir", default=None, help="where the backbone and the adapter go (default: a temp dir)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = args.output_dir or tempfile.mkdtemp(prefix="lfma_peft_trainer_")
    data = load_digits_splits()

    # A pretrained backbone, saved as a user's would come from the hub; a fresh 5-way head to train.
    backbone = pretrain(data, epochs=args.pretrain_epochs, quiet=True)
    backbone.save_pretrained(os.path.join(out, "backbone"))

    model = ViTForImageClassification.from_pretrained(os.path.join(out, "backbone"))
    torch.manual_seed(0)
    model.classifier.reset_parameters()
    config = LfmaConfig(target_modules=attention_targets(model), k=64, alpha=120.0, modules_to_save=["classifier"])
    model = get_peft_model(model, config)
    model.print_trainable_parameters()

    trainer = Trainer(
        model=model,
        args=TrainingArguments(output_dir=os.path.join(out, "trainer"), num_train_epochs=args.epochs,
                               per_device_train_batch_size=32, learning_rate=3e-2, weight_decay=1e-4,
                               lr_scheduler_type="constant", save_strategy="no", report_to=[], use_cpu=True,
                               logging_steps=50, disable_tqdm=True, seed=0),
        train_dataset=Digits(data.train),
    )
    trainer.train()
    trained = accuracy(model, data.test)

    model.save_pretrained(os.path.join(out, "adapter"))
    reloaded = PeftModel.from_pretrained(ViTForImageClassification.from_pretrained(os.path.join(out, "backbone")),
                                         os.path.join(out, "adapter"))
    reloaded_acc = accuracy(reloaded, data.test)
    merged = reloaded.merge_and_unload()
    merged_acc = accuracy(merged, data.test)

    print(f"test accuracy, digits 5-9: trained {100 * trained:.1f}%, reloaded {100 * reloaded_acc:.1f}%, "
          f"merged {100 * merged_acc:.1f}% ({type(merged).__name__}); {time.perf_counter() - start:.0f} s; "
          f"files in {out}")
    return 0 if trained == reloaded_acc == merged_acc else 1


if __name__ == "__main__":
    sys.exit(main())
