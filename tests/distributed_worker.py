"""The worker of tests/test_distributed.py, run by torchrun on the gloo backend:

    torchrun --standalone --nproc_per_node 2 tests/distributed_worker.py REPORT_DIR CASE:API [CASE:API ...]

Runs each case in turn in one process group (one launch: a process start costs seconds here) and
writes its reports to REPORT_DIR/CASE-API. CASE is an engine (``ENGINES``) or ``sharded_build``;
API is how the adapter is applied, saved and loaded (``APIS``: the native API and the PEFT
method). The test imports this module too: the single-process reference runs the same model, data
and training sequence on the whole batch.
"""
from __future__ import annotations

import gc
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.nn.parallel import DistributedDataParallel

import lfma_kernels as lfma
from lfma_kernels.distributed import fsdp_auto_wrap_policy, full_adapter_state_dict, load_adapter_state
from lfma_kernels.model import lfma_layers

from distributed_harness import run_and_report

WORLD_SIZE = 2
LOCAL_BATCH = 4
STEPS = 3
# SGD; moves the coefficients by about half their initial size in STEPS steps, outputs stay O(1).
LR = 1.0


class AdapterApi(NamedTuple):
    apply: Callable[[nn.Module], nn.Module]         # adapts the plain model in place, returns it
    layers: Callable[[nn.Module], List[nn.Module]]  # the adapted layers (FSDP2 shards each on its own)
    save: Callable[[nn.Module, Path], None]
    load: Callable[[nn.Module, Path], nn.Module]    # a fresh plain model + a saved adapter


def _apply_native(model: nn.Module) -> nn.Module:
    # K = 13 splits unevenly over 2 ranks, as does the first layer's d_out = 23.
    return lfma.apply_lfma(model, lfma.LFMAConfig(["0", "4"], k=13, modules_to_save=["6"]))


def _apply_peft(model: nn.Module) -> nn.Module:
    from lfma_kernels.peft import LfmaConfig
    from peft import get_peft_model

    return get_peft_model(model, LfmaConfig(target_modules=["0", "4"], k=13, modules_to_save=["6"]))


def _peft_layers(model: nn.Module) -> List[nn.Module]:
    from lfma_kernels.peft import LfmaLayer

    return [m for m in model.modules() if isinstance(m, LfmaLayer)]


def _load_peft(model: nn.Module, directory: Path) -> nn.Module:
    from peft import PeftModel

    return PeftModel.from_pretrained(model, directory)


APIS: Dict[str, AdapterApi] = {
    "native": AdapterApi(_apply_native, lambda m: list(lfma_layers(m).values()), lfma.save_lfma, lfma.load_lfma),
    "peft": AdapterApi(_apply_peft, _peft_layers, lambda m, d: m.save_pretrained(d), _load_peft),
}


def base_model() -> nn.Module:
    """Two adapted layers (0, 4), a frozen layer between them (2) and a trained head (6)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(17, 23), nn.ReLU(), nn.Linear(23, 23), nn.ReLU(), nn.Linear(23, 20), nn.ReLU(),
                         nn.Linear(20, 5))


def data():
    """``STEPS + 2`` global batches ``(x, r)`` and an eval input; ``r`` is dL/dout (times the batch
    size): random, because a plain ``out.sum()`` would give most LFMA frequencies a zero gradient."""
    g = torch.Generator().manual_seed(1)
    batch = WORLD_SIZE * LOCAL_BATCH
    batches = [(torch.randn(batch, 17, generator=g), torch.randn(batch, 5, generator=g)) for _ in range(STEPS + 2)]
    return batches, torch.randn(6, 17, generator=g)


def train_and_evaluate(model: nn.Module, rows: slice) -> List[torch.Tensor]:
    """``STEPS`` SGD steps on ``rows`` of each global batch, then the eval outputs the cache must
    get right: twice in a row, after a train/eval switch and a step, after a step in eval mode.
    The loss is a mean over the batch, so the engines' gradient averaging over equal shards
    reproduces the single-process gradient of the whole batch."""
    batches, x_eval = data()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)

    def step(x: torch.Tensor, r: torch.Tensor) -> None:
        optimizer.zero_grad()
        ((model(x[rows]) * r[rows]).sum() / x[rows].shape[0]).backward()
        optimizer.step()

    def evaluate() -> torch.Tensor:
        with torch.no_grad():
            return model(x_eval)

    for x, r in batches[:STEPS]:
        step(x, r)
    model.eval()
    outputs = [evaluate(), evaluate()]
    model.train()
    step(*batches[STEPS])
    model.eval()
    outputs.append(evaluate())
    step(*batches[STEPS + 1])
    outputs.append(evaluate())
    return outputs


def _fsdp2(model: nn.Module, api: AdapterApi) -> nn.Module:
    for layer in api.layers(model):
        fully_shard(layer)
    return fully_shard(model)


ENGINES: Dict[str, Callable[[nn.Module, AdapterApi], nn.Module]] = {
    "ddp": lambda model, api: DistributedDataParallel(model),
    "fsdp2": _fsdp2,
    "fsdp1": lambda model, api: FullyShardedDataParallel(model, auto_wrap_policy=fsdp_auto_wrap_policy,
                                                         use_orig_params=True, device_id=torch.device("cpu")),
}


def train_case(engine: str, api_name: str, report_dir: Path, rank: int) -> Dict[str, Any]:
    api = APIS[api_name]
    model = ENGINES[engine](api.apply(base_model()), api)
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    outputs = train_and_evaluate(model, rows)
    state = full_adapter_state_dict(model)
    if rank == 0:
        # as a user would on rank 0: the gathered adapter into an unsharded copy, saved from there
        api.save(load_adapter_state(api.apply(base_model()), state), report_dir / "adapter")
    return {"state": state, "eval": outputs}


def sharded_build_case(engine: str, api_name: str, report_dir: Path, rank: int) -> Dict[str, Any]:
    """Build an ``LFMALinear`` on a layer that FSDP2 has already sharded (its weight a DTensor);
    report, per ``init``, the error it raised ('' when it raised none)."""
    errors = {}
    for init in ("weight", "random"):
        model = fully_shard(base_model())
        try:
            lfma.LFMALinear(model[0], k=13, init=init)
            errors[init] = ""
        except Exception as e:  # the type and message are the result
            errors[init] = f"{type(e).__name__}: {e}"
    return {"errors": errors}


def case_dir(report_dir: Path, case: str, api_name: str) -> Path:
    return Path(report_dir) / f"{case}-{api_name}"


def main(argv: List[str]) -> None:
    report_dir, specs = Path(argv[0]), [spec.split(":") for spec in argv[1:]]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for case, api_name in specs:
        work = sharded_build_case if case == "sharded_build" else train_case
        directory = case_dir(report_dir, case, api_name)
        directory.mkdir(parents=True, exist_ok=True)
        run_and_report(directory, rank, lambda: work(case, api_name, directory, rank))
        # Free the case's wrapped models (DDP's reducer, FSDP's state hold the process group):
        # alive at teardown, they make gloo abort the exit now and then (torch 2.13).
        gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
