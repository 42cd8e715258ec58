"""Every path choice of the package, in one place: which backend a call runs on, how that backend
builds ``dW`` and reads ``dL/dcoeffs`` from ``G = dL/d(dW)``, and how a layer's backward gets
``dL/dcoeffs`` (docs/math.md). :func:`plan` answers "what runs for this call, and why" with the
reason each alternative was refused; the backends ask :func:`dw_algorithm`, :func:`grad_algorithm`
and :func:`backward_path` at call time, :mod:`.dispatch` asks :func:`choose_backend`.

Cost constants are data: one :class:`CostTable` per device kind (:data:`CPU`, :data:`CUDA`), every
entry in seconds, each citing the command and the ``benchmarks/RESULTS.md`` section it came from.
The C++ CPU kernels choose among their three algorithms themselves (the choice needs the count of
distinct terms and columns of the K frequencies; its constants, in nanoseconds, are in
``csrc/cpu_plan.cpp``); the planner reports that choice (``lfma_ext::choose_algo``) and
:func:`force` overrides it like every other.

:func:`force` is how tests and benchmarks pin a path (``with planner.force(dw="fft"): ...``); a
path name it does not know is a ``ValueError`` at the call.

This module imports nothing from the rest of the package: facts about backends (available here? on
this device?) are passed in by :mod:`.dispatch`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch

from . import calibration
from .cost_tables import CPU, CUDA, TABLES, CostTable

__all__ = [
    "CostTable", "CPU", "CUDA", "TABLES", "table_for", "calibrated", "using", "reload_calibration", "DW_ALGORITHMS", "BACKWARD_PATHS", "ALGORITHMS_OF",
    "force", "forced", "forced_delta", "dw_algorithm", "grad_algorithm", "backward_path", "native_algorithm", "dw_costs",
    "grad_costs", "backward_costs", "DELTA_PATHS", "delta_costs", "delta_path", "mixed_costs", "mixed_path", "choose_backend", "Plan", "Refusal",
    "QuantizedBase", "plan",
]

# Ways to build dW (and, the same names, to read dL/dcoeffs from G): the rank-2K separable product
# (torch: a GEMM with exact-phase tables; triton: its fused kernel; cpp: a GEMM or fused loops; cuda:
# its tiled kernel), the C++ hybrid (rows direct, then row FFTs), or one 2-D (real) FFT.
DW_ALGORITHMS: Tuple[str, ...] = ("separable", "hybrid", "fft")
# Ways a layer's backward gets dL/dcoeffs: from G = g^T x ("dense"), or without forming G through
# the phase tables ("gemm") or one real FFT of every token row of x and g ("fft").
BACKWARD_PATHS: Tuple[str, ...] = ("dense", "gemm", "fft")
# Ways a layer beside a quantized base gets its output (docs/math.md, the delta path): dequantize W into a transient
# dense copy, fold dW into it and run one GEMM ("fold"); or the base layer's own output plus x dW^T by
# row FFTs ("rows"), the exact-phase tables ("separable") or a dense dW and a second GEMM ("dense").
DELTA_PATHS: Tuple[str, ...] = ("fold", "rows", "separable", "dense")
# What each fast backend can run. The reference is the oracle: always the paper's dense spectrum
# and ifft2, autograd through it; the planner does not choose for it.
ALGORITHMS_OF: Mapping[str, Tuple[str, ...]] = {
    "torch": ("separable", "fft"),
    "triton": ("separable", "fft"),        # fft: the torch backend's scatter + irfft2 (cuFFT)
    "cpp": ("separable", "hybrid", "fft"),
    "cuda": ("separable",),
}
# What each (backend, algorithm) runs: (for dW, for dL/dcoeffs from G).
_DESCRIPTIONS: Mapping[Tuple[str, str], Tuple[str, str]] = {
    ("torch", "separable"): ("rank-2K GEMM of exact-phase cos/sin tables", "G times the phase tables (a GEMM)"),
    ("torch", "fft"): ("scatter into a half spectrum, one irfft2", "one rfft2 of G, a gather"),
    ("triton", "separable"): ("fused Triton kernel (phase tiles, tl.dot)", "fused partial DFT of G (tl.dot)"),
    ("triton", "fft"): ("the torch backend's scatter + irfft2 (cuFFT)", "the torch backend's rfft2 of G + gather"),
    ("cpp", "separable"): ("rank-2K product (MKL GEMM; fused loops for K <= 2)", "G times the phase tables (GEMM; "
                                                                                 "fused loops for K <= 4)"),
    ("cpp", "hybrid"): ("rows direct from the K frequencies, then row real FFTs", "row real FFTs of G, then one "
                                                                                  "sum per term"),
    ("cpp", "fft"): ("scatter into a half spectrum, one 2-D real FFT", "one 2-D real FFT of G, a gather"),
    ("cuda", "separable"): ("tiled CUDA kernel (cos/sin tables in shared memory)", "CUDA reduction of G against the "
                                                                                   "phases"),
}
_PATH_DESCRIPTIONS: Mapping[str, str] = {
    "dense": "G = g^T x, then dL/dcoeffs from G",
    "gemm": "P = g A, Q = x B through the phase tables; no G",
    "fft": "a real FFT of each token row of g and x, K products per token; no G",
}
_DELTA_DESCRIPTIONS: Mapping[str, str] = {
    "fold": "dequantize W into a transient copy, fold dW in, one GEMM (dequantized again in the backward)",
    "rows": "the base layer's output + x dW^T by row FFTs of x and one inverse FFT per token",
    "separable": "the base layer's output + x dW^T through the exact-phase tables (LoRA-like)",
    "dense": "the base layer's output + x dW^T with a dense dW and a second GEMM",
}


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
    try:
        yield
    finally:
        if saved is None:
            _ACTIVE.pop(table.device, None)
        else:
            _ACTIVE[table.device] = saved


def reload_calibration() -> None:
    """Read the calibration files again (after ``lfma_kernels.calibrate()`` or a change of
    ``LFMA_CALIBRATION``)."""
    _ACTIVE.clear()


# ---------------------------------------------------------------------------------------------
# forcing a path
# ---------------------------------------------------------------------------------------------
_FORCED: Dict[str, Optional[str]] = {"dw": None, "grad": None, "backward": None, "delta": None}
_CHOICES: Mapping[str, Tuple[str, ...]] = {"dw": DW_ALGORITHMS, "grad": DW_ALGORITHMS, "backward": BACKWARD_PATHS,
                                           "delta": DELTA_PATHS}


@contextlib.contextmanager
def force(*, dw: Optional[str] = None, grad: Optional[str] = None, backward: Optional[str] = None,
          delta: Optional[str] = None) -> Iterator[None]:
    """Pin paths inside the ``with`` block, for every backend and thread (the autograd engine runs
    backward passes on threads of its own):

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
    saved = dict(_FORCED)
    _FORCED.update({what: value for what, value in asked.items() if value is not None})
    try:
        yield
    finally:
        _FORCED.update(saved)


