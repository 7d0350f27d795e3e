"""`python -m training.youtube --channel UC... --out comments.json`: a channel's comments and your replies.

Fetches every comment thread of a channel with the YouTube Data API v3 (``commentThreads.list``
with ``allThreadsRelatedToChannelId``, ``part=snippet,replies``, 100 threads a page) and writes the
pages as they came, the export the data loader reads: each thread where the channel replied to the
top-level comment becomes a (comment, your first reply) pair, the channel's replies told apart by
its channel id. Train on it with ``python -m training.run --data comments.json --eval-data none``.

The API key comes from ``YOUTUBE_API_KEY`` (or ``--api-key``); it is sent to the API and never
written to a file or a log. Every page is saved as it arrives (``OUT.partial``), so a fetch that
stopped (quota, network, Ctrl+C) continues where it stopped when run again. A page costs 1 unit of
the key's daily quota of 10,000. The API lists at most 5 replies per thread; the owner's reply is
almost always among them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from errors import ReplytuneError

API_URL = "https://www.googleapis.com/youtube/v3"
KEY_ENV = "YOUTUBE_API_KEY"
PAGE_SIZE = 100  # the API's maximum for commentThreads.list
TIMEOUT_S = 30


class FetchError(ReplytuneError, RuntimeError):
    """The API refused or could not be reached; the message is one line and says what to do."""


def _explain(status: int, body: bytes, pages_done: int) -> str:
    """One line for an API error, from its ``error.errors[].reason``."""
    try:
        error = json.loads(body)["error"]
        reason = (error.get("errors") or [{}])[0].get("reason", "")
        message = error.get("message", "")
    except (ValueError, KeyError, TypeError, AttributeError):
        reason, message = "", body[:200].decode("utf-8", "replace")
    resume = f"; {pages_done} page(s) are saved and the same command continues from there" if pages_done else ""
    if reason in ("quotaExceeded", "dailyLimitExceeded", "rateLimitExceeded"):
        return f"the API key's daily YouTube quota is used up (10,000 units, 1 per page): run the same command tomorrow{resume}"
    if reason in ("keyInvalid", "keyExpired") or "API key not valid" in message:
        return (f"YouTube refused the API key ({reason or message}): create one under APIs & Services > Credentials in the Google Cloud "
                f"console, enable the YouTube Data API v3 for its project, and set {KEY_ENV}")
    if reason in ("accessNotConfigured", "SERVICE_DISABLED"):
        return "the YouTube Data API v3 is not enabled for the API key's project: enable it in the Google Cloud console"
    if reason == "commentsDisabled":
        return "comments are turned off for this channel's videos, so there is nothing to fetch"
    if reason in ("channelNotFound", "notFound") or status == 404:
        return "no channel with that id: pass the channel id (it starts with UC), not its @handle or name"
    return f"the YouTube API answered {status} {reason or ''}: {message}".rstrip()


def fetch_page(api_url: str, channel: str, key: str, page_token: str | None, pages_done: int) -> dict[str, Any]:
    params = {"part": "snippet,replies", "allThreadsRelatedToChannelId": channel, "maxResults": PAGE_SIZE, "textFormat": "plainText", "key": key}
    if page_token:
        params["pageToken"] = page_token
    url = f"{api_url}/commentThreads?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise FetchError(_explain(exc.code, exc.read(), pages_done)) from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        # The URL carries the key: name only the host.
        host = urllib.parse.urlsplit(api_url).netloc
        reason = getattr(exc, "reason", exc)
        resume = f"; {pages_done} page(s) are saved, run the same command again to continue" if pages_done else ""
        raise FetchError(f"could not reach {host} ({reason}){resume}") from None


def fetch_channel(channel: str, out: Path, key: str, api_url: str = API_URL, max_pages: int | None = None) -> tuple[int, int]:
    """Fetch (or continue fetching) every page into ``out``; returns (pages, threads)."""
    from tqdm.auto import tqdm

    partial = out.with_name(out.name + ".partial")
    state = {"channel": channel, "pages": [], "next": None}
    if partial.is_file():
        saved = json.loads(partial.read_text(encoding="utf-8"))
        if saved.get("channel") != channel:
            raise FetchError(f"{partial} holds a fetch of another channel ({saved.get('channel')}); remove it or pass --out another file")
        state = saved
    threads = sum(len(p.get("items") or []) for p in state["pages"])
    with tqdm(desc=f"fetching {channel}", unit=" page", initial=len(state["pages"])) as bar:
        while max_pages is None or len(state["pages"]) < max_pages:
            page = fetch_page(api_url, channel, key, state["next"], len(state["pages"]))
            if page.get("kind") != "youtube#commentThreadListResponse":
                raise FetchError(f"the API answered something that is not a commentThreads page (kind {page.get('kind')!r})")
            state["pages"].append(page)
            state["next"] = page.get("nextPageToken")
            threads += len(page.get("items") or [])
            _write(partial, state)
            bar.update(1)
            bar.set_postfix(threads=threads)
            if not state["next"]:
                break
    if state["next"] is None:
        _write(out, state["pages"])
        partial.unlink()
    return len(state["pages"]), threads


def _write(path: Path, data: Any) -> None:
    """Write a file in one rename, so a kill leaves the old version or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.youtube", description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("--channel", required=True, help="the channel id (UC...), from YouTube Studio > Settings > Channel > Advanced")
    parser.add_argument("--out", type=Path, default=Path("comments.json"), help="the export to write (default: comments.json)")
    parser.add_argument("--api-key", help=f"a YouTube Data API v3 key (default: ${KEY_ENV}); never written anywhere")
    parser.add_argument("--max-pages", type=int, help="stop after this many pages of 100 threads (the fetch can be continued later)")
    parser.add_argument("--api-url", default=API_URL, help=argparse.SUPPRESS)  # another endpoint: a proxy, or the tests' local server
    args = parser.parse_args(argv)
    key = args.api_key or os.environ.get(KEY_ENV)
    if not key:
        print(f"error: no API key: set {KEY_ENV} (or pass --api-key); a key comes from the Google Cloud console with the YouTube Data API v3 enabled", file=sys.stderr)
        return 2
    try:
        pages, threads = fetch_channel(args.channel, args.out, key, args.api_url, args.max_pages)
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.out.is_file():
        from training.data import DataError, load_pairs

        try:
            pairs = len(load_pairs(args.out))
        except DataError:  # the loader's "no rows": no thread has a reply of the channel
            pairs = 0
        print(f"{threads} threads in {pages} page(s) written to {args.out}: {pairs} with your reply, the pairs to train on")
        if pairs:
            print(f"train: python -m training.run --data {args.out} --eval-data none")
    else:
        print(f"{threads} threads in {pages} page(s) so far; run the same command to continue")
    return 0


if __name__ == "__main__":
    sys.exit(main())
