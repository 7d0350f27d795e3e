"""Model loading: safetensors only, and no code from a model folder runs without --trust-remote-code."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from inference.loading import load_adapter, load_base_model


def test_a_pickle_only_model_is_refused(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(OSError, match="safetensors"):
        load_base_model(str(folder), "none")


def test_a_pickle_only_adapter_is_refused(tiny_model_dir, tiny_adapter_dir, tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(tiny_adapter_dir, folder)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        load_adapter(load_base_model(str(tiny_model_dir), "none"), folder)


def test_code_shipped_in_a_model_folder_does_not_run_by_default(tiny_model_dir, tmp_path):
    folder = tmp_path / "remote-code"
    shutil.copytree(tiny_model_dir, folder)
    marker = tmp_path / "code-ran"
    (folder / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaForCausalLM as EvilModel, LlamaConfig as EvilConfig\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    try:
        model = load_base_model(str(folder), "none")
    except ValueError as exc:  # transformers may refuse outright instead of using its own class
        assert "trust_remote_code" in str(exc)
    else:
        assert type(model).__module__.startswith("transformers.")
    assert not marker.exists()
