"""The memory a training run may use on this machine: a flag, the GPU's size, or a share of what the
OS has available when the run starts (training.estimate says how much a run needs)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from training.distributed import local_processes

if TYPE_CHECKING:
    from training.config import TrainConfig

GiB = 2**30
# On a CPU with no limit given: this share of the memory available when the run starts. The
# estimate is within ~20% of measured peaks, a run's heap grows ~0.05-0.1 GiB per epoch past it
# (bench/RESULTS.md), and the rest of the machine (the app, a browser) keeps running beside it.
CPU_MEMORY_SHARE = 0.5


def available_memory() -> float:
    """Bytes the OS can give this process now without swapping (psutil: MemAvailable on Linux)."""
    import psutil

    return float(psutil.virtual_memory().available)


def memory_limit(train_config: TrainConfig) -> tuple[float, str]:
    """Bytes a run may use, and where that number came from: ``memory_limit_gib``, else on a GPU 90%
    of the card (the rest is the CUDA context and the allocator's slack), else CPU_MEMORY_SHARE of
    the memory available now."""
    import torch

    if train_config.memory_limit_gib is not None:
        return train_config.memory_limit_gib * GiB, "--memory-limit-gib"
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        return 0.9 * total, f"90% of the GPU's {total / GiB:.1f} GiB"
    available, processes = available_memory(), local_processes()
    share = f"{CPU_MEMORY_SHARE:.0%} of the {available / GiB:.1f} GiB available when the run started"
    if processes == 1:
        return CPU_MEMORY_SHARE * available, share
    return CPU_MEMORY_SHARE * available / processes, f"{share}, shared by this machine's {processes} processes"
