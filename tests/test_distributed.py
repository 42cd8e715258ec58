"""LFMA under DDP, FSDP2 (fully_shard) and FSDP1, 2 processes on gloo (CPU): training equals
single-process training on the whole batch, the eval cache stays right, and the adapter gathered
after training loads into a plain model. tests/distributed_worker.py is the worker; the reports
it writes are judged, not its exit status (tests/distributed_harness.py says why)."""
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch
import torch.nn as nn

from lfma_kernels.distributed import fsdp_auto_wrap_policy

from distributed_harness import launch, read_reports, torchrun
from distributed_worker import APIS, ENGINES, WORLD_SIZE, base_model, case_dir, data, train_and_evaluate

WORKER = Path(__file__).with_name("distributed_worker.py")
TOL = 1e-6  # max abs difference; float32 runs in the tests differ by about 1e-7
CASES = [(engine, api) for engine in ENGINES for api in APIS] + [("sharded_build", "native")]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """``(report_dir, per-rank results)`` of a worker case. Every case runs in one 2-process
    launch, started once per module; a case that failed fails only the tests that judge it."""
    root = tmp_path_factory.mktemp("distributed")
    output = launch(torchrun(WORKER, str(root), *(f"{case}:{api}" for case, api in CASES)), log=root / "launch.log")

    def results(case: str, api: str) -> Tuple[Path, List[dict]]:
        directory = case_dir(root, case, api)
        return directory, read_reports(directory, WORLD_SIZE, output)

    return results


@pytest.fixture(scope="module")
def reference():
    """Per API: the trained single-process model and its eval outputs on the whole batches."""
    models: Dict[str, Tuple[nn.Module, List[torch.Tensor]]] = {}

    def get(api: str) -> Tuple[nn.Module, List[torch.Tensor]]:
        if api not in models:
            model = APIS[api].apply(base_model())
            models[api] = model, train_and_evaluate(model, slice(None))
        return models[api]

    return get


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("api", APIS)
def test_training_matches_single_process(launched, reference, api, engine):
    _, results = launched(engine, api)
    model, _ = reference(api)
    want = model.state_dict()
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    for rank, result in enumerate(results):
        state = result["state"]
        assert set(state) == trained | {name for name, _ in model.named_buffers()}, f"rank {rank}"
        for key, tensor in state.items():
            assert max_diff(tensor, want[key]) <= TOL, f"rank {rank}, {key}"
    untrained = APIS[api].apply(base_model()).state_dict()
    for key in trained:  # the comparison is not vacuous: training moved every trained tensor
        assert max_diff(want[key], untrained[key]) > 1e-3, key


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("api", APIS)
def test_eval_cache_matches_unsharded(launched, reference, api, engine):
    """Eval twice, after a train/eval switch and a step, after a step taken in eval mode."""
    _, results = launched(engine, api)
    _, want = reference(api)
    for rank, result in enumerate(results):
        assert len(result["eval"]) == len(want)
        for i, (got, expected) in enumerate(zip(result["eval"], want)):
            assert max_diff(got, expected) <= TOL, f"rank {rank}, eval output {i}"


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("api", APIS)
def test_gathered_adapter_loads_into_plain_model(launched, api, engine):
    """Rank 0 saved the gathered adapter; a fresh unsharded model loading it gives the trained
    model's outputs."""
    directory, results = launched(engine, api)
    plain = APIS[api].load(base_model(), directory / "adapter").eval()
    _, x_eval = data()
    with torch.no_grad():
        assert max_diff(plain(x_eval), results[0]["eval"][-1]) <= TOL


def test_sharded_weight_is_refused(launched):
    """An LFMALinear built on a layer FSDP2 already sharded must refuse: init="weight" would select
    from a DTensor (a silent all-gather, then DTensor coefficients and buffers the forward rejects),
    and with any init the coefficients would be added after fully_shard, so no engine would reduce
    their gradients and the ranks would drift apart silently. Apply LFMA first, then shard."""
    _, results = launched("sharded_build", "native")
    for rank, result in enumerate(results):
        for init, error in result["errors"].items():
            assert error, f"rank {rank}, init={init}: a layer on an already-sharded weight was not refused"
            assert error.startswith("ValueError") and "shard" in error, f"rank {rank}, init={init}: {error}"


def test_fsdp1_policy_wraps_adapted_layers_and_trained_modules():
    model = APIS["native"].apply(base_model())
    wrapped = {name for name, module in model.named_modules() if name and fsdp_auto_wrap_policy(module, False, 0)}
    assert wrapped == {"0", "4", "6"}
    assert all(fsdp_auto_wrap_policy(module, True, 0) for module in model.modules())  # always recurse


def test_fsdp1_policy_wraps_the_owner_of_a_parameter_container():
    """A layer keeping its trained tensors in an nn.ParameterDict (as PEFT layers do) is the unit:
    the container is never called, so a unit of its own would never be unsharded."""
    owner = nn.Module()
    owner.coeffs = nn.ParameterDict({"default": nn.Parameter(torch.zeros(3, 2))})
    owner.base = nn.Linear(4, 4).requires_grad_(False)
    assert fsdp_auto_wrap_policy(owner, False, 0)
    assert not fsdp_auto_wrap_policy(owner.coeffs, False, 0)
    assert not fsdp_auto_wrap_policy(owner.base, False, 0)
