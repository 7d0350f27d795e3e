"""`python -m youtube.inbox pull|draft|list|login|post --state DIR`: the comments still waiting for
your answer, a drafted reply for each, and posting only the replies you approved.

    pull    the recent comment threads without a reply of the channel (newest first, back to
            --since) into DIR/inbox.jsonl; pulling again adds only what is new
    draft   a reply for every waiting comment, from the fine-tuned adapter (llama.cpp on a CPU,
            batched as the voice evaluation is)
    list    the counts and the comments still to answer
    login   sign in as the channel once (OAuth consent in the browser)
    post    post the approved replies (comments.insert); --dry-run shows what would be posted

Approving, editing, skipping and regenerating happen in the app's Inbox tab (``python app.py
--inbox DIR``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from youtube import auth
from youtube.api import KEY_ENV, Client, YouTubeError, default_api_url
from youtube.inbox.posting import post, preview
from youtube.inbox.pull import DEFAULT_SINCE_DAYS, parse_since, pull
from youtube.inbox.review import draft
from youtube.inbox.state import counts_line, to_answer

if TYPE_CHECKING:
    from inference.generate import StreamingReplier


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except YouTubeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def run(args: argparse.Namespace) -> None:
    """One command, its outcome printed."""
    if args.command == "pull":
        client = Client(args.api_url, key=_api_key(args.api_key))
        added, pages = pull(client, args.state, args.channel, args.since, args.max_pages)
        print(f"{added} new comment(s) from {pages} page(s); inbox: {counts_line(args.state)}")
    elif args.command == "draft":
        print(draft(args.state, _load_replier(args.base_model, args.adapter)))
        print(f"inbox: {counts_line(args.state)}")
    elif args.command == "list":
        for item in to_answer(args.state):
            print(f"{item.status:9} {item.id}  {item.author}: {item.text[:70]!r}  ->  {item.final[:70]!r}")
        print(f"inbox: {counts_line(args.state)}")
    elif args.command == "login":
        print(f"signed in; the sign-in is saved to {auth.login(args.client_secrets, args.token_file)} (mode 0600)")
    elif args.dry_run:
        print("\n".join(preview(args.state)) or "nothing approved to post")
    else:
        print(post(args.state, Client(args.api_url, sign_in=auth.load(args.token_file, args.token_url))))
        print(f"inbox: {counts_line(args.state)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m youtube.inbox",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common, signed = _state_options(), _sign_in_options()
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("pull", parents=[common], help="fetch the comments still waiting for your answer")
    p.add_argument(
        "--channel", required=True, help="the channel id (UC...), from YouTube Studio > Settings > Channel > Advanced"
    )
    p.add_argument(
        "--since",
        type=parse_since,
        default=f"{DEFAULT_SINCE_DAYS}d",
        help=f"how far back: days (30d) or a date (2026-11-01); default {DEFAULT_SINCE_DAYS}d",
    )
    p.add_argument("--max-pages", type=int, help="stop after this many pages of 100 threads")
    p.add_argument("--api-key", help=f"a YouTube Data API v3 key (default: ${KEY_ENV}); never written anywhere")
    d = commands.add_parser("draft", parents=[common], help="draft a reply for every waiting comment")
    d.add_argument("--base-model", default=None, help="the app's base model (default: the embedded one)")
    d.add_argument("--adapter", default=None, help="the adapter to draft with (default: the shipped adapters/default)")
    commands.add_parser("list", parents=[common], help="the counts and the comments to answer")
    g = commands.add_parser("login", parents=[signed], help="sign in as the channel (once)")
    g.add_argument(
        "--client-secrets",
        type=Path,
        required=True,
        help="the OAuth client (Desktop app) JSON from the Google Cloud console",
    )
    o = commands.add_parser("post", parents=[common, signed], help="post the approved replies")
    o.add_argument("--dry-run", action="store_true", help="show what would be posted, post nothing")
    return parser


def _state_options() -> argparse.ArgumentParser:
    """--state and --api-url, which every command but login takes."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--state", type=Path, required=True, help="the inbox folder (inbox.jsonl, pairs.jsonl, preferences.jsonl)"
    )
    common.add_argument(
        "--api-url", default=default_api_url(), help="the API root: a proxy or a local server [env YOUTUBE_API_URL]"
    )
    return common


def _sign_in_options() -> argparse.ArgumentParser:
    """Where the channel's sign-in is kept and renewed: login and post."""
    signed = argparse.ArgumentParser(add_help=False)
    signed.add_argument(
        "--token-file",
        type=Path,
        default=auth.default_token_file(),
        help="the saved sign-in, outside the repository [env YOUTUBE_TOKEN_FILE]",
    )
    signed.add_argument(
        "--token-url", default=auth.default_token_url(), help="the OAuth token endpoint [env YOUTUBE_TOKEN_URL]"
    )
    return signed


def _api_key(given: str | None) -> str:
    key = given or os.environ.get(KEY_ENV)
    if not key:
        raise YouTubeError(
            f"no API key: set {KEY_ENV} (or pass --api-key); a key comes from the Google Cloud console "
            "with the YouTube Data API v3 enabled"
        )
    return key


def _load_replier(base_model: str | None, adapter: str | None) -> StreamingReplier:
    """The app's fine-tuned pane: its default base model and shipped adapter, llama.cpp on a CPU."""
    from inference.default_model import DEFAULT_ADAPTER, DEFAULT_BASE_MODEL
    from inference.engines import load_replier

    replier = load_replier(base_model or DEFAULT_BASE_MODEL, adapter or str(DEFAULT_ADAPTER))
    print(f"drafting with {replier.backend}")
    return replier
