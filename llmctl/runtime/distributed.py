"""Data-parallel setup under torchrun (NCCL on GPU, Gloo on CPU) and the `--nproc` launcher."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..core.errors import LlmctlError


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job; a single process is rank 0 of 1."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_from_torchrun() -> DistEnv:
    """Read RANK / LOCAL_RANK / WORLD_SIZE as torchrun sets them (absent: one process)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as err:
        raise LlmctlError(f"malformed torchrun environment: {err}") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise LlmctlError(f"malformed torchrun environment: WORLD_SIZE={world}, RANK={rank}, "
                          f"LOCAL_RANK={local} (need WORLD_SIZE >= 1, 0 <= RANK < WORLD_SIZE, "
                          "LOCAL_RANK >= 0)")
    return DistEnv(rank=rank, local_rank=local, world_size=world)


def init(env: DistEnv, device: torch.device) -> None:
    """Join the process group: NCCL for CUDA devices, Gloo otherwise."""
    if not env.enabled or dist.is_initialized():
        return
    if "MASTER_ADDR" not in os.environ:
        raise LlmctlError("WORLD_SIZE > 1 but MASTER_ADDR is not set: launch with torchrun "
                          "(or llmctl train --nproc N)")
    port = os.environ.get("MASTER_PORT", "")
    if not (port.isdigit() and 0 < int(port) < 65536):
        raise LlmctlError(f"MASTER_PORT={port!r}: it must be a port number from 1 to 65535 "
                          "(torchrun and llmctl train --nproc N set it)")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=timedelta(minutes=30))
    else:
        dist.init_process_group("gloo", timeout=timedelta(minutes=30))


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum, avg or max); a no-op for a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    if op == "avg":
        # Gloo has no AVG: sum and divide.
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())
    else:
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return tensor


def all_gather_json(obj: object) -> list:
    """Every rank's JSON-ready object, in rank order (a single process gets [obj])."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_json(obj: object) -> object:
    """Rank 0's object on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
