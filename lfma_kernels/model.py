"""Model-level tooling: apply LFMA to chosen ``nn.Linear`` (or transformers ``Conv1D``) layers,
count, save/load, merge, unload."""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ._checks import check_frequencies, check_options
from .adapter import base_shape, layer_k
from .targets import (base_device, check_backend_name, check_not_aliased, check_target, is_adaptable, loadable_backend,
                      module_names, set_submodule, tied_weight_names)
from .layers import LFMALinear
from .selection import Frequencies

__all__ = [
    "LFMAConfig", "ParameterCount", "apply_lfma", "lfma_state_dict", "save_lfma", "load_lfma",
    "merge_lfma", "unmerge_lfma", "unload_lfma", "trainable_parameters", "lfma_layers",
]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "lfma_config.json"
_FORMAT_VERSION = 1


@dataclasses.dataclass
class LFMAConfig:
    """Which layers get an adapter and how it is built (see ``LFMALinear`` for the options).

    ``target_modules``: a list of module-name suffixes (``"query"`` matches ``encoder.layer.0.
    attention.query``; ``"attn.q_proj"`` matches on whole dotted components) or one regex string
    matched against the full name. ``modules_to_save``: suffixes of modules (a fresh classifier
    head, say) trained fully and saved with the adapter. Layer ``i`` of the matches, in
    ``named_modules`` order, draws its random init matrix with seed ``seed + i``, so layers of one
    shape get different frequencies (``seed=None``: from torch's global RNG, layer after layer). ``init_scale`` scales the starting coefficients, not the
    selection (``init="weight", init_scale=0.01``: the official code's start; 0: a zero start).
    """

    target_modules: Union[str, List[str]]
    _: dataclasses.KW_ONLY
    k: Optional[int] = None
    top_k_ratio: Optional[float] = None
    alpha: float = 12.0
    init: str = "random"
    init_std: float = 1e-3
    seed: Optional[int] = 0
    hermitian: bool = False
    backend: str = "auto"
    modules_to_save: Sequence[str] = ()
    init_scale: float = 1.0

    def __post_init__(self) -> None:
        """Check every value, and store plain Python numbers and lists (JSON-serialisable)."""
        try:
            options = check_options(k=self.k, top_k_ratio=self.top_k_ratio, alpha=self.alpha, init_std=self.init_std,
                                    init_scale=self.init_scale, seed=self.seed)
        except ValueError as e:
            raise ValueError(f"LFMAConfig: {e}") from None
        if not isinstance(self.init, str) or self.init not in ("random", "weight"):
            raise ValueError(f"LFMAConfig: init must be 'random' or 'weight', got {self.init!r} (a tensor init is per "
                             "layer: build LFMALinear directly)")
        check_backend_name(self.backend)
        target_modules = self.target_modules
        if isinstance(target_modules, str):
            try:
                re.compile(target_modules)
            except re.error as e:
                raise ValueError(f"LFMAConfig: target_modules {target_modules!r} is not a valid regular "
                                 f"expression: {e}") from None
        else:
            target_modules = list(target_modules)
            if not target_modules:
                raise ValueError("LFMAConfig: target_modules is empty")
        for field, names in (("target_modules", target_modules), ("modules_to_save", self.modules_to_save)):
            if not isinstance(names, str) and not all(isinstance(n, str) and n for n in names):
                raise ValueError(f"LFMAConfig: {field} must be a regex string or a list of non-empty "
                                 f"module-name suffixes, got {names!r}")
        self.target_modules = target_modules
        self.k, self.top_k_ratio, self.alpha = options.k, options.top_k_ratio, options.alpha
        self.init_std, self.init_scale, self.seed = options.init_std, options.init_scale, options.seed
        self.hermitian = bool(self.hermitian)
        self.modules_to_save = tuple(self.modules_to_save)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["modules_to_save"] = list(self.modules_to_save)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LFMAConfig":
        d = dict(d)
        return cls(d.pop("target_modules"), **d)


