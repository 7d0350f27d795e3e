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
--inbox DIR``). ``inbox.jsonl`` is one readable line per comment: its id, author, text, draft and
status, rewritten in one rename on each change. Every approved reply is appended to
DIR/pairs.jsonl and every edited draft to DIR/preferences.jsonl (the edit chosen, the draft
rejected), the files training reads as they are; commenters' handles are anonymised there and
only there.

Never posted twice: an item is recorded ``posting`` before the insert call and ``posted`` after
it; one left ``posting`` by a crash is resolved on the next ``post`` by looking for the channel's
reply in that thread.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from youtube.api import KEY_ENV, ApiError, Client, NetworkError, YouTubeError, default_api_url
from youtube.auth import AuthError
from youtube.fetch import thread_page, write_atomically

if TYPE_CHECKING:
    from inference.generate import GenerationSettings, StreamingReplier

STATE_FILE = "inbox.jsonl"
LOCK_FILE = "inbox.lock"
Status = Literal["waiting", "drafted", "approved", "posting", "posted", "skipped", "gone"]
TO_ANSWER: tuple[Status, ...] = ("waiting", "drafted", "approved")
DEFAULT_SINCE_DAYS = 30
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


def _change(state: Path, comment_id: str, change: Callable[[Item], None]) -> Item:
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


# --- pull --------------------------------------------------------------------------------------


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


# --- drafts ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DraftRun:
    comments: int
    tokens: int
    seconds: float

    def __str__(self) -> str:
        rate = (
            f"{self.comments / self.seconds:.2f} comments/s, {self.tokens / self.seconds:.1f} tokens/s"
            if self.comments
            else "nothing to draft"
        )
        return f"{self.comments} drafts in {self.seconds:.1f} s ({rate})"


def draft(state: Path, replier: StreamingReplier, settings: GenerationSettings | None = None) -> DraftRun:
    """A draft for every waiting comment from the fine-tuned pane, many comments decoded at once
    (llama.cpp: 8) as in the voice evaluation; each draft is saved as it arrives."""
    from tqdm.auto import tqdm

    from training.evaluate import EVAL_SETTINGS

    waiting = [i for i in load(state).values() if i.status == "waiting"]
    tokens, started = 0, time.perf_counter()
    # background=False: the decoding runs on this (main) thread, as in the voice evaluation.
    replies = replier.replies(
        [i.text for i in waiting], settings or EVAL_SETTINGS, panes=(replier.tuned_pane,), background=False
    )
    for item, (reply,) in tqdm(zip(waiting, replies), total=len(waiting), desc="drafting", unit=" comment"):
        tokens += len(reply.token_ids)
        with editing(state) as items:
            current = items.get(item.id)
            if current is not None and current.status == "waiting":  # the creator may have skipped it meanwhile
                current.draft, current.status = reply.text.strip(), "drafted"
    return DraftRun(len(waiting), tokens, time.perf_counter() - started)


def regenerate(state: Path, replier: StreamingReplier, comment_id: str) -> Item:
    """A new draft, sampled (greedy decoding would write the same one again); the edit is dropped."""
    from inference.generate import GenerationSettings
    from training.evaluate import EVAL_SETTINGS

    text = _answerable(load(state), comment_id).text
    (reply,) = replier.reply(
        text, GenerationSettings(EVAL_SETTINGS.max_new_tokens, temperature=0.8, top_p=0.95), panes=(replier.tuned_pane,)
    )

    def new_draft(item: Item) -> None:
        _check_answerable(item)
        item.draft, item.reply, item.status = reply.text.strip(), "", "drafted"

    return _change(state, comment_id, new_draft)


# --- the creator's decisions -------------------------------------------------------------------


def edit(state: Path, comment_id: str, text: str) -> Item:
    """Keep the creator's version of the reply; an edited draft becomes a preference pair."""
    text = _reply_text(text, comment_id)

    def keep(item: Item) -> None:
        _check_answerable(item)
        _keep_edit(state, item, text)

    return _change(state, comment_id, keep)