def forced_delta() -> Optional[str]:
    """The delta path forced right now, if any (read on every layer forward: one dict lookup)."""
    return _FORCED["delta"]


def forced() -> Dict[str, Optional[str]]:
    """What is forced right now (``None``: the cost model chooses)."""
    return dict(_FORCED)


def _checked(backend: str, what: str, name: str) -> str:
    if name not in ALGORITHMS_OF[backend]:
        raise ValueError(f"planner.force({what}={name!r}): backend {backend!r} has no {name!r} algorithm "
                         f"(it has {', '.join(ALGORITHMS_OF[backend])})")
    return name


# ---------------------------------------------------------------------------------------------
# the costs and the choices the backends make at call time
# ---------------------------------------------------------------------------------------------
def _log2(x: float) -> float:
    return math.log2(max(x, 2))


def _torch_fft_s(t: CostTable, shape: Sequence[int], *, gradient: bool) -> float:
    """The torch backend's FFT path: scatter + irfft2 for dW, rfft2 + gather for the gradient from G."""
    n = shape[0] * shape[1]
    per_point = t.irfft2_s * (n / (768 * 768)) ** t.fft_size_exponent / (t.rfft2_speedup if gradient else 1.0)
    return per_point * n * _log2(n)


def _costs(backend: str, t: CostTable, k: int, shape: Sequence[int], *, gradient: bool) -> Dict[str, float]:
    """Estimated seconds of the torch or triton backend's two ways; "fft" first, so a tie goes to the FFT."""
    n = shape[0] * shape[1]
    if backend == "triton" and t.triton_mac_s is not None:
        fixed = t.triton_fft_grad_fixed_s if gradient else t.triton_fft_fixed_s
        return {"fft": fixed + t.triton_fft_s * n * _log2(n), "separable": 2.0 * k * n * t.triton_mac_s}
    return {"fft": _torch_fft_s(t, shape, gradient=gradient), "separable": 2.0 * k * n * t.gemm_mac_s}


