"""torch.distributed in a few lines: launched by `torchrun`, a run uses every rank; otherwise one process.

Rank 0 alone writes files. Each rank draws its own batches (seeded by rank and step), the
gradients are averaged by DistributedDataParallel, so all ranks hold identical weights.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def mean_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each value averaged over the ranks (one all-reduce for all of them), read on the host."""
    if not values:
        return {}
    keys = sorted(values)
    stacked = torch.stack([torch.as_tensor(values[k], dtype=torch.float32) for k in keys])
    if dist.is_initialized():
        dist.all_reduce(stacked)
        stacked /= dist.get_world_size()
    return dict(zip(keys, stacked.tolist()))
