"""One run in several processes (``accelerate launch``, ``torchrun``): which process this is, and
the work that only the main one does.

A launcher starts one process per device and tells each its place in environment variables
(RANK, LOCAL_RANK, WORLD_SIZE). The Trainer, through accelerate, joins them into one process group,
gives each process its share of every batch and averages the gradients (DDP), or shards the model
itself (FSDP, with an accelerate config that says so). What replytune adds: each process loads the
model onto its own device (inference.loading.device_map), and the main process alone prints,
checks the data, writes the outputs and pushes them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def world_size() -> int:
    """Processes in this run: 1 unless a launcher started several."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_processes() -> int:
    """Processes of this run on this machine, which share its memory (and, on a CPU, its cores)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def wait_for_everyone() -> None:
    """A barrier: every process waits here until all have come (nothing to wait for in one process)."""
    if world_size() == 1:
        return
    import torch
    from accelerate import PartialState

    # The same process group the Trainer uses later (accelerate's state is one per process).
    PartialState(cpu=not torch.cuda.is_available()).wait_for_everyone()


def quiet_unless_main() -> None:
    """Send the other processes' standard output away: one process prints the run's settings, data
    summary, estimate and progress. Errors (standard error) still come from every process, under
    the rank that raised them."""
    if not is_main():
        sys.stdout = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 (for the life of the process)


def check_launch() -> None:
    """Stop an FSDP launch on a machine without a GPU before anything loads: accelerate refuses it
    only once every process holds the model, with a message that names no way on."""
    import torch

    from inference.loading import fsdp_enabled
    from training.config import ConfigError

    if fsdp_enabled() and not torch.cuda.is_available():
        raise ConfigError(
            "this run was launched with an FSDP config (ACCELERATE_USE_FSDP is set), which shards the model over GPUs, "
            "and this machine has none. On a CPU, launch with --config_file training/configs/accelerate/ddp.yaml "
            "or torchrun --nproc-per-node N: the same adapter, each process holding the whole model"
        )


def launch_plan(path: Path) -> tuple[int, bool]:
    """(processes, whether FSDP shards the model) of an accelerate config file: what
    training.estimate needs to plan the memory of each process."""
    import yaml

    from training.config import ConfigError

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read it as an accelerate config ({exc})") from None
    if not isinstance(data, dict) or "num_processes" not in data:
        raise ConfigError(
            f"{path}: no num_processes; expected an accelerate config (accelerate config --config_file {path})"
        )
    fsdp = data.get("distributed_type") == "FSDP"
    if fsdp and (data.get("fsdp_config") or {}).get("fsdp_offload_params"):
        raise ConfigError(
            f"{path}: fsdp_offload_params keeps the shards in CPU memory, which the "
            "estimate does not count; estimate without offloading for an upper bound"
        )
    return int(data["num_processes"]), fsdp


def error_prefix() -> str:
    """Where an error came from, when several processes could have printed it."""
    return f"[rank {rank()}] " if world_size() > 1 else ""
