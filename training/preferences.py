"""Preference pairs: a comment, the reply to prefer and the reply to avoid, read from the app's
``preferences.jsonl`` (or any .jsonl/.json/.csv with those columns), or made from the adapter's own
drafts (self-pairs); then rendered by the one prompt renderer into the ids TRL's DPOTrainer takes.

Read by training.data's readers, with its ``path:line: field 'name': what is wrong`` messages and
its anonymisation. Nothing is dropped without being counted: a pair whose chosen reply equals its
rejected one is skipped and counted, and so is a self-pair whose draft is already the real reply or
is merely different from it (see select_self_pairs: that is a weak negative).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inference.jsonl import Problem, jsonl_rows
from inference.quality import flags
from prompts.render import IGNORE_INDEX, PromptError, PromptRenderer
from training.data import (
    COMMENT_ALIASES,
    DataError,
    Pair,
    _json_rows,
    _listing,
    _normal,
    _read_text,
    anonymize,
    csv_records,
    text_problem,
)

FIELDS = ("comment", "chosen", "rejected")
# Names real preference files give the three columns, compared as training.data compares them
# (lower case, no spaces, dashes or underscores).
ALIASES = {
    "comment": COMMENT_ALIASES,
    "chosen": ("chosen", "preferred", "better", "winner", "chosenreply", "chosenresponse"),
    "rejected": ("rejected", "dispreferred", "worse", "loser", "rejectedreply", "rejectedresponse"),
}
FILE_SOURCE = "preferences"  # the source name of pairs read from a file (the summary's counts by source)
SELF_SOURCE = "self-pairs"


@dataclass(frozen=True)
class PreferencePair:
    comment: str
    chosen: str
    rejected: str
    where: str  # "path:line", or "self-pair of path:line"
    source: str = FILE_SOURCE
    reason: str = ""  # for a self-pair, why its draft was rejected ("loops", ...)


@dataclass
class PreferenceSummary:
    """What went into a preference run, by source, with every skip counted."""

    files: list[str] = field(default_factory=list)
    rows: int = 0  # read from the files
    same_skipped: list[str] = field(default_factory=list)  # where chosen == rejected
    duplicates_removed: int = 0
    drafted: int = 0  # self-pairs: comments the adapter drafted a reply to
    draft_equals_reply: int = 0
    selected: Counter = field(default_factory=Counter)  # self-pairs kept, by each content flag they carry
    self_pairs: int = 0
    merely_different: int = 0  # drafts with no content flag: a weak negative, skipped

    def counts(self) -> dict[str, Any]:
        return {
            "preference_files": self.files,
            "preferences_read": self.rows,
            "preferences_same_skipped": len(self.same_skipped),
            "duplicates_removed": self.duplicates_removed,
            "self_pairs_drafted": self.drafted,
            "self_pairs_draft_equals_reply": self.draft_equals_reply,
            "self_pairs_selected": self.self_pairs,
            "self_pairs_selected_by_reason": dict(self.selected),
            "self_pairs_merely_different_skipped": self.merely_different,
        }

    def lines(self) -> list[str]:
        out = []
        if self.files:
            out.append(
                f"preferences: {self.rows} read from {', '.join(self.files)}; "
                f"{len(self.same_skipped)} skipped (chosen equals rejected)"
            )
            if self.same_skipped:
                out.append("  skipped at: " + _listing(self.same_skipped))
        if self.drafted:
            reasons = ", ".join(f"{n} {reason}" for reason, n in self.selected.most_common()) or "none"
            out.append(
                f"self-pairs: {self.drafted} drafted; {self.draft_equals_reply} already the real reply (skipped); "
                f"{self.self_pairs} selected as rejected ({reasons}); "
                f"{self.merely_different} merely different (skipped: a weak negative)"
            )
        if self.duplicates_removed:
            out.append(f"duplicates removed: {self.duplicates_removed}")
        return out


def load_preferences(source: str | Path, summary: PreferenceSummary | None = None) -> list[PreferencePair]:
    """The pairs of a .jsonl/.json/.csv file with comment, chosen and rejected columns, every row
    checked; all problems are raised together as one DataError. Pairs whose chosen reply equals the
    rejected one are skipped and recorded in ``summary``."""
    summary = summary if summary is not None else PreferenceSummary()
    path = Path(source)
    if not path.is_file():
        raise DataError(f"{source}: file not found")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv"):
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .csv")
    text = _read_text(path)
    rows = (
        _csv_rows(path, text) if suffix == ".csv" else {".jsonl": jsonl_rows, ".json": _json_rows}[suffix](path, text)
    )
    pairs = _validate(rows, str(path), summary)
    summary.files.append(str(path))
    return pairs


def column_mapping(names: Iterable[Any]) -> dict[str, str] | str:
    """Which of ``names`` hold the comment, the chosen and the rejected reply; or the problem."""
    names = [n for n in names if isinstance(n, str)]
    found = {}
    for role, aliases in ALIASES.items():
        candidates = [n for n in names if n == role] or [n for n in names if _normal(n) in aliases]
        if len(candidates) > 1:
            return f"{len(candidates)} fields could be the {role}: {', '.join(candidates)}"
        if not candidates:
            return (
                f"field {role!r}: missing (the fields are {', '.join(names) or 'none'}; expected {', '.join(FIELDS)})"
            )
        found[role] = candidates[0]
    return found


def _csv_rows(path: Path, text: str) -> Iterable[tuple[str, Any]]:
    def check_header(header: list[str] | None) -> None:
        if header is None:
            raise DataError(f"{path}: empty file; expected a header line with {', '.join(FIELDS)}")
        mapping = column_mapping(header)
        if isinstance(mapping, str):
            raise DataError(f"{path}:1: header: {mapping}")

    return csv_records(path, text, check_header)


def _validate(rows: Iterable[tuple[str, Any]], source: str, summary: PreferenceSummary) -> list[PreferencePair]:
    pairs, problems = [], []
    for where, row in rows:
        if isinstance(row, Problem):
            problems.append(f"{where}: {row}")
            continue
        if not isinstance(row, dict):
            problems.append(f"{where}: expected an object with fields {', '.join(FIELDS)}, got {type(row).__name__}")
            continue
        summary.rows += 1
        mapping = column_mapping(row.keys())
        if isinstance(mapping, str):
            problems.append(f"{where}: {mapping}")
            continue
        bad = [problem for name in mapping.values() if (problem := text_problem(name, row[name]))]
        if bad:
            problems.extend(f"{where}: {b}" for b in bad)
            continue
        comment, chosen, rejected = (anonymize(row[mapping[role]]) for role in FIELDS)
        if chosen.strip() == rejected.strip():
            summary.same_skipped.append(where)
            continue
        pairs.append(PreferencePair(comment, chosen, rejected, where))
    if problems:
        raise DataError(f"{len(problems)} problem(s) in {source}:\n  " + _listing(problems, sep="\n  "))
    if not pairs and not summary.same_skipped:
        raise DataError(f"{source}: no rows; expected {', '.join(FIELDS)} columns")
    return pairs


@dataclass(frozen=True)
class Draft:
    """The adapter's own reply to a comment, and whether it ended on the end-of-turn token."""

    text: str
    stopped: bool


