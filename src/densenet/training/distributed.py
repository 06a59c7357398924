"""Several processes, one run: torchrun + DistributedDataParallel.

    torchrun --nproc_per_node 8 -m densenet train --config configs/imagenet-densenet121.yaml

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; ``setup`` joins the process group (NCCL on CUDA, gloo
on CPU) and pins each process to its GPU. Every rank trains on its share of each batch (--batch-size is
the total over all ranks, so a recipe means the same thing on 1 or 8 GPUs); only rank 0 writes the run
folder, and the others wait for it at the epoch's end.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from densenet.errors import ConfigError


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: torch.device) -> tuple[Dist, torch.device]:
    """Join torchrun's process group when launched by it; (Dist, the device this rank uses)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist(), device
    info = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        if info.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {info.local_rank} but only {torch.cuda.device_count()} GPUs here; "
                              f"use --nproc_per_node {torch.cuda.device_count()}")
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if restart != "0" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun keeps its store across restarts: without a fresh prefix, a restarted rank can read the
            # failed attempt's keys (dead workers' addresses) and fail to connect.
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
            dist.init_process_group(backend, store=dist.PrefixStore(f"densenet-restart-{restart}", store),
                                    rank=info.rank, world_size=info.world_size)
        else:
            dist.init_process_group(backend)
    return info, device


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: Dist) -> None:
    if info.enabled:
        dist.barrier()


def all_sum(values: list[float], info: Dist, device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (counts and loss sums of an epoch)."""
    if not info.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast_flag(flag: bool, info: Dist, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank (the maximum over ranks), e.g. 'stop: the loss is not
    finite': one rank's NaN stops them all at the same step, so none waits forever in the next all-reduce."""
    if not info.enabled:
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def per_rank_batch(batch_size: int, info: Dist) -> int:
    if batch_size % info.world_size:
        raise ConfigError(f"--batch-size {batch_size} does not divide among {info.world_size} processes; "
                          f"use a multiple of {info.world_size}")
    return batch_size // info.world_size
