"""Train an LFMA adapter on several processes with DDP or FSDP2, then save the adapter and a merged model.

    torchrun --nproc_per_node 2 examples/distributed_train.py --engine fsdp2 --output-dir out
    accelerate launch --multi_gpu --num_processes 2 examples/distributed_train.py --engine ddp --output-dir out

One process per GPU on the nccl backend where CUDA is available, CPU processes on gloo otherwise
(`accelerate launch --multi_gpu` starts CPU processes too when there is no GPU). The model is a
small stack of MLP blocks standing in for a pretrained network; LFMA adapts every block's fc1 and
fc2 and a fresh head is trained fully. Written to --output-dir by rank 0: adapter/ (load it with
lfma.load_lfma), merged.safetensors (the adapter folded into plain nn.Linear weights) and
train_log.json (the loss per step).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import lfma_kernels as lfma
from lfma_kernels.distributed import full_adapter_state_dict, load_adapter_state


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class Net(nn.Module):
    def __init__(self, width: int, depth: int, classes: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def base_model(args: argparse.Namespace) -> nn.Module:
    """Stands in for loading pretrained weights: the same on every rank (seeded), on the CPU."""
    torch.manual_seed(args.seed)
    return Net(args.width, args.depth, args.classes)


def adapted_model(args: argparse.Namespace) -> nn.Module:
    config = lfma.LFMAConfig(["fc1", "fc2"], top_k_ratio=args.top_k_ratio, modules_to_save=["head"])
    return lfma.apply_lfma(base_model(args), config)


def shard(model: nn.Module, engine: str, device: torch.device) -> nn.Module:
    """Wrap after apply_lfma: an engine syncs or shards only the parameters it finds when it wraps."""
    if engine == "ddp":
        return DistributedDataParallel(model.to(device), device_ids=[device.index] if device.type == "cuda" else None)
    # FSDP2: one unit per block (its frozen weights and LFMA coefficients are gathered together
    # for the block's forward), then the root for the head; moves the shards to the device.
    for block in model.blocks:
        fully_shard(block)
    return fully_shard(model)


def batches(args: argparse.Namespace, rank: int, world: int):
    """Each step's global batch (the same on every rank), of which this rank takes its share."""
    g = torch.Generator().manual_seed(args.seed + 1)
    teacher = torch.randn(args.width, args.classes, generator=g)
    local = args.batch_size // world
    for _ in range(args.steps):
        x = torch.randn(args.batch_size, args.width, generator=g)
        y = (x @ teacher).argmax(dim=1)
        yield x[rank * local:(rank + 1) * local], y[rank * local:(rank + 1) * local]


def train(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> None:
    model = shard(adapted_model(args), args.engine, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    losses: List[float] = []
    for x, y in batches(args, rank, world):
        loss = F.cross_entropy(model(x.to(device)), y.to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)  # the global batch's loss, for the log
        losses.append(mean.item() / world)
        if rank == 0 and (len(losses) == 1 or len(losses) % 10 == 0):
            print(f"step {len(losses):4d}  loss {losses[-1]:.4f}", flush=True)

    # Gathers only the trained tensors (every rank must call it); rank 0 loads them into an
    # unsharded copy of the model to save the adapter and merge it.
    state = full_adapter_state_dict(model)
    if rank == 0:
        save(args, state, losses)


def save(args: argparse.Namespace, state: dict, losses: List[float]) -> None:
    from safetensors.torch import save_file

    plain = load_adapter_state(adapted_model(args), state)
    out = Path(args.output_dir)
    lfma.save_lfma(plain, out / "adapter")
    save_file({k: v.contiguous() for k, v in lfma.unload_lfma(plain).state_dict().items()}, str(out / "merged.safetensors"))
    (out / "train_log.json").write_text(json.dumps({"engine": args.engine, "world_size": dist.get_world_size(),
                                                    "losses": losses}, indent=1))
    print(f"saved {out / 'adapter'}, {out / 'merged.safetensors'}, {out / 'train_log.json'}", flush=True)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engine", choices=["ddp", "fsdp2"], default="fsdp2")
    p.add_argument("--output-dir", default="lfma-distributed")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=64, help="global batch, split evenly over the processes")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--top-k-ratio", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    # torchrun and accelerate launch both set RANK, WORLD_SIZE, MASTER_ADDR/PORT and LOCAL_RANK.
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} does not split evenly over {world} processes")
    try:
        train(args, rank, world, device)
    finally:
        # The wrapped model is gone with train()'s frame; collect what cycles keep of it (DDP's
        # reducer and FSDP's state hold the process group) before the teardown: alive at
        # teardown, they make gloo abort the exit now and then (torch 2.13).
        gc.collect()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
