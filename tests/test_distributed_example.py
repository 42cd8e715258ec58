"""examples/distributed_train.py runs under torchrun and accelerate launch with 2 CPU processes:
the adapter it saves loads into a plain model, and its merged weights give the same outputs."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lfma_kernels as lfma

from distributed_harness import LaunchFailed, accelerate_launch, launch, tail, torchrun

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "distributed_train.py"
ARGS = ["--steps", "20"]


def load_example():
    spec = importlib.util.spec_from_file_location("distributed_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("launcher, engine", [("torchrun", "fsdp2"), ("accelerate", "ddp")])
def test_example_trains_saves_and_merges(tmp_path, launcher, engine):
    if launcher == "accelerate":
        pytest.importorskip("accelerate")
        command = accelerate_launch(SCRIPT, "--engine", engine, "--output-dir", str(tmp_path), *ARGS)
    else:
        command = torchrun(SCRIPT, "--engine", engine, "--output-dir", str(tmp_path), *ARGS)
    # HF_HOME: no accelerate config of the machine's user leaks into the run.
    output = launch(command, log=tmp_path / "launch.log", env={"HF_HOME": str(tmp_path / "hf")})
    # Judged by what rank 0 wrote last, not by the exit status (see distributed_harness).
    log_path = tmp_path / "train_log.json"
    if not log_path.exists():
        raise LaunchFailed(f"the example wrote no train_log.json; its output:\n{tail(output)}")
    log = json.loads(log_path.read_text())
    assert log["engine"] == engine and log["world_size"] == 2 and len(log["losses"]) == 20
    assert log["losses"][-1] < log["losses"][0]

    example = load_example()
    args = example.parse_args(ARGS)
    adapted = lfma.load_lfma(example.base_model(args), tmp_path / "adapter").eval()
    merged = example.base_model(args)
    merged.load_state_dict(load_file(str(tmp_path / "merged.safetensors")))
    x = torch.randn(8, args.width)
    with torch.no_grad():
        assert (adapted(x) - merged(x)).abs().max().item() <= 1e-5
