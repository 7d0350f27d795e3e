"""Drafts and the creator's review of them: a draft for every waiting comment from the fine-tuned
adapter, and Edit, Approve, Skip, Regenerate (the app's Inbox tab). An approved reply becomes a
training pair, an edited draft a preference pair (the edit chosen, the draft rejected)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from youtube.inbox.state import InboxError, Item, change_item, editing, load

if TYPE_CHECKING:
    from inference.generate import GenerationSettings, StreamingReplier


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

    return change_item(state, comment_id, new_draft)


def edit(state: Path, comment_id: str, text: str) -> Item:
    """Keep the creator's version of the reply; an edited draft becomes a preference pair."""
    text = _reply_text(text, comment_id)

    def keep(item: Item) -> None:
        _check_answerable(item)
        _keep_edit(state, item, text)

    return change_item(state, comment_id, keep)


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

    return change_item(state, comment_id, mark)


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

    return change_item(state, comment_id, mark)


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
