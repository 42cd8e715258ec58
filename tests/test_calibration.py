"""lfma-calibrate: the measured constants land in a per-machine file the planner then uses (and says so
in lfma.explain); turned off, another machine's or another format's file changes nothing."""
import json
import os
import subprocess
import sys

import pytest

import lfma_kernels as lfma
from lfma_kernels import calibrate
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
    data = calibrate.calibrate("cpu", quick=True)
    assert data["path"] == calibration.path_for("cpu") and os.path.dirname(data["path"]) == str(cache)
    assert data["seconds"] < 30
    table = planner.table_for("cpu")
    assert data["path"] in table.status and table.gemm_mac_s == data["constants"]["gemm_mac_s"]
    assert table.batch_pair_s["default"] == data["constants"]["batch_pair_s"]["default"]
    assert all(v > 0 for v in (table.gemm_mac_s, table.row_fft_s, table.batch_gemm_mac_s, table.irfft2_s))
    assert "calibrated on this machine" in str(lfma.explain((768, 768), 176, tokens=1024))
    # turned off: the shipped table again
    monkeypatch.setenv("LFMA_CALIBRATION", "off")
    planner.reload_calibration()
    assert planner.table_for("cpu") is planner.TABLES["cpu"]


def test_another_machine_or_format_is_ignored(cache):
    path = calibration.path_for("cpu")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    for data in ({"format": calibration.FORMAT, "key": "another machine", "constants": {"gemm_mac_s": 1.0}},
                 {"format": 999, "key": calibration.machine_key("cpu"), "constants": {"gemm_mac_s": 1.0}}):
        with open(path, "w") as f:
            json.dump(data, f)
        planner.reload_calibration()
        assert planner.table_for("cpu") is planner.TABLES["cpu"]
    with open(path, "w") as f:
        f.write("not json")
    planner.reload_calibration()
    assert planner.table_for("cpu") is planner.TABLES["cpu"]


def test_command_line_quick_run(tmp_path):
    out = tmp_path / "calibration.json"
    env = dict(os.environ, LFMA_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "lfma_kernels.calibrate", "--quick", "--output", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "gemm_mac_s" in proc.stdout and str(out) in proc.stdout
    data = json.loads(out.read_text())
    assert data["key"] == calibration.machine_key("cpu") and data["quick"] is True
    with pytest.raises(ValueError, match="device must be"):
        calibrate.calibrate("mps")
