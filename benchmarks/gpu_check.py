#!/usr/bin/env python3
"""Everything that needs a GPU, in one budgeted command: build the CUDA extension, run the CUDA
tests, measure the GPU benchmarks and the cost-model constants.

    python3 benchmarks/gpu_check.py OUT [--budget 450]     # on a CUDA machine, from a bare checkout
    make gpu-check OUT=folder                               # the same (no .venv needed)
    python3 benchmarks/gpu_check.py OUT --dry-run           # the plan, and an import of each script

Writes into OUT: RESULTS_GPU.md (the section "gpu check": date, device, versions, each step's
status, time and command, what was cut; then the sections the benchmark scripts write), the
measured cost-model constants as gpu_constants.json, models_gpu.png, and every step's output in
logs/STEP.log, packed into logs.tar.gz at the end (a device machine returns at most 8 files;
--keep-logs leaves the folder). The summary and the JSON are rewritten after every step, so a run
cut short keeps what finished.

Steps, most valuable first; seconds are estimates for one H200 with 16 CPU cores, from each
script's loop counts (no GPU has run them yet), and `cap` the most a step may take:

  build             ~60 s  (cap 240) setup.py build_ext --inplace: the C++ and CUDA extension, in
                           the background from the start, beside tests-triton (which needs none of
                           it); every later step waits for it: they use it, or time the GPU and
                           should not share the CPUs with a compiler
  tests-triton     ~120 s  (cap 240) tests/test_triton.py on CUDA: the Triton kernels at paper
                           sizes, bf16/fp16, Inductor (conftest sets TRITON_INTERPRET=1 only where
                           there is no GPU); compiles and caches the kernels the benchmarks reuse
  calibrate         ~20 s  (cap 60)  lfma-calibrate --device cuda --quick: this GPU's cost constants,
                           which the planner of the later steps uses; a copy in OUT
  tests-cuda-ext    ~20 s  (cap 90)  tests/test_cpp.py -k cuda: the CUDA extension against the oracle
  bench-gpu        ~100 s  (cap 170) bench_gpu.py --quick: 768x768 and 1024x1024 at four ratios,
                           delta_weight / training step / eval against the paper and the floor;
                           its own --budget-s ends it before its cap
  crossover-triton  ~60 s  (cap 120) bench_gpu.py --crossover: the triton entries of the planner's
                           CUDA table (lfma_kernels/ops/cost_tables.py)
  models            ~80 s  (cap 180) bench_models.py at full size (12 layers, batch 32, bf16): all
                           variants round-robin; writes only at its end, so it starts only with
                           its whole estimate left
  crossover-torch   ~15 s  (cap 60)  crossover.py --device cuda: the planner's torch-backend
                           entries on the GPU
  bench-cpp         ~30 s  (cap 90)  bench_cpp.py --device cuda: backend cuda against triton
  tests-all           rest           the whole suite (the CPU tests again, on this torch)

The estimates up to bench-cpp add up to ~445 s, so the default budget of 450 s usually ends at
tests-all, and the whole run fits an 8-minute slot.

Correctness comes first (short, and a wrong kernel makes every timing moot), then the Triton
backend's numbers that `auto` runs on CUDA and the constants its planner needs, then the model
level, then the cheaper or less central rest. No step starts after the budget is spent, nor with
less left than its minimum; each gets min(cap, what is left) as its timeout.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import importlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

_HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(_HERE)
for _path in (_HERE, ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)
# The steps' environment: this one as it came, plus the source tree on the path.
CHILD_ENV = dict(os.environ, PYTHONUNBUFFERED="1", MAX_JOBS=str(os.cpu_count() or 4),
                 PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
# This process only reports; it must never start compiling the extension itself.
os.environ.setdefault("LFMA_NO_JIT", "1")

import torch  # noqa: E402

from costfit import write_json  # noqa: E402
from report import machine_info, markdown_table, write_section  # noqa: E402

PY = sys.executable
RESULTS, CONSTANTS, CHART, LOGS = "RESULTS_GPU.md", "gpu_constants.json", "models_gpu.png", "logs"
CALIBRATION = "calibration-cuda.json"  # lfma-calibrate --quick on the GPU
SECTION = "gpu check"
SCRIPTS = ("bench_gpu", "bench_models", "bench_cpp", "crossover")  # imported by --dry-run
PARTIAL_JSON = {"triton_backend": "crossover_triton.json", "torch_backend": "crossover_torch.json"}


@dataclass
class Step:
    name: str
    est_s: float          # expected seconds on an H200 (see the docstring)
    cap_s: float          # the most it may take
    min_s: float          # not started with less than this left
    argv: Callable[[str, float], List[str]]  # (out folder, timeout) -> command
    background: bool = False
    after_build: bool = False  # waits for the build: it needs the extension, or times CPU-sensitive work
    status: str = "pending"
    seconds: Optional[float] = None
    timeout_s: Optional[float] = None
    command: str = ""
    cut: List[str] = field(default_factory=list)  # what the script itself left out (its budget)


def _script(name: str, *args: str) -> List[str]:
    return [PY, os.path.join("benchmarks", name), *args]


def _pytest(*args: str) -> List[str]:
    return [PY, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *args]


def _in(out: str, *names: str) -> str:
    return os.path.join(out, *names)


def plan() -> List[Step]:
    """The steps in the order they run (see the module docstring for the estimates and the order)."""
    triton_json, torch_json = PARTIAL_JSON["triton_backend"], PARTIAL_JSON["torch_backend"]
    return [
        Step("build", 60, 240, 0, lambda out, t: [PY, "setup.py", "build_ext", "--inplace"], background=True),
        Step("tests-triton", 120, 240, 30, lambda out, t: _pytest("tests/test_triton.py")),
        # Before the benchmarks: the planner of every later step uses this GPU's constants; OUT keeps a
        # copy, to become the shipped CUDA table.
        Step("calibrate", 20, 60, 20, lambda out, t: [PY, "-m", "lfma_kernels.calibrator", "--device", "cuda",
                                                       "--quick", "--copy", _in(out, CALIBRATION)], after_build=True),
        Step("tests-cuda-ext", 20, 90, 20, lambda out, t: _pytest("tests/test_cpp.py", "-k", "cuda"),
             after_build=True),
        # The scripts' own budgets end them (keeping what they measured) before the timeout kills them.
        Step("bench-gpu", 100, 170, 60, lambda out, t: _script(
            "bench_gpu.py", "--quick", "--output", _in(out, RESULTS), "--budget-s", f"{max(t - 50, 1):.0f}"),
            after_build=True),
        Step("crossover-triton", 60, 120, 45, lambda out, t: _script(
            "bench_gpu.py", "--crossover", "--shapes", "768x768,1024x1024,768x3072,4096x4096",
            "--output", _in(out, RESULTS), "--json", _in(out, LOGS, triton_json),
            "--budget-s", f"{max(t - 35, 1):.0f}"),
            after_build=True),
        Step("models", 80, 180, 80, lambda out, t: _script(
            "bench_models.py", "--device", "cuda", "--dtype", "bfloat16", "--layers", "12", "--batch", "32",
            "--output", _in(out, RESULTS), "--charts", _in(out, CHART)), after_build=True),
        Step("crossover-torch", 15, 60, 15, lambda out, t: _script(
            "crossover.py", "--device", "cuda", "--json", _in(out, LOGS, torch_json)), after_build=True),
        Step("bench-cpp", 30, 90, 30, lambda out, t: _script(
            "bench_cpp.py", "--device", "cuda", "--min-time", "0.5", "--output", _in(out, RESULTS)),
            after_build=True),
        Step("tests-all", 300, 10_000, 60, lambda out, t: _pytest("tests"), after_build=True),
    ]


# ---------------------------------------------------------------------------------------------
# running one step
# ---------------------------------------------------------------------------------------------
class Interrupted(Exception):
    """SIGTERM or SIGINT: stop, but still write what finished."""


def _interrupt(signum, frame) -> None:
    raise Interrupted(signal.Signals(signum).name)


def _kill(proc: subprocess.Popen) -> None:
    """End ``proc`` and everything it started (it leads its own process group)."""
    for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _start(step: Step, argv: List[str], env: Dict[str, str], log_path: str) -> subprocess.Popen:
    step.command = shlex.join(argv)
    log = open(log_path, "w")
    log.write(f"$ {step.command}\n")
    log.flush()
    try:
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        log.close()  # the child holds its own copy


def _finish(step: Step, proc: subprocess.Popen, started: float, timeout: float) -> None:
    """Wait for ``proc`` (at most ``timeout`` s from now) and record the outcome in ``step``."""
    try:
        rc = proc.wait(timeout=max(timeout, 0.0))
        step.status = "passed" if rc == 0 else f"failed (exit {rc})"
    except subprocess.TimeoutExpired:
        _kill(proc)
        step.status = f"timed out after {time.time() - started:.0f} s"
    except Interrupted:
        _kill(proc)
        step.status = "interrupted"
        raise
    finally:
        step.seconds = time.time() - started


def _cuts(log_path: str) -> List[str]:
    """The lines in which a script says what its own time budget left out (each once)."""
    try:
        with open(log_path, errors="replace") as f:
            lines = [line.strip().lstrip("- ") for line in f if "not measured" in line and "budget" in line]
    except OSError:
        return []
    return list(dict.fromkeys(lines))


# ---------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------
def _gpu() -> str:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    return f"{device} (torch {torch.__version__}, CUDA {torch.version.cuda}, triton {triton_version})"


def render(args: argparse.Namespace, steps: Sequence[Step], elapsed: float, final: bool, notes: List[str]) -> str:
    lines = ["## GPU check (benchmarks/gpu_check.py)", ""]
    if final:  # only now: machine_info asks lfma_kernels which backends load, which the build changes
        lines += [f"- {k}: {v}" for k, v in machine_info(args.device, "bfloat16, float32")]
    else:
        lines += [f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} (run in progress)"]
    lines += [f"- GPU: {_gpu()}", f"- command: `python benchmarks/gpu_check.py {' '.join(args.argv)}`",
              f"- budget {args.budget:.0f} s; {elapsed:.0f} s elapsed, "
              + ("run finished" if final else "run in progress (this section is rewritten after every step)")]
    lines += [f"- {note}" for note in notes] + [""]
    rows = [[s.name, s.status, "-" if s.seconds is None else f"{s.seconds:.0f}",
             "-" if s.timeout_s is None else f"{s.timeout_s:.0f}", f"{s.est_s:.0f}",
             f"`{s.command}`" if s.command else "-"] for s in steps]
    lines += [markdown_table(["step", "status", "s", "timeout s", "estimate s", "command"], rows,
                             [False, False, True, True, True, False]), ""]
    cut = [s.name for s in steps if not (s.status == "passed" or s.status.startswith("failed"))]
    cut += [f"{s.name}: {line}" for s in steps for line in s.cut]
    lines += ["Not run or cut short (see the status column): " + ("; ".join(cut) if cut else "nothing"), "",
              f"Each step's output: `{LOGS}/STEP.log` (packed into `{LOGS}.tar.gz`). Measured constants: "
              f"`{CONSTANTS}`. The benchmark scripts' own sections follow.", ""]
    return "\n".join(lines)


def merge_constants(out: str) -> None:
    """gpu_constants.json: the constants the crossover steps measured, one entry per backend."""
    merged: Dict[str, object] = {}
    for key, name in PARTIAL_JSON.items():
        path = os.path.join(out, LOGS, name)
        if os.path.exists(path):
            with open(path) as f:
                merged[key] = json.load(f)
    if merged:
        write_json(os.path.join(out, CONSTANTS), {
            "written_by": "benchmarks/gpu_check.py",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "environment": _gpu(), **merged})


def pack_logs(out: str) -> None:
    folder = os.path.join(out, LOGS)
    if not os.path.isdir(folder) or not os.listdir(folder):
        return
    with tarfile.open(os.path.join(out, LOGS + ".tar.gz"), "w:gz") as tar:
        tar.add(folder, arcname=LOGS)
    shutil.rmtree(folder)


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
def _has_cuda() -> bool:
    return torch.cuda.is_available()


def dry_run(args: argparse.Namespace, steps: Sequence[Step]) -> int:
    print(f"gpu_check plan (budget {args.budget:.0f} s; estimates for one H200), output in {args.out}:")
    for step in steps:
        timeout = min(step.cap_s, args.budget)
        how = "background" if step.background else ("after the build" if step.after_build else "")
        print(f"  {step.name:<17} ~{step.est_s:.0f} s, timeout {timeout:.0f} s, needs {step.min_s:.0f} s left"
              f"{', ' + how if how else ''}")
        print(f"    $ {shlex.join(step.argv(args.out, timeout))}")
    for name in SCRIPTS:
        importlib.import_module(name)
        print(f"imported benchmarks/{name}.py")
    return 0


def run(args: argparse.Namespace, steps: Sequence[Step]) -> int:
    start = time.time()
    out = args.out
    os.makedirs(out, exist_ok=True)
    cuda = _has_cuda()
    args.device = "cuda:0" if cuda else "cpu"
    notes = [] if cuda else ["no CUDA device: nothing was measured"]

    def write(final: bool = False) -> str:
        text = render(args, steps, time.time() - start, final, notes)
        write_section(_in(out, RESULTS), SECTION, text)
        merge_constants(out)
        return text

    build_step = next(s for s in steps if s.background)
    build: Optional[subprocess.Popen] = None
    build_started = 0.0
    write()
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for step in steps:
            left = args.budget - (time.time() - start)
            if left <= 0 or left < step.min_s:
                step.status = f"not started ({max(left, 0):.0f} s of the budget left, needs {step.min_s:.0f} s)"
                continue
            if not cuda:
                step.status = "skipped (no CUDA device)"
                continue
            if step.after_build and build is not None:
                _finish(build_step, build, build_started, min(build_step.cap_s - (time.time() - build_started), left))
                build = None
                if build_step.status != "passed":
                    notes.append(f"the extension build {build_step.status} (see {LOGS}/build.log): the later "
                                 "steps ran without the cpp and cuda backends")
                elif not glob.glob(os.path.join(ROOT, "lfma_kernels", "_C_cuda*")):
                    notes.append(f"the build made no CUDA kernels (no nvcc? see {LOGS}/build.log): the later "
                                 "steps ran without the cuda backend")
                left = args.budget - (time.time() - start)
                if left < step.min_s:
                    step.status = f"not started ({max(left, 0):.0f} s of the budget left after the build)"
                    continue
            step.timeout_s = min(step.cap_s, left)
            env = dict(CHILD_ENV)
            if build is not None or build_step.status not in ("pending", "passed"):
                # While the build runs, or after it failed, nothing may start compiling the extension itself.
                env["LFMA_NO_JIT"] = "1"
            os.makedirs(_in(out, LOGS), exist_ok=True)
            log_path = _in(out, LOGS, f"{step.name}.log")
            proc = _start(step, step.argv(out, step.timeout_s), env, log_path)
            print(f"[{time.time() - start:4.0f} s] {step.name}: {step.command}", flush=True)
            if step.background:
                build, build_started, step.status = proc, time.time(), "running"
                continue
            _finish(step, proc, time.time(), step.timeout_s)
            step.cut = _cuts(log_path)
            print(f"[{time.time() - start:4.0f} s] {step.name}: {step.status} in {step.seconds:.0f} s", flush=True)
            write()
    except Interrupted as exc:
        notes.append(f"interrupted by {exc}")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if build is not None:  # never waited for: done by now, or cut
            _finish(build_step, build, build_started, 0)
        print(write(final=True))
        if not args.keep_logs:
            pack_logs(out)
    failed = [s for s in steps if s.status.startswith(("failed", "timed out"))]
    return 2 if not cuda else (1 if failed else 0)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("out", help="output folder (created)")
    parser.add_argument("--budget", type=float, default=450.0,
                        help="seconds after which no step starts (default 450: the run fits an 8-minute slot)")
    parser.add_argument("--dry-run", action="store_true", help="list the steps' commands, import the scripts, exit")
    parser.add_argument("--keep-logs", action="store_true", help=f"leave {LOGS}/ unpacked")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    steps = plan()
    return dry_run(args, steps) if args.dry_run else run(args, steps)


if __name__ == "__main__":
    sys.exit(main())
