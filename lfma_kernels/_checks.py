"""Input validation shared by the functional API, the layer and the model tooling.

Every check raises before anything is modified. Index range checks read the indices on the
host (a device sync on GPU), so they run in the public entry points and once per layer
construction, never inside a training step.
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch


def check_shape(shape: Sequence[int]) -> Tuple[int, int]:
    if len(shape) != 2 or any(int(s) < 1 for s in shape):
        raise ValueError(f"shape must be (d_out, d_in) with positive sizes, got {tuple(shape)}")
    return int(shape[0]), int(shape[1])


def _scalar(value: object) -> object:
    """A 0-d tensor or numpy array as its element (a numpy scalar keeps its precision); a bool tensor
    as a bool, so that it is refused like one."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_complex():
        if value.dtype == torch.bool:
            return bool(value)
        return value.cpu().float().numpy()[()] if value.dtype == torch.bfloat16 else value.cpu().numpy()[()]
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value[()]
    return value


def _integer(value: object, what: str, kind: str) -> int:
    value = _scalar(value)
    try:
        if isinstance(value, (bool, np.bool_)):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be {kind}, got {value!r}") from None


def positive_int(value: object, what: str) -> int:
    """An int >= 1, numpy and 0-d integer tensors included (``operator.index``), never a bool."""
    number = _integer(value, what, "a positive int")
    if number < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return number


def count(value: object, what: str) -> int:
    """An int >= 0, as :func:`positive_int` takes them."""
    number = _integer(value, what, "an int >= 0")
    if number < 0:
        raise ValueError(f"{what} must be an int >= 0, got {value!r}")
    return number


def real_number(value: object, what: str) -> float:
    """A plain Python float from an int or float, a numpy scalar or a 0-d real tensor or array (stored as
    plain numbers, so configs stay JSON-serialisable); never a bool. A float32 or float16 value becomes
    the shortest decimal that rounds to it (``np.float32(0.01)`` is 0.01, not 0.009999999776), so that
    ``int(d_out * d_in * ratio)`` counts what the user wrote."""
    value = _scalar(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{what} must be a real number, got {value!r}")
    if isinstance(value, np.floating) and value.dtype.itemsize < 8:
        return float(str(value))
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{what} must be a finite number, got an integer too large for a float") from None


def finite_number(value: object, what: str) -> float:
    number = real_number(value, what)
    if not math.isfinite(number):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return number


def positive_number(value: object, what: str) -> float:
    number = real_number(value, what)
    if not 0 < number < math.inf:
        raise ValueError(f"{what} must be a positive finite number, got {value!r}")
    return number


def check_ratio(top_k_ratio: object) -> float:
    try:
        ratio = real_number(top_k_ratio, "top_k_ratio")
    except ValueError:
        ratio = math.nan
    if not 0 < ratio <= 1:
        raise ValueError(f"top_k_ratio must be in (0, 1], got {top_k_ratio!r}")
    return ratio


def optional_seed(seed: object) -> Optional[int]:
    """``None`` (draw from torch's global RNG) or an int that ``torch.Generator.manual_seed`` takes
    (in [-2**63, 2**64)), numpy and 0-d integer tensors included."""
    if seed is None:
        return None
    number = _integer(seed, "seed", "an int or None")
    if not -2 ** 63 <= number < 2 ** 64:
        raise ValueError(f"seed must lie in [-2**63, 2**64) (torch.Generator.manual_seed), got {seed!r}")
    return number


def check_budget(k: Optional[int], top_k_ratio: Optional[float]) -> Tuple[Optional[int], Optional[float]]:
    """Exactly one of ``k`` (a positive int) and ``top_k_ratio`` (in (0, 1])."""
    if (k is None) == (top_k_ratio is None):
        raise ValueError("pass exactly one of k and top_k_ratio")
    if k is not None:
        return positive_int(k, "k"), None
    return None, check_ratio(top_k_ratio)


class Options(NamedTuple):
    """An adapter's numeric options, checked and as plain Python numbers."""
    k: Optional[int]
    top_k_ratio: Optional[float]
    alpha: float
    init_std: float
    init_scale: float
    seed: Optional[int]


def check_options(*, k: Optional[int], top_k_ratio: Optional[float], alpha: object, init_std: object,
                  init_scale: object, seed: object, budget: bool = True) -> Options:
    """The one validator of the native config, the PEFT config and the layer (each fills in its own
    defaults first): exactly one of ``k`` / ``top_k_ratio`` (unless ``budget=False``: positions given),
    a finite ``alpha`` and ``init_scale``, a positive finite ``init_std``, an int or ``None`` seed."""
    if budget:
        k, top_k_ratio = check_budget(k, top_k_ratio)
    return Options(k, top_k_ratio, finite_number(alpha, "alpha"), positive_number(init_std, "init_std"),
                   finite_number(init_scale, "init_scale"), optional_seed(seed))


def check_k(k: int, shape: Sequence[int]) -> int:
    d_out, d_in = check_shape(shape)
    k = positive_int(k, "k")
    if not 1 <= k <= d_out * d_in:
        raise ValueError(f"k must be in [1, d_out*d_in = {d_out * d_in}] for shape {(d_out, d_in)}, got {k}")
    return k


def check_frequencies(coeffs: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, shape: Sequence[int]) -> None:
    """Validate coefficients ``[K, 2]`` and the integer positions they sit at."""
    d_out, d_in = check_shape(shape)
    if coeffs.dim() != 2 or coeffs.shape[1] != 2 or coeffs.shape[0] < 1:
        raise ValueError(f"coeffs must be a real tensor of shape [K, 2] (real, imag) with K >= 1, got {tuple(coeffs.shape)}")
    if coeffs.is_complex() or not coeffs.is_floating_point():
        raise ValueError(f"coeffs must be a real floating-point tensor [K, 2], got dtype {coeffs.dtype}")
    for name, idx in (("rows", rows), ("cols", cols)):
        if idx.dim() != 1 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{name} must be a 1-D int64 tensor, got shape {tuple(idx.shape)} dtype {idx.dtype}")
    if rows.shape[0] != cols.shape[0] or rows.shape[0] != coeffs.shape[0]:
        raise ValueError(
            f"rows, cols and coeffs must have the same length K, got {rows.shape[0]}, {cols.shape[0]}, {coeffs.shape[0]}")
    for name, idx, bound in (("rows", rows, d_out), ("cols", cols, d_in)):
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= bound:
            raise ValueError(f"{name} must lie in [0, {bound}) for shape {(d_out, d_in)}, found values in [{lo}, {hi}]")
