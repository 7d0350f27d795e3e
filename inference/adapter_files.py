"""The files that travel with an adapter, beside its weights: the persona it was trained with, the
held-out pairs it was evaluated on (the app's blind test and example comments) and the pairs it was
trained on (the creator's examples that a prompt may retrieve)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from errors import ReplytuneError
from inference.jsonl import Problem, jsonl_rows
from prompts.render import Persona


class AdapterFileError(ReplytuneError, ValueError):
    """A file beside an adapter's weights that cannot be read, with its path and line."""


HELD_OUT_FILE = "heldout.jsonl"  # beside an adapter's weights: the held-out pairs its training evaluated on
PERSONA_FILE = "persona.txt"  # beside an adapter's weights: the persona it was trained with
SUMMARY_FILE = "training_summary.json"  # the run's summary, with its voice table
EXAMPLES_FILE = (
    "examples.jsonl"  # beside them too: the training pairs, for the prompts that show the creator's examples
)


def adapter_file(adapter: str, name: str) -> Path | None:
    """A file that travelled with an adapter (its folder, or its Hub repo), or None if it has none."""
    if Path(adapter).exists():
        local = Path(adapter) / name
        return local if local.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(adapter, name))
    except EntryNotFoundError:
        return None


def write_persona(folder: Path, persona: Persona) -> None:
    """Save the persona beside an adapter's weights, where adapter_persona reads it back."""
    (folder / PERSONA_FILE).write_text(persona.template + "\n", encoding="utf-8")


def write_held_out(folder: Path, pairs: Iterable[tuple[str, str]]) -> None:
    """Save the (comment, reply) pairs a run held out, where adapter_held_out reads them back."""
    _write_pairs(folder / HELD_OUT_FILE, pairs)


def write_examples(folder: Path, pairs: Iterable[tuple[str, str]]) -> None:
    """Save the (comment, reply) pairs a run trained on, where adapter_examples reads them back."""
    _write_pairs(folder / EXAMPLES_FILE, pairs)


def _write_pairs(path: Path, pairs: Iterable[tuple[str, str]]) -> None:
    rows = (
        json.dumps({"comment": comment, "response": response}, ensure_ascii=False) + "\n" for comment, response in pairs
    )
    path.write_text("".join(rows), encoding="utf-8")


def adapter_persona(adapter: str) -> Persona | None:
    """The persona an adapter was trained with (persona.txt beside its weights), if it has one."""
    path = adapter_file(adapter, PERSONA_FILE)
    return Persona.from_file(path) if path else None


def _summary(adapter: str | None) -> dict:
    """The summary the adapter's training run saved; {} without one."""
    path = adapter_file(adapter, SUMMARY_FILE) if adapter else None
    return json.loads(path.read_text(encoding="utf-8")) if path else {}


def adapter_verdict(adapter: str | None) -> str:
    """What the adapter's voice evaluation found against the strongest prompt, from the summary its
    training run saved (training.evaluate.verdict); '' without one."""
    from training.evaluate import verdict

    summary = _summary(adapter)
    return verdict(summary["voice"]) if "voice" in summary else ""


def adapter_examples_shown(adapter: str | None) -> int | None:
    """How many examples the adapter saw in every training prompt (``--examples_in_prompt``), which
    is how many its prompts show; None for one trained without them."""
    return _summary(adapter).get("config", {}).get("examples_in_prompt") or None


def adapter_held_out(adapter: str | None) -> list[tuple[str, str]]:
    """(comment, the creator's real reply) pairs the adapter was evaluated on and not trained on,
    as its training run saved them (handles already anonymised); [] for an adapter without them."""
    return _adapter_pairs(adapter, HELD_OUT_FILE)


def adapter_examples(adapter: str | None) -> list[tuple[str, str]]:
    """The pairs the adapter was trained on (anonymised), which a prompt may show as the creator's
    examples (inference.retrieval); [] for an adapter without them."""
    return _adapter_pairs(adapter, EXAMPLES_FILE)


def _adapter_pairs(adapter: str | None, name: str) -> list[tuple[str, str]]:
    path = adapter_file(adapter, name) if adapter else None
    if path is None:
        return []
    pairs = []
    for where, row in jsonl_rows(path, path.read_text(encoding="utf-8")):
        if (
            isinstance(row, Problem)
            or not isinstance(row, dict)
            or not all(isinstance(row.get(k), str) for k in ("comment", "response"))
        ):
            raise AdapterFileError(
                f"{where}: not a {{'comment', 'response'}} row ({row if isinstance(row, Problem) else repr(row)[:80]})"
            )
        pairs.append((row["comment"], row["response"]))
    return pairs
