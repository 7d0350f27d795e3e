"""The data flywheel: a creator's corrections, appended to JSONL files that training reads as is.

Each save is one complete line written with a single ``write`` on a file opened in append mode,
under an exclusive ``flock``: concurrent saves from several app workers or processes never
interleave or tear a line, and a crash leaves every earlier line intact.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

PAIRS_FILE = "pairs.jsonl"  # {"comment", "response"}: the training format
PREFERENCES_FILE = "preferences.jsonl"  # {"comment", "chosen", "rejected"}


def append_jsonl(path: Path, record: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        written = os.write(fd, line)
        if written != len(line):
            raise OSError(f"{path}: only {written} of {len(line)} bytes written (disk full?)")
        os.fsync(fd)
    finally:
        os.close(fd)  # closing releases the lock


def save_correction(folder: Path, comment: str, reply: str) -> Path:
    """Store the reply the creator would really post, in the training format."""
    path = folder / PAIRS_FILE
    append_jsonl(path, {"comment": comment, "response": reply})
    return path


def save_preference(folder: Path, comment: str, chosen: str, rejected: str) -> Path:
    path = folder / PREFERENCES_FILE
    append_jsonl(path, {"comment": comment, "chosen": chosen, "rejected": rejected})
    return path


def waiting(folder: Path, adapter: str = "ADAPTER") -> str:
    """How many picks and corrections wait in ``folder``, and the command that trains on the picks
    (python -m training.prefer; the corrections are training pairs for python -m training.run)."""
    counts = {}
    for name in (PREFERENCES_FILE, PAIRS_FILE):
        path = folder / name
        counts[name] = (
            sum(1 for line in path.read_text(encoding="utf-8").split("\n") if line.strip()) if path.is_file() else 0
        )
    picks, corrections = counts[PREFERENCES_FILE], counts[PAIRS_FILE]
    text = f"{picks} pick(s) and {corrections} correction(s) waiting in `{folder}`."
    if picks:
        text += (
            f" Train on them: `python -m training.prefer --adapter {adapter} --preferences {folder / PREFERENCES_FILE} "
            "--output-dir outputs/preferred`"
        )
    return text
