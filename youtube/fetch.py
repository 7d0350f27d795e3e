"""`python -m youtube.fetch --channel UC... --out comments.json`: a channel's comments and your replies.

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
from pathlib import Path
from typing import Any

from youtube.api import KEY_ENV, Client, YouTubeError, default_api_url

PAGE_SIZE = 100  # the API's maximum for commentThreads.list


def thread_page(client: Client, channel: str, page_token: str | None, **extra: Any) -> dict[str, Any]:
    """One page of the channel's comment threads, newest first, with their replies."""
    params = {
        "part": "snippet,replies",
        "allThreadsRelatedToChannelId": channel,
        "maxResults": PAGE_SIZE,
        "textFormat": "plainText",
        **extra,
    }
    if page_token:
        params["pageToken"] = page_token
    page = client.get("commentThreads", params)
    if page.get("kind") != "youtube#commentThreadListResponse":
        raise YouTubeError(f"the API answered something that is not a commentThreads page (kind {page.get('kind')!r})")
    return page


def fetch_channel(channel: str, out: Path, client: Client, max_pages: int | None = None) -> tuple[int, int]:
    """Fetch (or continue fetching) every page into ``out``; returns (pages, threads)."""
    from tqdm.auto import tqdm

    partial = out.with_name(out.name + ".partial")
    state = {"channel": channel, "pages": [], "next": None}
    if partial.is_file():
        saved = json.loads(partial.read_text(encoding="utf-8"))
        if saved.get("channel") != channel:
            raise YouTubeError(
                f"{partial} holds a fetch of another channel "
                f"({saved.get('channel')}); remove it or pass --out another file"
            )
        state = saved
    threads = sum(len(p.get("items") or []) for p in state["pages"])
    with tqdm(desc=f"fetching {channel}", unit=" page", initial=len(state["pages"])) as bar:
        while max_pages is None or len(state["pages"]) < max_pages:
            try:
                page = thread_page(client, channel, state["next"])
            except YouTubeError as exc:
                done = len(state["pages"])
                resume = f"; {done} page(s) are saved and the same command continues from there" if done else ""
                raise YouTubeError(f"{exc}{resume}") from None
            state["pages"].append(page)
            state["next"] = page.get("nextPageToken")
            threads += len(page.get("items") or [])
            write_atomically(partial, json.dumps(state, ensure_ascii=False))
            bar.update(1)
            bar.set_postfix(threads=threads)
            if not state["next"]:
                break
    if state["next"] is None:
        write_atomically(out, json.dumps(state["pages"], ensure_ascii=False))
        partial.unlink()
    return len(state["pages"]), threads


def write_atomically(path: Path, text: str) -> None:
    """Write a file in one rename, so a kill leaves the old version or the new one; fsynced first,
    so a power cut cannot leave the new name on an empty file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m youtube.fetch", description=__doc__.splitlines()[0].split(": ", 1)[1]
    )
    parser.add_argument(
        "--channel", required=True, help="the channel id (UC...), from YouTube Studio > Settings > Channel > Advanced"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("comments.json"), help="the export to write (default: comments.json)"
    )
    parser.add_argument("--api-key", help=f"a YouTube Data API v3 key (default: ${KEY_ENV}); never written anywhere")
    parser.add_argument(
        "--max-pages", type=int, help="stop after this many pages of 100 threads (the fetch can be continued later)"
    )
    parser.add_argument(
        "--api-url",
        default=default_api_url(),
        help="the API root: another endpoint, a proxy or a local server [env YOUTUBE_API_URL]",
    )
    args = parser.parse_args(argv)
    key = args.api_key or os.environ.get(KEY_ENV)
    if not key:
        print(
            f"error: no API key: set {KEY_ENV} (or pass --api-key); a key comes "
            "from the Google Cloud console with the YouTube Data API v3 enabled",
            file=sys.stderr,
        )
        return 2
    try:
        pages, threads = fetch_channel(args.channel, args.out, Client(args.api_url, key=key), args.max_pages)
    except YouTubeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.out.is_file():
        from training.data import DataError, load_pairs

        try:
            pairs = len(load_pairs(args.out))
        except DataError:  # the loader's "no rows": no thread has a reply of the channel
            pairs = 0
        print(
            f"{threads} threads in {pages} page(s) written to "
            f"{args.out}: {pairs} with your reply, the pairs to train on"
        )
        if pairs:
            print(f"train: python -m training.run --data {args.out} --eval-data none")
    else:
        print(f"{threads} threads in {pages} page(s) so far; run the same command to continue")
    return 0


if __name__ == "__main__":
    sys.exit(main())
