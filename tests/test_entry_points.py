"""Every `python -m` entry point turns a mistake in its input into one `error:` line that says what
to fix, with exit status 2 and no traceback (errors.exits_on_error; training.run's own boundary).

Each input is refused before any model loads, so a row costs one interpreter start.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from errors import EXIT_ERROR
from inference.default_model import ROOT

ENTRY_POINTS = [
    ("training.run", ["--config", "no-such-recipe"], "no-such-recipe: config file not found (recipes in"),
    ("training.doctor", ["--config", "no-such-recipe"], "no-such-recipe: config file not found (recipes in"),
    (
        "training.estimate",
        ["--config", "nf4-mistral-dolly", "--gpu-memory", "24GiB", "--accelerate-config", "{tmp}/none.yaml"],
        "none.yaml: cannot read it as an accelerate config",
    ),
    ("training.evaluate", ["--eval-data", "{tmp}/none.jsonl"], "none.jsonl: file not found"),
    (
        "inference.export",
        ["--adapter", "{tmp}/none", "--out", "{tmp}/out"],
        "none: no such folder; pass --adapter a folder written by",
    ),
    ("inference.compare", ["--comments", "{tmp}/none.txt"], "No such file or directory"),
    ("youtube.fetch", ["--channel", "UC0"], "no API key: set YOUTUBE_API_KEY"),
    ("youtube.inbox", ["pull", "--state", "{tmp}/inbox", "--channel", "UC0"], "no API key: set YOUTUBE_API_KEY"),
]


@pytest.mark.parametrize("module, args, says", ENTRY_POINTS, ids=[module for module, _, _ in ENTRY_POINTS])
def test_a_bad_input_is_one_error_line_and_exit_status_2(module, args, says, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "YOUTUBE_API_KEY"}
    command = [sys.executable, "-m", module, *(a.format(tmp=tmp_path) for a in args)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == EXIT_ERROR, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and says in done.stderr, done.stderr[-2000:]
