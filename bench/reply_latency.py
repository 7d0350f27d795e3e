"""Reply latency per backend: the app's two panes, each reply alone, many comments at once (the
voice evaluation and `inference.compare`), and raw llama.cpp single-stream decoding of the same GGUF
file as the ceiling, all in one run on one machine.

    python -m bench.reply_latency [--backends llama.cpp transformers] [--limit 8] [--max-new-tokens 160]
        [--examples 2 4]

Prints Markdown tables to paste into bench/RESULTS.md, with the machine, its CPU flags and the
library versions.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from inference.compare import read_comments
from inference.default_model import DEFAULT_ADAPTER, DEFAULT_BASE_MODEL, ROOT
from inference.engines import load_replier
from inference.generate import GenerationSettings, StreamingReplier
from inference.llamacpp import LlamaCppReplier
from inference.loading import ENGINES
from inference.retrieval import K_EXAMPLES
from training.report import environment

MODES = {
    "the app's panes (prompt + examples, fine-tuned + examples)": ("examples", "adapter+examples"),
    "one reply alone (prompt + examples)": ("examples",),
    "one reply alone (fine-tuned + examples)": ("adapter+examples",),
    "one reply alone (fine-tuned, no examples)": ("adapter",),
    "one reply alone (persona prompt only)": ("base",),
}
APP_MODE = "the app's panes (prompt + examples, fine-tuned + examples)"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def raw_llama_decode(gguf: Path, prompt_ids: list[int], tokens: int) -> float:
    """Tokens/s of llama-cpp-python's own ``Llama`` decoding one sequence greedily, no replytune code."""
    import numpy as np
    from llama_cpp import Llama

    from inference.llamacpp import cpu_threads

    llm = Llama(str(gguf), n_ctx=2048, n_threads=cpu_threads(), n_threads_batch=cpu_threads(), verbose=False)
    llm.eval(prompt_ids)
    started = time.perf_counter()
    for _ in range(tokens):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    return tokens / (time.perf_counter() - started)


def latency_table(
    replier: StreamingReplier, comments: list[str], settings: GenerationSettings
) -> tuple[list[str], float]:
    """Rows of the per-comment table; the median decode speed of the longer reply in the app's mode."""
    results = {mode: {"first": [], "total": [], "tokens": []} for mode in MODES}
    longer_speed = []
    for comment in comments:
        for mode, panes in MODES.items():
            started = time.perf_counter()
            replies = replier.reply(comment, settings, panes)
            results[mode]["total"].append(time.perf_counter() - started)
            results[mode]["first"].append(max(r.first_token_s for r in replies))  # the later pane's
            results[mode]["tokens"].append(sum(len(r.token_ids) for r in replies))
            if mode == APP_MODE:
                longer = max(replies, key=lambda r: len(r.token_ids))
                # Decoding speed: the tokens after the first, over the time after the first.
                longer_speed.append((len(longer.token_ids) - 1) / max(1e-9, longer.seconds - longer.first_token_s))
    # Both replies run as many steps as the longer one, so each comment is compared with the slower
    # of its two replies alone.
    alone = [
        max(b, a)
        for b, a in zip(
            results["one reply alone (prompt + examples)"]["total"],
            results["one reply alone (fine-tuned + examples)"]["total"],
        )
    ]
    lines = []
    for mode, r in results.items():
        ratio = statistics.median(t / a for t, a in zip(r["total"], alone))
        lines.append(
            f"| {replier.backend} | {mode} | {statistics.median(r['first']):.2f} s | "
            f"{percentile(r['first'], 0.9):.2f} s | {statistics.median(r['total']):.2f} s | "
            f"{percentile(r['total'], 0.9):.2f} s | {statistics.mean(r['tokens']):.0f} | {ratio:.2f} |"
        )
    return lines, statistics.median(longer_speed)


