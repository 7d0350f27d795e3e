"""`python -m training.evaluate`: does the fine-tuned model sound like the creator?

On the held-out comments, the base model (+ persona prompt) and the adapter each reply (greedy, so
two runs agree), and both are compared with the creator's real replies: length ratio to the real
reply, signature rate, emoji rate, replying in the comment's language, replies copied verbatim from
the training set (memorization), the content measures of inference.quality (loops, talk about being
an AI, replies cut at the cap, chrF to the real reply) and the held-out loss on reply tokens. Runs at the end of every
training run; the table goes into training_summary.json, the model card and the console.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import re
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from errors import exits_on_error
from inference.generate import (
    BEST_PROMPT_PANE,
    PANE_NAMES,
    PANE_ROW,
    WITH_EXAMPLES,
    GenerationSettings,
    Pane,
    StreamingReplier,
)
from inference.loading import BACKENDS, QUANTIZATIONS
from inference.quality import content_stats, loops, talks_like_an_ai
from inference.transformers_engine import Replier
from prompts.render import IGNORE_INDEX, is_signed
from training.data import Pair

if TYPE_CHECKING:
    import torch

    from training.config import TrainConfig
    from training.examples import Prepared

EVAL_SETTINGS = GenerationSettings(max_new_tokens=120)
EMOJI = re.compile("[\U0001f300-\U0001faff\u2600-\u27bf\U0001f1e6-\U0001f1ff]")
MIN_WORDS_FOR_LANGUAGE = 4  # language detection on shorter text is a coin toss


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


def reply_stats(
    replies: Sequence[str], pairs: Sequence[Pair], signature: str | None, trained_replies: set[str]
) -> dict[str, float | None]:
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


def reply_log_probs(
    replier: Replier, pairs: Sequence[Pair], max_length: int, pane: Pane = "adapter"
) -> list[tuple[float, int]]:
    """Each pair's reply (with its end of turn) scored after its prompt: the summed log-probability
    of its tokens and their count. The pane's examples go in as earlier turns where it shows them."""
    import torch

    from training.collate import ReplyCollator

    collate = ReplyCollator(replier.tokenizer.pad_token_id)
    model = replier.model
    device = next(model.parameters()).device
    scores = []
    with torch.inference_mode(), model.disable_adapter() if PANE_ROW[pane] == "base" else contextlib.nullcontext():
        for pair in pairs:
            shown = replier.examples.similar(pair.comment) if pane in WITH_EXAMPLES and replier.examples else ()
            # Room for the examples as well, so that they never cut the comment itself.
            e = replier.renderer.example(pair.comment, pair.response, max_length * (1 + len(shown)), shown)
            n = sum(label != IGNORE_INDEX for label in e.labels)
            batch = collate([{"input_ids": e.input_ids, "labels": e.labels}])
            scores.append((-model(**{k: v.to(device) for k, v in batch.items()}).loss.item() * n, n))
    return scores


def held_out_losses(
    replier: Replier, pairs: Sequence[Pair], max_length: int, panes: Sequence[Pane] = ("base", "adapter")
) -> dict[str, float]:
    """Loss on the reply tokens of the held-out pairs for each pane: with the adapter off or on, and
    with the creator's retrieved examples as earlier turns where the pane shows them."""
    losses = {}
    for pane in panes:
        scores = reply_log_probs(replier, pairs, max_length, pane)
        losses[pane] = -sum(lp for lp, _ in scores) / sum(n for _, n in scores)
    return losses


def evaluate(
    replier: StreamingReplier,
    held_out: Sequence[Pair],
    trained: Sequence[Pair],
    losses: dict[str, float],
    panes: Sequence[Pane] | None = None,
    settings: GenerationSettings = EVAL_SETTINGS,
) -> dict[str, Any]:
    """Every metric for each pane (by default every pane the replier offers) and the real replies,
    plus each held-out reply for reading.

    ``replier`` writes the replies (llama.cpp on a CPU) and may be any engine; the held-out losses
    are ``losses``, which the caller measures with the transformers model (:func:`held_out_losses`;
    a training run has just measured most of them on these pairs).
    """
    from tqdm.auto import tqdm

    panes = tuple(panes or replier.panes)
    signature = replier.renderer.persona.signature
    generated: dict[str, list[str]] = {pane: [] for pane in panes}
    stopped: dict[str, list[bool]] = {pane: [] for pane in panes}
    comments = [pair.comment for pair in held_out]
    for replies in tqdm(
        replier.replies(comments, settings, panes, background=False),
        total=len(comments),
        desc=f"voice evaluation ({replier.backend})",
    ):
        for reply in replies:
            generated[reply.pane].append(reply.text)
            stopped[reply.pane].append(reply.stopped)
    trained_replies = {p.response.strip() for p in trained}
    real = [p.response for p in held_out]
    table: dict[str, dict[str, Any]] = {}
    for pane in panes:
        table[pane] = {
            **reply_stats(generated[pane], held_out, signature, trained_replies),
            **content_stats(generated[pane], stopped[pane], real),
            "stopped_rate": sum(stopped[pane]) / len(held_out),
            "held_out_loss": losses.get(pane),
        }
    table["real"] = {
        **reply_stats(real, held_out, signature, trained_replies),
        "loop_rate": sum(map(loops, real)) / len(real),
        "ai_talk_rate": sum(map(talks_like_an_ai, real)) / len(real),
    }
    shown = replier.examples.k if replier.examples and any(p in WITH_EXAMPLES for p in panes) else None
    return {
        "comments": len(held_out),
        "settings": {**dataclasses.asdict(settings), "backend": replier.backend, "examples_shown": shown},
        "panes": list(panes),
        "table": table,
        "replies": [
            {"comment": p.comment, "real": p.response, **{pane: generated[pane][i] for pane in panes}}
            for i, p in enumerate(held_out)
        ],
    }


