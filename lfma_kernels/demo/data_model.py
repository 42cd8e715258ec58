"""The data (scikit-learn's digits, split by label) and the model (a small ViT): build, pretrain, train, score."""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import List

import torch
import torch.nn as nn

from .config import BATCH, HEADS, HIDDEN, LAYERS, MLP

# ------------------------------------------------------------------------------------------ data
@dataclass
class Split:
    x: torch.Tensor  # [n, 1, 8, 8] float32, standardised
    y: torch.Tensor  # [n] int64 in 0..4


@dataclass
class Data:
    pretrain_train: Split
    pretrain_val: Split
    train: Split
    val: Split
    test: Split


def load_digits_splits(seed: int = 0) -> Data:
    """scikit-learn's bundled digits (1,797 real 8x8 images; no download), fixed stratified splits:
    digits 0-4 for pretraining (80/20), digits 5-9 relabelled 0-4 for adaptation (50/20/30)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    images = (images - images.mean()) / images.std()
    labels = torch.tensor(digits.target, dtype=torch.int64)

    def split(index, sizes, stratify):
        first, rest = train_test_split(index, train_size=sizes[0], random_state=seed, stratify=stratify[index])
        if len(sizes) == 1:
            return first, rest
        second, third = train_test_split(rest, train_size=sizes[1] / (1 - sizes[0]), random_state=seed,
                                         stratify=stratify[rest])
        return first, second, third

    def make(index, offset):
        return Split(images[index], labels[index] - offset)

    low = torch.nonzero(labels < 5).flatten().numpy()
    high = torch.nonzero(labels >= 5).flatten().numpy()
    pre_train, pre_val = split(low, (0.8,), labels.numpy())
    train, val, test = split(high, (0.5, 0.2), labels.numpy())
    return Data(make(pre_train, 0), make(pre_val, 0), make(train, 5), make(val, 5), make(test, 5))


# ----------------------------------------------------------------------------------------- model
def build_vit(seed: int) -> nn.Module:
    """``ViTForImageClassification`` from a small config (no download), dropout off."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                       num_attention_heads=HEADS, intermediate_size=MLP, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, num_labels=5)
    return ViTForImageClassification(config)


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=x).logits


def accuracy(model: nn.Module, split: Split) -> float:
    model.eval()
    with torch.no_grad():
        return (logits(model, split.x).argmax(-1) == split.y).float().mean().item()


def train(model: nn.Module, data: Split, *, lr: float, epochs: int, seed: int, desc: str,
          quiet: bool = False) -> List[float]:
    """AdamW (weight decay 1e-4, as the paper), constant learning rate; returns step times in ms."""
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(data.y) / BATCH)
    times: List[float] = []
    model.train()
    with tqdm(total=epochs * steps_per_epoch, desc=desc, leave=False, disable=quiet, file=sys.stderr) as bar:
        for _ in range(epochs):
            order = torch.randperm(len(data.y), generator=gen)
            for i in range(steps_per_epoch):
                batch = order[i * BATCH:(i + 1) * BATCH]
                start = time.perf_counter()
                loss = nn.functional.cross_entropy(logits(model, data.x[batch]), data.y[batch])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                times.append((time.perf_counter() - start) * 1e3)
                bar.update()
    return times


def pretrain(data: Data, *, epochs: int, quiet: bool) -> nn.Module:
    model = build_vit(seed=0)
    train(model, data.pretrain_train, lr=1e-3, epochs=epochs, seed=0, desc="pretrain on digits 0-4", quiet=quiet)
    return model
