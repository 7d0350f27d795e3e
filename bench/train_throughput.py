"""Training throughput: the original article's recipe vs `python -m training.run`, same data, model
and epochs, each in its own process, plus the machine's bf16 matmul ceiling.

    python -m bench.train_throughput [--epochs 2]

The reference is the article's recipe as written, on the embedded default with NF4: transformers
``Trainer`` + ``DataCollatorForLanguageModeling`` (dynamic padding, loss on every token, pad = EOS),
gradient checkpointing, LoRA r=8 alpha=32 on q_proj, batch 4, grad. acc. 4, lr 2e-4. Both runs
are scored the same way afterwards: the held-out loss on reply tokens, with replytune's renderer.
Prints a Markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from training.config import ROOT

# The speed issue's convention: a LoRA step costs about 6 x 135M FLOP per token of SmolLM2 (forward,
# backward through the activations, and the weight-gradient share the 6N rule counts).
FLOP_PER_TOKEN = 6 * 134.5e6


def matmul_ceiling_gflops(size: int = 2048, repeats: int = 20) -> float:
    """bf16 matrix-product throughput of this machine (the speed limit of a training step)."""
    import torch

    a = torch.randn(size, size, dtype=torch.bfloat16)
    b = torch.randn(size, size, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def run_reference(out: Path, epochs: float) -> dict:
    """The article's recipe (runs in a child process; see main)."""
    import resource

    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments, set_seed

    from inference.default_model import DEFAULT_BASE_MODEL
    from inference.loading import load_base_model, load_tokenizer
    from prompts.render import Persona
    from training.data import load_pairs

    set_seed(42)
    tokenizer = load_tokenizer(DEFAULT_BASE_MODEL)
    tokenizer.pad_token = tokenizer.eos_token  # as in the article
    persona = Persona.from_file()
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": persona.fill(p.comment)}, {"role": "assistant", "content": p.response}], tokenize=False
        )
        for p in load_pairs(ROOT / "data" / "train.jsonl")
    ]
    data = Dataset.from_dict({"text": texts}).map(lambda b: tokenizer(b["text"], add_special_tokens=False), batched=True, remove_columns=["text"])
    model = load_base_model(DEFAULT_BASE_MODEL, "nf4", torch.bfloat16)
    model = prepare_model_for_kbit_training(model)  # enables gradient checkpointing, as the article
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=str(out / "ref-checkpoints"), num_train_epochs=epochs, learning_rate=2e-4,
        per_device_train_batch_size=4, gradient_accumulation_steps=4, gradient_checkpointing=True,
        warmup_steps=2, weight_decay=0.01, logging_strategy="epoch", save_strategy="no", eval_strategy="no",
        bf16=True, use_cpu=True, report_to="none", optim="adamw_torch", disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    model.save_pretrained(out / "reference")
    real_tokens = sum(len(ids) for ids in data["input_ids"]) * epochs
    return {"tokens_per_s": real_tokens / seconds, "seconds": seconds, "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def held_out_loss(adapter: Path) -> float:
    """Reply-token loss on data/heldout.jsonl, measured the same way for every adapter."""
    from inference.default_model import DEFAULT_BASE_MODEL
    from inference.generate import load_replier
    from training.data import load_pairs
    from training.evaluate import held_out_losses

    replier = load_replier(DEFAULT_BASE_MODEL, str(adapter))
    return held_out_losses(replier, load_pairs(ROOT / "data" / "heldout.jsonl"), 512)["adapter"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--child", choices=("reference",), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "reference":
        print(json.dumps(run_reference(args.out, args.epochs)))
        return

    from training.report import environment

    out = Path(tempfile.mkdtemp(prefix="replytune-bench-"))
    ceiling = matmul_ceiling_gflops()
    rows = {}
    # Each run in its own process, so peak memory is each run's own.
    ref = subprocess.run([sys.executable, "-m", "bench.train_throughput", "--child", "reference", "--out", str(out), "--epochs", str(args.epochs)], cwd=ROOT, capture_output=True, text=True, check=True)
    rows["reference (article recipe)"] = {**json.loads(ref.stdout.strip().splitlines()[-1]), "loss": held_out_loss(out / "reference")}
    for name, flags in {
        "training.run, article hyperparameters": ["--config", "article", "--no-gradient-checkpointing", "--early-stopping-patience", "0"],
        "training.run, default": ["--early-stopping-patience", "0"],
        "training.run, default + --gradient-checkpointing": ["--early-stopping-patience", "0", "--gradient-checkpointing"],
    }.items():
        folder = out / name.replace(" ", "_").replace(",", "")
        cmd = [sys.executable, "-m", "training.run", *flags, "--epochs", str(args.epochs), "--output-dir", str(folder)]
        subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
        summary = json.loads((folder / "training_summary.json").read_text())
        rows[name] = {"tokens_per_s": summary["tokens_per_second"], "seconds": summary["wall_seconds"], "peak_gib": summary["peak_memory_gib"], "loss": held_out_loss(folder)}

    env = environment()
    print(f"{time.strftime('%Y-%m-%d')}, {env['cpu']}, {env['cores']} cores, torch {env['libraries']['torch']}, "
          f"transformers {env['libraries']['transformers']}, peft {env['libraries']['peft']}, bitsandbytes {env['libraries']['bitsandbytes']}")
    print(f"{args.epochs:g} epochs on data/train.jsonl; bf16 matmul ceiling {ceiling:.0f} GFLOP/s\n")
    base = rows["reference (article recipe)"]["tokens_per_s"]
    print("| run | real tokens/s | x reference | share of the bf16 ceiling | peak memory | held-out loss (reply tokens) |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        share = r["tokens_per_s"] * FLOP_PER_TOKEN / (ceiling * 1e9)
        print(f"| {name} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base:.2f} | {share:.0%} | {r['peak_gib']:.2f} GiB | {r['loss']:.4f} |")


if __name__ == "__main__":
    main()
