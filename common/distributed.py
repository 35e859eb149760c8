"""torchrun setup and the few collectives the scripts use.

`python script.py` runs as a world of one with no process group; `torchrun --nproc_per_node N script.py` starts N
processes that find each other through the RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR environment torchrun sets.
NCCL joins CUDA ranks, gloo CPU ranks.
"""
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from common import UserError


# How long a collective may wait for the other ranks. Rank 0 alone runs some stages while the others wait at a
# barrier (metric_transfer's label propagation: 8 to 37 minutes at ImageNet scale on a CPU), longer than NCCL's
# 10-minute and gloo's 30-minute defaults.
WAIT = datetime.timedelta(hours=4)


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool


def _device(flag, local_rank):
    if flag == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    if flag == "cuda" or (flag == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init(device_flag="auto"):
    """Join the torchrun process group when there is one; pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device(device_flag, local_rank)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None, timeout=WAIT)
    return Dist(rank, world_size, local_rank, device, rank == 0)


def is_distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank():
    return dist.get_rank() if is_distributed() else 0


def barrier():
    if is_distributed():
        dist.barrier()


def all_gather_cat(t):
    """Concatenate a tensor of the same shape from every rank along dim 0 (rank order); identity on one process."""
    if not is_distributed():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def all_reduce_mean(t):
    """Average a tensor over ranks, in place; identity on one process."""
    if is_distributed():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def broadcast_object(obj, src=0):
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def wrap(model, d):
    """DDP on more than one process (gradients averaged in backward), the model itself otherwise."""
    if d.world_size == 1:
        return model
    return DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


def shutdown():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
