"""Reply quality of every pane on the held-out set, in one run: the content measures
(inference.quality), chrF to the creator's real reply and the held-out loss, for each decoding
setting asked for; the time 30 comments take through ``inference.compare``; and the replies,
shuffled with their sources hidden, for a blind reading.

    python -m bench.reply_quality [--decoding 1.0:0 1.3:0 1.0:4] [--examples 2 4] [--out bench/out/reply_quality]

``--decoding PENALTY:NGRAM`` is a repetition penalty and a no-repeat n-gram size (0 = off); the
default is the shipped GenerationSettings. ``--examples K`` is how many of the creator's pairs the
examples panes show (default: the shipped K_EXAMPLES). Writes ``OUT/result.json`` (every table and
reply), ``OUT/blind.jsonl`` (id, comment, reply; shuffled) and ``OUT/blind_key.json`` (id -> pane,
examples shown and decoding), and prints Markdown tables for bench/RESULTS.md with the machine and
its CPU flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from pathlib import Path

from inference.compare import compare, read_comments
from inference.default_model import DEFAULT_ADAPTER, DEFAULT_BASE_MODEL, ROOT
from inference.engines import load_replier
from inference.generate import PANE_ROW, GenerationSettings
from inference.retrieval import K_EXAMPLES
from training.data import load_pairs
from training.evaluate import EVAL_SETTINGS, evaluate, held_out_losses, markdown_table
from training.report import environment

PANES = tuple(PANE_ROW)  # every pane, the fine-tuned one with examples too


def decoding(text: str) -> GenerationSettings:
    penalty, _, ngram = text.partition(":")
    return dataclasses.replace(EVAL_SETTINGS, repetition_penalty=float(penalty), no_repeat_ngram=int(ngram or 0))


def main() -> None:
    args = _parser().parse_args()
    held_out, trained = load_pairs(args.eval_data), load_pairs(args.data)
    scorer = load_replier(args.base_model, args.adapter, "none", backend="transformers")
    replier = load_replier(args.base_model, args.adapter, backend="auto")
    args.out.mkdir(parents=True, exist_ok=True)
    runs = [(k, settings) for k in args.examples for settings in args.decoding]
    results = []
    for k in args.examples:
        for bank in (scorer.examples, replier.examples):
            if bank is not None:
                bank.k = k
        losses = held_out_losses(scorer, held_out, 512, PANES)
        for settings in args.decoding:
            started = time.perf_counter()
            result = evaluate(replier, held_out, trained, losses, panes=PANES, settings=settings)
            result["seconds"] = time.perf_counter() - started
            results.append(result)
            # Written after every setting: a long grid stopped early keeps what it measured.
            (args.out / "result.json").write_text(
                json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
            )
            print(markdown_table(result), flush=True)

    comments = read_comments(ROOT / "data" / "heldout.jsonl")[:30]
    started = time.perf_counter()
    list(compare(replier, comments, GenerationSettings(), replier.renderer.persona.signature))
    compare_s = time.perf_counter() - started
    blind = write_blind_file(results, runs, args.blind, args.out)

    env = environment()
    print(
        f"{time.strftime('%Y-%m-%d')}, {env['cpu']} ({env.get('cpu_flags', '?')}), {env['cores']} "
        "cores; llama.cpp replies, losses from transformers (full-precision base)\n"
    )
    for (k, settings), result in zip(runs, results):
        print(
            f"### {k} examples, repetition penalty {settings.repetition_penalty}, no-repeat "
            f"n-gram {settings.no_repeat_ngram} ({result['seconds']:.0f} s)\n"
        )
        print(markdown_table(result))
    print(
        f"30 comments through inference.compare (panes {', '.join(replier.panes)}, "
        f"{args.examples[-1]} examples, max {GenerationSettings().max_new_tokens} new tokens): {compare_s:.1f} s"
    )
    print(f"blind reading file: {args.out / 'blind.jsonl'} ({blind} replies); key: {args.out / 'blind_key.json'}")


def write_blind_file(results: list[dict], runs: list[tuple[int, GenerationSettings]], per_pane: int, out: Path) -> int:
    """out/blind.jsonl: ``per_pane`` replies of every pane and setting, shuffled, without their
    source; out/blind_key.json says which is which. The number of replies written."""
    blind, key = [], {}
    rng = random.Random(0)
    for r, result in enumerate(results):
        for pane in PANES:
            for i, row in enumerate(result["replies"][:per_pane]):
                blind.append({"comment": row["comment"], "reply": row[pane]})
                k, settings = runs[r]
                key_entry = {
                    "pane": pane,
                    "examples_shown": k,
                    "decoding": dataclasses.asdict(settings),
                    "comment_index": i,
                }
                blind[-1]["_key"] = key_entry
    rng.shuffle(blind)
    with (out / "blind.jsonl").open("w", encoding="utf-8") as f:
        for n, item in enumerate(blind):
            key[n] = item.pop("_key")
            f.write(json.dumps({"id": n, **item}, ensure_ascii=False) + "\n")
    (out / "blind_key.json").write_text(json.dumps(key, indent=1) + "\n", encoding="utf-8")
    return len(blind)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", default=str(DEFAULT_ADAPTER))
    parser.add_argument("--base-model", default=DEFAULT_BASE_MODEL)
    parser.add_argument("--eval-data", type=Path, default=ROOT / "data" / "heldout.jsonl")
    parser.add_argument(
        "--data",
        type=Path,
        default=ROOT / "data" / "train.jsonl",
        help="the training pairs (for the memorization rate)",
    )
    parser.add_argument(
        "--decoding", nargs="+", type=decoding, default=[EVAL_SETTINGS], help="PENALTY:NGRAM settings to compare"
    )
    parser.add_argument(
        "--examples",
        nargs="+",
        type=int,
        default=[K_EXAMPLES],
        help="how many of the creator's pairs the examples panes show (one run each)",
    )
    parser.add_argument(
        "--blind", type=int, default=20, help="held-out comments per pane and setting in the blind file"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "reply_quality")
    return parser


if __name__ == "__main__":
    main()
