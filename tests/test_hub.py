"""What a push uploads, checked without network: the Hub client is faked at its edge only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from training.hub import CARD_FILE, model_card, push_adapter, upload_files

PERSONA = "You are Maya. Reply to: {comment}\n–Maya"

PLANTED_TOKEN = "hf_PLANTEDtoken0123456789abcdefABCDEF"


class RecordingApi:
    """Stands in for HfApi: records the calls a push makes instead of sending them."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))


@pytest.fixture(scope="module")
def trained_folder(tiny_model_dir, tmp_path_factory) -> Path:
    from training.config import TrainConfig
    from training.run import train

    tmp = tmp_path_factory.mktemp("push")
    rows = "".join(json.dumps({"comment": f"nice video {i}", "response": "Thanks! –Maya"}) + "\n" for i in range(12))
    (tmp / "train.jsonl").write_text(rows)
    config = TrainConfig(
        base_model=str(tiny_model_dir),
        data=str(tmp / "train.jsonl"),
        eval_data="none",
        eval_fraction=0.2,
        output_dir=str(tmp / "adapter"),
        epochs=1,
        batch_size=4,
        quantization="none",
    )
    import contextlib
    import io
    import os

    printed = io.StringIO()
    os.environ["HF_TOKEN"] = PLANTED_TOKEN  # present during the run: it must end up nowhere
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            assert train(config) == 0
    finally:
        del os.environ["HF_TOKEN"]
    (tmp / "printed.txt").write_text(printed.getvalue())
    return tmp / "adapter"


def test_upload_payload_is_the_adapter_and_its_card(trained_folder):
    names = {p.relative_to(trained_folder).as_posix() for p in upload_files(trained_folder)}
    for required in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "persona.txt",
        "heldout.jsonl",
        "examples.jsonl",
        "training_summary.json",
        "loss_curve.png",
        CARD_FILE,
    ):
        assert required in names
    assert not any(n.startswith("checkpoints/") or n.endswith((".bin", ".pt")) for n in names)
    assert any(n.startswith("runs/") for n in names)

    card = ModelCard.load(trained_folder / CARD_FILE)
    summary = json.loads((trained_folder / "training_summary.json").read_text())
    assert card.data.base_model == summary["base_model_hub_id"]
    assert card.data.library_name == "peft"
    assert "base model + persona prompt" in card.text and f"{summary['eval_loss']:.4f}" in card.text
    assert "–Maya" in card.text  # the persona prompt is in the card


def test_token_is_in_no_written_file_and_never_printed(trained_folder):
    files = [p for p in trained_folder.rglob("*") if p.is_file()]
    assert any(p.name.startswith("events.out.tfevents") for p in files)  # TensorBoard's log is among them
    for path in files:
        assert PLANTED_TOKEN.encode() not in path.read_bytes(), path
    printed = (trained_folder.parent / "printed.txt").read_text()
    assert "adapter saved to" in printed and PLANTED_TOKEN not in printed


