"""Every path choice of the package, in one place: :func:`decide` takes a :class:`.decision.Call` (host
facts only) and returns the :class:`.decision.Decision` the layers execute and ``lfma.explain`` prints:
which backend runs, how it builds ``dW`` and reads ``dL/dcoeffs`` from ``G``, how a layer's backward
gets ``dL/dcoeffs``, and beside a quantized base (or for one adapter of a mixed batch) how the output is
formed (docs/math.md). What a backend can run and what that costs is its own object's answer
(:mod:`.backends`); the shared formulas are :mod:`.costs`'.

Cost constants are data: one :class:`CostTable` per device kind (:mod:`.cost_tables`), with this
machine's calibration laid over it when ``lfma-calibrate`` wrote one (:mod:`.calibration`).
:func:`force` is how tests and benchmarks pin a path (``with planner.force(dw="fft"): ...``); a path
name it does not know is a ``ValueError`` at the call.

This module imports nothing from the rest of the package but the backends' declarations: facts about
them (available here? on this device?) are passed in by :mod:`.dispatch`.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Dict, Iterator, Mapping, Optional, Tuple

import torch

from . import calibration, costs
from .backends import REGISTRY
from .cost_tables import CPU, CUDA, TABLES, CostTable
from .decision import BACKWARD_DESCRIPTIONS, DELTA_DESCRIPTIONS, Call, Decision, Forced

__all__ = ["CostTable", "CPU", "CUDA", "TABLES", "table_for", "calibrated", "using", "reload_calibration",
           "DW_ALGORITHMS", "BACKWARD_PATHS", "DELTA_PATHS", "force", "forced", "decide"]

# Ways to build dW (and, the same names, to read dL/dcoeffs from G): every fast backend's, as it declares them.
DW_ALGORITHMS: Tuple[str, ...] = tuple(dict.fromkeys(
    name for backend in REGISTRY.values() if backend.name != "reference" for name in backend.algorithms))
# Ways a layer's backward gets dL/dcoeffs: from G = g^T x ("dense"), or without forming G through
# the phase tables ("gemm") or one real FFT of every token row of x and g ("fft").
BACKWARD_PATHS: Tuple[str, ...] = tuple(BACKWARD_DESCRIPTIONS)
# Ways a layer beside a quantized base gets its output (docs/math.md, the delta path): dequantize W into a
# transient dense copy, fold dW into it and run one GEMM ("fold"); or the base layer's own output plus
# x dW^T by row FFTs ("rows"), the exact-phase tables ("separable") or a dense dW and a second GEMM ("dense").
DELTA_PATHS: Tuple[str, ...] = tuple(DELTA_DESCRIPTIONS)

_ACTIVE: Dict[str, CostTable] = {}  # per device kind: the shipped table with this machine's calibration


def table_for(device_type: str) -> CostTable:
    """The table of a device kind (devices without one of their own, mps or xpu, use the CPU's), with
    this machine's calibration laid over it when ``lfma-calibrate`` wrote one (:mod:`.calibration`);
    read once per process."""
    table = _ACTIVE.get(device_type)
    if table is None:
        if torch.compiler.is_compiling():  # no file reads or global writes while Dynamo traces
            return TABLES.get(device_type, CPU)
        table = _ACTIVE[device_type] = calibrated(TABLES.get(device_type, CPU), calibration.load(device_type))
    return table


def calibrated(table: CostTable, data: Optional[Mapping]) -> CostTable:
    """``table`` with a calibration's constants (``data``: :func:`.calibration.load`'s) in place of its own;
    per-backend entries (``batch_pair_s``, ``delta_pair_s``) are merged, so a backend not measured keeps
    the shipped figure."""
    if not data:
        return table
    fitted = calibration.constants_of(data, table)
    if not fitted:
        return table
    # Constants the calibration does not measure (seconds: the FFT paths' and triton's when not on a GPU,
    # dequantizing) move with this machine's GEMM speed, so that every comparison stays on one scale.
    scale = fitted.get("gemm_mac_s", table.gemm_mac_s) / table.gemm_mac_s
    for name in _SCALED:
        if name not in fitted and getattr(table, name) is not None:
            fitted[name] = getattr(table, name) * scale
    for name in ("batch_pair_s", "delta_pair_s"):
        shipped = {b: v * scale for b, v in getattr(table, name).items()}
        fitted[name] = {**shipped, **fitted.get(name, {})}
    # The cpp algorithms: each one's measured time over the shipped model's, where timed; else the GEMM's ratio.
    measured = fitted.pop(calibration.CPP_ALGORITHM_SCALE, {})
    if table.cpp is not None:
        fitted["cpp"] = table.cpp.scaled({name: measured.get(name, scale) for name in calibration.CPP_ALGORITHMS})
    status = f"calibrated on this machine {data.get('date', '')} ({data['path']}); shipped: {table.status}"
    return dataclasses.replace(table, status=status, **fitted)


# CostTable fields in seconds (per unit of work): the ones scaled with a calibration's GEMM speed.
_SCALED = ("irfft2_s", "batch_gemm_mac_s", "row_fft_s", "triton_mac_s", "triton_fft_fixed_s",
           "triton_fft_grad_fixed_s", "triton_fft_s", "dequantize_s", "weight_pass_s")


@contextlib.contextmanager
def using(table: CostTable) -> Iterator[None]:
    """Plan with ``table`` for its device kind inside the block (benchmarks compare a calibration with
    the shipped table this way)."""
    saved = _ACTIVE.get(table.device)
    _ACTIVE[table.device] = table
    _DECISIONS.clear()
    try:
        yield
    finally:
        if saved is None:
            _ACTIVE.pop(table.device, None)
        else:
            _ACTIVE[table.device] = saved
        _DECISIONS.clear()


def reload_calibration() -> None:
    """Read the calibration files again (after ``lfma_kernels.calibrate()`` or a change of
    ``LFMA_CALIBRATION``)."""
    _ACTIVE.clear()
    _DECISIONS.clear()


# ---------------------------------------------------------------------------------------------
# forcing a path
# ---------------------------------------------------------------------------------------------
_FORCED = Forced()
_CHOICES: Mapping[str, Tuple[str, ...]] = {"dw": DW_ALGORITHMS, "grad": DW_ALGORITHMS, "backward": BACKWARD_PATHS,
                                           "delta": DELTA_PATHS}


@contextlib.contextmanager
def force(*, dw: Optional[str] = None, grad: Optional[str] = None, backward: Optional[str] = None,
          delta: Optional[str] = None) -> Iterator[None]:
    """Pin paths inside the ``with`` block, for every backend and thread (a process-wide setting, as the
    planner's tables are):

    * ``dw``: how ``dW`` (and ``W + dW``) is built: ``"separable"``, ``"hybrid"`` (cpp only) or ``"fft"``;
    * ``grad``: how ``dL/dcoeffs`` is read from ``G = dL/d(dW)``, same names;
    * ``backward``: how a layer's backward gets ``dL/dcoeffs``: ``"dense"``, ``"gemm"`` or ``"fft"``
      (a backward that also needs ``dL/dW`` forms ``G`` anyway, and goes through it);
    * ``delta``: how a layer beside a quantized base gets its output: ``"fold"``, ``"rows"``,
      ``"separable"`` or ``"dense"`` (``"fold"`` needs a base LFMA can dequantize); forced, it also
      runs a full-precision layer that way (which otherwise always folds), to compare.

    A name this does not know raises ``ValueError`` here; one a backend does not have (``"hybrid"`` on
    torch) raises ``ValueError`` when that backend is called. Blocks nest; leaving one restores what
    was forced before it. The reference backend (the oracle) is never forced."""
    asked = {"dw": dw, "grad": grad, "backward": backward, "delta": delta}
    for what, value in asked.items():
        if value is not None and value not in _CHOICES[what]:
            raise ValueError(f"planner.force({what}={value!r}): unknown path; choose one of "
                             f"{', '.join(_CHOICES[what])}")
    global _FORCED
    saved = _FORCED
    _FORCED = _FORCED._replace(**{what: value for what, value in asked.items() if value is not None})
    try:
        yield
    finally:
        _FORCED = saved


def forced() -> Forced:
    """What is forced right now (``None`` fields: the cost model chooses)."""
    return _FORCED


# ---------------------------------------------------------------------------------------------
# deciding
# ---------------------------------------------------------------------------------------------
_DECISIONS: Dict[tuple, Decision] = {}  # (call, forced, facts, table) -> decision
_MAX_DECISIONS = 4096                    # distinct calls are few (layer shapes x token counts); a bound anyway


def decide(call: Call, why_not: Callable[[str], Optional[str]]) -> Decision:
    """What ``call`` runs. ``why_not(name)`` is the registry's fact: why backend ``name`` cannot run a call
    on ``call.device`` here (``None``: it can). Kept per (call, what is forced, facts, cost table): the
    layers decide on every forward, and the same call decides the same way until one of those changes."""
    forced_now, table = _FORCED, table_for(call.device)
    key = (call, forced_now, why_not, id(table))
    decision = _DECISIONS.get(key)
    if decision is None:
        decision = _decide(call, why_not, forced_now, table)
        if not torch.compiler.is_compiling():  # no global writes while Dynamo traces
            if len(_DECISIONS) >= _MAX_DECISIONS:
                _DECISIONS.clear()
            _DECISIONS[key] = decision
    return decision


def _decide(call: Call, why_not: Callable[[str], Optional[str]], forced_now: Forced, t: CostTable) -> Decision:
    notes = []
    if call.backend == "auto":
        chosen = "torch"
        for name in t.order(call.dtype):  # a loop, not next(generator): Dynamo traces a first decision
            if REGISTRY[name].auto_refusal(t, call.k, call.shape) is None and why_not(name) is None:
                chosen = name
                break
    else:
        chosen = call.backend
        reason = why_not(chosen)
        if reason is not None:
            notes.append(f"backend {chosen!r} cannot run this call here ({reason})")
    if call.quantized is not None:
        notes.append(f"beside a {call.quantized.name} base layer: W is never folded in place and there is no "
                     "eval cache")
    estimates: Dict[str, Mapping[str, float]] = {}
    if chosen == "reference":  # the oracle: the paper's formulation, no choices
        dw = grad = "ifft2"
        backward = None if call.tokens is None else "autograd"
        delta = "reference" if call.tokens is not None and (call.quantized or call.mixed) else None
    else:
        dw, grad, backward, delta = _choices(call, t, chosen, forced_now, estimates)
    return Decision(call=call, backend=chosen, dw=dw, grad=grad, backward=backward, delta=delta, estimates=estimates,
                    forced=forced_now, table=t, why_not=why_not, notes=tuple(notes))


def _choices(call: Call, t: CostTable, chosen: str, forced_now: Forced, estimates: Dict) -> tuple:
    """A fast backend's dW and gradient algorithms, backward path and delta path; ``estimates`` gets the costs
    compared (not those of a forced choice)."""
    backend = REGISTRY[chosen]
    layouts = {"dw": call.dw_layout(), "grad": (call.shape, call.positions)}
    picks, chosen_s = {}, {}
    for what, label in (("dw", "dW"), ("grad", "gradient")):
        shape, positions = layouts[what]
        options = backend.algorithm_costs(t, call.k, shape, positions, gradient=what == "grad")
        pinned = getattr(forced_now, what)
        if pinned is not None:
            picks[what] = _checked(chosen, what, pinned)
        else:
            estimates[label] = options
            picks[what] = costs.cheapest(options)
        chosen_s[what] = options[picks[what]]
    backward = None
    if call.tokens is not None:
        options = costs.backward_costs(t, chosen, call.tokens, call.k, call.shape, chosen_s["grad"])
        estimates["backward"] = options
        backward = ("dense" if call.weight_grad else forced_now.backward if forced_now.backward is not None
                    else costs.cheapest(options))
    delta = None
    if (call.quantized is not None or call.mixed is not None) and call.tokens is not None:
        delta = _delta(call, t, chosen, chosen_s["dw"], forced_now, estimates)
    return picks["dw"], picks["grad"], backward, delta


def _delta(call: Call, t: CostTable, backend: str, dw_s: float, forced_now: Forced, estimates: Dict) -> str:
    if call.mixed is not None:
        can_fold = call.mixed.fold is not None
        options = costs.mixed_costs(t, backend, call.tokens, call.k, call.shape, dw_s, fold=call.mixed.fold,
                                    whole_batch=call.mixed.whole_batch)
        cannot = ("a mixed-adapter batch beside a quantized base takes the delta paths (its base layer runs once "
                  "for every sample)")
    else:
        q = call.quantized
        can_fold = q.can_dequantize
        options = costs.delta_costs(t, backend, call.tokens, call.k, call.shape, dw_s, training=q.training,
                                    base_dequantizes=q.base_dequantizes)
        if not can_fold:
            options.pop("fold")
        cannot = "this base layer cannot be dequantized"
    estimates["delta"] = options
    if forced_now.delta is not None:
        if forced_now.delta == "fold" and not can_fold:
            raise ValueError(f"planner.force(delta='fold'): {cannot}")
        return forced_now.delta
    return costs.cheapest(options)


def _checked(backend: str, what: str, name: str) -> str:
    algorithms = REGISTRY[backend].algorithms
    if name not in algorithms:
        raise ValueError(f"planner.force({what}={name!r}): backend {backend!r} has no {name!r} algorithm "
                         f"(it has {', '.join(algorithms)})")
    return name
