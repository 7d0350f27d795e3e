"""The Inbox tab: the comments waiting for an answer, each with its draft: Edit, Approve, Skip,
Regenerate, and Post for what was approved. The state is youtube.inbox's; drafts come from
`python -m youtube.inbox draft` (Refresh shows them)."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import gradio as gr

from inference.generate import StreamingReplier
from ui.reply import NO_ADAPTER_TEXT
from youtube.api import YouTubeError
from youtube.inbox import posting, review, state

logger = logging.getLogger("replytune.app")
ACTIONS = ("edit", "approve", "skip", "regenerate")


def inbox_view(inbox_dir: Path, selected: str | None = None) -> tuple:
    """The counts, table and comment picker (keeping ``selected`` while it is listed)."""
    items = state.to_answer(inbox_dir)
    rows = [[i.status, i.author, i.text, i.final] for i in items]
    choices = [(f"{i.author}: {i.text[:80]}", i.id) for i in items]
    keep = selected if selected in {i.id for i in items} else (items[0].id if items else None)
    return state.counts_line(inbox_dir), rows, gr.Dropdown(choices=choices, value=keep)


def inbox_pick(inbox_dir: Path, comment_id: str | None) -> tuple[str, str]:
    """The picked comment (with its author, as the creator sees it on YouTube) and its reply."""
    item = state.load(inbox_dir).get(comment_id or "")
    return (f"{item.author}: {item.text}", item.final) if item else ("", "")


def inbox_action(action: str, inbox_dir: Path, replier: StreamingReplier, comment_id: str | None, text: str) -> tuple:
    """Edit, Approve, Skip or Regenerate the picked comment, then the refreshed view and its reply."""
    if not comment_id:
        raise gr.Error("Pick a comment first.")
    if action == "regenerate" and not replier.has_adapter:
        raise gr.Error(NO_ADAPTER_TEXT)
    try:
        if action == "edit":
            item = review.edit(inbox_dir, comment_id, text)
        elif action == "approve":
            item = review.approve(inbox_dir, comment_id, text)
        elif action == "skip":
            item = review.skip(inbox_dir, comment_id)
        else:
            item = review.regenerate(inbox_dir, replier, comment_id)
    except YouTubeError as exc:
        raise gr.Error(str(exc)) from None
    return (*inbox_view(inbox_dir, comment_id), item.final, f"{item.author}'s comment: {item.status}.")


def inbox_post(inbox_dir: Path, dry_run: bool) -> tuple:
    """Post the approved replies, or show them (dry run); sign-in and API from the environment, as
    `python -m youtube.inbox post` takes them."""
    from youtube import auth
    from youtube.api import Client, default_api_url

    try:
        if dry_run:
            message = "\n".join(f"- {line}" for line in posting.preview(inbox_dir)) or "Nothing approved to post."
        else:
            sign_in = auth.load(auth.default_token_file(), auth.default_token_url())
            client = Client(default_api_url(), sign_in=sign_in)
            message = f"Posted: {posting.post(inbox_dir, client, echo=logger.info)}."
    except YouTubeError as exc:
        raise gr.Error(str(exc)) from None
    return (*inbox_view(inbox_dir), message)


def inbox_tab(replier: StreamingReplier, inbox_dir: Path, demo: gr.Blocks) -> None:
    """The counts, the table of comments to answer, the picked one's reply and its actions, Post."""
    gr.Markdown(
        f"Comments pulled with `python -m youtube.inbox pull --state {inbox_dir}`, drafted by `... draft`. "
        "Nothing is posted until you approve it and press Post."
    )
    counts = gr.Markdown(elem_id="inbox-counts")
    table = gr.Dataframe(
        headers=["status", "author", "comment", "reply"], interactive=False, wrap=True, elem_id="inbox-table"
    )
    refresh = gr.Button("Refresh")
    picked = gr.Dropdown(label="Comment", allow_custom_value=True, elem_id="inbox-pick")
    comment = gr.Textbox(label="Comment", interactive=False, elem_id="inbox-comment")
    reply = gr.Textbox(label="Reply (edit it here)", lines=4, elem_id="inbox-reply")
    with gr.Row():
        buttons = {
            action: gr.Button(
                action.capitalize(),
                variant="primary" if action == "approve" else "secondary",
                elem_id=f"inbox-{action}",
            )
            for action in ACTIONS
        }
    done = gr.Markdown(elem_id="inbox-done")
    with gr.Row():
        dry_run = gr.Checkbox(label="Dry run (show what would be posted)", value=False)
        post = gr.Button("Post approved replies", variant="primary", elem_id="inbox-post")
    posted = gr.Markdown(elem_id="inbox-posted")
    view = functools.partial(inbox_view, inbox_dir)
    demo.load(view, None, [counts, table, picked])
    refresh.click(view, picked, [counts, table, picked], api_name="inbox")
    picked.change(functools.partial(inbox_pick, inbox_dir), picked, [comment, reply], api_name="inbox_pick")
    for action, button in buttons.items():
        button.click(
            functools.partial(inbox_action, action, inbox_dir, replier),
            [picked, reply],
            [counts, table, picked, reply, done],
            api_name=f"inbox_{action}",
        )
    post.click(
        functools.partial(inbox_post, inbox_dir), dry_run, [counts, table, picked, posted], api_name="inbox_post"
    )
