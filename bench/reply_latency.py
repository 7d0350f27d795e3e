"""Reply latency of the app's model: both replies from one mixed batch, vs one reply alone, vs two
replies one after the other, over the held-out comments.

    python -m bench.reply_latency [--comments data/heldout.jsonl] [--limit 23] [--max-new-tokens 160]

Prints a Markdown table (median and p90 of time to first token and total time per comment) to
paste into bench/RESULTS.md, with the machine and library versions.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from inference.compare import read_comments
from inference.default_model import DEFAULT_BASE_MODEL
from inference.generate import GenerationSettings, load_replier
from inference.settings import DEFAULT_ADAPTER, ROOT
from training.report import environment


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comments", type=Path, default=ROOT / "data" / "heldout.jsonl")
    parser.add_argument("--limit", type=int, default=23)
    parser.add_argument("--max-new-tokens", type=int, default=GenerationSettings.max_new_tokens)
    parser.add_argument("--base-model", default=DEFAULT_BASE_MODEL)
    parser.add_argument("--adapter", default=str(DEFAULT_ADAPTER))
    parser.add_argument("--quantization", choices=("nf4", "none"), default="nf4")
    args = parser.parse_args()

    replier = load_replier(args.base_model, args.adapter, args.quantization)
    replier.warm_up()
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    comments = read_comments(args.comments)[: args.limit]
    modes = {
        "both replies, one mixed batch (the app)": [("base", "adapter")],
        "one reply alone (base + prompt)": [("base",)],
        "one reply alone (fine-tuned)": [("adapter",)],
        "two replies, one after the other": [("base",), ("adapter",)],
    }
    results: dict[str, dict[str, list[float]]] = {m: {"first": [], "total": [], "tokens": []} for m in modes}
    for comment in comments:
        for mode, passes in modes.items():
            started = time.perf_counter()
            first = None
            tokens = 0
            for rows in passes:
                replies = replier.reply(comment, settings, rows=rows)
                if first is None:
                    first = min(r.first_token_s for r in replies if r.first_token_s is not None)
                tokens += sum(len(r.token_ids) for r in replies)
            results[mode]["first"].append(first or 0.0)
            results[mode]["total"].append(time.perf_counter() - started)
            results[mode]["tokens"].append(tokens)

    env = environment()
    print(f"{time.strftime('%Y-%m-%d')}, {env['cpu']}, {env['cores']} cores, torch {env['libraries']['torch']}, "
          f"transformers {env['libraries']['transformers']}, peft {env['libraries']['peft']}, bitsandbytes {env['libraries']['bitsandbytes']}")
    print(f"{len(comments)} held-out comments, {args.quantization} base, greedy, max {args.max_new_tokens} new tokens\n")
    # A batch runs as many decoding steps as its longer reply, so each comment's times are compared
    # with the slower of its two replies generated alone.
    alone = [max(b, a) for b, a in zip(results["one reply alone (base + prompt)"]["total"], results["one reply alone (fine-tuned)"]["total"])]
    print("| mode | first token p50 | p90 | total p50 | p90 | tokens/comment | x the longer reply alone (median) |")
    print("|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        ratio = statistics.median(t / a for t, a in zip(r["total"], alone))
        print(
            f"| {mode} | {statistics.median(r['first']):.2f} s | {percentile(r['first'], 0.9):.2f} s | "
            f"{statistics.median(r['total']):.2f} s | {percentile(r['total'], 0.9):.2f} s | {statistics.mean(r['tokens']):.0f} | {ratio:.2f} |"
        )


if __name__ == "__main__":
    main()