ROWS = [
    ("loop_rate", "loops or repeats itself", "{:.0%}"),
    ("ai_talk_rate", "talks about being an AI", "{:.0%}"),
    ("cut_rate", "cut at the token cap", "{:.0%}"),
    ("chrf", "chrF to the real reply (0-100)", "{:.1f}"),
    ("held_out_loss", "held-out loss on reply tokens", "{:.3f}"),
    ("length_ratio", "reply length / real reply length (median)", "{:.2f}"),
    ("signature_rate", "ends with the signature", "{:.0%}"),
    ("emoji_rate", "contains an emoji", "{:.0%}"),
    ("same_language_rate", "replies in the comment's language", "{:.0%}"),
    ("memorized_rate", "copied verbatim from the training replies", "{:.0%}"),
]


def markdown_table(result: dict[str, Any]) -> str:
    """The voice table: one column per pane and the creator's real replies."""
    sources = [*result.get("panes", ("base", "adapter")), "real"]
    lines = [
        "| metric | " + " | ".join(PANE_NAMES.get(s, "creator's real replies") for s in sources) + " |",
        "|---" * (len(sources) + 1) + "|",
    ]
    for key, label, fmt in ROWS:
        cells = []
        for source in sources:
            value = result["table"][source].get(key)
            cells.append("–" if value is None else fmt.format(value))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    settings = result["settings"]
    backend = f", replies by {settings['backend']}" if "backend" in settings else ""
    shown = (
        f"; the examples panes show the creator's {settings['examples_shown']} most similar past pairs"
        if settings.get("examples_shown")
        else ""
    )
    footer = (
        f"{result['comments']} held-out comments, {decoding_text(settings)}, "
        f"at most {settings['max_new_tokens']} new tokens{backend}{shown}."
    )
    return "\n".join(lines) + f"\n\n{footer}\n"


VERDICT_MEASURES = [  # (key, what it is, higher is better)
    ("chrf", "chrF to the real replies", True),
    ("held_out_loss", "held-out loss", False),
    ("loop_rate", "loops", False),
    ("ai_talk_rate", "AI talk", False),
]


def verdict(result: dict[str, Any]) -> str:
    """One plain sentence, with the numbers: where the app's fine-tuned pane beats the app's prompt
    pane (the stronger prompt: the creator's examples where the adapter has them) and where it does
    not. '' for a table without both (or from before chrF)."""
    table = result["table"]
    prompt_pane = BEST_PROMPT_PANE if BEST_PROMPT_PANE in table else "base"
    tuned_pane = "adapter+examples" if "adapter+examples" in table else "adapter"
    if table.get(prompt_pane, {}).get("chrf") is None or table.get(tuned_pane, {}).get("chrf") is None:
        return ""
    tuned, prompt = table[tuned_pane], table[prompt_pane]
    better, worse = [], []
    for key, name, higher in VERDICT_MEASURES:
        if tuned.get(key) is None or prompt.get(key) is None or tuned[key] == prompt[key]:
            continue
        fmt = "{:.0%}" if key.endswith("_rate") else ("{:.1f}" if key == "chrf" else "{:.3f}")
        text = f"{name} ({fmt.format(tuned[key])} vs {fmt.format(prompt[key])})"
        (better if (tuned[key] > prompt[key]) == higher else worse).append(text)
    head = f"On {result['comments']} held-out comments, {PANE_NAMES[tuned_pane]} against {PANE_NAMES[prompt_pane]}: "
    parts = []
    if better:
        parts.append("better on " + ", ".join(better))
    if worse:
        parts.append("worse on " + ", ".join(worse))
    return head + ("; ".join(parts) or "no difference") + "."


def decoding_text(settings: dict[str, Any]) -> str:
    """How the replies were decoded, in words (the settings saved with a voice table)."""
    parts = [
        "greedy decoding" if not settings.get("temperature") else f"sampling at temperature {settings['temperature']}"
    ]
    if settings.get("repetition_penalty", 1.0) != 1.0:
        parts.append(f"repetition penalty {settings['repetition_penalty']}")
    if settings.get("no_repeat_ngram"):
        parts.append(f"no {settings['no_repeat_ngram']}-token phrase twice")
    return ", ".join(parts)


