"""The LFMA PEFT config, and what registering it needs first: a supported PEFT, and ``PeftType.LFMA``."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from .. import targets
from .._checks import check_options, positive_int

try:
    import peft
    from peft.config import PeftConfig
    from peft.utils import PeftType
except ImportError as e:  # missing, or too old to have these names
    raise ImportError(f"lfma_kernels.peft needs peft >= 0.18 (pip install 'lfma_kernels[peft]'): {e}") from e

__all__ = ["LfmaConfig", "SUPPORTED_PEFT", "DEFAULT_K"]

# K when a config gives neither k nor top_k_ratio, so that a config built from target_modules alone
# works, as every PEFT config does: about the paper's RoBERTa-base budget (0.0016 * 768^2 = 943),
# and FourierFT's default n_frequency (1000).
DEFAULT_K = 1000

# Tested with peft 0.18.1 and 0.21.2 (tests/test_peft.py): the BaseTuner hooks used here
# (tuner_layer_cls, target_module_mapping, structural adapter-state selection) date from 0.18.
SUPPORTED_PEFT = (0, 18)


def _version_tuple(version: str) -> tuple:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:2])


if _version_tuple(peft.__version__) < SUPPORTED_PEFT:
    raise ImportError(f"lfma_kernels.peft supports peft >= {'.'.join(map(str, SUPPORTED_PEFT))}; "
                      f"peft {peft.__version__} is installed: pip install -U 'lfma_kernels[peft]'")


def _extend_peft_type() -> None:
    if "LFMA" in PeftType.__members__:
        return
    try:
        from aenum import extend_enum
    except ImportError as e:
        raise ImportError("lfma_kernels.peft needs aenum to register LFMA with PEFT's closed PeftType enum: "
                          "pip install 'lfma_kernels[peft]'") from e
    extend_enum(PeftType, "LFMA", "LFMA")


_extend_peft_type()


@dataclass
class LfmaConfig(PeftConfig):
    """Configuration of an LFMA adapter (see docs/usage.md and ``lfma.LFMALinear``).

    Args:
        target_modules: module names (suffix match) or one regex; ``nn.Linear`` and transformers
            ``Conv1D`` layers. Defaults per architecture as PEFT's LoRA (e.g. query/value).
        exclude_modules: names or regex of modules not to adapt.
        k / top_k_ratio: at most one: K frequencies per layer, or ``K = int(d_out*d_in*ratio)``;
            neither: ``K = DEFAULT_K`` (1000).
        k_pattern: per-module K by name pattern, e.g. ``{"c_attn": 64}`` (like FourierFT's
            ``n_frequency_pattern``), overriding ``k`` / ``top_k_ratio`` there.
        alpha: ``dW = alpha * Re(ifft2(F))``.
        init / init_std / seed: the matrix ``D`` whose strongest frequencies are selected:
            ``"random"`` (a Gaussian of std ``init_std``) or ``"weight"`` (the frozen weight; no
            seed involved). ``seed=None`` (default, PEFT's convention): ``D`` is drawn from torch's
            global RNG, so adapters added one after another differ and ``torch.manual_seed`` makes
            a run reproducible; an int: seed ``seed + i`` for the i-th adapted layer, exactly as
            the native ``apply_lfma``.
        init_scale: the coefficients start at ``init_scale * fft2(D)`` on the selected support
            (1: the paper; ``init="weight"`` with 0.01: the official code's ``D = 0.01 W``; 0: a
            zero start, as ``init_weights=True``, which wins when set).
        hermitian: select from the half-spectrum only (K independent frequencies).
        backend: kernel backend, ``"auto"`` or one of ``lfma.available_backends()``.
        init_weights: ``True``: zero coefficients (the adapted model starts as the base model);
            ``False`` (default, as the paper and PEFT's FourierFT): ``c = fft2(D)[u, v]``.
        fan_in_fan_out: the target stores its weight ``(in, out)``; forced to ``True`` (with a
            warning) for ``Conv1D`` targets and to ``False`` for ``nn.Linear``.
        bias: ``"none"``, ``"all"`` or ``"lfma_only"`` (biases of the adapted layers train).
        modules_to_save, layers_to_transform, layers_pattern: as in every PEFT method.
    """

    target_modules: Optional[Union[List[str], str]] = field(
        default=None, metadata={"help": "Module names (suffix match) or a regex of the layers to adapt."})
    exclude_modules: Optional[Union[List[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex of modules not to adapt."})
    k: Optional[int] = field(default=None, metadata={"help": "Frequencies per layer (or top_k_ratio)."})
    top_k_ratio: Optional[float] = field(default=None, metadata={"help": "K = int(d_out * d_in * ratio)."})
    alpha: float = field(default=12.0, metadata={"help": "Scale of dW = alpha * Re(ifft2(F))."})
    init: str = field(default="random", metadata={"help": "'random' or 'weight': the matrix selected from."})
    init_std: float = field(default=1e-3, metadata={"help": "Std of the 'random' init matrix."})
    init_scale: float = field(default=1.0, metadata={"help": "Starting coefficients: init_scale * fft2(D)."})
    seed: Optional[int] = field(default=None, metadata={
        "help": "Seed of the first layer's 'random' init matrix; None: torch's global RNG."})
    hermitian: bool = field(default=False, metadata={"help": "Select one of each conjugate pair only."})
    backend: str = field(default="auto", metadata={"help": "Kernel backend."})
    init_weights: bool = field(default=False, metadata={"help": "True: zero coefficients (identity start)."})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "The target stores its weight (in, out)."})
    modules_to_save: Optional[List[str]] = field(
        default=None, metadata={"help": "Modules trained fully and saved with the adapter."})
    layers_to_transform: Optional[Union[List[int], int]] = field(
        default=None, metadata={"help": "Indices of the layers to adapt."})
    layers_pattern: Optional[Union[List[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list layers_to_transform indexes."})
    k_pattern: Dict[str, int] = field(
        default_factory=dict, metadata={"help": "Per-module K by name pattern, e.g. {'c_attn': 64}."})
    bias: str = field(default="none", metadata={"help": "'none', 'all' or 'lfma_only'."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.LFMA
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.k is None and self.top_k_ratio is None:
            self.k = DEFAULT_K
        try:
            options = check_options(k=self.k, top_k_ratio=self.top_k_ratio, alpha=self.alpha, init_std=self.init_std,
                                    init_scale=self.init_scale, seed=self.seed)
            self.k_pattern = {pattern: positive_int(k, f"k_pattern[{pattern!r}]")
                              for pattern, k in self.k_pattern.items()}
        except ValueError as e:
            raise ValueError(f"LfmaConfig: {e}") from None
        # Plain Python numbers (numpy or tensor scalars in, JSON-serialisable adapter_config.json out).
        self.k, self.top_k_ratio, self.alpha = options.k, options.top_k_ratio, options.alpha
        self.init_std, self.init_scale, self.seed = options.init_std, options.init_scale, options.seed
        if self.init not in ("random", "weight"):
            raise ValueError(f"LfmaConfig: init must be 'random' or 'weight', got {self.init!r}")
        if self.bias not in ("none", "all", "lfma_only"):
            raise ValueError(f"LfmaConfig: bias must be 'none', 'all' or 'lfma_only', got {self.bias!r}")
        targets.check_backend_name(self.backend)
        if isinstance(self.target_modules, str):
            if self.layers_to_transform is not None or self.layers_pattern is not None:
                raise ValueError("LfmaConfig: layers_to_transform / layers_pattern cannot be used when "
                                 "target_modules is a regex string")
            try:
                re.compile(self.target_modules)
            except re.error as e:
                raise ValueError(f"LfmaConfig: target_modules {self.target_modules!r} is not a valid regular "
                                 f"expression: {e}") from None
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("LfmaConfig: layers_pattern needs layers_to_transform")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None,
                        **kwargs: Any) -> "LfmaConfig":
        """PEFT's loader, then: the saved backend is a preference (one that cannot run here, as
        ``"cuda"`` on a CPU-only machine, becomes ``"auto"`` with a warning), and the config is marked
        as read from a checkpoint, so that an adapter built from it whose weights do not fit the
        model is removed again (see ``LfmaModel._load_from_state_dict``)."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        config.backend = targets.loadable_backend(config.backend, None,
                                                  f"the LFMA adapter at {pretrained_model_name_or_path}")
        config._lfma_from_checkpoint = True
        return config