class ParameterCount(NamedTuple):
    coefficients: int  # trained complex LFMA coefficients
    real: int          # trained real scalars (2 per coefficient, plus modules_to_save)
    total: int         # every parameter of the model


def _suffix_match(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _matches(name: str, targets: Union[str, Sequence[str]]) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(_suffix_match(name, t) for t in targets)


def _listing(names: Sequence[str], limit: int = 12, fold: bool = True) -> str:
    """Module names for an error message; ``fold`` folds repeated blocks (``layer.*.query``), so
    that a list of candidates does not hide a 12-layer model's head behind 48 projections."""
    if fold:
        names = list(dict.fromkeys(re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", n) for n in names))
    if not names:
        return "(none)"
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _check_not_adapted(model: nn.Module, action: str) -> None:
    adapted = sorted(lfma_layers(model))
    if adapted:
        raise ValueError(f"{action}: the model already has LFMA adapters at {_listing(adapted, fold=False)}; a model is "
                         "adapted once: put every target into one LFMAConfig, or unload_lfma(model) (or start "
                         "from a fresh model) first")


def _target_names(model: nn.Module, config: LFMAConfig) -> List[str]:
    """Names of the modules ``config`` adapts; raises before anything is changed."""
    names = [n for n, _ in model.named_modules() if n and _matches(n, config.target_modules)]
    if not names:
        linear = [n for n, m in model.named_modules() if is_adaptable(m)]
        raise ValueError(f"target_modules={config.target_modules!r} matched no module; the model's nn.Linear "
                         f"and Conv1D layers are: {_listing(linear)}")
    aliases = module_names(model)
    for n in names:
        module = model.get_submodule(n)
        check_target(module, n, model.get_submodule(n.rpartition(".")[0]))
        check_not_aliased(module, n, aliases)
    return names


def lfma_layers(model: nn.Module) -> Dict[str, LFMALinear]:
    """Every ``LFMALinear`` in ``model`` by its qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LFMALinear)}


def _save_names(model: nn.Module, config: LFMAConfig) -> List[str]:
    names = [n for n, _ in model.named_modules() if n and any(_suffix_match(n, s) for s in config.modules_to_save)]
    missing = [s for s in config.modules_to_save if not any(_suffix_match(n, s) for n in names)]
    if missing:
        owners = [n for n, m in model.named_modules() if n and any(True for _ in m.parameters(recurse=False))]
        raise ValueError(f"modules_to_save {missing} matched no module of the model; modules with parameters "
                         f"are: {_listing(owners)}")
    return names


def attention_targets(model: nn.Module) -> List[str]:
    """Query and value projections: ``q_proj``/``v_proj`` in current transformers, ``query``/``value``
    in older releases."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for pair in (["q_proj", "v_proj"], ["query", "value"]):
        if set(pair) <= names:
            return pair
    raise RuntimeError(f"no query/value projections found among {sorted(names)}")


def apply_lfma(model: nn.Module, config: LFMAConfig,
               frequencies: Optional[Dict[str, Frequencies]] = None) -> nn.Module:
    """Wrap every target ``nn.Linear`` or ``Conv1D`` in an ``LFMALinear`` in place and freeze everything but the
    coefficients and ``modules_to_save``. ``frequencies`` (by layer name) overrides the selection,
    as ``load_lfma`` does. Validates every layer before changing any; a model is adapted once (a
    second call raises ``ValueError``: one config, one saved adapter)."""
    _check_not_adapted(model, "apply_lfma")
    names = _target_names(model, config)
    save_names = _save_names(model, config)
    # Building a layer freezes its base: if a later layer is refused, thaw them all again.
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    layers = {}
    for i, n in enumerate(names):
        base = model.get_submodule(n)
        given = None if frequencies is None else frequencies.get(n)
        try:
            if given is not None:
                layers[n] = LFMALinear(base, alpha=config.alpha, hermitian=config.hermitian,
                                       backend=config.backend, frequencies=given)
            else:
                layers[n] = LFMALinear(base, k=config.k, top_k_ratio=config.top_k_ratio, alpha=config.alpha,
                                       init=config.init, init_std=config.init_std,
                                       seed=None if config.seed is None else config.seed + i,
                                       init_scale=config.init_scale,
                                       hermitian=config.hermitian, backend=config.backend)
        except (ValueError, TypeError, RuntimeError) as e:
            for p, flag in requires_grad.items():
                p.requires_grad_(flag)
            kind = next(t for t in (ValueError, TypeError, RuntimeError) if isinstance(e, t))
            raise kind(f"layer {n!r}: {e}") from e
    model.requires_grad_(False)
    for n, layer in layers.items():
        set_submodule(model, n, layer)
        layer.coeffs.requires_grad_(True)
    for n in save_names:
        model.get_submodule(n).requires_grad_(True)
    model.lfma_config = config
    return model


def lfma_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The adapter: ``coeffs``, ``rows``, ``cols`` of every layer plus the ``modules_to_save`` weights."""
    state: Dict[str, torch.Tensor] = {}
    for n, layer in lfma_layers(model).items():
        for key in ("coeffs", "rows", "cols"):
            state[f"{n}.{key}"] = getattr(layer, key).detach()
    config = getattr(model, "lfma_config", None)
    if config is not None:
        for n in _save_names(model, config):
            for key, tensor in model.get_submodule(n).state_dict().items():
                state[f"{n}.{key}"] = tensor.detach()
    return state


def save_lfma(model: nn.Module, directory: Union[str, os.PathLike]) -> None:
    """Write ``adapter_model.safetensors`` and ``lfma_config.json`` into ``directory``."""
    from safetensors.torch import save_file

    config = getattr(model, "lfma_config", None)
    if config is None or not lfma_layers(model):
        raise ValueError("the model has no LFMA adapter to save (call apply_lfma first)")
    layers = {n: [m.out_features, m.in_features, m.k] for n, m in lfma_layers(model).items()}
    os.makedirs(directory, exist_ok=True)
    state = {k: v.contiguous().cpu() for k, v in lfma_state_dict(model).items()}
    save_file(state, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "lfma", "version": str(_FORMAT_VERSION)})
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump({"format_version": _FORMAT_VERSION, "config": config.to_dict(), "layers": layers}, f, indent=2)


def _load_files(directory) -> Tuple[LFMAConfig, Dict[str, list], Dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    config_path, weights_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no LFMA adapter at {directory}: {os.path.basename(path)} is missing")
    with open(config_path) as f:
        saved = json.load(f)
    if saved.get("format_version") != _FORMAT_VERSION:
        raise ValueError(f"{config_path}: unsupported format_version {saved.get('format_version')!r}")
    try:
        config = LFMAConfig.from_dict(saved["config"])
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{config_path}: {e}") from None
    return config, saved["layers"], load_file(weights_path)


def load_lfma(model: nn.Module, directory: Union[str, os.PathLike], *, backend: Optional[str] = None) -> nn.Module:
    """Apply the saved config to ``model`` (a model without adapters) and load the saved adapter.

    Every layer's shape, K and index range, and every ``modules_to_save`` tensor, is checked
    against the model before anything is changed; a mismatch raises ``ValueError`` naming the layer.
    ``backend`` overrides the saved backend; without it a saved backend that cannot run here
    falls back to ``"auto"`` with a warning.
    """
    config, layers, state = _load_files(directory)
    config.backend = loadable_backend(config.backend, backend, f"the LFMA adapter at {directory}")
    _check_not_adapted(model, "load_lfma")
    names = _target_names(model, config)
    if sorted(names) != sorted(layers):
        extra, missing = sorted(set(names) - set(layers)), sorted(set(layers) - set(names))
        raise ValueError(f"the saved adapter does not fit this model: adapter layers the model lacks: {missing}; "
                         f"model layers matching the saved targets that the adapter lacks: {extra}")
    frequencies = {}
    for n in names:
        base = model.get_submodule(n)
        shape = base_shape(base)
        d_out, d_in, k = layers[n]
        if (d_out, d_in) != shape:
            raise ValueError(f"layer {n!r}: the adapter was saved for shape {(d_out, d_in)}, the model's is {shape}")
        try:
            coeffs, rows, cols = (state[f"{n}.{key}"] for key in ("coeffs", "rows", "cols"))
        except KeyError as e:
            raise ValueError(f"layer {n!r}: {e.args[0]} is missing from {WEIGHTS_NAME}") from None
        try:
            check_frequencies(coeffs, rows, cols, shape)
            expected = layer_k(shape, config.k, config.top_k_ratio)
        except ValueError as e:
            raise ValueError(f"layer {n!r}: {e}") from None
        if coeffs.shape[0] != k or k != expected:
            raise ValueError(f"layer {n!r}: the adapter holds {coeffs.shape[0]} coefficients, its config "
                             f"gives k={expected}")
        device = base_device(base)
        frequencies[n] = Frequencies(rows.to(device), cols.to(device),
                                     torch.view_as_complex(coeffs.float().contiguous()).to(device))
    save_state = {}
    for n in _save_names(model, config):
        module_state = model.get_submodule(n).state_dict()
        for key, tensor in module_state.items():
            saved = state.get(f"{n}.{key}")
            if saved is None or saved.shape != tensor.shape:
                got = "missing" if saved is None else f"shape {tuple(saved.shape)}"
                raise ValueError(f"module to save {n!r}: {key} is {got} in the adapter, the model has "
                                 f"shape {tuple(tensor.shape)}")
        save_state[n] = {key: state[f"{n}.{key}"] for key in module_state}
    apply_lfma(model, config, frequencies=frequencies)
    for n, module_state in save_state.items():
        model.get_submodule(n).load_state_dict(module_state)
    return model


def merge_lfma(model: nn.Module, safe: bool = False) -> None:
    """Merge every adapter. Every layer is checked before any is merged: a layer whose weight the
    model also holds elsewhere (a tied embedding: GPT-2's ``lm_head.weight`` is
    ``transformer.wte.weight``) raises ``ValueError``, since ``dW`` would be added to the other
    module too; with ``safe=True``, so does a non-finite ``W + dW``."""
    layers = [(n, layer) for n, layer in lfma_layers(model).items() if not layer.merged]
    for n, layer in layers:
        tied = tied_weight_names(model, n, layer.base)
        if tied:
            raise ValueError(f"merge_lfma: the weight of layer {n!r} is tied to {', '.join(tied)}; merging would add "
                             "dW there too. Keep this adapter unmerged, or give the layer a weight of its own "
                             "first (layer.base.weight = nn.Parameter(layer.base.weight.detach().clone())); "
                             "nothing was merged")
        if safe and not torch.isfinite(layer._folded_weight()).all():
            raise ValueError(f"merge_lfma(safe=True): layer {n!r} would get non-finite weights; nothing was merged")
    for _, layer in layers:
        layer.merge()


def unmerge_lfma(model: nn.Module) -> None:
    for layer in lfma_layers(model).values():
        layer.unmerge()


def unload_lfma(model: nn.Module) -> nn.Module:
    """Merge every adapter and put the plain ``nn.Linear`` / ``Conv1D`` layers back; returns the model."""
    merge_lfma(model)
    for n, layer in lfma_layers(model).items():
        set_submodule(model, n, layer.base)
    if hasattr(model, "lfma_config"):
        del model.lfma_config
    return model


def trainable_parameters(model: nn.Module) -> ParameterCount:
    """Complex LFMA coefficients trained, real scalars trained (all trainable parameters), all parameters."""
    coefficients = sum(m.k for m in lfma_layers(model).values() if m.coeffs.requires_grad)
    real = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return ParameterCount(coefficients, real, total)