def test_an_adapter_with_nan_weights_is_never_pushed(trained_folder, tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "diverged"
    shutil.copytree(trained_folder, folder)
    weights = load_file(folder / "adapter_model.safetensors")
    next(iter(weights.values())).fill_(float("nan"))
    save_file(weights, folder / "adapter_model.safetensors")
    monkeypatch.setenv("HF_TOKEN", PLANTED_TOKEN)
    api = RecordingApi()
    with pytest.raises(ValueError, match=r"NaN or infinite values .* not pushed"):
        push_adapter(folder, "maya/replytune-voice", private=False, api=api)
    assert api.calls == []


def test_push_creates_the_repo_and_uploads_the_folder(trained_folder, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", PLANTED_TOKEN)
    api = RecordingApi()
    url = push_adapter(trained_folder, "maya/replytune-voice", private=True, api=api)
    assert url == "https://huggingface.co/maya/replytune-voice"
    (create, args1), (upload, args2) = api.calls
    assert create == "create_repo" and args1["private"] is True and args1["repo_id"] == "maya/replytune-voice"
    assert upload == "upload_folder" and args2["folder_path"] == str(trained_folder)
    assert PLANTED_TOKEN not in json.dumps(args2)


def test_push_without_token_says_how_to_log_in(trained_folder, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # no cached login either
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    with pytest.raises(PermissionError, match="HF_TOKEN or run `hf auth login`"):
        push_adapter(trained_folder, "maya/x", private=False, api=RecordingApi())


def card_summary(method: str = "lora") -> dict:
    return {
        "name": "x",
        "base_model": "b",
        "base_model_hub_id": "org/b",
        "config": {
            "method": method,
            **dict.fromkeys(
                (
                    "quantization",
                    "lora_r",
                    "lora_alpha",
                    "lora_dropout",
                    "target_modules",
                    "epochs",
                    "learning_rate",
                    "batch_size",
                    "grad_accum",
                    "max_length",
                    "seed",
                ),
                1,
            ),
        },
        "epochs": [{"epoch": 1, "train_loss": 2.0, "eval_loss": 1.5}],
        "base_eval_loss": 3.0,
        "eval_loss": 1.5,
        "data": {"train_rows": 10, "eval_rows": 2, "hash": "abc"},
        "config_hash": "def",
        "peak_memory_gib": 1.0,
        "tokens_per_second": 100.0,
        "wall_seconds": 60.0,
        "environment": {"gpu": None, "cpu": "cpu"},
    }


def test_card_renders_from_a_summary():
    card = model_card(card_summary(), "persona {comment}")
    assert card.data.base_model == "org/b"
    assert "| 1 | 2.0000 | 1.5000 |" in card.text
    assert "persona {comment}" in card.text  # a persona's braces stay text


# The metadata the card's YAML was written by hand as, before huggingface_hub's ModelCardData wrote it.
HAND_WRITTEN_METADATA = """base_model: org/b
library_name: peft
pipeline_tag: text-generation
license: apache-2.0
tags:
- lora
- qlora
- replytune
- youtube-comments
"""


def test_card_metadata_is_what_the_hand_written_yaml_said():
    import yaml

    card = str(model_card(card_summary(), "persona {comment}"))
    assert card.startswith("---\n")
    front = card.split("---\n")[1]
    assert yaml.safe_load(front) == yaml.safe_load(HAND_WRITTEN_METADATA)
    assert card.split("---\n", 2)[2].startswith("\n# x\n")  # the body follows the metadata as before


def test_a_full_fine_tune_folder_is_pushed_with_its_model_and_a_card_that_loads_it(
    tiny_model_dir, tmp_path, monkeypatch
):
    """--method full saves model.safetensors + config.json and no adapter files."""
    import shutil

    folder = tmp_path / "full"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "persona.txt").write_text(PERSONA)
    assert not list(folder.glob("adapter_*"))
    model_card(card_summary("full"), PERSONA).save(folder / CARD_FILE)

    names = {p.relative_to(folder).as_posix() for p in upload_files(folder)}
    assert {"model.safetensors", "config.json", "tokenizer.json", "persona.txt", CARD_FILE} <= names
    card = ModelCard.load(folder / CARD_FILE)
    assert card.data.library_name == "transformers" and card.data.base_model == "org/b"
    assert "lora" not in card.data.tags
    assert 'AutoModelForCausalLM.from_pretrained("THIS_REPO_OR_FOLDER")' in card.text and "PeftModel" not in card.text

    monkeypatch.setenv("HF_TOKEN", PLANTED_TOKEN)
    api = RecordingApi()
    push_adapter(folder, "maya/replytune-full", private=False, api=api)
    assert [call for call, _ in api.calls] == ["create_repo", "upload_folder"]


def test_a_folder_without_weights_is_never_pushed(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", PLANTED_TOKEN)
    api = RecordingApi()
    with pytest.raises(FileNotFoundError, match=r"no adapter_model\.safetensors or model\.safetensors"):
        push_adapter(tmp_path, "maya/x", private=False, api=api)
    assert api.calls == []
