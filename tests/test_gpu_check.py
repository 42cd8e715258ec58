"""The one-command GPU check (benchmarks/gpu_check.py) and the crossover scripts it runs, on CPU:
the plan and its imports, the budget, the step runner (with stand-in commands), the timing's
synchronisation and the constants JSON. What they measure on a GPU is never asserted here."""
import json
import os
import re
import subprocess
import sys
import tarfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)

import gpu_check  # noqa: E402

STEPS = ["build", "tests-triton", "calibrate", "tests-cuda-ext", "bench-gpu", "crossover-triton", "models", "crossover-torch",
         "bench-cpp", "tests-all"]


def _driver(*args, timeout=120):
    return subprocess.run([sys.executable, os.path.join(BENCH, "gpu_check.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_dry_run_lists_the_steps_and_imports_every_script(tmp_path):
    out = tmp_path / "out"
    proc = _driver(str(out), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    listed = re.findall(r"^  (\S+) +~", proc.stdout, re.M)
    assert listed == STEPS
    for command in ["setup.py build_ext --inplace", "pytest -q -rs -p no:cacheprovider tests/test_triton.py",
                    "tests/test_cpp.py -k cuda", "bench_gpu.py --quick", "bench_gpu.py --crossover",
                    "bench_models.py --device cuda --dtype bfloat16 --layers 12 --batch 32",
                    "crossover.py --device cuda", "bench_cpp.py --device cuda",
                    "-m lfma_kernels.calibrator --device cuda --quick --copy"]:
        assert command in proc.stdout, command
    for script in gpu_check.SCRIPTS:
        assert f"imported benchmarks/{script}.py" in proc.stdout
    assert not out.exists()  # a dry run writes nothing


def test_zero_budget_starts_nothing_but_writes_the_summary(tmp_path):
    proc = _driver(str(tmp_path), "--budget", "0")
    assert proc.returncode == (0 if torch.cuda.is_available() else 2), proc.stderr
    assert sorted(os.listdir(tmp_path)) == [gpu_check.RESULTS]  # no logs: nothing ran
    text = (tmp_path / gpu_check.RESULTS).read_text()
    assert "<!-- section: gpu check -->" in text and "budget 0 s" in text
    for step in STEPS:
        assert re.search(rf"^\| {re.escape(step)} +\| not started", text, re.M), step


def _step(name, code, *, cap=30, min_s=0, **kwargs):
    return gpu_check.Step(name, 1, cap, min_s, lambda out, t: [sys.executable, "-c", code], **kwargs)


def test_runner_waits_for_the_build_times_out_and_keeps_what_finished(tmp_path, monkeypatch):
    """Stand-in steps through the real runner: the background build, a step that waits for it,
    a failure, a timeout (killed), one the budget leaves out, a partial JSON merged, logs packed."""
    monkeypatch.setattr(gpu_check, "_has_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "stand-in GPU")
    marker = tmp_path / "built"
    partial = os.path.join(str(tmp_path / "out"), gpu_check.LOGS, gpu_check.PARTIAL_JSON["torch_backend"])
    steps = [
        _step("build", f"import time, pathlib; time.sleep(1); pathlib.Path({str(marker)!r}).touch()",
              background=True),
        _step("after", f"import pathlib, sys; sys.exit(0 if pathlib.Path({str(marker)!r}).exists() else 5)",
              after_build=True),
        _step("json", f"import json; json.dump({{'torch_ops': {{'_RFFT_SPEEDUP': 3.0}}}}, open({partial!r}, 'w'));"
                      "print('not measured (time budget): 4096x4096')"),
        _step("fails", "import sys; sys.exit(3)"),
        _step("hangs", "import time; time.sleep(60)", cap=1),
        _step("too-long", "pass", min_s=10_000),
    ]
    args = gpu_check.parse_args([str(tmp_path / "out"), "--budget", "100"])
    assert gpu_check.run(args, steps) == 1
    status = {s.name: s.status for s in steps}
    assert status["build"] == status["after"] == status["json"] == "passed"
    assert status["fails"] == "failed (exit 3)"
    assert status["hangs"].startswith("timed out") and steps[4].seconds < 20
    assert status["too-long"].startswith("not started")
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == sorted([gpu_check.CONSTANTS, gpu_check.RESULTS, "logs.tar.gz"])
    assert json.loads((out / gpu_check.CONSTANTS).read_text())["torch_backend"]["torch_ops"]["_RFFT_SPEEDUP"] == 3.0
    text = (out / gpu_check.RESULTS).read_text()
    assert "json: not measured (time budget): 4096x4096" in text and "hangs" in text.split("cut short")[1]
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {f"logs/{s}.log" for s in ("build", "after", "json", "fails", "hangs")} <= names


def test_crossover_synchronises_every_timed_call_on_a_gpu(monkeypatch):
    import crossover

    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: events.append("sync"))
    ms = crossover.time_paths({"a": lambda: events.append("call")}, "cuda")
    assert ms["a"] >= 0
    timed = events[events.index("sync") + 1:]  # after the warmup
    assert timed and all(timed[i:i + 2] == ["call", "sync"] for i in range(0, len(timed), 2))


@pytest.mark.parametrize("budget", ["1000", "0"])
def test_bench_gpu_crossover_writes_the_constants(tmp_path, monkeypatch, budget):
    """bench_gpu.py --crossover's tables, fits and JSON from stand-in times (the fused kernel's
    time grows with K, the FFT's does not: the crossover lies between K=32 and K=64)."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton_ops needs a GPU or the interpreter")
    import bench_gpu

    def fake_bench(self, label, make, *, graph=False):
        k = int(re.search(r"K=(\d+)", label).group(1))
        kind = label.rsplit(" ", 1)[-1]
        return {"kernel": 0.001 * k, "dense": 1.0, "gemm": 0.5}.get(kind, 0.045)
    monkeypatch.setattr(bench_gpu.Bench, "__call__", fake_bench)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "stand-in GPU")
    path = tmp_path / "c.json"
    args = bench_gpu.parse_args(["--crossover", "--shapes", "64x64,128x128", "--tokens", "256", "--json", str(path),
                                 "--output", str(tmp_path / "R.md"), "--budget-s", budget])
    args.device = "cpu"  # the stand-in timer runs nothing; the problems it would time are built here
    assert bench_gpu.run_crossover(args) == 0
    data = json.loads(path.read_text())
    if budget == "0":
        assert data["crossover_k"] == {} and len(data["not_measured"]) == 4
        return
    assert data["crossover_k"]["64x64"]["dW"] == ["~", 45.0] and data["not_measured"] == []
    assert data["triton"]["triton_macs_per_s"] > 0
    assert {row["fastest"] for row in data["coeff_grad_paths"]} == {"fft"}
    assert "~45" in (tmp_path / "R.md").read_text()
