"""`python -m training.prefer`: the creator's picks train the model (preference tuning of an adapter).

parse config -> read preferences / draft self-pairs and select -> render + doctor -> load base +
adapter -> TRL's DPOTrainer (IPO loss by default) with the starting adapter as the reference -> save
-> voice before/after.

The starting adapter is the reference: TRL's DPOTrainer, given a PeftModel and no reference model,
copies the adapter into a frozen second adapter named "ref" on the same base (trl 1.16
``DPOTrainer.__init__``), so one base is in memory. The output is an ordinary adapter folder.

Its rooms: prefer_config.py (the typed config and flags), preferences.py (reading pairs, selecting
self-pairs, rendering), prefer_trainer.py (memory plan, model, TRL's trainer), prefer_report.py
(the summary record, the voice table before and after, the model card).
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from errors import EXIT_ERROR, ReplytuneError
from inference.default_model import hub_id
from training.checkpoints import CHECKPOINTS, prepare_output, write_json_atomic
from training.data import DataError, Pair, file_hash, read_pairs
from training.prefer_config import PreferConfig, parse_config
from training.prefer_report import model_card, run_record, voice_before_after
from training.prefer_trainer import set_up
from training.preferences import (
    SELF_SOURCE,
    Draft,
    PreferenceExample,
    PreferencePair,
    PreferenceSummary,
    load_preferences,
    remove_duplicate_preferences,
    render_preferences,
    select_self_pairs,
)
from training.report import environment, write_summary

if TYPE_CHECKING:
    from inference.generate import StreamingReplier
    from prompts.render import PromptRenderer

# In the checkpoints folder: the pairs of the run and the self-pair counts, read back on --resume.
PAIRS_FILE = "preference_pairs.jsonl"
SELF_PAIRS_FILE = "self_pairs.json"


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config, given = parse_config(argv)
        print("settings:")
        for name, value in dataclasses.asdict(config).items():
            print(f"  {name:24} {value!s:48} ({'flag' if name in given else 'default'})")
        return prefer(config)
    except (ReplytuneError, PermissionError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR


def prefer(config: PreferConfig) -> int:
    started = time.perf_counter()
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    adapter = Path(config.adapter)
    sources = [*config.preferences, *self_pair_sources(config)]
    run_info = {
        "data_hash": file_hash(*sources, adapter / "adapter_model.safetensors", adapter / "persona.txt"),
        "config_hash": config.training_hash(),
        "processes": 1,
    }
    summary = PreferenceSummary()
    pairs = read_preference_files(config, summary)  # malformed files fail before any model loads
    checkpoint = prepare_output(output, config.resume, run_info)
    pairs = gather_pairs(config, pairs, summary, output)
    by_source = {source: sum(p.source == source for p in pairs) for source in dict.fromkeys(p.source for p in pairs)}
    print("pairs by source: " + ", ".join(f"{n} {source}" for source, n in by_source.items()))

    from inference.adapter_files import adapter_persona
    from inference.loading import load_tokenizer
    from prompts.render import Persona, PromptRenderer

    # As the app reads it (inference.engines.load_replier).
    persona = adapter_persona(str(adapter)) or Persona.from_file()
    tokenizer = load_tokenizer(config.base_model)
    renderer = PromptRenderer(tokenizer, persona)
    examples = render_preferences(pairs, renderer, config.max_length)
    if config.doctor:
        run_doctor(config, pairs, examples, renderer)

    model, trainer, estimate, trainable, total = set_up(config, tokenizer, examples)
    from training.run import Run, fit, save_adapter

    if checkpoint is not None:
        print(f"resuming from {checkpoint}")
    # NaN stop, out of memory, full disk: one message each.
    fit(Run(config, trainer, None, estimate, trainable, total), checkpoint)
    model = trainer.accelerator.unwrap_model(trainer.model)
    if "ref" in model.peft_config:
        model.delete_adapter("ref")  # the frozen reference copy: the output holds the tuned adapter alone
    model.peft_config["default"].base_model_name_or_path = hub_id(config.base_model)
    held_out, trained_on = adapter_pairs(adapter)
    save_adapter(model, tokenizer, persona, held_out, trained_on, output)
    result = run_record(config, trainer, pairs, by_source, self_pair_counts(summary), run_info, trainable)
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    del trainer, model
    if config.voice:
        voice_before_after(config, adapter, output, held_out, trained_on, result)
    result["environment"] = environment()
    write_summary(output, result)
    (output / "README.md").write_text(model_card(result, persona.template), encoding="utf-8")
    shutil.rmtree(output / CHECKPOINTS)
    print(
        f"done: {len(pairs)} pairs ({', '.join(f'{n} {s}' for s, n in by_source.items())}), {result['steps']} steps in "
        f"{result['wall_seconds'] / 60:.1f} min; reward accuracy {result['reward_accuracy']}, "
        f"margin {result['reward_margin']}\n"
        f"adapter saved to {output}"
    )
    return 0


def gather_pairs(
    config: PreferConfig, pairs: list[PreferencePair], summary: PreferenceSummary, output: Path
) -> list[PreferencePair]:
    """The files' pairs plus the self-pairs (drafted, or those of the interrupted run on --resume),
    duplicates removed, saved in the checkpoints folder."""
    saved_pairs, saved_counts = output / CHECKPOINTS / PAIRS_FILE, output / CHECKPOINTS / SELF_PAIRS_FILE
    if config.self_pairs:
        if config.resume and saved_pairs.is_file() and saved_counts.is_file():
            # The drafts of the interrupted run, so that the resumed run trains on the very same pairs.
            rows = map(json.loads, saved_pairs.read_text(encoding="utf-8").splitlines())
            pairs += [PreferencePair(**row) for row in rows if row["source"] == SELF_SOURCE]
            restore_self_pair_counts(summary, json.loads(saved_counts.read_text(encoding="utf-8")))
        else:
            pairs += draft_self_pairs(config, summary)
            write_json_atomic(saved_counts, self_pair_counts(summary))
    pairs, summary.duplicates_removed = remove_duplicate_preferences(pairs)
    write_pairs(saved_pairs, pairs)
    print("data:\n  " + "\n  ".join(summary.lines()))
    if not pairs:
        shutil.rmtree(output / CHECKPOINTS)
        raise DataError("no preference pairs to train on: " + "; ".join(summary.lines()))
    return pairs


def self_pair_sources(config: PreferConfig) -> list[str]:
    if not config.self_pairs:
        return []
    return config.data or [str(Path(config.adapter) / "examples.jsonl")]


def read_preference_files(config: PreferConfig, summary: PreferenceSummary) -> list[PreferencePair]:
    pairs: list[PreferencePair] = []
    for source in config.preferences:
        pairs += load_preferences(source, summary)
    return pairs


def self_pair_counts(summary: PreferenceSummary) -> dict[str, Any]:
    """The selection step's counts (and the preference files' skips), for the summary and the card."""
    return {
        "drafted": summary.drafted,
        "draft_equals_reply": summary.draft_equals_reply,
        "selected": dict(summary.selected),
        "self_pairs": summary.self_pairs,
        "merely_different": summary.merely_different,
        "same_skipped": summary.same_skipped,
        "rows": summary.rows,
        "files": summary.files,
    }


def restore_self_pair_counts(summary: PreferenceSummary, counts: dict[str, Any]) -> None:
    from collections import Counter

    summary.drafted, summary.draft_equals_reply, summary.self_pairs, summary.merely_different = (
        counts[k] for k in ("drafted", "draft_equals_reply", "self_pairs", "merely_different")
    )
    summary.selected = Counter(counts["selected"])


def write_pairs(path: Path, pairs: list[PreferencePair]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(
        "".join(json.dumps(dataclasses.asdict(p), ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8"
    )
    tmp.replace(path)


def draft_self_pairs(config: PreferConfig, summary: PreferenceSummary) -> list[PreferencePair]:
    """The adapter's greedy drafts of the --data comments, and the selection of the rejected ones."""
    from inference.engines import load_replier

    pairs: list[Pair] = []
    for source in self_pair_sources(config):
        if not Path(source).is_file():
            raise DataError(
                f"{source}: file not found; --self-pairs needs the comments and real replies (pass --data FILE)"
            )
        pairs += read_pairs(source)[0]
    if config.max_rows is not None and config.max_rows < len(pairs):
        keep = sorted(random.Random(config.seed).sample(range(len(pairs)), config.max_rows))
        pairs = [pairs[i] for i in keep]
    replier = load_replier(config.base_model, config.adapter, config.quantization, backend=config.backend)
    started = time.perf_counter()
    drafts = draft(replier, [p.comment for p in pairs], config.max_new_tokens)
    print(f"self-pairs: {len(drafts)} drafts by {replier.backend} in {time.perf_counter() - started:.0f} s")
    return select_self_pairs(pairs, drafts, summary)


