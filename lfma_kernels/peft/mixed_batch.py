"""Mixed-adapter batches (PEFT's ``adapter_names=``): each sample through its own adapter, or none.

The samples of one adapter go together: one call per adapter present in the batch, never one per
sample. For each adapter the planner chooses (a decision's ``delta``, :func:`lfma_kernels.ops.costs.mixed_costs`):

- a delta path (``rows``, ``separable`` or ``dense``): ``x dW^T`` on the adapter's samples, added to the
  base layer's output, which runs once for every sample not folded (quantized bases always go this way);
- ``fold`` (full-precision bases): one GEMM of the adapter's samples with its own ``W + dW``. Kept
  between calls, like the eval cache and invalidated the same way, for at most ``FoldPool.capacity``
  adapters per layer; built for the call beyond that.

The delta paths cost per row and the fold one pass over the weight: decoding (a few rows per adapter)
takes a delta path, a prompt of many rows the fold, whose cost is then that of the merged adapter.
"""
from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import torch

from .. import adapter
from ..eval_cache import FoldedWeightCache
from ..ops import dispatch, quantized_ops
from ..ops.decision import MixedFold
from ..quantized import Quantization

__all__ = ["Group", "FoldPool", "DEFAULT_FOLDS", "groups_of", "linear"]

# Adapters whose W + dW a layer keeps for mixed batches: each costs the memory of the layer's weight,
# as a merged copy would (set per model: LfmaModel.set_mixed_batch_folds).
DEFAULT_FOLDS = 4


class Group(NamedTuple):
    name: str
    adapter: adapter.Adapter
    backend: str
    samples: List[int]   # its samples' places in the batch ...
    index: torch.Tensor  # ... as int64 on the input's device


class FoldPool:
    """Each adapter's kept ``W + dW`` for mixed batches: at most ``capacity`` adapters, those first served
    by the fold (no eviction: a stream of batches cycling through more adapters than fit would otherwise
    rebuild at every call). Emptied as the layer's eval cache is (a mode switch, a device or dtype move)
    and when an adapter is deleted or the capacity changes."""

    __slots__ = ("_caches", "capacity", "enabled", "__weakref__")

    def __init__(self, capacity: int = DEFAULT_FOLDS) -> None:
        self._caches: Dict[str, FoldedWeightCache] = {}
        self.capacity = capacity
        self.enabled = True  # False: the layer may not keep caches now (adapter.cache_allowed)

    def kept(self, name: str) -> Optional[bool]:
        """True: ``name`` has a cache here; False: it would get one; None: no room (or none allowed)."""
        if not self.enabled:
            return None
        if name in self._caches:
            return True
        return False if len(self._caches) < self.capacity else None

    def cache(self, name: str) -> Optional[FoldedWeightCache]:
        if self.kept(name) is None:
            return None
        return self._caches.setdefault(name, FoldedWeightCache())

    def drop(self, name: str) -> None:
        self._caches.pop(name, None)

    def clear(self) -> None:
        self._caches.clear()

    def __reduce__(self):
        return (FoldPool, (self.capacity,))  # copied or pickled empty, as FoldedWeightCache


def groups_of(adapter_names: Sequence[str], adapters: Callable[[str, List[int]], Optional[Group]]) -> List[Group]:
    """The samples of each adapter named in ``adapter_names`` that this layer has (``adapters(name, samples)``
    builds its group, or ``None``); ``"__base__"`` and adapters the layer lacks get the base layer alone."""
    samples: Dict[str, List[int]] = {}
    for i, name in enumerate(adapter_names):
        samples.setdefault(name, []).append(i)
    groups = []
    for name, rows in samples.items():
        group = None if name == "__base__" else adapters(name, rows)
        if group is not None:
            groups.append(group)
    return groups


