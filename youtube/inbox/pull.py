"""Pulling: the recent comment threads without a reply of the channel, added to the inbox."""

from __future__ import annotations

import argparse
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from youtube.api import Client, YouTubeError
from youtube.fetch import thread_page
from youtube.inbox.state import Item, editing

DEFAULT_SINCE_DAYS = 30


def pull(client: Client, state: Path, channel: str, since: datetime, max_pages: int | None = None) -> tuple[int, int]:
    """Add the threads published since ``since`` that have no reply of the channel and are not in
    the inbox yet; returns (added, pages read). Pages come newest first, so the first thread older
    than ``since`` ends the pull. The API lists at most 5 replies of a thread."""
    added = pages = 0
    token: str | None = None
    while max_pages is None or pages < max_pages:
        page = thread_page(client, channel, token, order="time")
        pages += 1
        new, older = [], False
        for thread in page.get("items") or []:
            item = _item(thread, channel)
            if datetime.fromisoformat(item.published) < since:
                older = True
                break
            if not _answered(thread, channel):
                new.append(item)
        with editing(state) as items:
            for item in new:
                if item.id not in items:
                    items[item.id] = item
                    added += 1
        token = page.get("nextPageToken")
        if older or not token:
            break
    return added, pages


def _item(thread: dict[str, Any], channel: str) -> Item:
    try:
        top = thread["snippet"]["topLevelComment"]
        snippet = top["snippet"]
        return Item(
            id=top["id"],
            channel=channel,
            video=snippet.get("videoId", ""),
            author=snippet.get("authorDisplayName", ""),
            text=snippet["textOriginal"],
            published=snippet["publishedAt"],
        )
    except (KeyError, TypeError) as exc:
        raise YouTubeError(
            f"thread {thread.get('id')!r} is not a commentThread in the YouTube Data API format (missing {exc})"
        ) from None


def _answered(thread: dict[str, Any], channel: str) -> bool:
    """The channel wrote the comment, or has replied to it."""
    comments = [thread["snippet"]["topLevelComment"], *((thread.get("replies") or {}).get("comments") or [])]
    return any((c["snippet"].get("authorChannelId") or {}).get("value") == channel for c in comments)


def parse_since(text: str) -> datetime:
    """``30d`` (days back from now) or a date, ``2026-11-01``."""
    if match := re.fullmatch(r"(\d+)d", text.strip()):
        return datetime.now(UTC) - timedelta(days=int(match[1]))
    try:
        return datetime.fromisoformat(text.strip()).replace(tzinfo=UTC)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--since {text!r}: give a number of days (30d) or a date (2026-11-01)"
        ) from None
