"""Posting the approved replies (comments.insert), never twice: an item is recorded ``posting``
before the insert call and ``posted`` after it; one left ``posting`` by a crash is resolved on the
next ``post`` by looking for the channel's reply in that thread."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from youtube.api import ApiError, Client, NetworkError, YouTubeError
from youtube.auth import AuthError
from youtube.inbox.state import Item, Status, change_item, counts, editing, load

MAX_CHECK_PAGES = 20  # of 100 replies: a thread with more is beyond what a creator answers by hand
# 400s about one reply (its text, or a thread the channel may not answer): that item stays
# approved with the reason, and the rest of the batch goes on.
ITEM_REASONS = (
    "commentTextRequired",
    "commentTextTooLong",
    "invalidCustomEmoji",
    "invalidCommentMetadata",
    "operationNotSupported",
    "parentCommentIsPrivate",
    "processingFailure",
)


@dataclass
class PostRun:
    posted: list[Item] = dataclasses.field(default_factory=list)
    found: list[Item] = dataclasses.field(default_factory=list)  # posted by a run that crashed before recording it
    gone: list[Item] = dataclasses.field(default_factory=list)
    refused: list[Item] = dataclasses.field(default_factory=list)  # stay approved, with the reason in their note

    def __str__(self) -> str:
        parts = [f"{len(self.posted)} posted"]
        if self.found:
            parts.append(f"{len(self.found)} found already posted by an interrupted run")
        if self.gone:
            parts.append(f"{len(self.gone)} gone (deleted before posting)")
        if self.refused:
            parts.append(
                f"{len(self.refused)} refused by YouTube and left approved: "
                + "; ".join(f"{i.id}: {i.note}" for i in self.refused)
            )
        return ", ".join(parts)


def preview(state: Path) -> list[str]:
    """What ``post`` would post (--dry-run), one line per reply; changes nothing."""
    lines = []
    for item in load(state).values():
        if item.status in ("approved", "posting"):
            check = " (once checked that an interrupted run did not post it)" if item.status == "posting" else ""
            lines.append(f"would reply to {item.author} on {item.id}{check}: {item.final}")
    return lines


def post(state: Path, client: Client, echo: Callable[[str], None] = print) -> PostRun:
    """Post every approved reply once. Items left ``posting`` by a crash are looked up first. A
    quota, sign-in or network error stops the batch: what was not posted stays approved (or
    ``posting``, to be looked up, when the connection broke during the call) and is raised as one
    line."""
    run = PostRun()
    for item in [i for i in load(state).values() if i.status == "posting"]:
        _resolve(state, client, item, run)
    for comment_id in [i.id for i in load(state).values() if i.status == "approved"]:
        if item := _claim(state, comment_id):
            _post_one(state, client, item, run)
            echo(f"{item.id}: {item.status}")
    return run


def _claim(state: Path, comment_id: str) -> Item | None:
    """Record the item ``posting`` before the call, so that a crash after it is looked up, never
    posted blind; None if the creator changed their mind (skipped it) since the batch began. The
    text posted is the one recorded here."""
    with editing(state) as items:
        item = items[comment_id]
        if item.status != "approved":
            return None
        item.status = "posting"
        return dataclasses.replace(item)


def _post_one(state: Path, client: Client, item: Item, run: PostRun) -> None:
    try:
        answer = client.post(
            "comments", {"part": "snippet"}, {"snippet": {"parentId": item.id, "textOriginal": item.final}}
        )
    except ApiError as exc:
        if exc.status == 404:
            run.gone.append(_set(state, item, "gone", note=str(exc)))
        elif exc.reason in ITEM_REASONS:
            run.refused.append(_set(state, item, "approved", note=str(exc)))
        else:  # the call was refused as a whole (quota, sign-in): nothing was posted
            _set(state, item, "approved")
            raise _stopped(state, exc, run) from None
        return
    except AuthError as exc:  # no access token, so the call was never sent
        _set(state, item, "approved")
        raise _stopped(state, exc, run) from None
    except NetworkError as exc:
        raise _stopped(state, exc, run) from None  # it may have been posted: stays "posting", looked up next time
    run.posted.append(_set(state, item, "posted", reply_id=answer.get("id", "")))


def _resolve(state: Path, client: Client, item: Item, run: PostRun) -> None:
    """An item a crashed run left ``posting``: posted if the thread holds the channel's reply with
    its text, else approved again (and posted in this run)."""
    token: str | None = None
    try:
        for _ in range(MAX_CHECK_PAGES):
            params = {
                "part": "snippet",
                "parentId": item.id,
                "maxResults": 100,
                "textFormat": "plainText",
                **({"pageToken": token} if token else {}),
            }
            page = client.get("comments", params)
            for reply in page.get("items") or []:
                snippet = reply.get("snippet") or {}
                if (snippet.get("authorChannelId") or {}).get("value") == item.channel and snippet.get(
                    "textOriginal", ""
                ).strip() == item.final:
                    run.found.append(_set(state, item, "posted", reply_id=reply.get("id", "")))
                    return
            token = page.get("nextPageToken")
            if not token:
                break
    except ApiError as exc:
        if exc.status != 404:
            raise _stopped(state, exc, run) from None
        run.gone.append(_set(state, item, "gone", note=str(exc)))
        return
    except NetworkError as exc:
        raise _stopped(state, exc, run) from None
    _set(state, item, "approved")


def _set(state: Path, item: Item, status: Status, **changes: str) -> Item:
    def update(current: Item) -> None:
        current.status = status
        for name, value in changes.items():
            setattr(current, name, value)

    updated = change_item(state, item.id, update)
    item.status = updated.status
    return updated


def _stopped(state: Path, exc: YouTubeError, run: PostRun) -> YouTubeError:
    left = counts(load(state))["approved"]
    return YouTubeError(f"{exc}; {run}; {left} approved replies are kept and the same command posts them")
