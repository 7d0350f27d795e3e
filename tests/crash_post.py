"""Run `python -m youtube.inbox` and SIGKILL it at the first comments.insert call, for real.

    python -m tests.crash_post before|after -- [youtube.inbox arguments]

  before   killed as the call is about to be sent: the item is recorded "posting", nothing is posted
  after    killed as soon as the call returned: the reply is posted, not yet recorded "posted"

What the next `post` finds is exactly what a power cut at that moment would leave.
"""

from __future__ import annotations

import sys

import youtube.api
from tests.crash_run import die


def install(point: str) -> None:
    original_post = youtube.api.Client.post

    def post(self, *args, **kwargs):
        if point == "before":
            die()
        answer = original_post(self, *args, **kwargs)
        die()
        return answer

    youtube.api.Client.post = post


if __name__ == "__main__":
    point, separator, *arguments = sys.argv[1:]
    if separator != "--" or point not in ("before", "after"):
        raise SystemExit(__doc__)
    install(point)
    from youtube.inbox.cli import main

    sys.exit(main(arguments))
