"""A model's architecture from its config alone: the config (shipped for the recipes' models, so it
reads offline), the model built on PyTorch's ``meta`` device (shapes, no storage), and the widths
and attention that decide what training keeps in memory (training.footprint) and how it packs
batches (training.examples)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from errors import ReplytuneError
from inference.default_model import ROOT

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

MODEL_CONFIGS = ROOT / "training" / "model_configs"  # config.json of the recipes' models, a few KB each


class EstimateError(ReplytuneError, ValueError):
    """A model config that cannot be read, or settings the estimate cannot use."""


def read_model_config(name: str) -> PretrainedConfig:
    """A transformers config from a shipped file, a local folder or file, or the Hub (online only)."""
    from transformers import AutoConfig

    from inference.loading import resolve_base_model

    shipped = MODEL_CONFIGS / f"{name.replace('/', '--')}.json"
    path = shipped if shipped.is_file() else Path(resolve_base_model(name))
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        if "model_type" not in data:
            raise EstimateError(f"{path}: no model_type; expected a transformers config.json")
        return AutoConfig.for_model(**data)
    try:
        return AutoConfig.from_pretrained(str(path))
    except OSError as exc:
        shipped_names = ", ".join(sorted(p.stem.replace("--", "/") for p in MODEL_CONFIGS.glob("*.json")))
        raise EstimateError(f"{name}: no config found ({exc}); shipped offline: {shipped_names}") from None


def meta_model(config: PretrainedConfig) -> torch.nn.Module:
    """The architecture with shapes only: no memory, no weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(config)


def text_config(config: PretrainedConfig) -> PretrainedConfig:
    """The language model's part of a config (a multimodal config nests it; any other is its own)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def linear_packing(config: PretrainedConfig, on_cpu: bool) -> bool:
    """Whether packed rows attend example by example (a CPU training the model with
    training.attention's grouped attention), rather than over the whole row."""
    from training.attention import GROUPED, training_attention

    text = text_config(config)
    return on_cpu and training_attention(text) == GROUPED


def model_widths(config: PretrainedConfig) -> tuple[int, int, int]:
    """(hidden size, MLP width, layers that keep activations) of a decoder or encoder-decoder config."""
    text = text_config(config)
    hidden = getattr(text, "hidden_size", None) or getattr(text, "d_model", None)
    inner = getattr(text, "intermediate_size", None) or getattr(text, "d_ff", None) or 4 * hidden
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "num_layers", 0) + getattr(
        text, "num_decoder_layers", 0
    )
    if not hidden or not layers:
        raise EstimateError(f"{text.model_type}: cannot read the hidden size and layer count from its config")
    return hidden, inner, layers
