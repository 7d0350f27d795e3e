"""What a finished run leaves beside its adapter: training_summary.json and the loss-curve PNG."""

from __future__ import annotations

import dataclasses
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inference.adapter_files import SUMMARY_FILE
from inference.default_model import ROOT, hub_id

if TYPE_CHECKING:
    from transformers import TrainerState

    from training.examples import Prepared

PLOT_FILE = "loss_curve.png"
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "datasets", "accelerate", "llama_cpp_python")


def epoch_losses(log_history: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Mean train loss and eval loss of each epoch, from the Trainer's log history."""
    epochs: dict[int, dict[str, Any]] = {}
    for entry in log_history:
        if entry.get("epoch") is None:
            continue
        epoch = max(1, round(entry["epoch"] + 0.4999))  # a step logged at 1.05 belongs to epoch 2
        row = epochs.setdefault(epoch, {"epoch": epoch, "train": []})
        if "loss" in entry:
            row["train"].append(entry["loss"])
        if "eval_loss" in entry and entry["epoch"] > 0:
            # The first evaluation of an epoch is its own; a later one at the same epoch is the final
            # evaluation of the best checkpoint (after early stopping), which must not overwrite it.
            row.setdefault("eval_loss", entry["eval_loss"])
    out = []
    for epoch in sorted(epochs):
        row = epochs[epoch]
        if "eval_loss" not in row:
            continue  # the final evaluation after loading the best adapter repeats an earlier epoch
        train = row.pop("train")
        row["train_loss"] = sum(train) / len(train) if train else None
        out.append(row)
    return out


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None  # recorded as not installed (bitsandbytes is not needed for a GPTQ or full run)


def environment() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    import torch

    return {
        "cpu": cpu,
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "libraries": {name: _version(name) for name in LIBRARIES},
    }


def cpu_flags() -> str:
    """The CPU features that decide the speed of every number measured here: AVX2 on most laptops,
    AVX-512 BF16 and AMX (native bf16 matmuls) on recent Xeons."""
    try:
        flags = next(
            (
                line.split(":", 1)[1].split()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("flags")
            ),
            [],
        )
    except OSError:
        return "unknown"
    return (
        " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags) or "none of avx2/avx512/amx"
    )


def display_path(path: str | None) -> str | None:
    """Paths inside the project are written relative to it, so a summary does not carry a home folder."""
    if path is None:
        return None
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return path


def run_record(
    prepared: Prepared,
    run_info: dict[str, Any],
    base_eval: float,
    final_eval: float,
    state: TrainerState,
    trainable: int,
    total: int,
    peak_memory_gib: float,
    tokens_per_second: float,
    wall_seconds: float,
) -> dict[str, Any]:
    """training_summary.json of a finished run, before its voice evaluation is added."""
    config, summary = prepared.config, prepared.summary
    return {
        "name": Path(config.output_dir).name,
        "base_model": config.base_model,
        "base_model_hub_id": hub_id(config.base_model),
        "seq2seq": prepared.seq2seq,
        "data": {
            "train": [display_path(source) for source in summary.files],
            "eval": display_path(config.eval_data),
            "hash": run_info["data_hash"],
            "train_rows": summary.train_rows,
            "eval_rows": summary.eval_rows,
            "duplicates_removed": len(summary.duplicates_removed),
            "columns": summary.columns,
            "signatures_added": summary.signatures_added,
            "truncated": summary.truncated,
            "tokens": summary.tokens,
        },
        "config": {
            k: [display_path(s) for s in v]
            if k == "data"
            else display_path(v)
            if k in ("eval_data", "persona", "output_dir")
            else v
            for k, v in dataclasses.asdict(config).items()
            if k not in ("resume", "check_data", "push_to_hub", "private")
        },
        "config_hash": run_info["config_hash"],
        "base_eval_loss": base_eval,
        "eval_loss": final_eval,
        "epochs": epoch_losses(state.log_history),
        "best_checkpoint": Path(state.best_model_checkpoint).name if state.best_model_checkpoint else None,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "peak_memory_gib": round(peak_memory_gib, 3),
        "tokens_per_second": round(tokens_per_second, 1),
        "wall_seconds": round(wall_seconds, 1),  # data to saved adapter; evaluation_seconds is extra
        "environment": environment(),
    }


def write_summary(folder: Path, summary: dict[str, Any]) -> Path:
    path = folder / SUMMARY_FILE
    path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def plot_losses(folder: Path, log_history: list[dict[str, Any]], base_eval_loss: float | None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [(h["epoch"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["epoch"], h["eval_loss"]) for h in log_history if "eval_loss" in h and h.get("epoch")]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if steps:
        ax.plot(*zip(*steps), label="train loss (per step)", color="#8fb3d9", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="held-out loss (per epoch)", color="#d9534f")
    if base_eval_loss is not None:
        ax.axhline(
            base_eval_loss, linestyle="--", color="gray", label=f"base model held-out loss ({base_eval_loss:.2f})"
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss on reply tokens")
    ax.set_title("LoRA fine-tuning")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = folder / PLOT_FILE
    fig.savefig(path)
    plt.close(fig)
    return path
