"""Crash safety with real failures: runs killed with SIGKILL at several moments, a disk that fills up
mid-save, memory running out, a diverging loss. Every killed run resumes with --resume and ends with
the same adapter as an uninterrupted run.

Exact equality needs a float32 base (quantization "none"): the NF4 path gives the same result in
principle, but its bf16 kernels are not bit-reproducible across batch shapes, so the comparison
would need a tolerance that hides real mistakes.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from inference.default_model import ROOT
from tests.helpers import write_run_data
from training.callbacks import RunStats
from training.checkpoints import checkpoint_folders
from training.config import TrainConfig
from training.run import TrainingStopped, train

EPOCHS = 2  # 24 examples, batch 4: 6 steps per epoch, checkpoint-6 and checkpoint-12


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_run_data(tmp_path_factory.mktemp("crash-data"))


def make_config(tiny_model_dir: Path, data: Path, output: Path, **overrides) -> TrainConfig:
    values = dict(
        base_model=str(tiny_model_dir),
        data=str(data / "train.jsonl"),
        eval_data=str(data / "eval.jsonl"),
        output_dir=str(output),
        quantization="none",
        epochs=EPOCHS,
        learning_rate=2e-2,
        target_modules=["q_proj", "v_proj"],
        batch_size=4,
        grad_accum=1,
        warmup_ratio=0.0,
        early_stopping_patience=0,
        doctor=False,
    )
    values.update(overrides)
    return TrainConfig(**values)


def flags(config: TrainConfig) -> list[str]:
    """The command line that reproduces ``config``."""
    out = []
    for f in dataclasses.fields(config):
        value, flag = getattr(config, f.name), "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            out += [flag, *value]
        elif value is not None:
            out += [flag, str(value)]
    return out


def run_child(point: str, config: TrainConfig) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "tests.crash_run", point, "--", *flags(config)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def reference(tiny_model_dir, data, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The adapter of an uninterrupted run, and the checkpoints it kept along the way."""
    output = tmp_path_factory.mktemp("reference")
    counts = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            RunStats, "on_save", lambda self, args, state, control, **kw: counts.append(len(checkpoint_folders(output)))
        )
        assert train(make_config(tiny_model_dir, data, output, save_total_limit=2)) == 0
    assert counts and max(counts) <= 2  # never more checkpoints on disk than configured
    return load_file(output / "adapter_model.safetensors")


KILLS = {
    "step:9": "a training step in epoch 2",
    "eval:3": "the evaluation after epoch 2",
    "save:12:optimizer.pt": "writing the optimizer state of checkpoint-12",
    "save:12:trainer_state.json": "writing the trainer state of checkpoint-12 (the last file)",
    "save:6:adapter_model.safetensors": "writing the first checkpoint's weights",
    "final": "moving the finished adapter into place",
}


@pytest.mark.parametrize("point", list(KILLS), ids=list(KILLS.values()))
def test_run_killed_with_sigkill_resumes_to_the_same_adapter(point, tiny_model_dir, data, reference, tmp_path, capsys):
    config = make_config(tiny_model_dir, data, tmp_path / "out")
    child = run_child(point, config)
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    assert not (tmp_path / "out" / "training_summary.json").exists()

    assert train(dataclasses.replace(config, resume=True)) == 0
    printed = capsys.readouterr().out
    if point.startswith("save:"):
        assert "skipping incomplete checkpoint" in printed
    resumed = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert resumed.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(resumed[name], reference[name], rtol=0, atol=1e-6)
    assert not (tmp_path / "out" / ".saving").exists()


@pytest.mark.parametrize(
    ("limit", "what"),
    [(4096, "the training logs in"), (64 * 1024, "checkpoint-12 in")],
    ids=["the TensorBoard log fills the disk", "the checkpoint fills the disk"],
)
def test_disk_full_is_one_clear_error_and_resumes(limit, what, tiny_model_dir, data, reference, tmp_path):
    config = make_config(tiny_model_dir, data, tmp_path / "out")
    child = run_child(f"disk-full:6:{limit}", config)
    assert child.returncode == 2, child.stderr[-3000:]
    error = child.stderr[child.stderr.index("error: could not write") :]
    assert what in error.splitlines()[0] and "File too large" in error
    assert "run the same command with --resume: it continues from checkpoint-6" in child.stderr
    assert "unexpected pos" not in child.stderr and "Traceback" not in child.stderr

    assert train(dataclasses.replace(config, resume=True)) == 0
    resumed = load_file(tmp_path / "out" / "adapter_model.safetensors")
    for name in reference:
        torch.testing.assert_close(resumed[name], reference[name], rtol=0, atol=1e-6)


def test_a_checkpoint_that_fails_for_another_reason_is_raised_as_it_is(tiny_model_dir, data, tmp_path, monkeypatch):
    """Only a failed write gets the disk-space message: a save that fails on a bug (a model
    wrapped in something the writer does not expect, as FSDP once did) keeps its own traceback."""
    from peft import PeftModel

    def broken(self, *args, **kwargs):
        raise AttributeError("'Wrapped' object has no attribute 'active_adapter'")

    monkeypatch.setattr(PeftModel, "save_pretrained", broken)
    with pytest.raises(AttributeError, match="active_adapter"):
        train(make_config(tiny_model_dir, data, tmp_path / "out"))


def test_out_of_memory_names_the_estimate_and_what_to_lower(tiny_model_dir, data, tmp_path):
    # A batch of all 24 examples needs one 80 MB logits tensor, more than the 48 MiB left. With a
    # generous limit no layer is checkpointed, so checkpointing is among the advice.
    child = run_child(
        "memory", make_config(tiny_model_dir, data, tmp_path / "out", batch_size=24, memory_limit_gib=24.0)
    )
    assert child.returncode == 2, child.stderr[-3000:]
    assert "error: out of memory at step 1" in child.stderr
    assert "Estimated need for this run:" in child.stderr and "GiB" in child.stderr
    assert (
        "--batch-size (now 24" in child.stderr
        and "a lower --memory-limit-gib (more layers checkpointed) or --gradient-checkpointing" in child.stderr
    )


def test_too_little_disk_is_refused_before_training(tiny_model_dir, data, tmp_path, monkeypatch):
    import shutil

    from training.checkpoints import DiskSpaceError

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=2 * 2**20))
    with pytest.raises(DiskSpaceError, match=r"2 MB free, but this run needs about \d+ MB .*lower --save-total-limit"):
        train(make_config(tiny_model_dir, data, tmp_path / "out"))
    assert not checkpoint_folders(tmp_path / "out")


def test_nan_loss_stops_within_a_step_and_saves_nothing(tiny_model_dir, data, tmp_path, monkeypatch):
    """A weight turned NaN after step 8 (as a diverging update would) stops the run at step 9."""

    def poison(self, args, state, control, model=None, **kwargs):
        if state.global_step == 8:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "lora_A" in n).fill_(float("nan"))

    monkeypatch.setattr(RunStats, "on_step_end", poison)
    config = make_config(tiny_model_dir, data, tmp_path / "out")
    with pytest.raises(
        TrainingStopped, match=r"training loss became nan at step 9 .*Last good checkpoint: .*checkpoint-6"
    ):
        train(config)
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
    assert (tmp_path / "out" / "checkpoints" / "checkpoint-6").is_dir()
    assert not (tmp_path / "out" / "checkpoints" / "checkpoint-12").exists()
