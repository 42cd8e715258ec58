"""Launch multi-process runs from the tests and judge what the workers report, not how they exit.

With torch 2.13 on gloo, a worker can abort during process-group teardown ('terminate called
without an active exception', exit code 1 or SIGABRT) after its work is done, so a launcher's
exit status says nothing reliable. Workers therefore write a report per rank (the result, or the
traceback of what went wrong) before teardown, and the test reads the reports: a rank that wrote
none, or wrote an error, fails the test with the worker's own output. Every launch runs under a
timeout and in a session of its own, so that a hung or orphaned worker is killed with it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

# Generous: a 2-process launch takes 5-15 s on a busy 2-core machine; this only bounds a hang.
LAUNCH_TIMEOUT_S = 180.0
# The tail of the launcher's output shown when a run fails (torchrun forwards the workers' output).
OUTPUT_TAIL_CHARS = 6000


class LaunchFailed(AssertionError):
    """A run that timed out, or whose workers reported an error or nothing."""


def torchrun(script: Path, *args: str, nproc: int = 2) -> List[str]:
    """A ``torchrun`` command line for this interpreter. ``--standalone`` rendezvouses on a port
    the OS picks, so concurrent launches never collide."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(script), *args]


def accelerate_launch(script: Path, *args: str, nproc: int = 2) -> List[str]:
    """An ``accelerate launch`` command line for this interpreter: ``--multi_gpu`` is its
    multi-process launcher, CPU processes where there is no GPU; port 0 lets it pick a free one."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={nproc}",
            "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", "--main_process_port=0",
            str(script), *args]


def launch(command: Sequence[str], *, log: Path, timeout: float = LAUNCH_TIMEOUT_S,
           env: Optional[Dict[str, str]] = None) -> str:
    """Run ``command`` with its output (stdout and stderr together) in ``log`` and return that
    output. The exit status is not judged (see the module docstring); a run past ``timeout`` is
    killed, its whole process group included, and raises ``LaunchFailed``."""
    with open(log, "wb") as out:
        # CPU runs on gloo even on a GPU machine, where fully_shard would build its mesh on CUDA.
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})}
        proc = subprocess.Popen(list(command), stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise LaunchFailed(f"{' '.join(command)} ran past {timeout:.0f} s and was killed\n"
                               f"{tail(log.read_text(errors='replace'))}") from None
    return log.read_text(errors="replace")


def tail(output: str) -> str:
    return output[-OUTPUT_TAIL_CHARS:]


def report_path(report_dir: Path, rank: int) -> Path:
    return Path(report_dir) / f"rank{rank}.pt"


def run_and_report(report_dir: Path, rank: int, work: Callable[[], Dict[str, Any]]) -> None:
    """Worker side: run ``work`` and write its result, or the traceback it raised, as this rank's
    report. Written to a temporary name and renamed, so a reader never sees half a report."""
    try:
        report = {"result": work()}
    except Exception:  # any failure becomes the report the test judges
        report = {"error": traceback.format_exc()}
        # also in the launcher's output, shown when the run then hangs (the other ranks waiting
        # in a collective this rank never reaches) and is killed at the timeout
        print(report["error"], file=sys.stderr, flush=True)
    path = report_path(report_dir, rank)
    torch.save(report, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def read_reports(report_dir: Path, world_size: int, output: str) -> List[Dict[str, Any]]:
    """Test side: every rank's result, in rank order; ``LaunchFailed`` with the worker's traceback
    (or, when a rank wrote nothing, the launcher's output) otherwise."""
    results = []
    for rank in range(world_size):
        path = report_path(report_dir, rank)
        if not path.exists():
            raise LaunchFailed(f"rank {rank} reported nothing; launcher output:\n{tail(output)}")
        report = torch.load(path, weights_only=True)
        if "error" in report:
            raise LaunchFailed(f"rank {rank} failed:\n{report['error']}")
        results.append(report["result"])
    return results
