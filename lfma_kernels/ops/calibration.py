"""Where a machine's measured cost constants live, and when the planner uses them.

``lfma-calibrate`` (:mod:`lfma_kernels.calibrator`) times the candidate paths on this machine and writes
the fitted constants to a file of its own, keyed by the device (CPU model and instruction set, or GPU
name and compute capability), torch's thread count and torch's version: the shipped tables were
fitted on one AMD CPU and estimated for GPUs. The planner (:func:`.planner.table_for`) overlays a
matching file on the shipped table of its device kind, once per process; ``lfma.explain`` names the
file. ``LFMA_CALIBRATION=off`` ignores every file; ``LFMA_CACHE_DIR`` moves them (default
``$XDG_CACHE_HOME/lfma_kernels``, else ``~/.cache/lfma_kernels``).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
from typing import Any, Dict, Optional

import torch

__all__ = ["cpu_name", "machine_key", "path_for", "load", "enabled", "constants_of", "MEASURED", "FORMAT",
           "CPP_ALGORITHM_SCALE", "CPP_ALGORITHMS"]

FORMAT = 2  # bumped when the file's meaning changes; other formats are ignored
# The CostTable fields a calibration measures (seconds per unit of work; the pair costs per backend).
MEASURED = ("gemm_mac_s", "weight_pass_s", "batch_gemm_mac_s", "row_fft_s", "batch_pair_s", "delta_pair_s",
            "triton_mac_s", "triton_fft_s", "triton_fft_fixed_s")
# The C++ kernels' algorithms: per algorithm, its measured time over what the shipped constants estimate
# (one factor per algorithm: the CostTable's `cpp` costs are scaled by it).
CPP_ALGORITHM_SCALE = "cpp_algorithm_scale"
CPP_ALGORITHMS = ("separable", "hybrid", "fft")


def enabled() -> bool:
    return os.environ.get("LFMA_CALIBRATION", "on").strip().lower() not in ("off", "0", "false", "no")


def cache_dir() -> str:
    if os.environ.get("LFMA_CACHE_DIR"):
        return os.environ["LFMA_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lfma_kernels")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key(device_type: str) -> str:
    """What a calibration holds for: the GPU (the current one) and its compute capability, or the CPU, its
    instruction set and the threads torch uses; and torch's version (each changes the constants)."""
    if device_type == "cuda" and torch.cuda.is_available():
        index = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        device = f"cuda {torch.cuda.get_device_name(index)} sm_{major}{minor} CUDA {torch.version.cuda}"
    else:
        device = (f"{device_type} {platform.machine()} {cpu_name()} {torch.backends.cpu.get_cpu_capability()}; "
                  f"{torch.get_num_threads()} threads")
    return f"{device}; torch {torch.__version__}"


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def constants_of(data: Dict[str, Any], table: Any) -> Dict[str, Any]:
    """The usable constants of a calibration file: measured fields only, finite positive numbers (per
    backend for the pair costs), for a field the shipped ``table`` has; anything else is left out."""
    constants = data.get("constants")
    if not isinstance(constants, dict):
        return {}
    usable: Dict[str, Any] = {}
    for name in MEASURED:
        value = constants.get(name)
        if isinstance(value, dict) and isinstance(getattr(table, name, None), dict):
            per_backend = {k: v for k, v in value.items() if isinstance(k, str) and _positive(v)}
            if per_backend:
                usable[name] = per_backend
        elif _positive(value) and getattr(table, name, None) is not None:
            usable[name] = float(value)
    scales = constants.get(CPP_ALGORITHM_SCALE)
    if isinstance(scales, dict) and getattr(table, "cpp", None) is not None:
        per_algorithm = {k: float(v) for k, v in scales.items() if k in CPP_ALGORITHMS and _positive(v)}
        if per_algorithm:
            usable[CPP_ALGORITHM_SCALE] = per_algorithm
    return usable


def path_for(device_type: str) -> str:
    key = machine_key(device_type)
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return os.path.join(cache_dir(), f"calibration-{device_type}-{digest}.json")


def load(device_type: str) -> Optional[Dict[str, Any]]:
    """This machine's calibration of ``device_type`` (the file's content plus its ``path``), or ``None``:
    none written, turned off, another format or another machine's."""
    if not enabled():
        return None
    path = path_for(device_type)
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if data.get("format") != FORMAT or data.get("key") != machine_key(device_type):
        return None
    return {**data, "path": path}
