"""Where a machine's measured cost constants live, and when the planner uses them.

``lfma-calibrate`` (:mod:`lfma_kernels.calibrate`) times the candidate paths on this machine and writes
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
import os
import platform
from typing import Any, Dict, Optional

import torch

__all__ = ["machine_key", "path_for", "load", "enabled", "FORMAT"]

FORMAT = 1  # bumped when the file's meaning changes; other formats are ignored


def enabled() -> bool:
    return os.environ.get("LFMA_CALIBRATION", "on").strip().lower() not in ("off", "0", "false", "no")


def cache_dir() -> str:
    if os.environ.get("LFMA_CACHE_DIR"):
        return os.environ["LFMA_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lfma_kernels")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key(device_type: str) -> str:
    """What a calibration holds for: the device, its instruction set or compute capability, the
    threads torch uses and torch's version (each changes the constants)."""
    if device_type == "cuda" and torch.cuda.is_available():
        index = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        device = f"cuda {torch.cuda.get_device_name(index)} sm_{major}{minor} CUDA {torch.version.cuda}"
    else:
        device = f"{device_type} {platform.machine()} {_cpu_name()} {torch.backends.cpu.get_cpu_capability()}"
    return f"{device}; {torch.get_num_threads()} threads; torch {torch.__version__}"


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