def draft(replier: StreamingReplier, comments: list[str], max_new_tokens: int) -> list[Draft]:
    """Plain greedy replies of the adapter pane: no repetition rules, so the model's own loops show."""
    from tqdm.auto import tqdm

    from inference.generate import GenerationSettings

    settings = GenerationSettings(
        max_new_tokens=max_new_tokens, temperature=0.0, repetition_penalty=1.0, no_repeat_ngram=0
    )
    replies = replier.replies(comments, settings, panes=("adapter",), background=False)
    return [Draft(r[0].text, r[0].stopped) for r in tqdm(replies, total=len(comments), desc="drafting self-pairs")]


def run_doctor(
    config: PreferConfig, pairs: list[PreferencePair], examples: list[PreferenceExample], renderer: PromptRenderer
) -> None:
    """The data doctor's checks on preference pairs: the app's prompt, the end of turn learned on
    both sides, and the loss on the replies only."""
    from training.config import TrainConfig
    from training.doctor import DoctorError, Finding, app_renderer, check_app_prompt, format_report

    eot = renderer.end_of_turn_id
    no_end = [p.where for p, e in zip(pairs, examples) if e.chosen_ids[-1:] != [eot] or e.rejected_ids[-1:] != [eot]]
    uncut = [(p, e) for p, e in zip(pairs, examples) if not e.comment_tokens_cut]
    leaks = [p.where for p, e in uncut if e.prompt_ids != renderer.prompt(p.comment).input_ids]
    app = app_renderer(TrainConfig(base_model=config.base_model, eval_data=None), renderer.persona)
    findings = [
        Finding(
            "end of turn in chosen and rejected",
            not no_end,
            f"missing at {', '.join(no_end[:5])}"
            if no_end
            else f"every pair ends both replies with {renderer.tokenizer.convert_ids_to_tokens(eot)!r}",
        ),
        Finding(
            "loss on the replies only",
            not leaks,
            f"the prompt differs from the generation prompt at {', '.join(leaks[:5])}"
            if leaks
            else "the prompt is the generation prompt; only the replies and their end of turn are scored",
        ),
        check_app_prompt(pairs, renderer, app),
    ]
    first = examples[0]
    shown = (
        renderer.tokenizer.decode(first.prompt_ids[-8:])
        + " ["
        + renderer.tokenizer.decode(first.chosen_ids)
        + "] / ["
        + renderer.tokenizer.decode(first.rejected_ids)
        + "]"
    )
    text = format_report(findings, repr(shown))
    if not all(f.ok for f in findings):
        raise DoctorError(f"{text}\nfix the data or prompt above, or pass --no-doctor to train anyway")
    print(text)


def adapter_pairs(adapter: Path) -> tuple[list[Pair], list[Pair]]:
    """The held-out and trained-on pairs that travel with the adapter, carried to the tuned one."""
    from inference.adapter_files import EXAMPLES_FILE, HELD_OUT_FILE

    return tuple(
        read_pairs(adapter / name)[0] if (adapter / name).is_file() else [] for name in (HELD_OUT_FILE, EXAMPLES_FILE)
    )


if __name__ == "__main__":
    sys.exit(main())
