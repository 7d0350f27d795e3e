"""Preference tuning on the model's own drafts against the supervised run it starts from (issue 29):
a supervised ``training.run`` on ``data/``, then ``training.prefer --self-pairs`` on its adapter,
each timed in its own process as a user runs them; then both adapters on the held-out comments
with plain greedy decoding (no repetition rules): loops, AI talk, cut at the cap, chrF to the real
reply, the held-out loss on the real reply tokens, and the preference accuracy on held-out
self-pairs (the supervised adapter's flagged drafts of the held-out comments as rejected, the real
replies as chosen: the share where the tuned adapter moved the pair's log-odds the right way
against the supervised one, DPO's implicit reward).

    python -m bench.preference [--out bench/out/preference] [--supervised DIR] [training.prefer flags]

``--supervised DIR`` reuses a finished supervised run (its time is then not measured); any other
flag goes to ``training.prefer`` (e.g. ``--sft-weight 1``). Writes
``OUT/result.json`` and ``OUT/blind.jsonl`` / ``OUT/blind_key.json`` (20 held-out replies of each
adapter, shuffled, sources hidden) and prints Markdown for bench/RESULTS.md with the CPU's flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import subprocess
import sys
import time
from pathlib import Path

from inference.adapter_files import SUMMARY_FILE
from inference.default_model import DEFAULT_BASE_MODEL, ROOT
from inference.engines import load_replier
from training.data import Pair, load_pairs
from training.evaluate import EVAL_SETTINGS, evaluate, held_out_losses, markdown_table, reply_log_probs
from training.prefer import draft
from training.preferences import PreferenceSummary, select_self_pairs
from training.report import environment

GREEDY = dataclasses.replace(EVAL_SETTINGS, repetition_penalty=1.0, no_repeat_ngram=0)
SELF_PAIR_TOKENS = 120  # training.prefer's --max-new-tokens default: a draft that reaches it is cut


def timed(command: list[str], log: Path) -> float:
    """Run ``python -m ...`` in its own process, its output to ``log``; the wall seconds."""
    started = time.perf_counter()
    with log.open("w", encoding="utf-8") as out:
        subprocess.run([sys.executable, "-m", *command], stdout=out, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "preference")
    parser.add_argument("--supervised", type=Path, help="a finished training.run output folder to start from")
    args, prefer_flags = parser.parse_known_args()
    args.out.mkdir(parents=True, exist_ok=True)
    supervised, preferred = args.supervised or args.out / "supervised", args.out / "preferred"
    times: dict[str, float] = {}
    if args.supervised is None:
        times["supervised"] = timed(["training.run", "--output-dir", str(supervised)], args.out / "supervised.log")
    times["preference"] = timed(
        [
            "training.prefer",
            "--adapter",
            str(supervised),
            "--self-pairs",
            "--output-dir",
            str(preferred),
            *prefer_flags,
        ],
        args.out / "preference.log",
    )
    # Each run's own clock, before its evaluation (the supervised run's voice evaluation scores every
    # pane with held-out losses; the preference run's only the adapter before and after).
    for name, folder in (("supervised", supervised), ("preference", preferred)):
        summary = json.loads((folder / SUMMARY_FILE).read_text(encoding="utf-8"))
        times[f"{name} before evaluation"] = summary["wall_seconds"]
    print(f"wall: {times}", flush=True)

    held_out, trained = load_pairs(ROOT / "data" / "heldout.jsonl"), load_pairs(ROOT / "data" / "train.jsonl")
    # The held-out self-pairs: the supervised adapter's own flagged drafts, as training.prefer picks them.
    replier = load_replier(DEFAULT_BASE_MODEL, str(supervised))
    summary = PreferenceSummary()
    pairs = select_self_pairs(held_out, draft(replier, [p.comment for p in held_out], SELF_PAIR_TOKENS), summary)
    del replier

    result: dict = {
        "prefer_flags": prefer_flags,
        "times_s": times,
        "held_out_self_pairs": len(pairs),
        "selected": dict(summary.selected),
    }
    logps: dict[str, list[list[float]]] = {}
    for name, folder in (("supervised", supervised), ("preferred", preferred)):
        scorer = load_replier(DEFAULT_BASE_MODEL, str(folder), "none", backend="transformers")
        losses = held_out_losses(scorer, held_out, 512, ("adapter",))
        logps[name] = [
            [lp for lp, _ in reply_log_probs(scorer, [Pair(p.comment, getattr(p, side), p.where) for p in pairs], 512)]
            for side in ("chosen", "rejected")
        ]
        del scorer
        replier = load_replier(DEFAULT_BASE_MODEL, str(folder))
        result[name] = evaluate(replier, held_out, trained, losses, panes=("adapter",), settings=GREEDY)
        del replier
        print(f"{name} adapter, plain greedy:\n{markdown_table(result[name])}", flush=True)
    margins = [
        (pc - sc) - (pr - sr)
        for pc, sc, pr, sr in zip(
            logps["preferred"][0], logps["supervised"][0], logps["preferred"][1], logps["supervised"][1]
        )
    ]
    result["preference_accuracy"] = sum(m > 0 for m in margins) / len(margins) if margins else None
    result["environment"] = environment()
    (args.out / "result.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    write_blind(args.out, {name: result[name] for name in ("supervised", "preferred")})
    env = result["environment"]
    print(f"{time.strftime('%Y-%m-%d')} · {env['cpu']} ({env.get('cpu_flags', '?')}), {env['cores']} cores")
    print(
        f"held-out self-pairs: {len(pairs)} ({summary.selected}); preference accuracy {result['preference_accuracy']}"
    )


def write_blind(out: Path, results: dict[str, dict], per_adapter: int = 20) -> None:
    """20 held-out replies of each adapter, shuffled, with the key kept apart."""
    rows = [
        (name, row["comment"], row["adapter"])
        for name, result in results.items()
        for row in result["replies"][:per_adapter]
    ]
    random.Random(0).shuffle(rows)
    with (out / "blind.jsonl").open("w", encoding="utf-8") as blind:
        for i, (_, comment, reply) in enumerate(rows):
            blind.write(json.dumps({"id": i, "comment": comment, "reply": reply}, ensure_ascii=False) + "\n")
    (out / "blind_key.json").write_text(json.dumps({i: row[0] for i, row in enumerate(rows)}, indent=1) + "\n")


if __name__ == "__main__":
    main()