def approve(state: Path, comment_id: str, text: str) -> Item:
    """Approve ``text`` as the reply to post (an edit of the draft is kept as one); it becomes a
    training pair, once however often it is approved."""
    from training.flywheel import save_correction

    text = _reply_text(text, comment_id)

    def mark(item: Item) -> None:
        _check_answerable(item)
        if item.status == "approved" and text == item.final:
            return
        _keep_edit(state, item, text)
        item.status, item.note = "approved", ""
        save_correction(state, *_anonymized(item.text, item.final))

    return _change(state, comment_id, mark)


def _keep_edit(state: Path, item: Item, text: str) -> None:
    if text == item.final:
        return
    if item.draft:  # the edit is preferred over what the model wrote
        from training.flywheel import save_preference

        save_preference(state, *_anonymized(item.text, text), _anonymized(item.text, item.draft)[1])
    item.reply = "" if text == item.draft else text


def skip(state: Path, comment_id: str) -> Item:
    """Leave the comment unanswered; it no longer shows as waiting."""

    def mark(item: Item) -> None:
        _check_answerable(item)
        item.status = "skipped"

    return _change(state, comment_id, mark)


def _answerable(items: dict[str, Item], comment_id: str) -> Item:
    if comment_id not in items:
        raise InboxError(f"no comment {comment_id!r} in the inbox; pick one of the comments listed")
    _check_answerable(items[comment_id])
    return items[comment_id]


def _check_answerable(item: Item) -> None:
    if item.status in ("posting", "posted", "gone"):
        raise InboxError(f"comment {item.id} is {item.status}: its reply can no longer be changed")


def _reply_text(text: str, comment_id: str) -> str:
    text = (text or "").replace("\x00", "").strip()
    if not text:
        raise InboxError(f"the reply to comment {comment_id} is empty: write one, or skip the comment")
    return text


def _anonymized(comment: str, reply: str) -> tuple[str, str]:
    """What goes to training: the commenters' @handles replaced, as the data loader does."""
    from training.data import anonymize

    return anonymize(comment), anonymize(reply)


# --- posting -----------------------------------------------------------------------------------


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

    updated = _change(state, item.id, update)
    item.status = updated.status
    return updated


def _stopped(state: Path, exc: YouTubeError, run: PostRun) -> YouTubeError:
    left = counts(load(state))["approved"]
    return YouTubeError(f"{exc}; {run}; {left} approved replies are kept and the same command posts them")


# --- the command -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from youtube import auth

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--state", type=Path, required=True, help="the inbox folder (inbox.jsonl, pairs.jsonl, preferences.jsonl)"
    )
    common.add_argument(
        "--api-url", default=default_api_url(), help="the API root: a proxy or a local server [env YOUTUBE_API_URL]"
    )
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
    parser = argparse.ArgumentParser(
        prog="python -m youtube.inbox",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    args = parser.parse_args(argv)
    try:
        if args.command == "pull":
            key = args.api_key or os.environ.get(KEY_ENV)
            if not key:
                raise YouTubeError(
                    f"no API key: set {KEY_ENV} (or pass --api-key); a key comes from the Google Cloud console with the YouTube Data API v3 enabled"
                )
            added, pages = pull(Client(args.api_url, key=key), args.state, args.channel, args.since, args.max_pages)
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
    except YouTubeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _load_replier(base_model: str | None, adapter: str | None) -> StreamingReplier:
    """The app's fine-tuned pane: its default base model and shipped adapter, llama.cpp on a CPU."""
    from inference.default_model import DEFAULT_ADAPTER, DEFAULT_BASE_MODEL
    from inference.engines import load_replier

    replier = load_replier(base_model or DEFAULT_BASE_MODEL, adapter or str(DEFAULT_ADAPTER))
    print(f"drafting with {replier.backend}")
    return replier


if __name__ == "__main__":
    sys.exit(main())
