"""Formatting shared by the benchmark scripts, and the one writer of benchmarks/RESULTS.md.

RESULTS.md is a set of sections, one per script, device and dtype (for example ``layer cpu
float32`` or ``models cuda bfloat16``), each between ``<!-- section: NAME -->`` and
``<!-- /section: NAME -->`` markers. A script run replaces only its own section, so the CPU
tables, the model-level comparison and the GPU tables each keep the date and machine they were
measured on.
"""
from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from typing import List, Optional, Tuple

import torch

from lfma_kernels._format import markdown_table  # noqa: F401  (the scripts import it from here)
from lfma_kernels.ops.calibration import cpu_name

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TITLE = "# lfma_kernels benchmark results"
_INTRO = ("Each section below was written by one run of the script it names, with the machine, date and "
          "versions it ran on. `make bench` refreshes the CPU layer and model sections; the section "
          "\"cpp batch-grad cpu\" comes from `benchmarks/bench_cpp.py --batch-grad` (its command line is in it), "
          "the GPU sections from `benchmarks/bench_gpu.py` and `benchmarks/bench_models.py --device cuda` on a "
          "CUDA machine.")


def fmt_ms(ms: Optional[float]) -> str:
    if ms is None:
        return "err"
    if ms < 1:
        return f"{ms:.3f}"
    if ms < 100:
        return f"{ms:.2f}"
    return f"{ms:.0f}"


def fmt_ratio(num: Optional[float], den: Optional[float]) -> str:
    if num is None or den is None or den <= 0:
        return "-"
    return f"{num / den:.2f}x"


def _git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_ROOT, capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def noisy_lines(noisy: List[str]) -> List[str]:
    """The results section's note of the measurements other processes disturbed (none: nothing)."""
    if not noisy:
        return []
    note = "Measured while other processes loaded the machine (treat with care):"
    return [note, ""] + [f"- {n}" for n in noisy] + [""]


def machine_info(device: str, dtype: str) -> List[Tuple[str, str]]:
    """Date, machine, versions and device of a run, as (label, value) pairs."""
    import lfma_kernels as lfma

    info = [
        ("date", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
        ("machine", f"{platform.system()} {platform.machine()}, {cpu_name()}"),
        ("CPU cores", f"{os.cpu_count()} (torch threads: {torch.get_num_threads()})"),
        ("python / torch", f"{platform.python_version()} / {torch.__version__}"),
        ("lfma_kernels", f"{lfma.__version__}, git {_git_revision()}, "
                         f"backends available: {', '.join(lfma.available_backends())}"),
    ]
    if device.startswith("cuda"):
        info.append(("GPU", f"{torch.cuda.get_device_name(torch.device(device))} (CUDA {torch.version.cuda})"))
    info.append(("device / dtype", f"{device} / {dtype}"))
    return info


def publish(text: str, path: Optional[str], name: str) -> None:
    """Print a script's results and, given a results file ``path``, write them as its section ``name``."""
    if path:
        write_section(path, name, text)
    print(text)


def write_section(path: str, name: str, text: str) -> None:
    """Replace section ``name`` of the results file at ``path`` (append it if new)."""
    begin, end = f"<!-- section: {name} -->", f"<!-- /section: {name} -->"
    block = f"{begin}\n{text.strip()}\n{end}\n"
    current = open(path).read() if os.path.exists(path) else f"{_TITLE}\n\n{_INTRO}\n\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    updated = pattern.sub(lambda _: block, current) if pattern.search(current) else current.rstrip("\n") + "\n\n" + block
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(updated)
