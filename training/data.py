"""Reading and validating comment/reply pairs (JSONL, JSON, CSV, YouTube exports, a Hub dataset), and
tokenizing them with the one renderer; what a run does with them next (signing, de-duplicating,
splitting) is training.examples.

Every row is checked; a problem is reported as ``path:line: field 'name': what is wrong`` and all
problems of a file are reported together. Nothing is dropped without being counted and named.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from errors import ReplytuneError
from inference.jsonl import Problem, jsonl_rows
from prompts.render import Example, PromptError, PromptRenderer

FIELDS = ("comment", "response")
# @handles of commenters (YouTube's reply mentions) become this placeholder before they reach the
# training data, a model card or the Hub; an e-mail address is left alone.
HANDLE = re.compile(r"(?<![\w@.])@\w(?:[\w.\-]*\w)?")
HANDLE_PLACEHOLDER = "@user"
# Header names (CSV) and keys (JSON) that real exports give the comment and the reply, compared after
# lower-casing and dropping spaces, dashes and underscores: "Comment", "comment_text" and
# "Comment Text" are all "commenttext" or "comment". --comment-field / --response-field choose
# when a file has two candidates.
COMMENT_ALIASES = ("comment", "commenttext", "text", "prompt", "input", "question", "message")
RESPONSE_ALIASES = ("response", "reply", "replytext", "answer", "completion", "output", "responsetext")
MAX_PROBLEMS_SHOWN = 20
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class DataError(ReplytuneError, ValueError):
    """Bad training data: the message names the file, the line and the field."""


@dataclass(frozen=True)
class Pair:
    comment: str
    response: str
    where: str  # "path:line" (or "path: item N" for JSON arrays), for messages


def load_pairs(source: str | Path, comment_field: str | None = None, response_field: str | None = None) -> list[Pair]:
    """Read pairs from a .jsonl/.json/.csv file or a Hub dataset id, validating every row."""
    return read_pairs(source, comment_field, response_field)[0]


def read_pairs(
    source: str | Path, comment_field: str | None = None, response_field: str | None = None
) -> tuple[list[Pair], list[str]]:
    """The pairs, and the column mappings used (``"Comment -> comment, Reply -> response"``, one per
    distinct mapping; none when the file names its fields comment and response)."""
    path = Path(source)
    if not path.exists():
        if isinstance(source, str) and HUB_ID.match(source):
            return _load_hub(source, comment_field, response_field)
        raise DataError(f"{source}: file not found")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv"):
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .csv")
    text = _read_text(path)
    if suffix == ".csv":
        rows = _csv_rows(path, text, comment_field, response_field)
    else:
        rows = {".jsonl": jsonl_rows, ".json": _json_rows}[suffix](path, text)
    return _validate(rows, str(path), comment_field, response_field)


def _normal(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name).casefold()


def column_mapping(
    names, comment_field: str | None = None, response_field: str | None = None
) -> dict[str, str] | str | None:
    """Which of ``names`` (a CSV header, a JSON row's keys) hold the comment and the reply:
    ``{"comment": name, "response": name}``; a problem (a named field that is missing, two
    candidates for one role); or None when the row has no comment/reply pair (Dolly, Guanaco rows)."""
    names = [n for n in names if isinstance(n, str)]
    found = {}
    for role, chosen, aliases, flag in (
        ("comment", comment_field, COMMENT_ALIASES, "--comment-field"),
        ("response", response_field, RESPONSE_ALIASES, "--response-field"),
    ):
        if chosen is not None:
            if chosen not in names:
                return f"no field {chosen!r} ({flag}); the fields are {', '.join(names)}"
            found[role] = chosen
            continue
        exact = [n for n in names if n == role]
        candidates = exact or [n for n in names if _normal(n) in aliases]
        if len(candidates) > 1:
            return f"{len(candidates)} fields could be the {role}: {', '.join(candidates)}; choose one with {flag} NAME"
        if not candidates:
            return None
        found[role] = candidates[0]
    if found["comment"] == found["response"]:
        return (
            f"field {found['comment']!r} cannot be both the comment and the response; "
            "choose with --comment-field and --response-field"
        )
    return found


def file_hash(*paths: str | Path | None) -> str:
    """sha256 over the bytes of the given files (a Hub id is hashed by name)."""
    digest = hashlib.sha256()
    for p in paths:
        if p is None:
            continue
        path = Path(p)
        digest.update(path.read_bytes() if path.is_file() else str(p).encode())
    return digest.hexdigest()[:16]


def check_no_overlap(train: list[Pair], evals: list[Pair]) -> None:
    """A held-out comment that is also trained on makes the eval loss meaningless."""
    train_at = {comment_key(p.comment): p.where for p in train}
    clashes = [
        f"{p.where} (also at {train_at[comment_key(p.comment)]})" for p in evals if comment_key(p.comment) in train_at
    ]
    if clashes:
        raise DataError(
            f"{len(clashes)} held-out comment(s) also appear in the training data: "
            + _listing(clashes)
            + "; remove them from one of the files"
        )


# The creator's pairs a prompt shows before a comment, as earlier turns.
Earlier = Callable[[str], Sequence[tuple[str, str]]]


def no_turns(comment: str) -> Sequence[tuple[str, str]]:
    """The default :data:`Earlier`: the comment alone."""
    return ()


def tokenize_pairs(
    pairs: Iterable[Pair], renderer: PromptRenderer, max_length: int, earlier: Earlier = no_turns
) -> tuple[list[Example], int]:
    """Render every pair once, after ``earlier(comment)``'s pairs as earlier turns; returns the
    examples and how many had their comment cut."""
    examples, truncated = [], 0
    for pair in pairs:
        try:
            example = renderer.example(pair.comment, pair.response, max_length, earlier(pair.comment))
        except PromptError as exc:
            raise DataError(f"{pair.where}: field 'response': {exc}") from exc
        truncated += example.comment_tokens_cut > 0
        examples.append(example)
    return examples, truncated


# --- readers: each yields (where, row) with row a dict or a Problem


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 (byte {raw[exc.start]:#04x} at offset {exc.start}); save the file as UTF-8"
        ) from None


def _json_rows(path: Path, text: str) -> Iterable[tuple[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    pages = data if isinstance(data, list) and data and all(_is_thread_page(d) for d in data) else [data]
    if all(_is_thread_page(p) for p in pages):
        yield from _youtube_rows(path, pages)
        return
    if not isinstance(data, list):
        raise DataError(
            f"{path}: expected a JSON array of objects with fields "
            f"{', '.join(FIELDS)}, or a YouTube Data API commentThreads export"
        )
    for number, row in enumerate(data, start=1):
        yield f"{path}: item {number}", row


def _is_thread_page(data: Any) -> bool:
    return isinstance(data, dict) and data.get("kind") == "youtube#commentThreadListResponse"


def _youtube_rows(path: Path, pages: list[dict]) -> Iterable[tuple[str, Any]]:
    """Threads where the channel owner replied to a top-level comment: (that comment, the owner's reply).

    Only the comment texts are read: author names and channel ids never leave this function.
    """
    for page_number, page in enumerate(pages, start=1):
        for number, thread in enumerate(page.get("items") or [], start=1):
            where = f"{path}: page {page_number} thread {number}"
            try:
                snippet = thread["snippet"]
                owner = snippet["channelId"]
                comment = snippet["topLevelComment"]["snippet"]["textOriginal"]
                replies = (thread.get("replies") or {}).get("comments") or []
                owner_replies = [
                    r["snippet"]["textOriginal"]
                    for r in replies
                    if (r["snippet"].get("authorChannelId") or {}).get("value") == owner
                ]
            except (KeyError, TypeError) as exc:
                yield where, Problem(f"not a commentThread in the YouTube Data API format (missing {exc})")
                continue
            if owner_replies:
                # The API lists replies oldest first: the owner's first answer is the reply to learn.
                yield where, {"comment": comment, "response": owner_replies[0]}


def _csv_rows(
    path: Path, text: str, comment_field: str | None = None, response_field: str | None = None
) -> Iterable[tuple[str, Any]]:
    def check_header(header: list[str] | None) -> None:
        if header is None:
            raise DataError(f"{path}: empty file; expected a header line with {', '.join(FIELDS)}")
        mapping = column_mapping(header, comment_field, response_field)
        if isinstance(mapping, str):
            raise DataError(f"{path}:1: header: {mapping}")
        missing = [] if mapping else [f for f in row_fields(header) if f not in header]
        if missing:
            raise DataError(
                f"{path}:1: header lacks column(s) {', '.join(missing)} (got {', '.join(header)}); "
                "name the comment and reply columns with --comment-field and --response-field"
            )

    return csv_records(path, text, check_header)


def csv_records(path: Path, text: str, check_header: Callable[[list[str] | None], None]) -> Iterator[tuple[str, Any]]:
    """Each data line of a CSV file as (``path:line``, a dict by header name) or a Problem;
    ``check_header`` raises a DataError for a header (None: an empty file) its caller cannot use."""
    # The csv module refuses fields over 128 KiB by default; a long comment is data, not an error
    # (the renderer cuts it to max_length later, and counts it). The limit is process-wide.
    csv.field_size_limit(2**31 - 1)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
        check_header(header)
        start = reader.line_num + 1
        for row in reader:
            where = f"{path}:{start}"
            start = reader.line_num + 1
            if not row:
                continue
            if len(row) != len(header):
                yield (
                    where,
                    Problem(
                        f"{len(row)} fields, but the header has {len(header)}; quote any field that "
                        'contains a comma, e.g. "Thanks, great video"'
                    ),
                )
            else:
                # Every value stays a string: a comment that reads NA, null or None is text.
                yield where, dict(zip(header, row))
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: {exc}") from None


def _load_hub(dataset_id: str, comment_field: str | None, response_field: str | None) -> tuple[list[Pair], list[str]]:
    import datasets

    rows = datasets.load_dataset(dataset_id, split="train")
    return _validate(
        ((f"{dataset_id}: row {i + 1}", row) for i, row in enumerate(rows)), dataset_id, comment_field, response_field
    )


def row_fields(keys) -> tuple[str, ...]:
    """The required fields of a row (or CSV header) by its shape: comment/response, Dolly-style
    instruction/response (+ optional context), or Guanaco-style conversation text."""
    keys = set(keys)
    if "comment" in keys or ("instruction" not in keys and "text" not in keys):
        return FIELDS
    return ("instruction", "response") if "instruction" in keys else ("text",)


def _validate(
    rows: Iterable[tuple[str, Any]], source: str, comment_field: str | None = None, response_field: str | None = None
) -> tuple[list[Pair], list[str]]:
    pairs, problems, mappings = [], [], {}
    for where, row in rows:
        if isinstance(row, Problem):
            problems.append(f"{where}: {row}")
            continue
        if not isinstance(row, dict):
            problems.append(f"{where}: expected an object with fields {', '.join(FIELDS)}, got {type(row).__name__}")
            continue
        mapping = column_mapping(row.keys(), comment_field, response_field)
        if isinstance(mapping, str):
            problems.append(f"{where}: {mapping}")
            continue
        shown = {}  # the file's own name for a mapped field, in messages
        if mapping and mapping != {"comment": "comment", "response": "response"}:
            mappings.setdefault(f"{source}: {mapping['comment']} -> comment, {mapping['response']} -> response", None)
            row = {"comment": row[mapping["comment"]], "response": row[mapping["response"]]}
            shown = mapping
        fields = row_fields(row)
        bad = [problem for name in fields if (problem := text_problem(shown.get(name, name), row.get(name)))]
        if "instruction" in fields and not isinstance(row.get("context") or "", str):
            bad.append(f"field 'context': expected text, got {type(row['context']).__name__}")
        pair = None if bad else _to_pair(row, fields)
        if isinstance(pair, str):
            bad.append(pair)
        if bad:
            problems.extend(f"{where}: {b}" for b in bad)
        else:
            pairs.append(Pair(anonymize(pair[0]), anonymize(pair[1]), where))
    if problems:
        raise DataError(f"{len(problems)} problem(s) in {source}:\n  " + _listing(problems, sep="\n  "))
    if not pairs:
        raise DataError(f"{source}: no rows; expected {', '.join(FIELDS)} pairs")
    return pairs, list(mappings)


def text_problem(label: str, value: Any) -> str | None:
    """What is wrong with a row's text field ``label`` (None when absent), or None: missing, not text, blank."""
    if value is None:
        return f"field {label!r}: missing"
    if not isinstance(value, str):
        return f"field {label!r}: expected text, got {type(value).__name__} {value!r}"[:200]
    if not value.strip():
        return f"field {label!r}: blank (got {value!r})"[:200]
    return None


GUANACO_TURN = re.compile(r"###\s*(Human|Assistant):")


def _to_pair(row: dict[str, Any], fields: tuple[str, ...]) -> tuple[str, str] | str:
    """(comment, response) of a validated row, or a problem with its text field."""
    if fields == FIELDS:
        return row["comment"], row["response"]
    if fields[0] == "instruction":
        # Dolly's context (a passage the instruction refers to) follows the instruction, as in its own prompts.
        context = (row.get("context") or "").strip()
        return (f"{row['instruction']}\n\n{context}" if context else row["instruction"]), row["response"]
    # Guanaco: "### Human: ... ### Assistant: ..." turns. The last assistant turn is the response;
    # everything before it (earlier turns included, markers kept) is what it answers, so a
    # multi-turn conversation loses nothing.
    text = row["text"]
    turns = list(GUANACO_TURN.finditer(text))
    if not turns or turns[0].group(1) != "Human" or turns[-1].group(1) != "Assistant":
        return "field 'text': expected '### Human: ... ### Assistant: ...' turns, the last one the assistant's"
    last = turns[-1]
    comment = text[turns[0].end() : last.start()].strip() if len(turns) == 2 else text[: last.start()].strip()
    response = text[last.end() :].strip()
    if not comment or not response:
        return "field 'text': a blank human or assistant turn"
    return comment, response


def anonymize(text: str) -> str:
    """Replace commenters' @handles with a neutral placeholder."""
    return HANDLE.sub(HANDLE_PLACEHOLDER, text)


def comment_key(comment: str) -> str:
    """A comment as duplicates and overlaps are found: spacing and case aside."""
    return " ".join(comment.split()).casefold()


def _listing(items: list[str], sep: str = ", ") -> str:
    more = len(items) - MAX_PROBLEMS_SHOWN
    return sep.join(items[:MAX_PROBLEMS_SHOWN]) + (f"{sep}... and {more} more" if more > 0 else "")
