"""The methods compared, their learning rates, and one run of a method at a budget."""
from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..baselines import FourierFTLinear, LoRALinear
from ..layers import LFMALinear
from ..model import LFMAConfig, apply_lfma, attention_targets, lfma_layers
from ..targets import set_submodule
from .config import ALPHA, BUDGETS, HEAD, HIDDEN
from .data_model import Data, accuracy, train

# --------------------------------------------------------------------------------------- methods
def _fresh_head(model: nn.Module, seed: int) -> None:
    torch.manual_seed(1000 + seed)
    model.classifier = nn.Linear(model.classifier.in_features, 5)


def _freeze_all_but_head(model: nn.Module) -> None:
    model.requires_grad_(False)
    model.classifier.requires_grad_(True)


def _target_names(model: nn.Module) -> List[str]:
    suffixes = attention_targets(model)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in suffixes]


def _backend_of(model: nn.Module) -> str:
    """What the model's first adapted projection runs: its plan (for the weight's device and dtype)."""
    return next(m for m in model.modules() if isinstance(m, (LFMALinear, FourierFTLinear))).plan().backend


def setup_head_only(model: nn.Module, budget: int, seed: int) -> str:
    _freeze_all_but_head(model)
    return "-"


def setup_full(model: nn.Module, budget: int, seed: int) -> str:
    model.requires_grad_(True)
    return "-"


def setup_lora(model: nn.Module, budget: int, seed: int) -> str:
    r = budget // (2 * HIDDEN)
    targets = attention_targets(model)
    _freeze_all_but_head(model)
    torch.manual_seed(seed)
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        for name in _target_names(model):
            set_submodule(model, name, LoRALinear(model.get_submodule(name), r, alpha=r))
        return "local LoRA"
    inject_adapter_in_model(LoraConfig(r=r, lora_alpha=r, target_modules=targets), model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or name.startswith(HEAD + "."))
    return "peft"


def setup_fourierft(model: nn.Module, budget: int, seed: int) -> str:
    _freeze_all_but_head(model)
    for name in _target_names(model):
        set_submodule(model, name, FourierFTLinear(model.get_submodule(name), budget, alpha=ALPHA["fourierft"],
                                                    seed=777 + seed))
    return _backend_of(model)


def setup_lfma(**options) -> Callable[[nn.Module, int, int], str]:
    def setup(model: nn.Module, budget: int, seed: int) -> str:
        apply_lfma(model, LFMAConfig(attention_targets(model), k=budget // 2, alpha=ALPHA["lfma"], seed=seed,
                                     modules_to_save=[HEAD], **options))
        return _backend_of(model)
    return setup


@dataclass(frozen=True)
class Method:
    setup: Callable[[nn.Module, int, int], str]  # (model, budget, seed) -> the backend it runs
    size: Callable[[int], str]                   # the budget in the method's own terms
    budgets: Tuple[int, ...] = BUDGETS           # (0,): a reference line, no adapter


def _reference(setup) -> Method:
    return Method(setup, lambda budget: "-", budgets=(0,))


METHODS: Dict[str, Method] = {
    "head only": _reference(setup_head_only),
    "LoRA": Method(setup_lora, lambda b: f"r={b // (2 * HIDDEN)}"),
    "FourierFT": Method(setup_fourierft, lambda b: f"n={b}"),
    "LFMA": Method(setup_lfma(), lambda b: f"K={b // 2}"),
    "LFMA official start": Method(setup_lfma(init="weight", init_scale=0.01), lambda b: f"K={b // 2}"),
    "LFMA zero start": Method(setup_lfma(init="weight", init_scale=0.0), lambda b: f"K={b // 2}"),
    "LFMA hermitian": Method(setup_lfma(hermitian=True), lambda b: f"K={b // 2}"),
    "full fine-tuning": _reference(setup_full),
}

# Learning rates chosen on the validation split by ``--sweep`` (seed 0, ADAPT_EPOCHS epochs, AdamW),
# the best of SWEEP_GRID per method and budget (ties: the smaller rate). One seed makes the
# curves jagged (one validation image is 0.56 points): a choice is a good rate, not the optimum. The
# sweep's table (validation accuracy at every rate) is in docs/demo.md.
SWEEP_GRID = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
LEARNING_RATES: Dict[str, Dict[int, float]] = {
    "head only": {0: 1e-1},
    "LoRA": {128: 1e-2, 256: 1e-2, 512: 3e-3, 1024: 3e-3, 2048: 3e-3},
    "FourierFT": {128: 3e-2, 256: 1e-2, 512: 3e-3, 1024: 1e-2, 2048: 3e-3},
    "LFMA": {128: 1e-1, 256: 1e-1, 512: 1e-1, 1024: 3e-3, 2048: 1e-2},
    "LFMA official start": {128: 3e-2, 256: 3e-2, 512: 3e-2, 1024: 1e-2, 2048: 3e-2},
    "LFMA zero start": {128: 3e-2, 256: 3e-3, 512: 1e-2, 1024: 3e-3, 2048: 3e-3},
    "LFMA hermitian": {128: 3e-2, 256: 1e-2, 512: 3e-2, 1024: 1e-2, 2048: 3e-3},
    "full fine-tuning": {0: 1e-3},
}


@dataclass
class RunResult:
    val: float
    test: float
    step_ms: float
    trainable_real: int
    coefficients: Optional[int]
    backend: str


def run_method(method: str, budget: int, backbone: nn.Module, data: Data, *, lr: float, epochs: int, seed: int,
               quiet: bool = True) -> RunResult:
    model = copy.deepcopy(backbone)
    _fresh_head(model, seed)
    backend = METHODS[method].setup(model, budget, seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    layers = lfma_layers(model)
    coefficients = sum(m.k for m in layers.values()) if layers else None
    times = train(model, data.train, lr=lr, epochs=epochs, seed=seed, desc=f"{method} {budget} seed {seed}",
                  quiet=quiet)
    return RunResult(accuracy(model, data.val), accuracy(model, data.test), statistics.median(times), trainable,
                     coefficients, backend)
