"""The multi-process harness judges what workers report: an error or a silent worker fails with the
worker's own words, a hang is killed at the timeout, and an abort after the report (the gloo
teardown hazard) does not fail a run whose work succeeded."""
import os
import sys
from pathlib import Path

import pytest

from distributed_harness import LaunchFailed, launch, read_reports

WORKER = """
import os, sys, time
from pathlib import Path
from distributed_harness import run_and_report

mode, report_dir = sys.argv[1], Path(sys.argv[2])
if mode == "silent":
    print("dying before any report", flush=True)
    os._exit(3)
if mode == "hang":
    time.sleep(600)

def work():
    if mode == "raise":
        raise RuntimeError("boom in the worker")
    return {"value": 1}

run_and_report(report_dir, 0, work)
if mode == "abort_after_report":
    os.abort()
"""


def run_worker(tmp_path: Path, mode: str, timeout: float = 60.0):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))}
    output = launch([sys.executable, str(script), mode, str(tmp_path)], log=tmp_path / "log", timeout=timeout, env=env)
    return read_reports(tmp_path, 1, output)


def test_result_is_read_back(tmp_path):
    assert run_worker(tmp_path, "ok") == [{"value": 1}]


def test_abort_after_the_report_does_not_fail(tmp_path):
    assert run_worker(tmp_path, "abort_after_report") == [{"value": 1}]


def test_worker_exception_fails_with_its_traceback(tmp_path):
    with pytest.raises(LaunchFailed, match="(?s)rank 0 failed.*RuntimeError: boom in the worker"):
        run_worker(tmp_path, "raise")


def test_silent_worker_fails_with_its_output(tmp_path):
    with pytest.raises(LaunchFailed, match="(?s)rank 0 reported nothing.*dying before any report"):
        run_worker(tmp_path, "silent")


def test_hung_worker_is_killed_at_the_timeout(tmp_path):
    with pytest.raises(LaunchFailed, match="ran past 3 s and was killed"):
        run_worker(tmp_path, "hang", timeout=3.0)
