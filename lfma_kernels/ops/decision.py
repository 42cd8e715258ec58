"""A call, as the planner sees it, and the :class:`Decision` it makes: what runs, and why.

A :class:`Call` holds only host facts (device type, dtype, K, shape, token count, and what the
positions look like, counted once on the host when they are set or loaded: :func:`count_positions`),
so deciding never reads device data and traces under ``torch.compile`` without a break. The layers
execute a :class:`Decision`'s choices (its backend, ``dw``, ``grad``, ``backward``, ``delta``) and
``lfma.explain`` prints the very same object; its reasons are written from its own fields when printed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple

import torch

from .backends import BACKENDS, REGISTRY
from .cost_tables import CostTable

__all__ = ["PositionFacts", "count_positions", "QuantizedBase", "MixedFold", "Call", "Forced", "Refusal",
           "Decision", "BACKWARD_DESCRIPTIONS", "DELTA_DESCRIPTIONS"]


class PositionFacts(NamedTuple):
    """What a backend's cost model may read from K positions (:mod:`.backends.cpp`'s hybrid), for the
    logical ``(d_out, d_in)`` weight and for its transpose (a fold in a Conv1D's stored layout)."""
    terms: int     # distinct hybrid terms: (column, row step) with conjugate pairs merged
    columns: int   # distinct columns those terms touch
    transposed_terms: int
    transposed_columns: int

    def transposed(self) -> "PositionFacts":
        """The same positions seen on the transposed weight (rows and columns exchanged)."""
        return PositionFacts(self.transposed_terms, self.transposed_columns, self.terms, self.columns)


# Past this many frequencies per (d_out + d_in) the 2-D FFT wins even with every term merged: not counted.
_COUNT_LIMIT = 16


def count_positions(rows: torch.Tensor, cols: torch.Tensor, shape: Tuple[int, int]) -> Optional[PositionFacts]:
    """The positions' :class:`PositionFacts` (one host copy of K indices: call it when positions are set or
    loaded, not per step); ``None`` when K is past where counting could change a decision. A frequency
    past ``d_in / 2`` is the conjugate of its mirror ``(-u, d_in - v)``, so both members of a pair land
    on one term."""
    m, n = int(shape[0]), int(shape[1])
    if rows.numel() > _COUNT_LIMIT * (m + n) or rows.device.type == "meta":
        return None
    u, v = rows.detach().to("cpu", torch.int64), cols.detach().to("cpu", torch.int64)
    return PositionFacts(*_terms_and_columns(u, v, m, n), *_terms_and_columns(v, u, n, m))


def _terms_and_columns(u: torch.Tensor, v: torch.Tensor, m: int, n: int) -> Tuple[int, int]:
    mirror = 2 * v > n
    keys = torch.unique(torch.where(mirror, n - v, v) * m + torch.where(mirror, (m - u) % m, u))
    return int(keys.numel()), int(torch.unique(keys // m).numel())


class QuantizedBase(NamedTuple):
    """A layer beside a quantized base (:mod:`lfma_kernels.quantized`)."""
    name: str               # the quantization, as decisions name it
    training: bool          # a backward will follow
    base_dequantizes: bool  # the base's own kernel dequantizes W and runs a dense GEMM for this call
    can_dequantize: bool    # LFMA can dequantize W (else only the delta paths)


class MixedFold(NamedTuple):
    """One adapter's rows of a mixed-adapter batch (:mod:`lfma_kernels.peft.mixed_batch`)."""
    fold: Optional[bool]    # its W + dW is kept (True), would be built now (False); None: no fold (quantized base)
    whole_batch: bool       # its rows are the whole batch (then no base GEMM runs beside the fold)


class Call(NamedTuple):
    device: str                       # device type of the call's tensors
    dtype: torch.dtype
    k: int
    shape: Tuple[int, int]            # the logical (d_out, d_in)
    backend: str = "auto"             # as asked
    tokens: Optional[int] = None      # rows of a layer's input (None: no layer call, so no backward path)
    weight_grad: bool = False         # the frozen weight needs a gradient too
    positions: Optional[PositionFacts] = None
    quantized: Optional[QuantizedBase] = None
    mixed: Optional[MixedFold] = None
    transposed: bool = False          # W + dW is folded in the weight's stored, transposed layout (a Conv1D)

    def dw_layout(self) -> Tuple[Tuple[int, int], Optional[PositionFacts]]:
        """The shape and position facts dW is built with: the layout it is folded in (dL/dcoeffs is read from
        G, always (d_out, d_in), with ``shape`` and ``positions``)."""
        if not self.transposed:
            return self.shape, self.positions
        return self.shape[::-1], None if self.positions is None else self.positions.transposed()


class Forced(NamedTuple):
    """What :func:`.planner.force` pins (``None``: the cost model chooses)."""
    dw: Optional[str] = None
    grad: Optional[str] = None
    backward: Optional[str] = None
    delta: Optional[str] = None


class Refusal(NamedTuple):
    what: str    # "backend", "dW", "gradient", "backward" or "delta"
    choice: str
    reason: str


BACKWARD_DESCRIPTIONS: Mapping[str, str] = {
    "dense": "G = g^T x, then dL/dcoeffs from G",
    "gemm": "P = g A, Q = x B through the phase tables; no G",
    "fft": "a real FFT of each token row of g and x, K products per token; no G",
}
DELTA_DESCRIPTIONS: Mapping[str, str] = {
    "fold": "dequantize W into a transient copy, fold dW in, one GEMM (dequantized again in the backward)",
    "rows": "the base layer's output + x dW^T by row FFTs of x and one inverse FFT per token",
    "separable": "the base layer's output + x dW^T through the exact-phase tables (LoRA-like)",
    "dense": "the base layer's output + x dW^T with a dense dW and a second GEMM",
}


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


@dataclass(frozen=True)
class Decision:
    """What a call runs (``backend``, ``dw``, ``grad``, ``backward``, ``delta``) and the facts it was
    decided on; ``print(decision)`` for a readable account, with the reason every alternative was refused."""
    call: Call
    backend: str
    dw: str                        # how dW / W + dW is built
    grad: str                      # how dL/dcoeffs is read from G (delta_weight's backward, the dense path)
    backward: Optional[str]        # how a layer's backward gets dL/dcoeffs (None: no tokens given)
    delta: Optional[str]           # beside a quantized base or in a mixed batch: how the output is formed
    estimates: Mapping[str, Mapping[str, float]]  # per decision ("dW", ...): alternative -> estimated seconds
    forced: Forced
    table: CostTable
    # The registry's facts, for the reasons: (backend name) -> why it cannot run this call here, or None.
    why_not: Callable[[str], Optional[str]] = field(compare=False, repr=False)
    notes: Tuple[str, ...] = ()

    @property
    def auto_order(self) -> Tuple[str, ...]:
        """auto's order for this device and dtype (empty: a backend asked by name)."""
        return self.table.order(self.call.dtype) if self.call.backend == "auto" else ()

    @property
    def descriptions(self) -> Mapping[str, Tuple[str, str]]:
        """The chosen backend's algorithms: what each runs for dW and for dL/dcoeffs from G."""
        return REGISTRY[self.backend].descriptions

    def auto_refusal(self, name: str) -> Optional[str]:
        """Why auto passes backend ``name`` over for this call though it runs here, or None."""
        return REGISTRY[name].auto_refusal(self.table, self.call.k, self.call.shape)

    # --- the call, for readers -------------------------------------------------------------
    @property
    def shape(self) -> Tuple[int, int]:
        return self.call.shape

    @property
    def k(self) -> int:
        return self.call.k

    @property
    def tokens(self) -> Optional[int]:
        return self.call.tokens

    @property
    def device(self) -> str:
        return self.call.device

    @property
    def dtype(self) -> torch.dtype:
        return self.call.dtype

    # --- the reasons, written from the fields ------------------------------------------------
    @property
    def backend_reason(self) -> str:
        if not self.auto_order:
            return "asked for by name"
        call = self.call
        return f"auto on {call.device} {_dtype(call.dtype)}: the first of {', '.join(self.auto_order)} that runs here"

    @property
    def reasons(self) -> Dict[str, str]:
        out: Dict[str, str] = {}
        for label, what, pick, side in (("dW", "dw", self.dw, 0), ("gradient", "grad", self.grad, 1)):
            out[label] = f"{self.descriptions[pick][side]}{self._why(label, what, pick)}"
        if self.backward is not None:
            out["backward"] = BACKWARD_DESCRIPTIONS.get(self.backward, "autograd through the paper's layer")
            out["backward"] += ("; dL/dW is needed too, and that is G" if self.call.weight_grad
                                else self._why("backward", "backward", self.backward))
        if self.delta is not None:
            out["delta"] = DELTA_DESCRIPTIONS.get(self.delta, "the base layer's output + x dW^T with the paper's "
                                                              "dense dW (the oracle)")
            out["delta"] += self._why("delta", "delta", self.delta)
        return out

    def _why(self, label: str, what: str, pick: str) -> str:
        if self.backend == "reference":
            return ""
        if getattr(self.forced, what) is not None:
            return f"; forced ({what}={pick!r})"
        if label in ("dW", "gradient") and len(self.descriptions) == 1:
            return " (its only algorithm)"
        if REGISTRY[self.backend].uses_positions and label in ("dW", "gradient"):
            p = self.call.dw_layout()[1] if label == "dW" else self.call.positions
            basis = (f"the positions' {p.terms} distinct terms in {p.columns} columns" if p is not None
                     else f"K={self.call.k} random frequencies")
            layout = ", folded in the stored transposed layout" if label == "dW" and self.call.transposed else ""
            return f" (cost table {self.table.device}, {basis}{layout})"
        return f" (cost table {self.table.device})"

    @property
    def refused(self) -> Tuple[Refusal, ...]:
        out: List[Refusal] = []
        call = self.call
        if self.auto_order:
            for name in BACKENDS:
                if name == self.backend:
                    continue
                if name not in self.auto_order:
                    reason = (self.auto_refusal(name) if name == "reference" else
                              f"not in auto's order for {call.device} {_dtype(call.dtype)} "
                              f"({', '.join(self.auto_order)}; cost table {self.table.device})")
                    if name != "reference" and call.device == "cuda" and call.dtype == torch.float64 \
                            and name in self.table.backends:
                        reason += ": float64 runs on the torch backend's cuBLAS / cuFFT, not on CUDA-core fallbacks"
                    fact = None if name == "reference" else self.why_not(name)
                    reason += f" (and {fact})" if fact else ""
                else:
                    reason = (self.why_not(name) or self.auto_refusal(name)
                              or f"ranked after {self.backend} on {call.device}")
                out.append(Refusal("backend", name, reason))
        for label, what, pick in (("dW", "dw", self.dw), ("gradient", "grad", self.grad),
                                  ("backward", "backward", self.backward), ("delta", "delta", self.delta)):
            if pick is None or self.backend == "reference":
                continue
            if label == "backward" and call.weight_grad:
                out += [Refusal(label, p, "dL/dW needs G anyway") for p in BACKWARD_DESCRIPTIONS if p != pick]
            elif getattr(self.forced, what) is not None:
                others = (self.descriptions if label in ("dW", "gradient") else
                          BACKWARD_DESCRIPTIONS if label == "backward" else DELTA_DESCRIPTIONS)
                out += [Refusal(label, p, f"planner.force({what}={pick!r}) is in effect") for p in others if p != pick]
            else:
                costs = self.estimates.get(label, {})
                out += [Refusal(label, p, f"est. {_ms(s)} against {_ms(costs[pick])} for {pick}")
                        for p, s in costs.items() if p != pick]
                if label == "delta" and call.quantized is not None and not call.quantized.can_dequantize:
                    out.append(Refusal("delta", "fold", f"a {call.quantized.name} layer cannot be dequantized"))
        return tuple(out)

    def __str__(self) -> str:
        call = self.call
        tokens = "" if call.tokens is None else f", {call.tokens} tokens"
        lines = [f"lfma plan: {call.shape[0]}x{call.shape[1]}, K={call.k}, {call.device} {_dtype(call.dtype)}{tokens}",
                 f"  backend   {self.backend:<10} {self.backend_reason}"]
        reasons = self.reasons
        for label, key, value in (("delta", "delta", self.delta), ("dW", "dW", self.dw),
                                  ("gradient", "gradient", self.grad), ("backward", "backward", self.backward)):
            if value is not None:
                lines.append(f"  {label:<9} {value:<10} {reasons.get(key, '')}".rstrip())
        refused = self.refused
        if refused:
            lines.append("  refused:")
            lines += [f"    {r.what} {r.choice}: {r.reason}" for r in refused]
        lines += [f"  note: {n}" for n in self.notes]
        lines.append(f"  cost table: {self.table.device} ({self.table.status})")
        return "\n".join(lines)


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
