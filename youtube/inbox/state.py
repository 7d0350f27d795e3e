"""The inbox's state, ``DIR/inbox.jsonl``: one item per top-level comment, read whole and written
back in one rename, under a lock, on each change (the app and a command may edit at once)."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from youtube.api import YouTubeError
from youtube.fetch import write_atomically

STATE_FILE = "inbox.jsonl"
LOCK_FILE = "inbox.lock"
Status = Literal["waiting", "drafted", "approved", "posting", "posted", "skipped", "gone"]
TO_ANSWER: tuple[Status, ...] = ("waiting", "drafted", "approved")


class InboxError(YouTubeError):
    """The inbox state or a request on it is wrong; the message names the file, line or comment."""


@dataclass
class Item:
    """One top-level comment waiting for the creator's answer."""

    id: str  # the top-level comment's id (also its thread's id): the parentId of the reply
    channel: str
    video: str
    author: str  # the commenter's display name, shown to the creator, never written to training data
    text: str
    published: str  # RFC 3339, as the API gives it
    status: Status = "waiting"
    draft: str = ""  # what the model wrote
    reply: str = ""  # the creator's edit of the draft ("" = the draft as it is)
    reply_id: str = ""  # the posted reply's comment id
    note: str = ""  # why the last post of this item did not go through

    @property
    def final(self) -> str:
        return self.reply or self.draft


def load(state: Path) -> dict[str, Item]:
    """Every item of ``state/inbox.jsonl`` by comment id ({} before the first pull)."""
    path = state / STATE_FILE
    if not path.is_file():
        return {}
    items: dict[str, Item] = {}
    fields = {f.name for f in dataclasses.fields(Item)}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            record = json.loads(line)
            item = Item(**{k: v for k, v in record.items() if k in fields})
        except (ValueError, TypeError) as exc:
            raise InboxError(
                f"{path}:{number}: not an inbox line ({exc}); restore the line or delete it and pull again"
            ) from None
        if item.status not in get_args(Status):
            raise InboxError(
                f"{path}:{number}: field 'status': {item.status!r} is none of {', '.join(get_args(Status))}"
            )
        items[item.id] = item
    return items


@contextlib.contextmanager
def editing(state: Path) -> Iterator[dict[str, Item]]:
    """The items to change, under a lock (the app and a command may edit at once), written back in
    one rename when the block ends without an error."""
    state.mkdir(parents=True, exist_ok=True)
    with open(state / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        items = load(state)
        yield items
        write_atomically(
            state / STATE_FILE,
            "".join(json.dumps(dataclasses.asdict(i), ensure_ascii=False) + "\n" for i in items.values()),
        )


def change_item(state: Path, comment_id: str, change: Callable[[Item], None]) -> Item:
    """Apply ``change`` to one item under the lock; the changed item."""
    with editing(state) as items:
        if comment_id not in items:
            raise InboxError(f"no comment {comment_id!r} in {state / STATE_FILE}; pick one of the inbox's comments")
        change(items[comment_id])
        return items[comment_id]


def counts(items: dict[str, Item]) -> dict[str, int]:
    """waiting (drafted or not), approved and posted, as the app and `list` show them."""
    statuses = [i.status for i in items.values()]
    return {
        "waiting": statuses.count("waiting") + statuses.count("drafted"),
        "approved": statuses.count("approved") + statuses.count("posting"),
        "posted": statuses.count("posted"),
    }


def counts_line(state: Path) -> str:
    return " · ".join(f"{n} {name}" for name, n in counts(load(state)).items())


def to_answer(state: Path) -> list[Item]:
    """The comments still to answer or post, newest first."""
    return sorted((i for i in load(state).values() if i.status in TO_ANSWER), key=lambda i: i.published, reverse=True)
