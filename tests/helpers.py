"""Helpers the tests share (fixtures live in conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def build_tiny_model(tokenizer, folder: Path, seed: int = 0) -> Path:
    """A 2-layer Llama with SmolLM2's vocabulary, saved with its tokenizer so the real loader runs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        # Wide enough weights that a 64-wide model can make confident predictions at all: with
        # the usual 0.02 the largest reachable logit is about 1, and no training can lower the loss.
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def pairs_jsonl(n: int, start: int = 0) -> str:
    return "".join(
        json.dumps({"comment": f"Question number {i}: what is topic {i}?", "response": f"Topic {i} is explained in part {i}. –Maya"}) + "\n"
        for i in range(start, start + n)
    )



def write_run_data(folder: Path) -> Path:
    """A tiny model's run: 24 training pairs (6 updates of 4 per epoch) and 6 held-out ones."""
    (folder / "train.jsonl").write_text(pairs_jsonl(24))
    (folder / "eval.jsonl").write_text(pairs_jsonl(6, start=100))
    return folder


def launch_environment(config: Path) -> dict[str, str]:
    """The variables `accelerate launch --config_file CONFIG` gives each process it starts, as
    accelerate's own launch code computes them."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "-m", "training.run"])
    args, _, _ = _validate_launch_command(args)
    return prepare_multi_gpu_env(args)
