"""The Reply tab: a comment, the prompt pane's and the fine-tuned reply side by side, streamed, with
the decoding settings, the exact prompt and the data flywheel (the reply the creator would post)."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import gradio as gr

from inference.generate import LIMITS, PANE_NAMES, GenerationSettings, Pane, Reply, StreamingReplier
from inference.quality import flags
from training.flywheel import PAIRS_FILE, save_correction, save_preference
from training.flywheel import waiting as flywheel_waiting

# A limit quoted in the UI and enforced in the handlers: a Textbox's max_length binds only the
# browser, and the API accepts anything.
MAX_COMMENT_CHARS = 2_000
NO_ADAPTER_TEXT = (
    "No adapter is loaded, so there is no fine-tuned reply. Train one with `python -m training.run`, "
    "then start the app with `ADAPTER=outputs/adapter python app.py`."
)
# The decoding settings the Reply tab offers, in respond's order: (GenerationSettings field, step,
# label, info); the ranges are inference.generate's LIMITS, the defaults GenerationSettings'.
SLIDERS = (
    ("max_new_tokens", 1, "Max new tokens", None),
    ("temperature", 0.05, "Temperature", "0 = greedy: the same comment always gets the same replies"),
    ("top_p", 0.05, "Top-p", "used when temperature > 0"),
    ("repetition_penalty", 0.05, "Repetition penalty", "1 = off; > 1 makes tokens already in the reply less likely"),
    ("no_repeat_ngram", 1, "No repeated phrase of N tokens", "0 = off; stops loops without touching single words"),
)


def clean_comment(comment: str | None) -> tuple[str, str]:
    """The comment as it will be sent, and a notice for the user ('' when there is nothing to say)."""
    comment = (comment or "").replace("\x00", "")
    if not comment.strip():
        return "", "Please type a comment first."
    if len(comment) > MAX_COMMENT_CHARS:
        return comment[:MAX_COMMENT_CHARS], (
            f"Your comment was {len(comment):,} characters long; only the first {MAX_COMMENT_CHARS:,} were used."
        )
    return comment, ""


def stats_line(reply: Reply) -> str:
    if not reply.token_ids and not reply.done:
        return "…"
    end = "stopped at end of turn" if reply.stopped else ("hit the token cap" if reply.done else "writing…")
    first = f" · first token {reply.first_token_s:.2f} s" if reply.first_token_s is not None else ""
    warnings = "".join(
        f" · ⚠ {flag}" for flag in flags(reply.text, reply.stopped) if reply.done and flag != "cut at the token cap"
    )
    speed = f"{reply.seconds:.2f} s · {len(reply.token_ids)} tokens · {reply.tokens_per_s:.1f} tokens/s"
    return f"{speed}{first} · {end}{warnings}"


def respond(
    replier: StreamingReplier,
    comment: str,
    max_new_tokens: float,
    temperature: float,
    top_p: float,
    repetition_penalty: float,
    no_repeat_ngram: float,
    prompt_pane: str,
) -> Iterator[tuple[str, ...]]:
    """The Reply tab: (notice, prompt pane's reply, its stats, fine-tuned reply, its stats, the
    exact prompts), streamed. ``prompt_pane``: which prompt the base model answers ("base" or "examples")."""
    comment, notice = clean_comment(comment)
    if not comment:
        yield notice, "", "", "" if replier.has_adapter else NO_ADAPTER_TEXT, "", ""
        return
    try:
        settings = GenerationSettings(
            int(max_new_tokens), float(temperature), float(top_p), float(repetition_penalty), int(no_repeat_ngram)
        )
    except ValueError as exc:
        raise gr.Error(str(exc)) from None
    panes: tuple[Pane, ...] = (prompt_pane, replier.tuned_pane) if replier.has_adapter else (prompt_pane,)
    prompt = "\n\n".join(f"── {PANE_NAMES[pane]} ──\n{replier.prompt(comment, pane).text}" for pane in panes)
    for replies in replier.stream(comment, settings, panes):
        base = replies[0]
        tuned = replies[1] if replier.has_adapter else None
        yield (
            notice,
            base.text,
            stats_line(base),
            tuned.text if tuned else NO_ADAPTER_TEXT,
            stats_line(tuned) if tuned else "",
            prompt,
        )


def save_reply(
    flywheel_dir: Path | None, comment: str, better: str | None, edited: str, base_reply: str, tuned_reply: str
) -> str:
    """The flywheel: the reply the creator would post, and which pane was better, saved as training data."""
    if flywheel_dir is None:
        raise gr.Error("Saving is turned off on this app (set FLYWHEEL_DIR to turn it on).")
    comment, _ = clean_comment(comment)
    if not comment:
        raise gr.Error("Generate replies for a comment first.")
    saved = []
    if edited and edited.strip():
        saved.append(str(save_correction(flywheel_dir, comment, edited.strip())))
    if better in ("prompt only", "fine-tuned") and base_reply and tuned_reply:
        chosen, rejected = (base_reply, tuned_reply) if better == "prompt only" else (tuned_reply, base_reply)
        saved.append(str(save_preference(flywheel_dir, comment, chosen, rejected)))
    if not saved:
        raise gr.Error("Pick the better reply or write your own reply, then save.")
    return (
        "Saved to " + " and ".join(f"`{s}`" for s in saved) + ". Train on your data and the corrections together with "
        f"`python -m training.run --data YOUR_DATA.jsonl {flywheel_dir / PAIRS_FILE}`."
    )


def reply_tab(
    replier: StreamingReplier, labels: dict[str, str], flywheel_dir: Path | None, examples: list[str]
) -> gr.Slider:
    """The comment box, both panes, settings, prompt and flywheel; its max-new-tokens slider."""
    comment = gr.Textbox(
        label=f"YouTube comment (up to {MAX_COMMENT_CHARS:,} characters)",
        placeholder="Great video! How do I pick the number of clusters?",
        info="Enter sends, Shift+Enter starts a new line",
        lines=1,  # with one line, Gradio submits on Enter; the box grows up to max_lines
        max_lines=8,
        max_length=MAX_COMMENT_CHARS,
        elem_id="comment",
    )
    reply_button = gr.Button("Reply", variant="primary", elem_id="reply")
    notice = gr.Markdown(elem_id="notice")
    prompt_pane, base_box, base_stats, tuned_box, tuned_stats = _panes(replier, labels)
    with gr.Accordion("Generation settings", open=False):
        sliders = _settings_sliders()
    with gr.Accordion("Exact prompt sent to the model", open=False):
        prompt_view = gr.Textbox(show_label=False, lines=8, interactive=False, elem_id="prompt")
    if examples:
        gr.Examples(examples=[[c] for c in examples], inputs=[comment], label="Held-out comments (not trained on)")
    with gr.Accordion(
        "Save a better reply (data flywheel)", open=False, visible=flywheel_dir is not None and replier.has_adapter
    ):
        better = gr.Radio(["prompt only", "fine-tuned"], label="Which reply is better?")
        edited = gr.Textbox(label="The reply you would really post (saved as training data)", lines=3)
        save_button = gr.Button("Save")
        saved = gr.Markdown()
        if flywheel_dir is not None:  # counted again on every page load
            gr.Markdown(functools.partial(flywheel_waiting, flywheel_dir), elem_id="flywheel-waiting")
    outputs = [notice, base_box, base_stats, tuned_box, tuned_stats, prompt_view]
    gr.on(
        [reply_button.click, comment.submit],
        functools.partial(respond, replier),
        [comment, *sliders, prompt_pane],
        outputs,
        api_name="reply",
    )
    prompt_pane.change(lambda pane: gr.Textbox(label=labels[pane]), prompt_pane, base_box, api_name=False)
    save_button.click(
        functools.partial(save_reply, flywheel_dir),
        [comment, better, edited, base_box, tuned_box],
        saved,
        api_name="save",
    )
    return sliders[0]


def _panes(
    replier: StreamingReplier, labels: dict[str, str]
) -> tuple[gr.Radio, gr.Textbox, gr.Markdown, gr.Textbox, gr.Markdown]:
    """The prompt side's choice, its reply and stats; the fine-tuned reply and its stats."""
    prompt_panes = [pane for pane in replier.panes if pane in ("base", "examples")]
    best = replier.best_prompt_pane
    with gr.Row():
        with gr.Column():
            prompt_pane = gr.Radio(
                [(PANE_NAMES[pane], pane) for pane in prompt_panes],
                value=best,
                label="Prompt side",
                info="what the base model gets without fine-tuning "
                f"(default: the one that measured stronger, {PANE_NAMES[best]})",
                elem_id="prompt-pane",
            )
            base_box = gr.Textbox(label=labels[best], lines=6, interactive=False, elem_id="base-reply")
            base_stats = gr.Markdown(elem_id="base-stats")
        with gr.Column():
            tuned_label = labels.get(replier.tuned_pane, "fine-tuned · no adapter loaded")
            tuned_box = gr.Textbox(
                label=tuned_label,
                lines=6,
                interactive=False,
                value="" if replier.has_adapter else NO_ADAPTER_TEXT,
                elem_id="tuned-reply",
            )
            tuned_stats = gr.Markdown(elem_id="tuned-stats")
    return prompt_pane, base_box, base_stats, tuned_box, tuned_stats


def _settings_sliders() -> list[gr.Slider]:
    return [
        gr.Slider(*LIMITS[name], value=getattr(GenerationSettings, name), step=step, label=label, info=info)
        for name, step, label, info in SLIDERS
    ]