def dw_costs(backend: str, device_type: str, k: int, shape: Sequence[int]) -> Dict[str, float]:
    """Estimated seconds of each way ``backend`` (torch or triton) can build ``dW``."""
    return _costs(backend, table_for(device_type), k, shape, gradient=False)


def grad_costs(backend: str, device_type: str, k: int, shape: Sequence[int]) -> Dict[str, float]:
    """Estimated seconds of each way ``backend`` (torch or triton) can read ``dL/dcoeffs`` from ``G``."""
    return _costs(backend, table_for(device_type), k, shape, gradient=True)


def _cheapest(costs: Mapping[str, float]) -> str:
    return min(costs, key=costs.get)


def dw_algorithm(backend: str, device_type: str, k: int, shape: Sequence[int]) -> str:
    """How the torch or triton backend builds ``dW`` (or ``W + dW``): ``"separable"`` or ``"fft"``."""
    if _FORCED["dw"] is not None:
        return _checked(backend, "dw", _FORCED["dw"])
    return _cheapest(dw_costs(backend, device_type, k, shape))


def grad_algorithm(backend: str, device_type: str, k: int, shape: Sequence[int]) -> str:
    """How the torch or triton backend reads ``dL/dcoeffs`` from ``G``: ``"separable"`` or ``"fft"``."""
    if _FORCED["grad"] is not None:
        return _checked(backend, "grad", _FORCED["grad"])
    return _cheapest(grad_costs(backend, device_type, k, shape))


def native_algorithm(backend: str, what: str) -> Optional[str]:
    """For the compiled backends, which choose inside their kernels: the algorithm forced for ``what``
    (``"dw"`` or ``"grad"``), or ``None`` to let the kernels' own cost model choose (csrc/cpu_plan.cpp)."""
    name = _FORCED[what]
    return None if name is None else _checked(backend, what, name)


def backward_costs(backend: str, device_type: str, tokens: int, k: int, shape: Sequence[int]) -> Dict[str, float]:
    """Estimated seconds of each way a layer's backward can get ``dL/dcoeffs`` (docs/math.md): the
    dense ``G = g^T x`` then a gradient from it (the torch backend's cheaper way), the gemm batch path
    ``tokens * 2K * (d_out + d_in)``, or the fft batch path (row FFTs, then ``backend``'s cost per
    (token, frequency) pair)."""
    t = table_for(device_type)
    d_out, d_in = shape
    n = d_out * d_in
    return {
        "dense": tokens * n * t.gemm_mac_s + min(2.0 * k * n * t.gemm_mac_s, _torch_fft_s(t, shape, gradient=True)),
        "gemm": t.batch_gemm_mac_s * tokens * 2 * k * (d_out + d_in),
        "fft": t.row_fft_s * tokens * (d_out * _log2(d_out) + d_in * _log2(d_in)) + t.batch_pair(backend) * tokens * k,
    }


def backward_path(backend: str, device_type: str, tokens: int, k: int, shape: Sequence[int], *,
                  weight_grad: bool = False) -> str:
    """How a layer's backward gets ``dL/dcoeffs``: ``"dense"``, ``"gemm"`` or ``"fft"``. ``weight_grad``:
    ``dL/dW`` is needed too, which is ``G`` itself, so the dense path costs nothing extra."""
    if weight_grad:
        return "dense"
    if _FORCED["backward"] is not None:
        return _FORCED["backward"]
    return _cheapest(backward_costs(backend, device_type, tokens, k, shape))


