"""The version guards of inference/internals: on the versions they were written for, the fast path;
on any other, the library's stock path, a warning, and the same results."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from packaging.version import Version

import inference.internals as internals
from inference.engines import load_replier
from inference.generate import GenerationSettings
from inference.internals import bitsandbytes as bnb_internals
from inference.internals import gptqmodel as gptq_internals
from inference.internals import peft as peft_internals
from inference.internals import torch as torch_internals
from inference.internals import transformers as transformers_internals
from inference.loading import load_base_model

GREEDY = GenerationSettings(max_new_tokens=12, temperature=0)


@pytest.fixture
def other_versions(monkeypatch):
    """Every library reports a version no guard was written for."""
    monkeypatch.setattr(internals, "installed_version", lambda library: Version("0.0.1"))
    internals.written_for.cache_clear()
    yield
    internals.written_for.cache_clear()


@pytest.mark.parametrize(
    "library, versions",
    [
        ("bitsandbytes", bnb_internals.WRITTEN_FOR),
        ("peft", peft_internals.WRITTEN_FOR),
        ("torch", torch_internals.WRITTEN_FOR),
        ("transformers", transformers_internals.WRITTEN_FOR),
    ],
)
def test_the_pinned_versions_are_the_ones_the_internals_were_written_for(library, versions):
    """requirements.txt and the guards move together: a pin bumped without re-checking the
    internals fails here, not silently in a user's run."""
    internals.written_for.cache_clear()
    assert internals.written_for(library, versions, "test")


def test_another_version_warns_once_and_says_what_it_falls_back_from(other_versions, caplog):
    with caplog.at_level(logging.WARNING, logger="inference.internals"):
        assert not internals.written_for("peft", peft_internals.WRITTEN_FOR, "PeftModel._enable_peft_forward_hooks")
        assert not internals.written_for("peft", peft_internals.WRITTEN_FOR, "PeftModel._enable_peft_forward_hooks")
    [record] = caplog.records
    assert (
        "peft 0.0.1" in record.message
        and "==0.21.*" in record.message
        and "_enable_peft_forward_hooks" in record.message
    )


def test_peft_on_another_version_decodes_the_panes_in_turn_with_the_same_replies(
    tiny_model_dir, tiny_adapter_dir, monkeypatch
):
    replier = load_replier(str(tiny_model_dir), str(tiny_adapter_dir), quantization="none", backend="transformers")
    assert replier.mixed_batches
    fast = [r.token_ids for r in replier.reply("How do I pick k in k-means?", GREEDY)]
    monkeypatch.setattr(internals, "installed_version", lambda library: Version("0.0.1"))
    internals.written_for.cache_clear()
    try:
        stock = load_replier(str(tiny_model_dir), str(tiny_adapter_dir), quantization="none", backend="transformers")
        assert not stock.mixed_batches
        assert [r.token_ids for r in stock.reply("How do I pick k in k-means?", GREEDY)] == fast
    finally:
        internals.written_for.cache_clear()


def test_peft_on_another_version_keeps_its_float32_copy_and_torch_dropout(tiny_model_dir, other_versions):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        load_base_model(str(tiny_model_dir), "nf4", for_training=True),
        LoraConfig(r=2, lora_dropout=0.1, target_modules=["q_proj"]),
    )
    peft_internals.cast_lora_inputs(model, False)
    peft_internals.replace_lora_dropout(model, lambda p: torch.nn.Identity())
    layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert layers and all(m.cast_input_dtype_enabled for m in layers)
    assert all(isinstance(d, torch.nn.Dropout) for m in layers for d in m.lora_dropout.values())


def test_bitsandbytes_on_another_version_leaves_its_layers_as_the_library_made_them(tiny_model_dir, other_versions):
    from bitsandbytes.nn import Linear4bit

    model = load_base_model(str(tiny_model_dir), "nf4")
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    before = [(type(m), m.support_avx512bf16_for_cpu) for m in layers]
    bnb_internals.use_cpu_inference_layout(model, not any(flag for _, flag in before))
    assert [(type(m), m.support_avx512bf16_for_cpu) for m in layers] == before


