"""How many CPU threads torch uses: one policy for every command (distill, teacher train, precond
compute, sample, eval).

    requested > 0                          → exactly that many (`run.threads`, or a command's --threads)
    requested = 0 ("auto"):
        $OMP_NUM_THREADS is set            → left to it (the user has said)
        CPU device, ≤ SMALL_NETWORK params → 1
        otherwise                          → torch's default

Why one thread for small networks: a step of a network under 10M parameters is a long chain of
small kernels, each too short to pay for waking a second thread; on a CPU that other processes also
use, the threads then wait for each other. Measured on the 2-core machine (docs/benchmarks.md,
"Threads"): `precond compute --preset digits` 37.9 s with one thread against 232.5 s with two.
Exact teachers (Gaussian mixtures) count as 0 parameters. The commands apply the policy as soon as
they know the network's size, before any statistics, training step or sample.
"""

from __future__ import annotations

import os

# EDM's CIFAR-10 DDPM++ (55.7M) and the larger networks keep torch's default; every CPU preset is far below.
SMALL_NETWORK_PARAMETERS = 10_000_000


def chosen_threads(requested: int, device_type: str, parameters: int) -> int | None:
    """The thread count the policy (module docstring) picks; None keeps torch's (or $OMP_NUM_THREADS's) choice."""
    if requested > 0:
        return requested
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    if device_type == "cpu" and parameters <= SMALL_NETWORK_PARAMETERS:
        return 1
    return None


def apply_thread_policy(requested: int, device, parameters: int) -> str:
    """Set torch's intra-op threads by `chosen_threads`; returns a phrase for the log, e.g.
    '1 thread (auto: CPU, 188,945 parameters)'."""
    import torch

    device_type = getattr(device, "type", str(device).partition(":")[0])
    threads = chosen_threads(requested, device_type, parameters)
    if threads is not None:
        torch.set_num_threads(threads)
    n = torch.get_num_threads()
    count = f"{n} thread{'s' if n != 1 else ''}"
    if requested > 0:
        return f"{count} (run.threads / --threads)"
    if threads is None and os.environ.get("OMP_NUM_THREADS"):
        return f"{count} ($OMP_NUM_THREADS)"
    if threads is None:
        return f"{count} (auto: torch's default for {device_type}, {parameters:,} parameters)"
    return f"{count} (auto: CPU, {parameters:,} parameters ≤ {SMALL_NETWORK_PARAMETERS:,})"
