"""torch.distributed in a few lines: launched by `torchrun`, a run uses every rank; otherwise one process.

Rank 0 alone writes files. Each rank draws its own batches (seeded by rank and step), the
gradients are averaged by DistributedDataParallel, so all ranks hold identical weights.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under a DistributedDataParallel wrapper (passes without gradient call it directly)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


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


def min_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The element-wise minimum over the ranks (the value itself in one process), left on its device."""
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return value


def max_over_ranks(value: float) -> float:
    """The maximum of a host number over the ranks."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def weights_checksum(module: torch.nn.Module) -> torch.Tensor:
    """Per tensor of the state dict (Σx, Σx², Σx·w) in float64, w = 1 + (position mod 251)/251 so that a
    permutation shows too: equal weights give bit-equal checksums on equal devices."""
    sums = []
    for value in module.state_dict().values():
        x = value.detach().reshape(-1).to(torch.float64)
        w = 1 + (torch.arange(x.numel(), device=x.device) % 251).to(torch.float64) / 251
        sums.append(torch.stack([x.sum(), (x * x).sum(), (x * w).sum()]))
    return torch.cat(sums) if sums else torch.zeros(0, dtype=torch.float64)


def check_same_weights(networks: dict[str, torch.nn.Module | None], step: int) -> None:
    """Every rank must hold the same networks at the start (DDP would silently copy rank 0's student but
    not θ⁻ or the EMA): compare checksums by an all-reduce of min and max; a mismatch is one line."""
    if not dist.is_initialized():
        return
    from apctl.errors import ApctlError

    device = _collective_device()
    differ = []
    for name, net in networks.items():
        if net is None:
            continue
        local = weights_checksum(net).to(device)
        low, high = local.clone(), local.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        if not torch.equal(low, high):
            differ.append(name)
    if differ:
        raise ApctlError(f"the {dist.get_world_size()} processes hold different {', '.join(differ)} weights at step "
                         f"{step}: every process must start from the same seed and read the same checkpoint "
                         "(is --out on a file system every node sees?)")
