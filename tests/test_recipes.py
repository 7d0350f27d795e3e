"""Every recipe of the source articles, run for real on CPU with a tiny model built from a config of
the recipe's architecture (Mistral, T5, Qwen2): a few real steps, then the result loaded back.

The recipes' own settings (quantization, LoRA rank and targets, method, optimizer) come from their
YAML files; only the model, the data, the epochs and the output folder are overridden.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training.config import load_config
from training.run import train


def build(config, tokenizer, folder: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    torch.manual_seed(0)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    auto.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def small(tokenizer, **extra) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def recipe(name: str, model: Path, data: Path, eval_data: Path, out: Path, *flags: str):
    config, _sources = load_config(
        [
            "--config",
            name,
            "--base-model",
            str(model),
            "--data",
            str(data),
            "--eval-data",
            str(eval_data),
            "--output-dir",
            str(out),
            "--epochs",
            "2",
            "--no-doctor",
            *flags,
        ]
    )
    return config


def dolly(n: int, start: int = 0) -> list[dict]:
    return [
        {
            "instruction": f"Explain topic {i}",
            "context": f"Topic {i} is about data.",
            "response": f"Topic {i} is explained in part {i}.",
            "category": "open_qa",
        }
        for i in range(start, start + n)
    ]


def test_nf4_recipe_trains_a_mistral_on_instruction_rows(mistral_tokenizer, tmp_path):
    from peft import PeftModel
    from transformers import MistralConfig

    from inference.loading import load_base_model

    model = build(MistralConfig(**small(mistral_tokenizer)), mistral_tokenizer, tmp_path / "mistral")
    config = recipe(
        "nf4-mistral-dolly",
        model,
        write_rows(tmp_path / "dolly.jsonl", dolly(40)),
        write_rows(tmp_path / "eval.jsonl", dolly(8, 100)),
        tmp_path / "out",
        "--max-rows",
        "32",
    )
    assert (config.quantization, config.lora_r, config.lora_alpha, config.max_rows) == ("nf4", 16, 64, 32)
    assert config.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]
    assert train(config) == 0
    summary = json.loads((tmp_path / "out" / "training_summary.json").read_text())
    assert summary["data"]["train_rows"] == 32 and summary["eval_loss"] < summary["base_eval_loss"]
    adapter = PeftModel.from_pretrained(load_base_model(str(model), "nf4"), str(tmp_path / "out"))
    targets = {name.split(".")[-4] for name, _ in adapter.named_parameters() if "lora_A" in name}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"}


def test_seq2seq_recipe_trains_an_8bit_t5_on_input_target_pairs(mistral_tokenizer, tmp_path):
    from peft import PeftModel
    from transformers import T5Config

    from inference.loading import load_base_model, load_tokenizer
    from prompts.render import Persona, Seq2SeqRenderer
    from tests.helpers import pairs_jsonl
    from training.collate import ReplyCollator
    from training.data import load_pairs, tokenize_pairs

    t5 = T5Config(
        vocab_size=len(mistral_tokenizer),
        d_model=64,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        d_kv=16,
        feed_forward_proj="gated-gelu",
        pad_token_id=mistral_tokenizer.pad_token_id,
        eos_token_id=mistral_tokenizer.eos_token_id,
        decoder_start_token_id=mistral_tokenizer.pad_token_id,
    )
    model = build(t5, mistral_tokenizer, tmp_path / "t5")
    (tmp_path / "train.jsonl").write_text(pairs_jsonl(24))
    (tmp_path / "eval.jsonl").write_text(pairs_jsonl(6, 100))
    config = recipe("flan-t5-lora", model, tmp_path / "train.jsonl", tmp_path / "eval.jsonl", tmp_path / "out")
    assert (config.quantization, config.target_modules, config.lora_r, config.lora_alpha) == (
        "int8",
        ["q", "v"],
        16,
        32,
    )
    assert train(config) == 0
    out = tmp_path / "out"
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["seq2seq"] is True and summary["eval_loss"] < summary["base_eval_loss"]
    assert any((out / "runs").rglob("events.out.tfevents.*"))  # TensorBoard logs

    # Loaded back on a fresh 8-bit base, the adapter gives the held-out loss the run reported.
    tokenizer = load_tokenizer(str(model))
    loaded = PeftModel.from_pretrained(load_base_model(str(model), "int8"), str(out)).eval()
    examples, _ = tokenize_pairs(
        load_pairs(config.eval_data),
        Seq2SeqRenderer(tokenizer, Persona.from_file(out / "persona.txt")),
        config.max_length,
    )
    batch = ReplyCollator(tokenizer.pad_token_id)([{"input_ids": e.input_ids, "labels": e.labels} for e in examples])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loaded(**batch).loss.item()
    assert loss == pytest.approx(summary["eval_loss"], abs=0.1)


def guanaco(n: int, start: int, answer: str) -> list[dict]:
    return [
        {"text": f"### Human: Question {i} about the course?### Assistant: {answer} {i}."}
        for i in range(start, start + n)
    ]


def test_full_fine_tune_recipe_stops_early_when_it_overfits(chatml_tokenizer, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, Qwen2Config

    from training.callbacks import RunStats
    from training.checkpoints import checkpoint_folders

    model = build(Qwen2Config(**small(chatml_tokenizer), tie_word_embeddings=True), chatml_tokenizer, tmp_path / "qwen")
    # Training answers all read one way, held-out answers another: after the shared words are
    # learned, every further epoch fits the training phrasing and the held-out loss rises.
    train_rows = write_rows(tmp_path / "guanaco.jsonl", guanaco(24, 0, "Certainly, see the third lecture for item"))
    eval_rows = write_rows(tmp_path / "eval.jsonl", guanaco(6, 100, "No idea, sorry, nothing about"))
    config = recipe(
        "full-qwen-guanaco",
        model,
        train_rows,
        eval_rows,
        tmp_path / "out",
        "--epochs",
        "8",
        "--learning-rate",
        "1e-2",
        "--grad-accum",
        "1",
        "--warmup-ratio",
        "0",
    )
    assert (config.method, config.quantization, config.early_stopping_patience, config.save_total_limit) == (
        "full",
        "none",
        1,
        2,
    )
    kept = []
    monkeypatch.setattr(
        RunStats,
        "on_save",
        lambda self, args, state, control, **kw: kept.append(len(checkpoint_folders(tmp_path / "out"))),
    )
    assert train(config) == 0
    summary = json.loads((tmp_path / "out" / "training_summary.json").read_text())
    losses = [e["eval_loss"] for e in summary["epochs"]]
    assert len(losses) < 8, f"early stopping never triggered: {losses}"
    assert losses[-1] > min(losses) and summary["eval_loss"] == pytest.approx(
        min(losses), abs=1e-4
    )  # the best epoch is kept
    assert max(kept) <= 2
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # a whole model, from safetensors
    assert (tmp_path / "out" / "model.safetensors").is_file() and not (
        tmp_path / "out" / "adapter_config.json"
    ).exists()
    assert sum(p.numel() for p in reloaded.parameters()) == summary["trainable_parameters"]
