"""Crash-safe checkpoints: what counts as a complete one, room on disk, and writes that cannot tear.

The Trainer writes straight into ``checkpoint-N`` and, left to itself, resumes from the highest
number, so a run killed in the middle of a save could not resume (transformers #35782). replytune
picks the checkpoint itself: the newest one whose files were all written.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from errors import ReplytuneError
from inference.loading import fsdp_enabled
from training.distributed import world_size

CHECKPOINTS = "checkpoints"
# What the Trainer writes into a checkpoint, after the weights and in this order; trainer_state.json
# comes last, so a checkpoint whose trainer_state.json parses has all the others complete. In a run
# of several processes each writes its own random state, and the main one need not be the last.
CHECKPOINT_FILES = ("optimizer.pt", "scheduler.pt", "trainer_state.json")
# Under FSDP the weights and optimizer state are each a folder of every process's shards
# (torch.distributed.checkpoint), whose .metadata is written once all shards are.
FSDP_CHECKPOINT_FILES = ("optimizer_0/.metadata", "scheduler.pt", "trainer_state.json")
WEIGHT_FILES = (
    "adapter_model.safetensors",
    "model.safetensors",
    "model.safetensors.index.json",
)  # LoRA, full fine-tune
FSDP_WEIGHT_FILES = ("pytorch_model_fsdp_0/.metadata",)


def rng_state_files(processes: int) -> list[str]:
    return ["rng_state.pth"] if processes == 1 else [f"rng_state_{rank}.pth" for rank in range(processes)]


# Room a checkpoint needs beyond its tensors: tokenizer files, configs, trainer state.
CHECKPOINT_OVERHEAD_BYTES = 16 * 2**20


RUN_FILE = "run.json"  # beside the checkpoints: what they were trained from, checked on --resume


class ResumeError(ReplytuneError, RuntimeError):
    """--resume cannot continue: no unfinished run, or the data or settings changed since."""


class CheckpointWriteError(ReplytuneError, RuntimeError):
    """A checkpoint could not be written (disk full, quota, I/O error); the message says how to go on."""


class DiskSpaceError(ReplytuneError, RuntimeError):
    """The output disk cannot hold the checkpoints this run will keep."""


def checkpoint_step(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[-1])


def checkpoint_folders(output_dir: str | Path) -> list[Path]:
    """``checkpoint-N`` folders, oldest step first."""
    folder = Path(output_dir) / CHECKPOINTS
    return sorted((p for p in folder.glob("checkpoint-*") if p.name.rsplit("-", 1)[-1].isdigit()), key=checkpoint_step)


def is_complete(path: Path) -> bool:
    """Whether every file of the checkpoint was written, by each process of this run."""
    files, weights = (FSDP_CHECKPOINT_FILES, FSDP_WEIGHT_FILES) if fsdp_enabled() else (CHECKPOINT_FILES, WEIGHT_FILES)
    needed = (*files, *rng_state_files(world_size()))
    if not all((path / name).is_file() for name in needed) or not any((path / name).is_file() for name in weights):
        return False
    try:
        json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return False  # killed while trainer_state.json was being written
    return True


def last_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint whose files were all written; newer, half-written ones are named and skipped."""
    for path in reversed(checkpoint_folders(output_dir)):
        if is_complete(path):
            return path
        print(f"skipping incomplete checkpoint {path} (its save was interrupted)")
    return None


def remove_incomplete_after(output_dir: str | Path, checkpoint: Path | None) -> None:
    """Delete the half-written checkpoints newer than the one resumed from.

    The resumed run writes the same step numbers again; leftover files of a torn save in that folder
    would be mixed with the new ones.
    """
    after = checkpoint_step(checkpoint) if checkpoint else -1
    for path in checkpoint_folders(output_dir):
        if checkpoint_step(path) > after:
            shutil.rmtree(path)


def checkpoint_bytes(trainable_parameters: int) -> int:
    """One checkpoint: float32 LoRA weights plus AdamW's two float32 moments, plus small files."""
    return trainable_parameters * 4 * 3 + CHECKPOINT_OVERHEAD_BYTES