def delta_costs(backend: str, device_type: str, tokens: int, k: int, shape: Sequence[int], *, training: bool,
                base_dequantizes: bool) -> Dict[str, float]:
    """Estimated seconds each way of running a layer beside a quantized base adds to the base layer's
    own work (a forward, and in ``training`` its backward too: the delta's adjoint, or the fold again;
    ``dL/dcoeffs`` is the same batch path whatever the way, so it is left out). ``base_dequantizes``:
    the base's own kernel dequantizes W and runs a dense GEMM anyway (bitsandbytes and torchao on a CPU,
    bitsandbytes in training on a GPU), so the fold replaces that work and only adds building dW; where
    the base has a kernel of its own (a 4-bit GEMV at inference, bitsandbytes' AVX512-BF16 CPU kernel),
    the fold also pays the dequantization and a dense GEMM in place of that kernel."""
    t = table_for(device_type)
    d_out, d_in = shape
    n = d_out * d_in
    passes = 2 if training else 1
    dw = min(_costs("torch", t, k, shape, gradient=False).values())
    fold = dw if base_dequantizes else (dw + n * t.dequantize_s
                                        + tokens * n * t.gemm_mac_s * (1.0 - t.quantized_kernel_fraction))
    return {
        "fold": passes * fold,
        "rows": passes * tokens * (t.row_fft_s * (d_out * _log2(d_out) + d_in * _log2(d_in))
                                   + t.delta_pair(backend) * k),
        "separable": passes * t.batch_gemm_mac_s * tokens * 2 * k * (d_out + d_in),
        "dense": passes * (dw + tokens * n * t.gemm_mac_s),
    }


def delta_path(backend: str, device_type: str, tokens: int, k: int, shape: Sequence[int], *, training: bool,
               base_dequantizes: bool, can_dequantize: bool = True) -> str:
    """How a layer beside a quantized base gets its output (:data:`DELTA_PATHS`); ``can_dequantize=False``
    (a base only its own forward can run) rules the fold out."""
    forced_name = _FORCED["delta"]
    if forced_name is not None:
        if forced_name == "fold" and not can_dequantize:
            raise ValueError("planner.force(delta='fold'): this base layer cannot be dequantized")
        return forced_name
    costs = delta_costs(backend, device_type, tokens, k, shape, training=training, base_dequantizes=base_dequantizes)
    if not can_dequantize:
        costs.pop("fold")
    return _cheapest(costs)


def mixed_costs(backend: str, device_type: str, tokens: int, k: int, shape: Sequence[int], *,
                fold: Optional[bool], whole_batch: bool = False) -> Dict[str, float]:
    """Estimated seconds one adapter's rows of a mixed-adapter batch (``tokens`` of them, no gradient) add to
    a GEMM of the base weight over those rows: a delta path beside the base layer's output, or ``"fold"``,
    a GEMM of their own with the adapter's ``W + dW``, which reads the whole weight once more unless its
    rows are the ``whole_batch`` (then no base GEMM runs besides it; ``fold``: True, that ``W + dW`` is
    kept from an earlier call; False, built now; None, no fold: a quantized base)."""
    costs = delta_costs(backend, device_type, tokens, k, shape, training=False, base_dequantizes=True)
    del costs["fold"]
    if fold is not None:
        t = table_for(device_type)
        build = 0.0 if fold else min(_costs("torch", t, k, shape, gradient=False).values())
        costs["fold"] = (0.0 if whole_batch else shape[0] * shape[1] * t.weight_pass_s) + build
    return costs


def mixed_path(backend: str, device_type: str, tokens: int, k: int, shape: Sequence[int], *,
               fold: Optional[bool], whole_batch: bool = False) -> str:
    """How one adapter's rows of a mixed-adapter batch get their output (:func:`mixed_costs`); a forced
    delta path (:func:`force`) applies here too."""
    forced_name = _FORCED["delta"]
    if forced_name is not None:
        if forced_name == "fold" and fold is None:
            raise ValueError("planner.force(delta='fold'): a mixed-adapter batch beside a quantized base takes "
                             "the delta paths (its base layer runs once for every sample)")
        return forced_name
    return _cheapest(mixed_costs(backend, device_type, tokens, k, shape, fold=fold, whole_batch=whole_batch))


