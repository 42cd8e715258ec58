"""lfma-calibrate: the measured constants land in a per-machine file the planner then uses (and says so
in lfma.explain); turned off, another machine's or format's file, or unusable values change nothing; the
planner reads no file while torch.compile traces."""
import json
import os
import subprocess
import sys

import pytest

import lfma_kernels as lfma
from lfma_kernels.ops import calibration, planner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LFMA_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("LFMA_CALIBRATION", "on")
    planner.reload_calibration()
    yield tmp_path
    monkeypatch.setenv("LFMA_CALIBRATION", "off")
    planner.reload_calibration()


def test_quick_calibration_is_used_by_the_planner(cache, monkeypatch):
    data = lfma.calibrate("cpu", quick=True)
    assert data["path"] == calibration.path_for("cpu") and os.path.dirname(data["path"]) == str(cache)
    assert data["seconds"] < 30
    table, shipped = planner.table_for("cpu"), planner.TABLES["cpu"]
    fitted = data["constants"]
    assert data["path"] in table.status and table.gemm_mac_s == fitted["gemm_mac_s"]
    assert table.batch_pair_s["cpp" if "cpp" in fitted["batch_pair_s"] else "default"] == \
        fitted["batch_pair_s"]["cpp" if "cpp" in fitted["batch_pair_s"] else "default"]
    for name in calibration.MEASURED:  # within the bounds the calibration keeps its fits to
        for value, reference in ((fitted[name], getattr(shipped, name)),) if name in fitted else ():
            if isinstance(value, dict):
                assert all(reference["default"] / 10 <= v <= reference.get(b, reference["default"]) * 10
                           or reference.get(b, reference["default"]) / 10 <= v for b, v in value.items())
            else:
                assert reference / 10 <= value <= reference * 10, name
    if "cpp" in lfma.available_backends():  # each C++ algorithm by its measured time over the shipped model
        factors = fitted[calibration.CPP_ALGORITHM_SCALE]
        assert set(factors) == set(calibration.CPP_ALGORITHMS) and all(0.1 <= f <= 10 for f in factors.values())
        assert table.cpp.mac_s[1] == pytest.approx(shipped.cpp.mac_s[1] * factors["separable"])
        assert table.cpp.term_row_s[0] == pytest.approx(shipped.cpp.term_row_s[0] * factors["hybrid"])
        assert table.cpp.fft2_call_s == pytest.approx(shipped.cpp.fft2_call_s * factors["fft"])
    # not measured: the shipped figure at this machine's GEMM speed
    scale = table.gemm_mac_s / shipped.gemm_mac_s
    assert table.irfft2_s == pytest.approx(shipped.irfft2_s * scale) and table.rfft2_speedup == shipped.rfft2_speedup
    assert "calibrated on this machine" in str(lfma.explain((768, 768), 176, tokens=1024))
    monkeypatch.setenv("LFMA_CALIBRATION", "off")
    planner.reload_calibration()
    assert planner.table_for("cpu") is shipped


def write(data):
    path = calibration.path_for("cpu")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(data if isinstance(data, str) else json.dumps(data))
    planner.reload_calibration()


def test_another_machine_or_format_or_unusable_values_are_ignored(cache):
    key = calibration.machine_key("cpu")
    for data in ({"format": calibration.FORMAT, "key": "another machine", "constants": {"gemm_mac_s": 1e-11}},
                 {"format": 1, "key": key, "constants": {"gemm_mac_s": 1e-11}},
                 {"format": calibration.FORMAT, "key": key, "constants": None},
                 {"format": calibration.FORMAT, "key": key,
                  "constants": {"gemm_mac_s": -1.0, "row_fft_s": "fast", "batch_pair_s": None, "irfft2_s": 1.0,
                                calibration.CPP_ALGORITHM_SCALE: {"hybrid": -1.0, "sparse": 2.0}}},
                 "not json"):
        write(data)
        assert planner.table_for("cpu") is planner.TABLES["cpu"], data
    write({"format": calibration.FORMAT, "key": key, "date": "today",
           "constants": {"gemm_mac_s": 2.2e-11, "batch_pair_s": {"cpp": 1e-9, "torch": float("nan")},
                         calibration.CPP_ALGORITHM_SCALE: {"hybrid": 3.0}}})
    table, shipped = planner.table_for("cpu"), planner.TABLES["cpu"]
    assert table.gemm_mac_s == 2.2e-11 and table.batch_pair_s["cpp"] == 1e-9
    assert table.batch_pair_s["default"] == pytest.approx(2 * shipped.batch_pair_s["default"])
    # the measured algorithm by its factor, the others with the GEMM
    assert table.cpp.term_row_s[1] == pytest.approx(3 * shipped.cpp.term_row_s[1])
    assert table.cpp.mac_s[0] == pytest.approx(2 * shipped.cpp.mac_s[0])


def test_command_line_quick_run(tmp_path):
    out = tmp_path / "calibration.json"
    env = dict(os.environ, LFMA_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "lfma_kernels.calibrator", "--quick", "--output", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "gemm_mac_s" in proc.stdout and str(out) in proc.stdout
    data = json.loads(out.read_text())
    assert data["key"] == calibration.machine_key("cpu") and data["quick"] is True
    with pytest.raises(ValueError, match="device must be"):
        lfma.calibrate("mps")


def test_compile_fullgraph_first_in_a_fresh_process():
    """Dynamo traces the planner: it must read no file and write no global while it does."""
    code = ("import torch, torch.nn as nn, lfma_kernels as lfma\n"
            "m = nn.Sequential(lfma.LFMALinear(nn.Linear(64, 48), k=17))\n"
            "x = torch.randn(5, 64)\n"
            "out = torch.compile(m, fullgraph=True)(x)\n"
            "assert torch.allclose(out, m(x), atol=1e-5)\n")
    for setting in ("off", "on"):
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, LFMA_CALIBRATION=setting))
        assert proc.returncode == 0, proc.stderr[-2000:]
