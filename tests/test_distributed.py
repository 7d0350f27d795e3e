"""Training in several processes, for real: `torchrun --nproc-per-node 2` on this CPU (gloo), a tiny
model built from a config, against the same run in one process; with DDP, and with FSDP as
training/configs/accelerate/fsdp.yaml sets it up (tests.crash_run's fsdp point).

The runs compute in float32 (tests.crash_run's float32 point): bf16 kernels round differently for
each batch shape, and two processes of 2 examples make other shapes than one of 4.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from inference.default_model import ROOT
from tests.helpers import write_run_data
from training.checkpoints import checkpoint_folders, is_complete

EPOCHS = 2  # 24 examples, 4 per update: 6 updates per epoch, checkpoint-6 and checkpoint-12
# Two processes sum their gradients in another order than one process does: float32 rounding.
TOLERANCE = 1e-4  # relative, on the adapter's weights


def flags(model: Path, data: Path, output: Path, batch_size: int, quantization: str = "none") -> list[str]:
    return [
        "--base-model",
        str(model),
        "--data",
        str(data / "train.jsonl"),
        "--eval-data",
        str(data / "eval.jsonl"),
        "--output-dir",
        str(output),
        "--quantization",
        quantization,
        "--epochs",
        str(EPOCHS),
        "--learning-rate",
        "2e-2",
        "--target-modules",
        "q_proj",
        "v_proj",
        "--batch-size",
        str(batch_size),
        "--grad-accum",
        "1",
        "--warmup-ratio",
        "0",
        "--early-stopping-patience",
        "0",
        "--lora-dropout",
        "0",
        "--no-doctor",
        "--backend",
        "transformers",
    ]


def launch(processes: int, point: str, run_flags: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """training.run under torchrun with ``processes`` workers (one process without a launcher)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")} | {
        "OMP_NUM_THREADS": "1"
    }
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
        if processes > 1
        else [sys.executable]
    )
    return subprocess.run(
        [*launcher, "-m", "tests.crash_run", point, "--", *run_flags],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    difference = sum(((a[k] - b[k]) ** 2).sum() for k in a) ** 0.5
    return float(difference / sum((a[k] ** 2).sum() for k in a) ** 0.5)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_run_data(tmp_path_factory.mktemp("ddp-data"))


def finished_run(
    folder: Path, processes: int, point: str, model: Path, data: Path, quantization: str = "none"
) -> tuple[Path, subprocess.CompletedProcess]:
    """A run that must succeed: ``processes`` x the batch of 4 / ``processes``, into ``folder``/adapter."""
    output = folder / "adapter"
    result = launch(processes, point, flags(model, data, output, batch_size=4 // processes, quantization=quantization))
    assert result.returncode == 0, result.stderr[-3000:]
    return output, result


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, data, tmp_path_factory) -> Path:
    return finished_run(tmp_path_factory.mktemp("one-process"), 1, "float32", tiny_model_dir, data)[0]


@pytest.fixture(scope="module")
def two_processes(tiny_model_dir, data, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    return finished_run(tmp_path_factory.mktemp("two-processes"), 2, "float32", tiny_model_dir, data)


def test_two_processes_train_the_adapter_one_process_trains(one_process, two_processes):
    """2 processes x 2 examples make the updates 1 process x 4 examples does: the same batches
    (the length grouping is sized by the whole update), gradients averaged over the processes and
    normalised by the learned tokens of all of them."""
    output, _ = two_processes
    one, two = adapter(one_process), adapter(output)
    assert relative_difference(one, two) < TOLERANCE
    # Not equal by accident: training moved the weights well beyond the tolerance (LoRA's B starts at 0).
    assert all(two[k].abs().max() > 1e-3 for k in two if "lora_B" in k)
    # The losses the main process reports are the whole run's: the held-out ones gathered from both
    # processes, the training ones averaged over them.
    one_run, two_runs = (json.loads((folder / "training_summary.json").read_text()) for folder in (one_process, output))
    for key in ("base_eval_loss", "eval_loss"):
        assert two_runs[key] == pytest.approx(one_run[key], rel=1e-5), key
    assert [e["train_loss"] for e in two_runs["epochs"]] == pytest.approx(
        [e["train_loss"] for e in one_run["epochs"]], rel=1e-5
    )


@pytest.fixture(scope="module")
def one_nf4_process(tiny_model_dir, data, tmp_path_factory) -> Path:
    return finished_run(
        tmp_path_factory.mktemp("one-nf4-process"), 1, "float32", tiny_model_dir, data, quantization="nf4"
    )[0]


@pytest.fixture(scope="module")
def two_fsdp_processes(tiny_model_dir, data, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    return finished_run(
        tmp_path_factory.mktemp("two-fsdp-processes"), 2, "fsdp+float32", tiny_model_dir, data, quantization="nf4"
    )


def test_fsdp_qlora_trains_the_adapter_one_process_trains(one_nf4_process, two_fsdp_processes):
    """FSDP-QLoRA (training/configs/accelerate/fsdp.yaml, on gloo; see tests.crash_run's fsdp point):
    each process holds half of every layer's NF4 weights, stored in the compute dtype so that FSDP
    can shard them, and the run still makes the updates of one process. Its adapter is gathered
    from the shards; the checkpoints hold the sharded adapter (peft found none of its weights there
    at first), and the best one is the one-process run's."""
    output, result = two_fsdp_processes
    one, two = adapter(one_nf4_process), adapter(output)
    assert relative_difference(one, two) < TOLERANCE
    one_run, fsdp_run = (
        json.loads((folder / "training_summary.json").read_text()) for folder in (one_nf4_process, output)
    )
    for key in ("base_eval_loss", "eval_loss"):
        assert fsdp_run[key] == pytest.approx(one_run[key], rel=1e-5), key
    assert fsdp_run["best_checkpoint"] == one_run["best_checkpoint"] == f"checkpoint-{EPOCHS * 6}"
    assert (
        "voice fidelity: skipped under FSDP" in result.stdout
        and "python -m training.evaluate --adapter" in result.stdout
    )


def test_only_the_main_process_prints_and_writes(one_process, two_processes):
    output, result = two_processes
    assert result.stdout.count("settings:") == 1 and result.stdout.count("adapter saved to") == 1
    assert result.stdout.count("base model held-out loss (before training)") == 1
    assert sorted(p.name for p in output.iterdir()) == sorted(p.name for p in one_process.iterdir())
    assert len(list((output / "runs").iterdir())) == 1  # one TensorBoard log
    assert not (output / "checkpoints").exists()  # the main process removed them, once the adapter was saved


def test_a_data_error_is_said_once(tiny_model_dir, data, tmp_path):
    broken = tmp_path / "data"
    shutil.copytree(data, broken)
    with open(broken / "train.jsonl", "a") as f:
        f.write("{not json\n")
    result = launch(2, "float32", flags(tiny_model_dir, broken, tmp_path / "out", batch_size=2), timeout=300)
    assert result.returncode != 0
    assert result.stderr.count("train.jsonl") >= 1 and result.stderr.count("error: ") == 1, result.stderr[-2000:]


@pytest.mark.slow
def test_a_killed_worker_stops_the_run_and_resume_completes_it(
    tiny_model_dir, data, two_processes, tmp_path, monkeypatch
):
    """SIGKILL in rank 1 after the first epoch's checkpoint: torchrun ends the other process (no
    hang) and says which rank failed; --resume under the launcher continues from checkpoint-6 and
    ends with the adapter of the uninterrupted run."""
    output = tmp_path / "adapter"
    started = time.monotonic()
    killed = launch(2, "float32+step:9@1", flags(tiny_model_dir, data, output, batch_size=2), timeout=300)
    assert killed.returncode != 0
    assert time.monotonic() - started < 240  # a hang would run into the timeout instead
    assert "rank      : 1" in killed.stderr and "Signal 9 (SIGKILL)" in killed.stderr, killed.stderr[-3000:]
    monkeypatch.setenv("WORLD_SIZE", "2")  # complete for a run of two processes: each one's random state is there
    assert [p.name for p in checkpoint_folders(output) if is_complete(p)] == ["checkpoint-6"]

    resumed = launch(2, "float32", [*flags(tiny_model_dir, data, output, batch_size=2), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "checkpoint-6" in resumed.stdout
    assert relative_difference(adapter(two_processes[0]), adapter(output)) < TOLERANCE


@pytest.mark.slow
def test_a_killed_fsdp_run_resumes_to_the_same_adapter(tiny_model_dir, data, two_fsdp_processes, tmp_path, monkeypatch):
    """The sharded checkpoint of an FSDP run holds the adapter and the optimizer state (a new
    optimizer took none of it at first): resumed, the run ends where the uninterrupted one did."""
    output = tmp_path / "adapter"
    killed = launch(
        2, "fsdp+float32+step:9@1", flags(tiny_model_dir, data, output, batch_size=2, quantization="nf4"), timeout=300
    )
    assert killed.returncode != 0
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # complete as an FSDP checkpoint: its shards' folders
    assert [p.name for p in checkpoint_folders(output) if is_complete(p)] == ["checkpoint-6"]

    resumed = launch(
        2, "fsdp+float32", [*flags(tiny_model_dir, data, output, batch_size=2, quantization="nf4"), "--resume"]
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "checkpoint-6" in resumed.stdout
    assert relative_difference(adapter(two_fsdp_processes[0]), adapter(output)) < TOLERANCE


def test_resume_refuses_another_number_of_processes(tiny_model_dir, data, tmp_path):
    """Each process takes its share of every batch: resumed with another count, the rest of the run
    would train on other batches."""
    output = tmp_path / "adapter"
    killed = launch(1, "float32+step:14", flags(tiny_model_dir, data, output, batch_size=2))
    assert killed.returncode != 0 and checkpoint_folders(output)
    result = launch(2, "float32", [*flags(tiny_model_dir, data, output, batch_size=2), "--resume"], timeout=300)
    assert result.returncode != 0
    assert "started with 1 process(es), this one has 2" in result.stderr
