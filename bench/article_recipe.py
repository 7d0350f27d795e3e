"""The original article's training recipe as written: bench.train_throughput's reference run, in
its own process so that its peak memory is its own.

    python -m bench.article_recipe --out DIR --epochs 2 --base-model MODEL --lora JSON --train-file FILE

transformers ``Trainer`` + ``DataCollatorForLanguageModeling`` (dynamic padding, loss on every
token, pad = EOS), gradient checkpointing, LoRA (``--lora``: r, alpha, targets), batch 4, grad.
acc. 4, lr 2e-4, on an NF4 base computing in the machine's compute dtype. Prints one JSON line: real
tokens/s, seconds, peak memory; the adapter is saved to DIR/reference.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class LoraShape:
    """The adapter both sides of a comparison train."""

    r: int = 8
    alpha: int = 32
    targets: list[str] = field(default_factory=lambda: ["q_proj"])

    def flags(self) -> list[str]:
        return ["--lora-r", str(self.r), "--lora-alpha", str(self.alpha), "--target-modules", *self.targets]


def run_reference(out: Path, epochs: float, base_model: str, lora: LoraShape, train_file: Path) -> dict:
    """The article's recipe; its speed and peak memory."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import DataCollatorForLanguageModeling, Trainer, set_seed

    from inference.loading import compute_dtype, load_base_model, load_tokenizer
    from training.callbacks import peak_memory_gib

    set_seed(42)
    dtype = compute_dtype()
    tokenizer = load_tokenizer(base_model)
    tokenizer.pad_token = tokenizer.eos_token  # as in the article
    data = _reference_data(tokenizer, train_file)
    model = load_base_model(base_model, "nf4", dtype)
    model = prepare_model_for_kbit_training(model)  # enables gradient checkpointing, as the article
    model = get_peft_model(
        model,
        LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.05, target_modules=lora.targets, task_type="CAUSAL_LM"
        ),
    )
    trainer = Trainer(
        model=model,
        args=_reference_arguments(out, epochs, dtype),
        train_dataset=data,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    model.save_pretrained(out / "reference")
    real_tokens = sum(len(ids) for ids in data["input_ids"]) * epochs
    return {"tokens_per_s": real_tokens / seconds, "seconds": seconds, "peak_gib": peak_memory_gib()}


def _reference_data(tokenizer, train_file: Path):
    """The training pairs as the article feeds them: chat-template text, tokenized whole."""
    from datasets import Dataset

    from prompts.render import Persona
    from training.data import load_pairs

    persona = Persona.from_file()
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": persona.fill(p.comment)}, {"role": "assistant", "content": p.response}],
            tokenize=False,
        )
        for p in load_pairs(train_file)
    ]
    # The article truncates at 512 tokens; no example here is that long.
    tokenize = lambda b: tokenizer(b["text"], add_special_tokens=False, truncation=True, max_length=512)  # noqa: E731
    return Dataset.from_dict({"text": texts}).map(tokenize, batched=True, remove_columns=["text"])


def _reference_arguments(out: Path, epochs: float, dtype):
    """The article's Trainer settings."""
    import torch
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out / "ref-checkpoints"),
        num_train_epochs=epochs,
        learning_rate=2e-4,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=4,
        gradient_checkpointing=True,
        warmup_steps=2,
        weight_decay=0.01,
        logging_strategy="epoch",
        save_strategy="no",
        eval_strategy="no",
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        optim="adamw_torch",
        disable_tqdm=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=float, required=True)
    parser.add_argument("--base-model", required=True)
    parser.add_argument("--lora", required=True, help="the LoraShape as JSON")
    parser.add_argument("--train-file", type=Path, required=True)
    args = parser.parse_args()
    lora = LoraShape(**json.loads(args.lora))
    print(json.dumps(run_reference(args.out, args.epochs, args.base_model, lora, args.train_file)))


if __name__ == "__main__":
    main()