def voice_evaluation(
    prepared: Prepared, model: torch.nn.Module, losses: dict[str, float], result: dict[str, Any]
) -> None:
    """The voice evaluation at the end of a training run (training.run): replies to the held-out
    comments with and without the just-trained adapter, scored by evaluate() into ``result``."""
    from inference.adapter_files import HELD_OUT_FILE
    from inference.loading import fsdp_enabled
    from training.model import ready_for_generation

    config = prepared.config
    if config.method != "lora" or prepared.seq2seq:
        # The comparison generates base and fine-tuned replies from one model with and without the
        # adapter, which needs LoRA on a causal LM; the held-out losses still compare the two.
        print("voice fidelity: skipped (it needs a LoRA adapter on a causal LM)")
        return
    if fsdp_enabled():
        # Each process holds a shard of the model: the main one cannot generate alone. The adapter
        # folder carries its held-out pairs.
        print(
            "voice fidelity: skipped under FSDP (each GPU holds a shard of the model); on a machine "
            f"that holds the whole model: python -m training.evaluate --adapter {config.output_dir} "
            f"--base-model {config.base_model} --eval-data {Path(config.output_dir) / HELD_OUT_FILE}"
        )
        return
    ready_for_generation(model)
    from inference.retrieval import K_EXAMPLES, ExampleBank

    # An adapter trained with N examples in its prompts is shown N, as the app will show it.
    examples = ExampleBank(
        [(p.comment, p.response) for p in prepared.train_pairs], config.examples_in_prompt or K_EXAMPLES
    )
    trained = Replier(model, prepared.tokenizer, prepared.renderer, has_adapter=True, examples=examples)
    # The held-out losses of the table are the ones the run measured, with the adapter off (before
    # training) and on: the same reply tokens of the same pairs.
    replier = voice_replier(config, trained, Path(config.output_dir))
    # The run measured the losses of its own prompts, before training and after: the persona-only
    # panes', or, where it trained with examples in its prompts (as many as the panes show), the
    # examples panes'. The other two are measured here.
    measured = (
        {"examples": "base", "adapter+examples": "adapter"}
        if config.examples_in_prompt
        else {"base": "base", "adapter": "adapter"}
    )
    losses = {
        **{pane: losses[run] for pane, run in measured.items()},
        **held_out_losses(
            trained, prepared.eval_pairs, config.max_length, [pane for pane in PANE_ROW if pane not in measured]
        ),
    }
    result["voice"] = evaluate(replier, prepared.eval_pairs, prepared.train_pairs, losses)
    print("voice fidelity on the held-out comments:\n" + markdown_table(result["voice"]))


def voice_replier(config: TrainConfig, trained: Replier, output: Path) -> StreamingReplier:
    """What writes the voice evaluation's replies: the saved adapter in llama.cpp on a CPU (seconds
    instead of minutes), or the trained model itself."""
    from inference.engines import engine_replier

    return engine_replier(
        config.backend, config.base_model, str(output), trained.renderer, trained.examples, lambda: trained
    )


@exits_on_error
def main(argv: list[str] | None = None) -> int:
    from inference.default_model import DEFAULT_ADAPTER, DEFAULT_BASE_MODEL, ROOT
    from inference.engines import load_replier
    from training.data import load_pairs

    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", default=str(DEFAULT_ADAPTER), help="adapter folder to evaluate")
    parser.add_argument("--base-model", default=DEFAULT_BASE_MODEL)
    parser.add_argument(
        "--eval-data",
        default=str(ROOT / "data" / "heldout.jsonl"),
        help="held-out pairs with the creator's real replies",
    )
    parser.add_argument(
        "--data", default=str(ROOT / "data" / "train.jsonl"), help="the training pairs (for the memorization rate)"
    )
    parser.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        default="nf4",
        help="how the base is stored for the transformers backend: nf4 (4-bit), int8 or none",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="what writes the replies (auto: llama.cpp on a CPU); the losses come from transformers",
    )
    parser.add_argument(
        "--panes",
        nargs="+",
        choices=list(PANE_ROW),
        help="which panes to evaluate (default: every pane the app shows for this adapter)",
    )
    parser.add_argument("--json", type=Path, help="also write the full result (with every reply) here")
    args = parser.parse_args(argv)
    held_out = load_pairs(args.eval_data)
    scorer = load_replier(args.base_model, args.adapter, args.quantization, backend="transformers")
    replier = load_replier(args.base_model, args.adapter, args.quantization, backend=args.backend)
    panes = tuple(args.panes or replier.panes)
    result = evaluate(
        replier, held_out, load_pairs(args.data), held_out_losses(scorer, held_out, 512, panes), panes=panes
    )
    print(markdown_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
