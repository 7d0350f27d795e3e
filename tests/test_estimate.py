"""The memory estimate: counts from the config alone, equal to what a real model holds."""

from __future__ import annotations

import pytest

from training.architecture import EstimateError, read_model_config
from training.config import TrainConfig
from training.estimate import estimate_for_config, main
from training.footprint import estimate
from training.memory import GiB


def test_mistral_7b_is_estimated_offline_from_its_shipped_config(capsys):
    config = read_model_config("mistralai/Mistral-7B-Instruct-v0.2")  # HF_HUB_OFFLINE=1: the shipped file
    result = estimate(
        config,
        storage="nf4",
        compute_bytes=2,
        lora_r=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"],
        batch_size=4,
        seq_len=512,
        checkpointed_layers=32,
        on_cpu=False,
    )
    assert result.parameters == 7_241_732_096  # Mistral-7B's true count, not peft's packed-4-bit "3.7B"
    # LoRA r=16 on q,k,v,o (4096->4096, 4096->1024 twice, 4096->4096) and gate (4096->14336), 32 layers
    assert result.trainable == 32 * 16 * ((4096 + 4096) + 2 * (4096 + 1024) + (4096 + 4096) + (4096 + 14336))
    assert 3.4 * GiB < result.weights < 4.2 * GiB  # NF4 linear layers + bf16 embeddings and head
    assert result.activations(32) < result.activations(16) < result.activations(0)
    assert main(["--config", "nf4-mistral-dolly", "--seq-len", "512", "--gpu-memory", "24GiB"]) == 0
    assert "fits" in capsys.readouterr().out


def test_counts_match_a_real_lora_model(tiny_model_dir):
    from inference.loading import load_base_model
    from training.model import count_parameters, lora_model

    train_config = TrainConfig(
        base_model=str(tiny_model_dir), target_modules=["q_proj", "v_proj", "down_proj"], lora_r=4
    )
    model = lora_model(load_base_model(str(tiny_model_dir), "nf4"), train_config, 0)
    trainable, total = count_parameters(model)
    result = estimate_for_config(train_config)
    assert result.trainable == trainable
    assert result.parameters == total - trainable  # the estimate counts the base; the LoRA matrices are on top


def test_full_fine_tune_trains_every_parameter(tiny_model_dir):
    result = estimate_for_config(TrainConfig(base_model=str(tiny_model_dir), method="full", quantization="none"))
    assert result.trainable == result.parameters and result.weights == 0
    assert result.optimizer == 2 * result.gradients  # AdamW: two float32 moments per trained weight


def test_unknown_target_module_is_named(tiny_model_dir):
    with pytest.raises(EstimateError, match=r"query_key_value.*its linear layers: .*q_proj"):
        estimate_for_config(TrainConfig(base_model=str(tiny_model_dir), target_modules=["query_key_value"]))


@pytest.mark.parametrize("checkpointed, on_cpu", [(0, True), (7, True), (32, True), (32, False)])
def test_the_table_adds_up_to_the_total_it_prints(checkpointed, on_cpu):
    """The rows marked * sum to the training line, and the peak is the larger of training and loading."""
    config = read_model_config("TheBloke/Mistral-7B-Instruct-v0.2-GPTQ")
    result = estimate(
        config,
        storage="gptq",
        compute_bytes=2,
        lora_r=8,
        target_modules=["q_proj"],
        batch_size=4,
        seq_len=512,
        checkpointed_layers=checkpointed,
        on_cpu=on_cpu,
    )
    lines = result.table().splitlines()
    value = lambda line: float(line.split()[-1])  # noqa: E731
    marked = sum(value(line) for line in lines if line.split()[-2] == "*")
    training = value(next(line for line in lines if line.startswith("training")))
    peak = value(next(line for line in lines if line.startswith("peak")))
    assert marked == pytest.approx(training, abs=0.002 * 8)
    assert (
        peak
        == pytest.approx(result.total / GiB, abs=0.001)
        == pytest.approx(max(training, result.while_loading / GiB), abs=0.001)
    )
    assert sum(line.split()[-2] == "*" for line in lines if line.startswith("activations")) == 1


@pytest.mark.parametrize("room", ["tight", "roomy"])
def test_on_a_cpu_the_memory_limit_is_half_of_what_the_machine_has_available(default_model_dir, monkeypatch, room):
    """A low-memory machine recomputes layers, no more than it must; a roomy one does not pay for it.
    The machines are sized from the estimate itself, which depends on this CPU's compute dtype."""
    import training.memory
    from training.estimate import checkpointing_plan
    from training.memory import memory_limit

    config = TrainConfig()
    unlimited = estimate_for_config(config, 512, on_cpu=True, learned_tokens=config.batch_size * 100)
    none, every = unlimited.total_with(0), unlimited.total_with(unlimited.layers)
    need = none if room == "roomy" else (none + every) / 2
    monkeypatch.setattr(training.memory, "available_memory", lambda: 2 * need)
    limit, source = memory_limit(config)
    assert limit == pytest.approx(need)
    assert source == f"50% of the {2 * need / GiB:.1f} GiB available when the run started"
    result = estimate_for_config(config, 512, on_cpu=True, limit=limit, learned_tokens=config.batch_size * 100)
    k = result.checkpointed_layers
    assert result.total <= limit
    assert k == 0 or result.total_with(k - 1) > limit  # one layer fewer would not fit
    plan = checkpointing_plan(result, limit, False)
    if room == "roomy":
        assert (
            k == 0
            and plan == f"gradient checkpointing: off, the estimate fits the memory limit of {limit / GiB:.2f} GiB"
        )
    else:
        assert 0 < k < result.layers
        assert plan == (
            f"gradient checkpointing: {k} of {result.layers} layers, the fewest "
            f"that keep the estimate under the memory limit of {limit / GiB:.2f} GiB"
        )
    assert memory_limit(TrainConfig(memory_limit_gib=3.0)) == (3.0 * GiB, "--memory-limit-gib")


def test_the_logits_are_counted_at_the_learned_positions_only(default_model_dir):
    config = read_model_config("embedded:SmolLM2-135M-Instruct")
    every = estimate(
        config, storage="nf4", compute_bytes=2, lora_r=8, target_modules=["q_proj"], batch_size=8, seq_len=400
    )
    learned = estimate(
        config,
        storage="nf4",
        compute_bytes=2,
        lora_r=8,
        target_modules=["q_proj"],
        batch_size=8,
        seq_len=400,
        learned_tokens=8 * 60,
    )
    assert learned.logits == pytest.approx(every.logits * 60 / 400)
    assert learned.total < every.total