def _cuda_kernels_fit(t: CostTable, k: int, shape: Sequence[int]) -> bool:
    """The CUDA kernels evaluate only the separable product: worth it where the torch backend would
    run that product too, not where it switches to an FFT."""
    return _cheapest(_costs("torch", t, k, shape, gradient=False)) == "separable"


def choose_backend(device: torch.device, dtype: torch.dtype, k: int, shape: Sequence[int],
                   why_not: Callable[[str, torch.device], Optional[str]]) -> str:
    """What ``backend="auto"`` runs for tensors on ``device`` of ``dtype`` with K frequencies on a
    ``shape`` weight: the first backend of the device table's order that fits and ``why_not`` (facts
    from :mod:`.dispatch`: available here, runs on this device) does not refuse; torch otherwise."""
    t = table_for(device.type)
    for name in t.order(dtype):
        if name == "cuda" and not _cuda_kernels_fit(t, k, shape):
            continue
        if why_not(name, device) is None:
            return name
    return "torch"


# ---------------------------------------------------------------------------------------------
# explaining a call
# ---------------------------------------------------------------------------------------------
class QuantizedBase(NamedTuple):
    """What :func:`plan` needs to know of a quantized base layer (:mod:`lfma_kernels.quantized`)."""
    name: str               # the quantization, as plans name it
    training: bool          # a backward will follow
    base_dequantizes: bool  # the base's own kernel dequantizes W and runs a dense GEMM for this call
    can_dequantize: bool    # LFMA can dequantize W (else only the delta paths)


class Refusal(NamedTuple):
    what: str    # "backend", "dW", "gradient" or "backward"
    choice: str
    reason: str


# (algorithm, {name: estimated seconds}) as a backend's own cost model reports it, for a K, a shape,
# "dw" or "grad", and (when known) the positions; see cpp_ops.algorithm_report.
AlgorithmReport = Callable[[int, Sequence[int], str, Optional[torch.Tensor], Optional[torch.Tensor]],
                           Tuple[str, Dict[str, float], str]]


@dataclass(frozen=True)
class Plan:
    """What a call runs and why (``print(plan)`` for a readable account)."""
    shape: Tuple[int, int]
    k: int
    device: str
    dtype: torch.dtype
    tokens: Optional[int]
    backend: str
    backend_reason: str
    dw: str                        # how dW / W + dW is built
    grad: str                      # how dL/dcoeffs is read from G (delta_weight's backward, the dense path)
    backward: Optional[str]        # how lfma_linear's backward gets dL/dcoeffs (None: no tokens given)
    reasons: Mapping[str, str]     # "dW", "gradient", "backward": why that choice
    estimates: Mapping[str, Mapping[str, float]]  # per decision: alternative -> estimated seconds
    refused: Tuple[Refusal, ...]
    table: str
    notes: Tuple[str, ...] = ()
    delta: Optional[str] = None    # beside a quantized base: how the output is formed (DELTA_PATHS)

    def __str__(self) -> str:
        tokens = "" if self.tokens is None else f", {self.tokens} tokens"
        dtype = str(self.dtype).replace("torch.", "")
        lines = [f"lfma plan: {self.shape[0]}x{self.shape[1]}, K={self.k}, {self.device} {dtype}{tokens}",
                 f"  backend   {self.backend:<10} {self.backend_reason}"]
        for label, key, value in (("delta", "delta", self.delta), ("dW", "dW", self.dw),
                                  ("gradient", "gradient", self.grad), ("backward", "backward", self.backward)):
            if value is not None:
                lines.append(f"  {label:<9} {value:<10} {self.reasons.get(key, '')}".rstrip())
        if self.refused:
            lines.append("  refused:")
            lines += [f"    {r.what} {r.choice}: {r.reason}" for r in self.refused]
        lines += [f"  note: {n}" for n in self.notes]
        lines.append(f"  cost table: {self.table}")
        return "\n".join(lines)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