def test_the_cpu_inference_layout_dequantizes_to_the_standard_weights(tiny_model_dir):
    """bitsandbytes' own conversion into its CPU layout is plain torch, so this runs on every CPU,
    with or without the AVX-512 BF16 kernel that reads the layout."""
    from bitsandbytes.functional import dequantize_4bit

    layer = load_base_model(str(tiny_model_dir), "nf4", for_training=True).model.layers[0].mlp.down_proj
    standard = dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16)
    packed, state = bnb_internals.pack_for_cpu(layer.weight.data.clone(), copy.deepcopy(layer.weight.quant_state))
    assert state.packing_format_for_cpu and packed.shape != layer.weight.data.shape
    torch.testing.assert_close(bnb_internals.dequantize_cpu_layout(packed, state), standard, atol=0.02, rtol=0.01)


def test_torch_on_another_version_computes_in_float32(other_versions):
    from inference.loading import compute_dtype

    assert not torch_internals.cpu_computes_bf16()
    if not torch.cuda.is_available():
        assert compute_dtype() == torch.float32


def test_transformers_on_another_version_checkpoints_every_layer_and_pads_batches(tiny_model_dir, other_versions):
    from transformers import Trainer

    model = load_base_model(str(tiny_model_dir), "none", for_training=True)
    transformers_internals.checkpoint_first_layers(model, 1)
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    assert not transformers_internals.attention_known()
    assert transformers_internals.checkpoint_errors_named(Trainer) is Trainer
    assert transformers_internals.trainer_hooks(Trainer) is Trainer


class _HookedTrainer:
    """Records the calls trainer_hooks routes to a trainer's public hooks."""

    def __init__(self) -> None:
        self.train_dataset, self.calls = "the training set", []

    def train_sampler(self, dataset):
        self.calls.append(("train_sampler", dataset))
        return "sampler"

    def before_loading_optimizer(self, checkpoint):
        self.calls.append(("before_loading_optimizer", checkpoint))


def test_transformers_on_its_version_hands_the_trainers_private_steps_to_its_hooks():
    from transformers import Trainer

    hooked = transformers_internals.trainer_hooks(type("T", (_HookedTrainer, Trainer), {}))
    trainer = hooked.__new__(hooked)
    _HookedTrainer.__init__(trainer)
    assert trainer._get_train_sampler() == "sampler"
    trainer._load_optimizer_and_scheduler(None)  # the Trainer's own step, with nothing to load
    assert trainer.calls == [("train_sampler", "the training set"), ("before_loading_optimizer", None)]


class _Quantizer:
    def remove_quantization_config(self, model):
        model.removed_by_quantizer = True
        del model.config.quantization_config


@pytest.mark.parametrize("on_its_version", [True, False])
def test_a_gguf_quantizer_is_dropped_by_its_own_method_only_on_its_version(tiny_model_dir, on_its_version, request):
    if not on_its_version:
        request.getfixturevalue("other_versions")
    model = load_base_model(str(tiny_model_dir), "none")
    model.config.quantization_config = {"quant_method": "gguf"}
    model.hf_quantizer = _Quantizer()
    transformers_internals.drop_gguf_quantizer(model)
    assert not hasattr(model.config, "quantization_config")
    assert getattr(model, "removed_by_quantizer", False) is on_its_version


def test_transformers_on_its_version_checkpoints_only_the_first_layers(tiny_model_dir):
    model = load_base_model(str(tiny_model_dir), "none", for_training=True)
    transformers_internals.checkpoint_first_layers(model, 1)
    assert [layer.gradient_checkpointing for layer in model.model.layers] == [True] + [False] * (
        len(model.model.layers) - 1
    )


class _GptqLikeLayer(torch.nn.Module):
    linear_mode = None  # what gptqmodel's CPU QuantLinear starts with


def test_gptqmodel_layers_are_pinned_to_training_only_on_its_version(monkeypatch):
    model = torch.nn.Sequential(_GptqLikeLayer())
    monkeypatch.setattr(internals, "installed_version", lambda library: Version("7.7.0"))
    internals.written_for.cache_clear()
    try:
        gptq_internals.keep_gptq_layers_trainable(model)
        assert model[0].linear_mode == "train"
        monkeypatch.setattr(internals, "installed_version", lambda library: Version("8.0.0"))
        internals.written_for.cache_clear()
        other = torch.nn.Sequential(_GptqLikeLayer())
        gptq_internals.keep_gptq_layers_trainable(other)
        assert other[0].linear_mode is None
    finally:
        internals.written_for.cache_clear()
