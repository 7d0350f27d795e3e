"""The one base of every error replytune raises on purpose, and the boundary that reports it.

The lowest layer: it imports nothing of the project, so prompts/, inference/, training/ and the app
may all import it. An entry point (``python -m ...``) turns a ReplytuneError into one line that
names the place, the value and the fix, and lets anything else through as a traceback: that one is
a bug. (The shape of simonw/llm's ``errors.py`` and click's ``ClickException``.)
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import ParamSpec

EXIT_ERROR = 2  # argparse's exit status for a bad command line: the same "fix your input" meaning

P = ParamSpec("P")


class ReplytuneError(Exception):
    """An error replytune raises on purpose; its message says what is wrong and how to fix it."""


def exits_on_error(main: Callable[P, int]) -> Callable[P, int]:
    """An entry point's ``main`` that prints a ReplytuneError as ``error: ...`` on stderr and returns
    EXIT_ERROR; any other exception is left to Python's traceback."""

    @functools.wraps(main)
    def boundary(*args: P.args, **kwargs: P.kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except ReplytuneError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_ERROR

    return boundary
