"""Frequency selection (the paper's Algorithm 1) and the init matrices it selects from."""
from __future__ import annotations

from typing import NamedTuple, Sequence, Union

import torch

from ._checks import check_k, check_shape

__all__ = ["Frequencies", "num_frequencies", "select_frequencies", "init_matrix", "hermitian_half_mask"]


class Frequencies(NamedTuple):
    rows: torch.Tensor    # int64 [K]
    cols: torch.Tensor    # int64 [K]
    values: torch.Tensor  # complex [K], fft2(init)[rows, cols]


def num_frequencies(shape: Sequence[int], top_k_ratio: float) -> int:
    """``K = int(d_out * d_in * top_k_ratio)``, the paper's count (it truncates)."""
    d_out, d_in = check_shape(shape)
    if isinstance(top_k_ratio, bool) or not isinstance(top_k_ratio, (int, float)) or not 0 < top_k_ratio <= 1:
        raise ValueError(f"top_k_ratio must be in (0, 1], got {top_k_ratio!r}")
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


def init_matrix(
    init: Union[str, torch.Tensor],
    weight: torch.Tensor,
    *,
    std: float = 1e-3,
    seed: int = 0,
) -> torch.Tensor:
    """The matrix ``D`` whose spectrum is ranked: ``"random"`` (seeded Gaussian of std ``std``,
    drawn from a generator of its own so the global RNG is untouched), ``"weight"`` (the
    frozen weight itself) or a given tensor of the weight's shape. Returned in float32 on CPU
    unless a tensor on another device is given."""
    shape = tuple(weight.shape)
    if isinstance(init, torch.Tensor):
        if tuple(init.shape) != shape:
            raise ValueError(f"init tensor has shape {tuple(init.shape)}, the layer's (d_out, d_in) weight has {shape}")
        return init.detach().float()
    if init == "random":
        if isinstance(std, bool) or not isinstance(std, (int, float)) or not 0 < std < float("inf"):
            raise ValueError(f"init_std must be a positive finite number, got {std!r}")
        generator = torch.Generator().manual_seed(int(seed))
        return torch.randn(shape, generator=generator, dtype=torch.float32) * std
    if init == "weight":
        return weight.detach().float()
    raise ValueError(f"init must be 'random', 'weight' or a Tensor of shape {shape}, got {init!r}")
