"""JSON Lines, read one way everywhere: training data, comments to compare, an adapter's held-out pairs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class Problem(str):
    """What a reader says about a row it could not read, in place of the row (a JSON line may
    itself be a string, so a plain str cannot mean "problem")."""


def jsonl_rows(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    """``("path:line", value)`` for each non-blank line of ``text`` (the contents of ``path``); a
    line that is not JSON gives a Problem, and reading goes on, so every bad line is reported.

    Split on "\\n" only: str.splitlines() would also split on U+2028 and other characters that are
    legal inside a JSON string.
    """
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        try:
            yield f"{path}:{number}", json.loads(line)
        except json.JSONDecodeError as exc:
            yield f"{path}:{number}", Problem(f"invalid JSON ({exc.msg} at column {exc.colno})")
