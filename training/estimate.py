"""`python -m training.estimate`: the memory a training run needs, from the model's config alone.

The parts are counted in training.footprint, from the model's shapes on PyTorch's ``meta`` device;
here a replytune run (its recipe, quantization, LoRA, batch and launch) is mapped onto them, and
the command prints every part, the peak, and how many layers gradient checkpointing needs.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from errors import exits_on_error
from training.architecture import read_model_config
from training.distributed import launch_plan, world_size
from training.footprint import Estimate, Storage, estimate
from training.memory import GiB, memory_limit

if TYPE_CHECKING:
    from training.config import TrainConfig

# What a GPU holds beside the tensors torch allocates (CUDA context, cuBLAS workspace): in what
# nvidia-smi reports, not in torch.cuda.max_memory_allocated, which the estimate is of.
CUDA_CONTEXT_BYTES = 0.5 * 2**30


def estimate_for_config(
    train_config: TrainConfig,
    seq_len: int | None = None,
    on_cpu: bool | None = None,
    limit: float | None = None,
    shared_prefix: int = 0,
    learned_tokens: int | None = None,
    packed_tokens: int | None = None,
    devices: int | None = None,
    sharded: bool | None = None,
) -> Estimate:
    """The estimate of a replytune training run (its model, quantization, LoRA and batch), on this
    machine's device unless ``on_cpu`` says which, with the layers it checkpoints: every layer with
    ``gradient_checkpointing``, else the fewest that keep it within ``limit`` bytes. Per device, for
    ``devices`` processes, FSDP-``sharded`` or not (unset: as this process was launched)."""
    import torch

    from inference.loading import compute_dtype, fsdp_enabled

    dtype = compute_dtype()
    storage: Storage = {"nf4": "nf4", "int8": "int8", "none": "fp32"}[train_config.quantization]
    config = read_model_config(train_config.base_model)
    if getattr(config, "quantization_config", None):
        storage = "gptq"
    result = estimate(
        config,
        storage=storage,
        compute_bytes=torch.finfo(dtype).bits // 8,  # training.run loads every base in this dtype
        lora_r=train_config.lora_r if train_config.method == "lora" else None,
        target_modules=train_config.target_modules,
        batch_size=train_config.batch_size,
        seq_len=seq_len or train_config.max_length,
        shared_prefix=shared_prefix,
        optimizer="adamw_8bit" if train_config.optim == "paged_adamw_8bit" else "adamw",
        on_cpu=not torch.cuda.is_available() if on_cpu is None else on_cpu,
        learned_tokens=learned_tokens,
        packed_tokens=packed_tokens,
        devices=world_size() if devices is None else devices,
        sharded=fsdp_enabled() if sharded is None else sharded,
    )
    if train_config.gradient_checkpointing:
        result.checkpointed_layers = result.layers
    elif limit is not None:
        fit = result.layers_to_fit(limit)
        result.checkpointed_layers = result.layers if fit is None else fit
    return result


def parse_size(text: str) -> float:
    """Bytes of a size given on the command line: 24GiB, 40GB, 8000MiB (no unit: GiB)."""
    match = re.fullmatch(r"\s*([\d.]+)\s*(GiB|GB|G|MiB|MB|M)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size such as 24GiB or 8000MiB")
    unit = (match.group(2) or "GiB").lower()
    return float(match.group(1)) * {"gib": GiB, "g": GiB, "gb": 1e9, "mib": 2**20, "m": 2**20, "mb": 1e6}[unit]


@exits_on_error
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from training.config import load_config

    flags = ["--config", args.config]
    flags += ["--base-model", args.model] if args.model else []
    flags += ["--batch-size", str(args.batch_size)] if args.batch_size else []
    train_config, _ = load_config(flags)
    # With --gpu-memory the question is about a GPU: no CPU process or mapped file to count.
    limit = args.gpu_memory if args.gpu_memory else memory_limit(train_config)[0]
    devices, sharded = launch_plan(Path(args.accelerate_config)) if args.accelerate_config else (None, None)
    result = estimate_for_config(
        train_config,
        args.seq_len,
        on_cpu=False if args.gpu_memory else None,
        limit=limit,
        devices=devices,
        sharded=sharded,
    )
    print(_run_line(train_config, result, args.seq_len or train_config.max_length))
    print(result.table())
    print(checkpointing_plan(result, limit, train_config.gradient_checkpointing))
    if args.gpu_memory:
        verdict = "fits" if result.total <= args.gpu_memory else "does not fit"
        print(
            f"GPU: {result.total / GiB:.2f} GiB of {args.gpu_memory / GiB:.1f} GiB -> {verdict} "
            f"(plus about {CUDA_CONTEXT_BYTES / GiB:.1f} GiB of CUDA context)"
        )
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.estimate", description=__doc__.splitlines()[0].split(": ", 1)[1]
    )
    parser.add_argument("--model", default=None, help="model id or config path (default: the recipe's base model)")
    parser.add_argument(
        "--config", default="default", help="training recipe (a path, or a name from training/configs/)"
    )
    parser.add_argument(
        "--seq-len", type=int, default=None, help="tokens per example (default: the recipe's max_length)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="examples per forward pass (default: the recipe's)"
    )
    parser.add_argument(
        "--gpu-memory",
        type=parse_size,
        default=None,
        help="estimate for a GPU and say whether the run fits one of this size, e.g. 24GiB",
    )
    parser.add_argument(
        "--accelerate-config",
        default=None,
        help="the run's accelerate config (e.g. training/configs/accelerate/fsdp.yaml): its processes, "
        "and whether FSDP shards the model",
    )
    return parser


def _run_line(train_config: TrainConfig, result: Estimate, seq_len: int) -> str:
    """The model, its parameters and the batch the estimate is for (per device, when several)."""
    launch = (
        f" per device, {result.devices} devices{', FSDP-sharded' if result.gathered else ''} "
        "(the figures are per device)"
        if result.devices > 1
        else ""
    )
    return (
        f"{train_config.base_model}: {result.parameters / 1e6:,.1f}M parameters, "
        f"{result.trainable / 1e6:,.2f}M trainable; batch {train_config.batch_size} x {seq_len} tokens{launch}"
    )


def checkpointing_plan(result: Estimate, limit: float, forced: bool) -> str:
    """One line: how many layers are checkpointed, and why (the limit's source is printed before it)."""
    k, layers = result.checkpointed_layers, result.layers
    if forced:
        return f"gradient checkpointing: all {layers} layers (gradient_checkpointing is on)"
    if result.total > limit:
        return (
            f"gradient checkpointing: all {layers} layers, and the estimate ({result.total / GiB:.2f} GiB) is still "
            f"above the memory limit ({limit / GiB:.2f} GiB): if memory runs out, lower --batch-size or --max-length"
        )
    if k == 0:
        return f"gradient checkpointing: off, the estimate fits the memory limit of {limit / GiB:.2f} GiB"
    return (
        f"gradient checkpointing: {k} of {layers} layers, the fewest that keep the estimate under the memory limit "
        f"of {limit / GiB:.2f} GiB"
    )


if __name__ == "__main__":
    sys.exit(main())
