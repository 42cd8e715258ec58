"""Frequency selection (the paper's Algorithm 1) and the init matrices it selects from."""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch

from ._checks import check_k, check_ratio, check_shape, optional_seed, positive_number

__all__ = ["Frequencies", "num_frequencies", "select_frequencies", "init_matrix", "hermitian_half_mask"]


class Frequencies(NamedTuple):
    rows: torch.Tensor    # int64 [K]
    cols: torch.Tensor    # int64 [K]
    values: torch.Tensor  # complex [K], fft2(init)[rows, cols]


def num_frequencies(shape: Sequence[int], top_k_ratio: float) -> int:
    """``K = int(d_out * d_in * top_k_ratio)``, the paper's count (it truncates)."""
    d_out, d_in = check_shape(shape)
    top_k_ratio = check_ratio(top_k_ratio)
    k = int(d_out * d_in * top_k_ratio)
    if k < 1:
        raise ValueError(
            f"top_k_ratio={top_k_ratio} selects no frequency for shape {(d_out, d_in)} "
            f"(int({d_out}*{d_in}*{top_k_ratio}) = 0); use a larger ratio or pass k")
    return k


def hermitian_half_mask(shape: Sequence[int], device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """True at one member of each conjugate pair ``(u, v) ~ (-u, -v)``: the one with the smaller
    flat index. Self-conjugate bins (``u in {0, d_out/2}`` x ``v in {0, d_in/2}``) are kept once."""
    d_out, d_in = check_shape(shape)
    u = torch.arange(d_out, device=device)[:, None]
    v = torch.arange(d_in, device=device)[None, :]
    flat = u * d_in + v
    partner = ((-u) % d_out) * d_in + (-v) % d_in
    return flat <= partner


def select_frequencies(init: torch.Tensor, k: int, *, hermitian: bool = False) -> Frequencies:
    """The ``k`` positions of largest ``|fft2(init)|``, by descending magnitude.

    ``hermitian=True`` picks from the half-spectrum only, so no conjugate partner of a selected
    bin is selected and all ``2k`` real coefficients act independently on ``dW``.
    """
    if init.dim() != 2 or init.is_complex():
        raise ValueError(f"init must be a real 2-D matrix (d_out, d_in), got shape {tuple(init.shape)} dtype {init.dtype}")
    shape = tuple(init.shape)
    check_k(k, shape)
    spectrum = torch.fft.fft2(init if init.dtype in (torch.float32, torch.float64) else init.float())
    magnitude = spectrum.abs()
    if hermitian:
        half = hermitian_half_mask(shape, init.device)
        available = int(half.sum())
        if k > available:
            raise ValueError(
                f"hermitian=True has {available} independent frequencies for shape {shape}, asked for k={k}")
        magnitude = magnitude.masked_fill(~half, -1.0)
    flat = torch.topk(magnitude.flatten(), k, sorted=True).indices
    rows, cols = flat // shape[1], flat % shape[1]
    return Frequencies(rows, cols, spectrum[rows, cols])


def _finite(matrix: torch.Tensor, what: str) -> torch.Tensor:
    if not torch.isfinite(matrix).all():
        raise ValueError(f"{what} has NaN or inf entries: its spectrum would make every selected coefficient "
                         "NaN; pass a finite matrix, or init=\"random\"")
    return matrix


def init_matrix(
    init: Union[str, torch.Tensor],
    weight: torch.Tensor,
    *,
    std: float = 1e-3,
    seed: Optional[int] = 0,
) -> torch.Tensor:
    """The matrix ``D`` whose spectrum is ranked: ``"random"`` (a Gaussian of std ``std``, drawn
    from a generator of its own seeded with ``seed``, so the global RNG is untouched; with
    ``seed=None`` from torch's global RNG, PEFT's convention), ``"weight"`` (the frozen weight
    itself) or a given tensor of the weight's shape. Returned in float32 on CPU unless a tensor on
    another device is given. A weight or tensor with NaN or inf is refused: its spectrum would
    make every selected coefficient NaN."""
    shape = tuple(weight.shape)
    if isinstance(init, torch.Tensor):
        if tuple(init.shape) != shape:
            raise ValueError(f"init tensor has shape {tuple(init.shape)}, the layer's (d_out, d_in) weight has {shape}")
        return _finite(init.detach().float(), "the init tensor")
    if isinstance(init, str) and init == "random":
        std, seed = positive_number(std, "init_std"), optional_seed(seed)
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        return torch.randn(shape, generator=generator, dtype=torch.float32) * std
    if isinstance(init, str) and init == "weight":
        return _finite(weight.detach().float(), 'init="weight": the weight')
    raise ValueError(f"init must be 'random', 'weight' or a Tensor of shape {shape}, got {init!r}")
