"""The accelerate configs shipped beside the recipes, as accelerate itself reads them, and what a
process started with them does: where it loads the model, how its 4-bit weights are stored, and
the memory it is estimated to need."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from inference.default_model import ROOT
from tests.helpers import launch_environment
from training.config import CONFIGS_DIR, load_config
from training.distributed import launch_plan
from training.estimate import CUDA_CONTEXT_BYTES, estimate_for_config
from training.memory import GiB

ACCELERATE_CONFIGS = sorted((CONFIGS_DIR / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("config", ACCELERATE_CONFIGS, ids=lambda p: p.stem)
def test_every_accelerate_config_loads(config):
    from accelerate.commands.config.config_args import load_config_from_file

    cluster = load_config_from_file(str(config))
    assert cluster.num_processes == 2 and cluster.num_machines == 1
    assert config.read_text().startswith("# accelerate launch --config_file training/configs/accelerate/" + config.name)
    if cluster.distributed_type == "FSDP":
        # The FSDP-QLoRA settings: a frozen 4-bit base needs flat parameters of their own per
        # dtype, and only the main process reads the checkpoint.
        fsdp = cluster.fsdp_config
        assert (
            fsdp["fsdp_use_orig_params"] is False
            and fsdp["fsdp_cpu_ram_efficient_loading"] is True
            and fsdp["fsdp_sync_module_states"] is True
        )
        assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"


def test_under_the_fsdp_config_the_4bit_weights_are_stored_in_the_compute_dtype(tiny_model_dir, monkeypatch):
    """FSDP shards flat buffers of one float dtype: the packed NF4 bytes are stored as bfloat16."""
    from inference.loading import device_map, fsdp_enabled, load_base_model

    env = launch_environment(CONFIGS_DIR / "accelerate" / "fsdp.yaml")
    for name in ("ACCELERATE_USE_FSDP", "FSDP_CPU_RAM_EFFICIENT_LOADING"):
        monkeypatch.setenv(name, env[name])
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert fsdp_enabled() and device_map(alone={"": 0}) is None  # FSDP places the shards
    model = load_base_model(str(tiny_model_dir), "nf4", torch.bfloat16, for_training=True)
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert weight.dtype == torch.bfloat16 and weight.quant_storage == torch.bfloat16
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_under_the_ddp_config_each_process_loads_onto_its_own_gpu(monkeypatch):
    from inference.loading import device_map, fsdp_enabled

    env = launch_environment(CONFIGS_DIR / "accelerate" / "ddp.yaml")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", env.get("ACCELERATE_USE_FSDP", "false"))
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not fsdp_enabled() and device_map(alone={"": 0}) == {"": 1}
    monkeypatch.delenv("LOCAL_RANK")
    assert device_map(alone={"": 0}) == {"": 0}  # one process, no launcher


def test_sharding_divides_what_each_gpu_keeps_and_ddp_does_not():
    config, _ = load_config(["--config", "fsdp-llama2-70b"])
    one = estimate_for_config(config, on_cpu=False, devices=1, sharded=False)
    ddp = estimate_for_config(config, on_cpu=False, devices=2, sharded=False)
    fsdp = estimate_for_config(config, on_cpu=False, devices=2, sharded=True)
    assert ddp.total == one.total  # every GPU holds the whole model and its own batch
    assert fsdp.weights == pytest.approx(one.weights / 2) and fsdp.optimizer == pytest.approx(one.optimizer / 2)
    assert fsdp.activations(fsdp.layers) == one.activations(one.layers)  # each GPU still computes its own batch
    assert 0 < fsdp.gathered < one.weights / 10  # two layers and the embeddings, not the model
    assert launch_plan(CONFIGS_DIR / "accelerate" / "fsdp.yaml") == (2, True)
    assert launch_plan(CONFIGS_DIR / "accelerate" / "ddp.yaml") == (2, False)


def test_the_70b_recipe_estimate_is_within_20_percent_of_the_published_figure():
    """peft's FSDP-QLoRA example (docs/source/accelerate/fsdp.md, "Memory usage"): Llama-2-70B,
    QLoRA r=8 on every linear layer, 2 GPUs, 2 x 2048 tokens per GPU, gradient checkpointing,
    flash attention, no CPU offloading: 35.6 GB per GPU, as the GPU reports it (CUDA context
    included)."""
    config, _ = load_config(["--config", "fsdp-llama2-70b"])
    assert (config.batch_size, config.max_length, config.lora_r, config.gradient_checkpointing) == (2, 2048, 8, True)
    devices, sharded = launch_plan(CONFIGS_DIR / "accelerate" / "fsdp.yaml")
    result = estimate_for_config(config, on_cpu=False, devices=devices, sharded=sharded)
    per_gpu = (result.total + CUDA_CONTEXT_BYTES) / 1e9
    assert per_gpu == pytest.approx(35.6, rel=0.2), f"{per_gpu:.1f} GB ({result.total / GiB:.2f} GiB allocated)"
    # One GPU could not hold it: the base alone is ~34 GiB in NF4.
    assert estimate_for_config(config, on_cpu=False, devices=1, sharded=False).total > 34 * GiB


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the FSDP config runs")
def test_the_fsdp_config_on_a_machine_without_a_gpu_stops_before_loading_and_says_what_to_launch(tmp_path):
    """accelerate itself refuses FSDP without a GPU only once every process has loaded the model,
    naming no way on; the run says so once, before it reads any data."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")} | {
        "OMP_NUM_THREADS": "1"
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(CONFIGS_DIR / "accelerate" / "fsdp.yaml"),
            "-m",
            "training.run",
            "--output-dir",
            str(tmp_path / "out"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert result.stderr.count("error: ") == 1 and "training/configs/accelerate/ddp.yaml" in result.stderr, (
        result.stderr[-2000:]
    )
    assert "settings:" not in result.stdout and not (tmp_path / "out").exists()