def _listing(costs: Mapping[str, float]) -> str:
    return ", ".join(f"{name} {_ms(s)}" for name, s in costs.items())


def _refusals(what: str, chosen: str, costs: Mapping[str, float]) -> List[Refusal]:
    return [Refusal(what, name, f"est. {_ms(s)} against {_ms(costs[chosen])} for {chosen}")
            for name, s in costs.items() if name != chosen]


def plan(device: torch.device, dtype: torch.dtype, k: int, shape: Sequence[int], *,
         why_not: Callable[[str, torch.device], Optional[str]], backends: Sequence[str],
         tokens: Optional[int] = None, backend: str = "auto", weight_grad: bool = False,
         rows: Optional[torch.Tensor] = None, cols: Optional[torch.Tensor] = None,
         algorithm_report: Optional[AlgorithmReport] = None, quantized: Optional[QuantizedBase] = None) -> Plan:
    """What a call with K frequencies on a ``shape`` weight, tensors on ``device`` of ``dtype`` (and,
    for a layer's training step, ``tokens`` rows of input) runs, with the reason every alternative
    was refused. ``why_not`` and ``backends`` are the registry's facts (:func:`.dispatch.explain`
    supplies them); ``algorithm_report`` is the chosen backend's own cost model where its kernels
    choose (cpp); ``rows``/``cols`` make that report exact. A backend asked for by name is planned
    as it would run (:mod:`.dispatch` refuses one that cannot run here when it is called)."""
    device = torch.device(device)
    shape = (int(shape[0]), int(shape[1]))
    t = table_for(device.type)
    refused: List[Refusal] = []
    notes: List[str] = []
    if backend == "auto":
        chosen = choose_backend(device, dtype, k, shape, why_not)
        order = t.order(dtype)
        dtype_name = str(dtype).replace("torch.", "")
        why = f"auto on {device.type} {dtype_name}: the first of {', '.join(order)} that runs here"
        for name in backends:
            if name == chosen:
                continue
            if name == "reference":
                reason = "auto never picks the oracle (the paper's dense formulation)"
            elif name not in order:
                reason = f"not in auto's order for {device.type} {dtype_name} ({', '.join(order)}; cost table {t.device})"
                if device.type == "cuda" and dtype == torch.float64 and name in t.backends:
                    reason += ": float64 runs on the torch backend's cuBLAS / cuFFT, not on CUDA-core fallbacks"
                fact = why_not(name, device)
                reason += f" (and {fact})" if fact else ""
            elif name == "cuda" and not _cuda_kernels_fit(t, k, shape):
                reason = ("its kernels only evaluate the separable product, and the torch backend would switch to "
                          f"an FFT here ({_listing(_costs('torch', t, k, shape, gradient=False))})")
            else:
                reason = why_not(name, device) or f"ranked after {chosen} on {device.type}"
            refused.append(Refusal("backend", name, reason))
    else:
        chosen = backend
        why = "asked for by name"
        reason = why_not(chosen, device)
        if reason is not None:
            notes.append(f"backend {chosen!r} cannot run this call here ({reason})")

    reasons: Dict[str, str] = {}
    estimates: Dict[str, Dict[str, float]] = {}
    picks = {}
    for what, label in (("dw", "dW"), ("grad", "gradient")):
        side = 0 if what == "dw" else 1
        forced_name = _FORCED[what]
        if chosen == "reference":
            pick = "ifft2" if what == "dw" else "autograd"
            reasons[label] = ("the paper's dense complex spectrum and torch.fft.ifft2 (the oracle)" if what == "dw"
                              else "autograd through ifft2")
        elif forced_name is not None:
            pick = _checked(chosen, what, forced_name)
            reasons[label] = f"{_DESCRIPTIONS[(chosen, pick)][side]}; forced ({what}={pick!r})"
            refused += [Refusal(label, a, f"planner.force({what}={pick!r}) is in effect")
                        for a in ALGORITHMS_OF[chosen] if a != pick]
        elif chosen in ("torch", "triton"):
            costs = _costs(chosen, t, k, shape, gradient=what == "grad")
            pick = _cheapest(costs)
            estimates[label] = costs
            reasons[label] = f"{_DESCRIPTIONS[(chosen, pick)][side]} (cost table {t.device})"
            refused += _refusals(label, pick, costs)
        elif len(ALGORITHMS_OF[chosen]) == 1:  # cuda
            pick = ALGORITHMS_OF[chosen][0]
            reasons[label] = f"{_DESCRIPTIONS[(chosen, pick)][side]} (its only algorithm)"
        elif algorithm_report is not None:  # cpp: the kernels' own cost model
            pick, costs, basis = algorithm_report(k, shape, what, rows, cols)
            estimates[label] = costs
            reasons[label] = f"{_DESCRIPTIONS[(chosen, pick)][side]} (the C++ kernels' cost model, {basis})"
            refused += _refusals(label, pick, costs)
        else:
            pick = "native"
            reasons[label] = "chosen inside the C++ kernels (csrc/cpu_plan.cpp); the extension is not loaded"
        picks[what] = pick
    dw, grad = picks["dw"], picks["grad"]

    backward = None
    if tokens is not None:
        if chosen == "reference":
            backward = "autograd"
            reasons["backward"] = "autograd through the paper's layer (a second GEMM with a dense dW)"
        else:
            costs = backward_costs(chosen, device.type, tokens, k, shape)
            estimates["backward"] = costs
            backward = backward_path(chosen, device.type, tokens, k, shape, weight_grad=weight_grad)
            if weight_grad:
                reasons["backward"] = f"{_PATH_DESCRIPTIONS['dense']}; dL/dW is needed too, and that is G"
                refused += [Refusal("backward", p, "dL/dW needs G anyway") for p in BACKWARD_PATHS if p != "dense"]
            elif _FORCED["backward"] is not None:
                reasons["backward"] = f"{_PATH_DESCRIPTIONS[backward]}; forced (backward={backward!r})"
                refused += [Refusal("backward", p, f"planner.force(backward={backward!r}) is in effect")
                            for p in BACKWARD_PATHS if p != backward]
            else:
                reasons["backward"] = f"{_PATH_DESCRIPTIONS[backward]} (cost table {t.device})"
                refused += _refusals("backward", backward, costs)
    delta = None
    if quantized is not None:
        notes.append(f"beside a {quantized.name} base layer: W is never folded in place and there is no eval cache")
        if tokens is not None and chosen != "reference":
            delta = delta_path(chosen, device.type, tokens, k, shape, training=quantized.training,
                               base_dequantizes=quantized.base_dequantizes, can_dequantize=quantized.can_dequantize)
            costs = delta_costs(chosen, device.type, tokens, k, shape, training=quantized.training,
                                base_dequantizes=quantized.base_dequantizes)
            estimates["delta"] = costs
            if _FORCED["delta"] is not None:
                reasons["delta"] = f"{_DELTA_DESCRIPTIONS[delta]}; forced (delta={delta!r})"
                refused += [Refusal("delta", p, f"planner.force(delta={delta!r}) is in effect")
                            for p in DELTA_PATHS if p != delta]
            else:
                reasons["delta"] = f"{_DELTA_DESCRIPTIONS[delta]} (cost table {t.device})"
                refused += _refusals("delta", delta, {p: c for p, c in costs.items()
                                                      if p != "fold" or quantized.can_dequantize})
                if not quantized.can_dequantize:
                    refused.append(Refusal("delta", "fold", f"a {quantized.name} layer cannot be dequantized"))
        elif chosen == "reference":
            delta = "reference"
            reasons["delta"] = "the base layer's output + x dW^T with the paper's dense dW (the oracle)"
    return Plan(shape=shape, k=int(k), device=device.type, dtype=dtype, tokens=tokens, backend=chosen,
                backend_reason=why, dw=dw, grad=grad, backward=backward, reasons=reasons, estimates=estimates,
                refused=tuple(refused), table=f"{t.device} ({t.status})", notes=tuple(notes), delta=delta)
