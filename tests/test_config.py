"""The typed training config: YAML recipes, CLI flags winning, every problem reported at once."""

from __future__ import annotations

import dataclasses

import pytest

from training.config import CONFIGS_DIR, ConfigError, TrainConfig, build_parser, load_config


@pytest.mark.parametrize("recipe", sorted(CONFIGS_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_recipe_loads(recipe):
    _config, sources = load_config(["--config", str(recipe)])
    assert any(s == "config" for s in sources.values())
    assert recipe.read_text().startswith("# python -m training.run --config")


def test_recipe_by_name_and_flags_win_over_it():
    config, sources = load_config(["--config", "article", "--lora-r", "4"])
    assert config.lora_r == 4 and sources["lora_r"] == "flag"
    assert config.lora_alpha == 32 and sources["lora_alpha"] == "config"
    assert config.target_modules == ["q_proj"]
    assert sources["seed"] == "default"


def test_unknown_key_and_wrong_type_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lora_rank: 8\nepochs: many\n")
    with pytest.raises(ConfigError) as info:
        load_config(["--config", str(path)])
    message = str(info.value)
    assert (
        str(path) in message
        and "unknown key 'lora_rank'" in message
        and "epochs: expected float, got 'many'" in message
    )


def test_contradictions_are_all_reported():
    with pytest.raises(ConfigError) as info:
        TrainConfig(lora_r=0, epochs=0, learning_rate=2, private=True, quantization="int3", examples_in_prompt=-1)
    message = str(info.value)
    for part in (
        "lora_r",
        "epochs",
        "learning_rate",
        "private: only applies with push_to_hub",
        "quantization",
        "examples_in_prompt: must be 0 (off) or more",
    ):
        assert part in message


def test_help_documents_every_field():
    text = build_parser().format_help()
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in text
    for flag in (
        "--config",
        "--data",
        "--base-model",
        "--epochs",
        "--output-dir",
        "--resume",
        "--push-to-hub",
        "--check-data",
    ):
        assert flag in text
    # Each field's help is printed as written, "%" included (argparse %-formats help strings).
    flat = " ".join(text.split())
    for f in dataclasses.fields(TrainConfig):
        assert " ".join(f.metadata["help"].split()) in flat


def test_training_hash_ignores_how_memory_is_saved():
    assert TrainConfig().training_hash() == TrainConfig(memory_limit_gib=2.0).training_hash()


def test_training_hash_ignores_where_output_goes():
    a = TrainConfig(output_dir="/tmp/a")
    assert a.training_hash() == TrainConfig(output_dir="/tmp/b", push_to_hub="me/x").training_hash()
    assert a.training_hash() != TrainConfig(lora_r=4).training_hash()


def test_eval_data_none_means_split():
    assert TrainConfig(eval_data="none").eval_data is None


def test_the_default_recipe_says_what_a_plain_run_does():
    """training/configs/default.yaml documents the defaults; TrainConfig holds them. Every value the
    recipe names is the dataclass default, so the two never drift apart."""
    from training.config import read_yaml

    recipe = read_yaml(CONFIGS_DIR / "default.yaml")
    defaults = dataclasses.asdict(TrainConfig())
    assert {key: defaults[key] for key in recipe} == recipe


def test_every_on_off_setting_can_be_turned_off_by_flag():
    """--no-X for every yes/no setting, whatever its default (HfArgumentParser's own for doctor)."""
    config, sources = load_config(["--no-doctor", "--no-resume", "--no-gradient-checkpointing", "--no-check-data"])
    assert not (config.doctor or config.resume or config.gradient_checkpointing or config.check_data)
    assert {sources[k] for k in ("doctor", "resume", "gradient_checkpointing", "check_data")} == {"flag"}
