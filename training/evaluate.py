"""`python -m training.evaluate`: does the fine-tuned model sound like the creator?

On the held-out comments, the base model (+ persona prompt) and the adapter each reply (greedy, so
two runs agree), and both are compared with the creator's real replies: length ratio to the real
reply, signature rate, emoji rate, replying in the comment's language, replies copied verbatim from
the training set (memorization), and the held-out loss on reply tokens. Runs at the end of every
training run; the table goes into training_summary.json, the model card and the console.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from errors import exits_on_error
from inference.generate import GenerationSettings, Replier, StreamingReplier
from inference.loading import BACKENDS, QUANTIZATIONS
from prompts.render import IGNORE_INDEX, is_signed
from training.data import Pair

EVAL_SETTINGS = GenerationSettings(max_new_tokens=120)
EMOJI = re.compile("[\U0001f300-\U0001faff\u2600-\u27bf\U0001f1e6-\U0001f1ff]")
MIN_WORDS_FOR_LANGUAGE = 4  # language detection on shorter text is a coin toss
SOURCES = ("base", "adapter", "real")
LABELS = {"base": "base + prompt", "adapter": "fine-tuned", "real": "creator's real replies"}


def language(text: str) -> str | None:
    """The language of ``text``, or None when it is too short or the detector is unsure."""
    from langdetect import DetectorFactory, LangDetectException, detect_langs

    DetectorFactory.seed = 0  # langdetect samples; a fixed seed makes it deterministic
    if len(text.split()) < MIN_WORDS_FOR_LANGUAGE:
        return None
    try:
        best = detect_langs(text)[0]
    except LangDetectException:
        return None
    return best.lang if best.prob >= 0.9 else None


def reply_stats(replies: Sequence[str], pairs: Sequence[Pair], signature: str | None, trained_replies: set[str]) -> dict[str, float | None]:
    def strip_signature(text: str) -> str:
        return text.rstrip().removesuffix(signature).rstrip() if signature else text

    ratios = [len(r.split()) / max(1, len(p.response.split())) for r, p in zip(replies, pairs)]
    languages = [(language(p.comment), language(strip_signature(r))) for r, p in zip(replies, pairs)]
    comparable = [(c, r) for c, r in languages if c is not None]
    return {
        "length_ratio": statistics.median(ratios),
        "signature_rate": sum(is_signed(r, signature) for r in replies) / len(replies),
        "emoji_rate": sum(bool(EMOJI.search(r)) for r in replies) / len(replies),
        "same_language_rate": sum(c == r for c, r in comparable) / len(comparable) if comparable else None,
        "memorized_rate": sum(r.strip() in trained_replies for r in replies) / len(replies),
    }


def held_out_losses(replier: Replier, pairs: Sequence[Pair], max_length: int) -> dict[str, float]:
    """Loss on the reply tokens of the held-out pairs, with the adapter off and on."""
    import torch

    from training.data import tokenize_pairs
    from training.collate import ReplyCollator

    examples, _ = tokenize_pairs(pairs, replier.renderer, max_length)
    collate = ReplyCollator(replier.tokenizer.pad_token_id)
    model = replier.model
    device = next(model.parameters()).device

    def loss() -> float:
        total = count = 0
        with torch.inference_mode():
            for e in examples:
                n = sum(label != IGNORE_INDEX for label in e.labels)
                batch = collate([{"input_ids": e.input_ids, "labels": e.labels}])
                total += model(**{k: v.to(device) for k, v in batch.items()}).loss.item() * n
                count += n
        return total / count

    with model.disable_adapter():
        base = loss()
    return {"base": base, "adapter": loss()}


def evaluate(
    replier: StreamingReplier, held_out: Sequence[Pair], trained: Sequence[Pair], max_length: int = 512, losses: dict[str, float] | None = None
) -> dict[str, Any]:
    """Every metric for base, fine-tuned and real replies, plus each held-out reply for reading.

    ``replier`` writes the replies (llama.cpp on a CPU). The held-out losses are ``losses`` when the
    caller has them (a training run has just measured both on these pairs), else measured here,
    which needs the transformers model.
    """
    from tqdm.auto import tqdm

    if losses is None:
        if not isinstance(replier, Replier):
            raise TypeError(f"the held-out losses need the transformers model, not {replier.backend}: pass losses=held_out_losses(...)")
        losses = held_out_losses(replier, held_out, max_length)
    signature = replier.renderer.persona.signature
    generated: dict[str, list[str]] = {"base": [], "adapter": []}
    stopped = {"base": 0, "adapter": 0}
    comments = [pair.comment for pair in held_out]
    for replies in tqdm(replier.replies(comments, EVAL_SETTINGS, background=False), total=len(comments), desc=f"voice evaluation ({replier.backend})"):
        for reply in replies:
            generated[reply.row].append(reply.text)
            stopped[reply.row] += reply.stopped
    trained_replies = {p.response.strip() for p in trained}
    table = {
        "base": reply_stats(generated["base"], held_out, signature, trained_replies),
        "adapter": reply_stats(generated["adapter"], held_out, signature, trained_replies),
        "real": reply_stats([p.response for p in held_out], held_out, signature, trained_replies),
    }
    for source in ("base", "adapter"):
        table[source]["stopped_rate"] = stopped[source] / len(held_out)
        table[source]["held_out_loss"] = losses[source]
    return {
        "comments": len(held_out),
        "settings": {"max_new_tokens": EVAL_SETTINGS.max_new_tokens, "decoding": "greedy", "backend": replier.backend},
        "table": table,
        "replies": [{"comment": p.comment, "real": p.response, "base": b, "adapter": a} for p, b, a in zip(held_out, generated["base"], generated["adapter"])],
    }


ROWS = [
    ("length_ratio", "reply length / real reply length (median)", "{:.2f}"),
    ("signature_rate", "ends with the signature", "{:.0%}"),
    ("emoji_rate", "contains an emoji", "{:.0%}"),
    ("same_language_rate", "replies in the comment's language", "{:.0%}"),
    ("memorized_rate", "copied verbatim from the training replies", "{:.0%}"),
    ("stopped_rate", "ends on its own (not at the token cap)", "{:.0%}"),
    ("held_out_loss", "held-out loss on reply tokens", "{:.3f}"),
]


def markdown_table(result: dict[str, Any]) -> str:
    lines = ["| metric | " + " | ".join(LABELS[s] for s in SOURCES) + " |", "|---|---|---|---|"]
    for key, label, fmt in ROWS:
        cells = []
        for source in SOURCES:
            value = result["table"][source].get(key)
            cells.append("–" if value is None else fmt.format(value))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    settings = result["settings"]
    backend = f", replies by {settings['backend']}" if "backend" in settings else ""
    return "\n".join(lines) + f"\n\n{result['comments']} held-out comments, greedy decoding, at most {settings['max_new_tokens']} new tokens{backend}.\n"


@exits_on_error
def main(argv: list[str] | None = None) -> int:
    from inference.default_model import DEFAULT_ADAPTER, DEFAULT_BASE_MODEL, ROOT
    from inference.generate import load_replier
    from training.data import load_pairs

    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", default=str(DEFAULT_ADAPTER), help="adapter folder to evaluate")
    parser.add_argument("--base-model", default=DEFAULT_BASE_MODEL)
    parser.add_argument("--eval-data", default=str(ROOT / "data" / "heldout.jsonl"), help="held-out pairs with the creator's real replies")
    parser.add_argument("--data", default=str(ROOT / "data" / "train.jsonl"), help="the training pairs (for the memorization rate)")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default="nf4", help="how the base is stored for the transformers backend: nf4 (4-bit), int8 or none")
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="what writes the replies (auto: llama.cpp on a CPU); the losses come from transformers")
    parser.add_argument("--json", type=Path, help="also write the full result (with every reply) here")
    args = parser.parse_args(argv)
    held_out = load_pairs(args.eval_data)
    scorer = load_replier(args.base_model, args.adapter, args.quantization, backend="transformers")
    replier = load_replier(args.base_model, args.adapter, args.quantization, backend=args.backend)
    result = evaluate(replier, held_out, load_pairs(args.data), losses=held_out_losses(scorer, held_out, 512))
    print(markdown_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