def main() -> None:
    args = _parser().parse_args()
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    comments = read_comments(args.comments)[: args.limit]
    many = [c for path in args.many for c in read_comments(path)]
    table = [
        (
            "| backend | mode | first token p50 | p90 | total p50 | p90 | tokens/comment "
            "| x the longer reply alone (median) |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for backend in args.backends:
        lines, backend_notes = measure_backend(backend, args, comments, many, settings)
        table += lines
        notes += backend_notes

    env = environment()
    libs = env["libraries"]
    print(
        f"{time.strftime('%Y-%m-%d')}, {env['cpu']} ({env.get('cpu_flags', '?')}), {env['cores']} cores; "
        + ", ".join(f"{name} {libs[name]}" for name in sorted(libs))
    )
    print(
        f"{len(comments)} held-out comments, greedy, max {args.max_new_tokens} "
        f"new tokens; transformers on a {args.quantization} base\n"
    )
    print("\n".join(table) + "\n")
    print("\n".join(f"- {note}" for note in notes))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comments", type=Path, default=ROOT / "data" / "heldout.jsonl")
    parser.add_argument(
        "--many",
        type=Path,
        nargs="+",
        default=[ROOT / "data" / "heldout.jsonl", ROOT / "data" / "train.jsonl"],
        help="comments for the many-at-once rows",
    )
    parser.add_argument("--limit", type=int, default=8, help="comments in the per-comment table")
    parser.add_argument("--backends", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--max-new-tokens", type=int, default=GenerationSettings.max_new_tokens)
    parser.add_argument("--base-model", default=DEFAULT_BASE_MODEL)
    parser.add_argument("--adapter", default=str(DEFAULT_ADAPTER))
    parser.add_argument(
        "--quantization", choices=("nf4", "none"), default="nf4", help="the transformers backend's base"
    )
    parser.add_argument(
        "--examples",
        nargs="+",
        type=int,
        default=[K_EXAMPLES],
        help="how many of the creator's pairs the examples panes show (a table each)",
    )
    return parser


def measure_backend(
    backend: str, args: argparse.Namespace, comments: list[str], many: list[str], settings: GenerationSettings
) -> tuple[list[str], list[str]]:
    """One backend's table rows, and its notes: load time, the longer reply's speed, many comments
    at once, and (llama.cpp) the share of llama.cpp's own decoding speed."""
    started = time.perf_counter()
    replier = load_replier(args.base_model, args.adapter, args.quantization, backend=backend)
    replier.warm_up()
    notes = [f"{backend}: loaded in {time.perf_counter() - started:.1f} s"]
    lines = []
    for k in args.examples:  # the last one stays for the many-at-once rows
        if replier.examples is not None:
            replier.examples.k = k
        rows, speed = latency_table(replier, comments, settings)
        lines += [row.replace("+ examples", f"+ {k} examples") for row in rows]
        notes.append(
            f"{backend}, {k} examples: the longer reply of the app's pair decodes at {speed:.1f} tokens/s (median)"
        )
    for count in (23, 30):
        started = time.perf_counter()
        done = list(
            replier.replies(
                many[:count], GenerationSettings(max_new_tokens=120 if count == 23 else settings.max_new_tokens)
            )
        )
        notes.append(
            f"{backend}: {len(done)} comments, every pane ({', '.join(replier.panes)}; max "
            f"{120 if count == 23 else settings.max_new_tokens} new tokens): {time.perf_counter() - started:.1f} s"
        )
    if isinstance(replier, LlamaCppReplier):  # the ceiling is llama.cpp's own decoding of the same file
        ceiling = raw_llama_decode(replier.model_path, replier.prompt(comments[0]).input_ids, args.max_new_tokens)
        notes.append(
            f"raw llama.cpp single-stream greedy decode of {replier.model_path.name}: {ceiling:.1f} tokens/s; "
            f"the app's longer reply reaches {speed / ceiling:.0%} of it"
        )
    replier.close()
    return lines, notes


if __name__ == "__main__":
    main()