def check_disk_space(output_dir: Path, trainable_parameters: int, kept: int) -> str:
    """Refuse a run whose checkpoints cannot fit; returns the line that says what they need.

    A new checkpoint is written before the oldest is deleted, so ``kept + 1`` must fit at once.
    """
    need = checkpoint_bytes(trainable_parameters) * (kept + 1)
    free = shutil.disk_usage(output_dir).free
    line = (
        f"checkpoints: about {checkpoint_bytes(trainable_parameters) / 2**20:.1f} "
        f"MB each, at most {kept} kept in {output_dir}"
    )
    if free < need:
        raise DiskSpaceError(
            f"{output_dir}: {free / 2**20:.0f} MB free, but this run needs about {need / 2**20:.0f} MB for its "
            f"checkpoints ({kept} kept + 1 being written); free some space, choose another --output-dir, "
            "or lower --save-total-limit"
        )
    return line


# Write errors that mean "no room": disk full, quota exceeded, file larger than allowed.
NO_ROOM_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


# How the writers of a checkpoint's files report a failed write without an OSError: torch's zip
# writer ("unexpected pos 640 vs 534", from "basic_ios::clear: iostream error"), safetensors ("I/O
# error: File too large (os error 27)") and tokenizers ("File too large (os error 27)").
WRITE_ERROR_MESSAGES = re.compile(r"unexpected pos|iostream error|I/O error|\(os error \d+\)")


def is_write_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a file failing to be written."""
    while exc is not None:
        if isinstance(exc, OSError) or WRITE_ERROR_MESSAGES.search(str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def write_failure(output_dir: Path, what: str, exc: BaseException) -> CheckpointWriteError:
    """One clear error for a write that failed half-way, whatever layer raised it."""
    resume_from = last_complete_checkpoint(output_dir)
    free = shutil.disk_usage(output_dir).free
    then = f"it continues from {resume_from.name}" if resume_from else "it starts again from the first step"
    detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "no detail"
    return CheckpointWriteError(
        f"could not write {what} ({type(exc).__name__}: {detail}); {free / 2**20:.0f} MB free in {output_dir}. "
        f"Free some space, then run the same command with --resume: {then}"
    )


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that a kill leaves the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def prepare_output(output: Path, resume: bool, run_info: dict) -> Path | None:
    """The checkpoint to resume from (None: start at step 0), after checking it matches this run.

    ``run.json`` records what the checkpoints are trained from; it is written before the first step,
    so a run killed before its first complete checkpoint still resumes (from the beginning).
    """
    checkpoints = output / CHECKPOINTS
    run_file = checkpoints / RUN_FILE
    if not resume:
        if checkpoint_folders(output):
            raise ResumeError(
                f"{checkpoints} holds checkpoints of an unfinished run; pass --resume to continue it, "
                "or delete that folder to start over"
            )
        checkpoints.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_file, run_info)
        return None
    if not run_file.is_file():
        raise ResumeError(f"--resume: no unfinished run in {checkpoints}; run without --resume to start one")
    saved = json.loads(run_file.read_text(encoding="utf-8"))
    changed = [k for k in ("data_hash", "config_hash") if saved.get(k) != run_info[k]]
    if changed:
        what = " and ".join(
            {"data_hash": "the data (or persona)", "config_hash": "the training settings"}[k] for k in changed
        )
        raise ResumeError(
            f"--resume: {what} changed since the run in {checkpoints} "
            "started; restore them, or start over without --resume"
        )
    # Runs before processes were recorded had one. Each process takes its share of every batch, so
    # another count would train on other batches.
    if saved.get("processes", 1) != run_info["processes"]:
        raise ResumeError(
            f"--resume: the run in {checkpoints} was started with {saved.get('processes', 1)} "
            f"process(es), this one has {run_info['processes']}; launch it with the "
            "same number (torchrun --nproc-per-node, accelerate launch --num-processes)"
        )
    checkpoint = last_complete_checkpoint(output)
    remove_incomplete_after(output, checkpoint)
    if checkpoint is None:
        print(f"--resume: no complete checkpoint in {checkpoints} yet; starting from the first step")
    return checkpoint
