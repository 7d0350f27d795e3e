"""The Batch compare tab: many comments at once, every pane's reply in a table (inference.compare)."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import gradio as gr

from inference.compare import compare, to_html
from inference.generate import GenerationSettings, StreamingReplier
from ui.reply import clean_comment

MAX_BATCH_COMMENTS = 20  # quoted in the UI and enforced in the handler, as the comment's length is


def compare_batch(replier: StreamingReplier, labels: dict[str, str], text: str, max_new_tokens: float) -> Iterator[str]:
    """The table, a row more as each comment is done."""
    comments = [c for c in (clean_comment(line.rstrip("\r"))[0] for line in (text or "").split("\n")) if c]
    if not comments:
        raise gr.Error("Paste one comment per line.")
    if len(comments) > MAX_BATCH_COMMENTS:
        raise gr.Error(
            f"At most {MAX_BATCH_COMMENTS} comments at a time (got {len(comments)}); "
            "use `python -m inference.compare` for more."
        )
    rows = []
    for row in compare(replier, comments, GenerationSettings(int(max_new_tokens)), replier.renderer.persona.signature):
        rows.append(row)
        yield to_html(rows, labels) + f"<p>{len(rows)} of {len(comments)} done</p>"


def batch_tab(
    replier: StreamingReplier, labels: dict[str, str], max_new_tokens: gr.Slider, examples: list[str]
) -> None:
    """A box of comments, one per line (the first held-out ones to start with), and the table;
    ``max_new_tokens``: the Reply tab's slider, shared."""
    batch_input = gr.Textbox(
        label=f"Comments, one per line (up to {MAX_BATCH_COMMENTS})", lines=6, value="\n".join(examples[:5])
    )
    batch_button = gr.Button("Compare", variant="primary")
    batch_output = gr.HTML()
    batch_button.click(
        functools.partial(compare_batch, replier, labels),
        [batch_input, max_new_tokens],
        batch_output,
        api_name="compare",
    )
