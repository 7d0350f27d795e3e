"""The adapter in adapters/default is what `python -m training.run` makes from this repository."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors import safe_open

from inference.default_model import DEFAULT_ADAPTER, ROOT
from training.config import TrainConfig
from training.data import file_hash


@pytest.fixture(scope="module")
def summary() -> dict:
    return json.loads((DEFAULT_ADAPTER / "training_summary.json").read_text())


def test_shipped_adapter_records_the_data_and_config_it_was_trained_from(summary):
    config = TrainConfig()
    assert summary["data"]["hash"] == file_hash(*config.data, config.eval_data, config.persona)
    assert summary["config_hash"] == config.training_hash()
    assert summary["eval_loss"] < summary["base_eval_loss"] - 0.5
    voice = summary["voice"]["table"]  # closer to the creator's real replies than the prompted base
    assert voice["adapter"]["signature_rate"] > voice["base"]["signature_rate"] + 0.5
    assert abs(voice["adapter"]["length_ratio"] - 1) < abs(voice["base"]["length_ratio"] - 1)


def test_shipped_adapter_is_small_and_safetensors_only():
    files = [p for p in DEFAULT_ADAPTER.rglob("*") if p.is_file()]
    assert not any(p.suffix in (".bin", ".pt", ".pth", ".pkl") for p in files)
    assert sum(p.stat().st_size for p in files) < 10 * 2**20
    with safe_open(DEFAULT_ADAPTER / "adapter_model.safetensors", "pt") as f:
        assert all("lora_" in key for key in f.keys())  # noqa: SIM118 (safe_open cannot be iterated)


@pytest.mark.slow
def test_default_command_trains_an_adapter_that_beats_the_base(tmp_path):
    """`python -m training.run` on a fresh output folder: the whole default pipeline at realistic
    lengths, 17 minutes on a slow day of the 2-core AMX Xeon. An AVX2-only CPU computes in float32
    and takes far longer: the limit is .ci/run's, which stops the slow checks at its time budget."""
    out = tmp_path / "adapter"
    result = subprocess.run(
        [sys.executable, "-m", "training.run", "--output-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=4800,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    trained = json.loads((out / "training_summary.json").read_text())
    assert trained["eval_loss"] < trained["base_eval_loss"] - 0.5
    voice = trained["voice"]["table"]
    assert voice["adapter"]["signature_rate"] > voice["base"]["signature_rate"] + 0.5
    assert abs(voice["adapter"]["length_ratio"] - 1) < abs(voice["base"]["length_ratio"] - 1)
