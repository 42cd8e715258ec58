"""The eval-mode cache of ``W + dW``: when it may serve a forward and how it notices a change.

A cached forward must never serve a stale ``W + dW`` and must never stand in for a forward whose
result needs a gradient through ``W + dW``. Both checks run on the host, on every eval forward,
so they cost a few attribute reads and no device sync (comparing tensor contents would sync a GPU).

What "changed" means, and what each part of the key catches:

- ``_version`` of every source tensor: in-place updates (``copy_``, ``mul_``, per-parameter and
  foreach optimizers, ``load_state_dict``);
- the tensor objects themselves, by ``id()``: a source was replaced (``layer.coeffs = ...``,
  ``load_state_dict(assign=True)``, which wraps the loaded tensors in new Parameters). Addresses and
  versions alone cannot tell: a replacement is often allocated at the freed address of a tensor the
  cache was built from, with version 0 again (swap the weight to A, run, swap to B, swap to C: C
  lands where A was and ``W_A + dW`` would be served). An ``id()`` is reused only once its object
  is gone, so the entry holds a weak reference to each source whose callback drops the entry when
  that source dies, before anything can be allocated in its place: a key that matches names the
  very objects the entry was built from. (The references keep no old tensor alive.)
- ``data_ptr()``: the same tensor object given other data (``.data = ...``, a device move of the
  base layer alone);
- the count of optimizer steps taken in this process: fused optimizers (``fused=True`` Adam, AdamW,
  SGD) update parameters without bumping their version counter, and so do old-style optimizers
  that write through ``p.data``. Every ``torch.optim.Optimizer`` runs the global step post-hooks,
  so one counter covers all of them; a step anywhere invalidates every cache, which costs one
  rebuild of ``W + dW`` per layer at the next eval forward after a step.

Not seen: user code writing through ``tensor.data`` outside an optimizer step (``.data`` exists to
hide writes from autograd's version counter). Write under ``torch.no_grad()`` instead, or call the
layer's ``clear_cache()``.

The cache is built outside inference mode, so a cache first built under
``torch.inference_mode()`` can serve a later ordinary forward (an inference tensor would make
autograd fail: "Inference tensors cannot be saved for backward").
"""
from __future__ import annotations

import weakref
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ["FoldedWeightCache", "optimizer_steps"]

_optimizer_steps = 0


def _count_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


# Registered once, at import; the handle is kept so the hook is never collected.
_STEP_HOOK = register_optimizer_step_post_hook(_count_step)


def optimizer_steps() -> int:
    """Optimizer steps taken in this process so far (any optimizer, any parameters)."""
    return _optimizer_steps


class FoldedWeightCache:
    """One cached tensor and the key it was built under.

    ``key`` is a tuple the caller assembles (it knows its source tensors; a generic builder would cost
    a loop on the hot path), holding the sources' ``id()``s among the rest; ``sources()`` lists those
    tensors, and is called only on a miss. The entry is one tuple, replaced whole, so a thread never
    pairs one build's key with another build's tensor.
    """

    __slots__ = ("_entry", "enabled", "__weakref__")

    def __init__(self) -> None:
        self._entry: Optional[Tuple[tuple, Tuple[weakref.ref, ...], torch.Tensor]] = None
        self.enabled = True  # False: the owner may not keep a cache now (see adapter.cache_allowed)

    def get(self, key: tuple, sources: Callable[[], Sequence[torch.Tensor]],
            build: Callable[[], torch.Tensor]) -> torch.Tensor:
        entry = self._entry
        if entry is not None and entry[0] == key:
            return entry[2]
        with torch.inference_mode(False), torch.no_grad():
            weight = build()
        built: list = []

        def drop(_ref, cache=weakref.ref(self)) -> None:
            # A source died, so its id() may be handed out again: the entry must go first.
            owner = cache()
            if owner is not None and built and owner._entry is built[0]:
                owner._entry = None

        built.append((key, tuple(weakref.ref(s, drop) for s in sources()), weight))
        self._entry = built[0]
        return weight

    def clear(self) -> None:
        self._entry = None

    def __reduce__(self):
        # Pickled (torch.save of a module) or deep-copied empty: the copy rebuilds on its first eval
        # forward instead of carrying a weight-sized tensor keyed on another object's addresses.
        return (FoldedWeightCache, ())