def linear(x: torch.Tensor, base: torch.nn.Module, groups: Sequence[Group], pool: FoldPool,
           eval_cache: FoldedWeightCache, quantization: Optional[Quantization],
           run_base: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The output of a mixed batch: ``run_base(x[i])`` for samples of no adapter, plus each group's own
    adapter on its samples (``x`` is ``[samples, ..., d_in]``). An adapter that has the whole batch keeps
    its ``W + dW`` in the layer's ``eval_cache`` (the one a forward without names would use), others in
    ``pool``."""
    shape = adapter.base_shape(base)
    per_sample = x[0].numel() // shape[1] if x.shape[0] else 0
    grad = adapter.needs_grad(x, *(g.adapter.coeffs for g in groups))
    q = quantization if quantization is not None else adapter.FULL_PRECISION
    dtype = q.compute_dtype(base, x.dtype)
    q.prepare(base, grad)  # before the base layer runs (bitsandbytes' CPU repacking, see quantized.py)
    folds, deltas = [], []
    for g in groups:
        k = g.adapter.rows.shape[0]
        # A kept W + dW serves no forward that needs a gradient through it (folded_linear rebuilds it then).
        whole = len(g.samples) == x.shape[0]
        kept = eval_cache.enabled if whole else pool.kept(g.name) is not None
        fold = None if quantization is not None else (kept and not grad)
        decision = dispatch.decide(g.backend, x.device, dtype, k, shape, tokens=len(g.samples) * per_sample,
                                   positions=g.adapter.positions, mixed=MixedFold(fold, whole))
        (folds if decision.delta == "fold" else deltas).append((g, decision))
    if folds:
        out = _folded(x, base, folds, (None, None) if grad else (pool, eval_cache), run_base)
    else:
        out = run_base(x)
    if not grad:
        deltas = _grouped(x, out, deltas, dtype, shape, per_sample)
    for g, decision in deltas:
        a = g.adapter
        delta = quantized_ops.delta_linear(decision, x.index_select(0, g.index).to(dtype), a.coeffs, a.rows, a.cols,
                                           a.alpha, shape)
        out.index_add_(0, g.index, delta.to(out.dtype))
    return out


# At most this many rows of several adapters go through one grouped rows call (the spectra of all of
# them are held at once; past a few hundred rows the per-adapter calls' fixed costs no longer matter).
GROUPED_ROWS = 256


def _grouped(x: torch.Tensor, out: torch.Tensor, deltas, dtype: torch.dtype, shape, per_sample: int) -> list:
    """Add, in one kernel call, the rows way of every delta group whose backend has a grouped kernel
    (decoding: a few rows per adapter, where one call per adapter would cost more than its work);
    return the groups left for one call each."""
    def grouped_kernel(decision):
        kernels = dispatch.kernels(decision.backend)  # None for the reference
        return None if kernels is None else kernels.delta_rows_grouped

    if len(deltas) < 2:
        return deltas
    batchable = [d for d in deltas if d[1].delta == "rows" and grouped_kernel(d[1]) is not None
                 and d[1].backend == deltas[0][1].backend]
    if len(batchable) < 2 or sum(len(g.samples) for g, _ in batchable) * per_sample > GROUPED_ROWS:
        return deltas
    index = torch.cat([g.index for g, _ in batchable])
    rows = x.index_select(0, index).to(dtype).reshape(-1, shape[1])
    delta = grouped_kernel(batchable[0][1])(rows, [g.adapter for g, _ in batchable],
                                            [len(g.samples) * per_sample for g, _ in batchable], shape)
    out.index_add_(0, index, delta.reshape(len(index), *out.shape[1:]).to(out.dtype))
    done = {id(d) for d in batchable}
    return [d for d in deltas if id(d) not in done]


def _folded(x: torch.Tensor, base: torch.nn.Module, folds, caches, run_base: Callable[[torch.Tensor], torch.Tensor]
            ) -> torch.Tensor:
    """Each folded group's samples through its own ``W + dW`` (kept in ``caches``: the pool and the eval
    cache, or ``(None, None)`` when a gradient flows through it), every other sample through the base layer."""
    pool, eval_cache = caches
    folded = set()
    pieces = []
    for g, decision in folds:
        folded.update(g.samples)
        cache = None if pool is None else eval_cache if decision.call.mixed.whole_batch else pool.cache(g.name)
        pieces.append((g.index, adapter.folded_linear(x.index_select(0, g.index), base, [g.adapter], decision.backend,
                                                      cache)))
    if len(folded) < x.shape[0]:
        rest = torch.tensor([i for i in range(x.shape[0]) if i not in folded], device=x.device)
        pieces.append((rest, run_base(x.index_select(0, rest))))
    first = pieces[0][1]
    out = first.new_empty((x.shape[0], *first.shape[1:]))
    for samples, piece in pieces:
        out.index_copy_(0, samples, piece)
    return out