def select_self_pairs(
    pairs: Sequence[Pair], drafts: Sequence[Draft], summary: PreferenceSummary
) -> list[PreferencePair]:
    """Self-pairs whose rejected side is worth learning from: the real reply is chosen over the
    adapter's draft only where the draft has what a reader rejects at a glance (inference.quality's
    flags: a loop, AI talk, a reply cut at the token cap). In a first trial, all 225 self-pairs moved
    the greedy replies hardly at all; the 78 flagged ones took loops from 6 to 0 (issue 29). A draft
    that is merely different from the real reply is a weak negative, skipped and counted."""
    if len(pairs) != len(drafts):
        raise ValueError(f"{len(pairs)} pairs but {len(drafts)} drafts")
    selected = []
    for pair, draft in zip(pairs, drafts):
        summary.drafted += 1
        if draft.text.strip() == pair.response.strip():
            summary.draft_equals_reply += 1
            continue
        found = flags(draft.text, draft.stopped)
        if not found:
            summary.merely_different += 1
            continue
        summary.selected.update(found)
        selected.append(
            PreferencePair(
                pair.comment,
                pair.response,
                anonymize(draft.text),
                f"self-pair of {pair.where}",
                SELF_SOURCE,
                ", ".join(found),
            )
        )
    summary.self_pairs += len(selected)
    return selected


def remove_duplicate_preferences(pairs: Sequence[PreferencePair]) -> tuple[list[PreferencePair], int]:
    """Drop repeats of a (comment, chosen, rejected) triple: the app appends a pick each time it is made."""
    seen, kept = set(), []
    for pair in pairs:
        key = (" ".join(pair.comment.split()).casefold(), pair.chosen.strip(), pair.rejected.strip())
        if key not in seen:
            seen.add(key)
            kept.append(pair)
    return kept, len(pairs) - len(kept)


@dataclass(frozen=True)
class PreferenceExample:
    """A pair as token ids: the app's prompt, then each reply with the end-of-turn token, exactly as
    a supervised training example has them (PromptRenderer.example)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    comment_tokens_cut: int


def render_preferences(
    pairs: Sequence[PreferencePair], renderer: PromptRenderer, max_length: int
) -> list[PreferenceExample]:
    """Render each pair with the one renderer; a reply it cannot tokenize is a DataError naming the pair."""
    examples, problems = [], []
    for pair in pairs:
        rendered = {}
        for role in ("chosen", "rejected"):
            try:
                rendered[role] = renderer.example(pair.comment, getattr(pair, role), max_length)
            except PromptError as exc:
                problems.append(f"{pair.where}: field {role!r}: {exc}")
        if len(rendered) < 2:
            continue
        split = {
            role: next(i for i, label in enumerate(ex.labels) if label != IGNORE_INDEX) for role, ex in rendered.items()
        }
        # A long comment is cut to fit the longer reply; both sides then share the shorter prompt.
        role = min(split, key=split.get)
        prompt = rendered[role].input_ids[: split[role]]
        chosen, rejected = (rendered[r].input_ids[split[r] :] for r in ("chosen", "rejected"))
        examples.append(
            PreferenceExample(prompt, chosen, rejected, max(e.comment_tokens_cut for e in rendered.values()))
        )
    if problems:
        raise DataError(f"{len(problems)} pair(s) cannot be rendered:\n  " + _listing(problems, sep="\n  "))
    return examples
