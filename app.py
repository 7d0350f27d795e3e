"""`python app.py`: type a YouTube comment, watch the base model (prompt only) and the fine-tuned
adapter reply side by side, streamed from one model in memory.

UI only: the model is loaded once in ``main()``, never at import; what it serves comes from flags
or the environment (what Hugging Face Spaces sets as Space variables and secrets; flags win).
Replies, comparison and model loading live in ``inference/``, the flywheel's files in ``training/``,
the comment inbox in ``youtube/``.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from errors import exits_on_error
from inference.compare import compare, pane_labels, to_html
from inference.default_model import DEFAULT_ADAPTER, DEFAULT_BASE_MODEL, ROOT
from inference.generate import LIMITS, PANE_NAMES, GenerationSettings, Pane, Reply, StreamingReplier
from inference.loading import BACKENDS, QUANTIZATIONS, Backend, Quantization
from inference.quality import flags
from training.flywheel import PAIRS_FILE, PREFERENCES_FILE, save_correction, save_preference
from training.flywheel import waiting as flywheel_waiting
from youtube.api import YouTubeError
from youtube.inbox import posting, review
from youtube.inbox import state as inbox_state

logger = logging.getLogger("replytune.app")

# Limits, quoted in the UI and enforced in the handlers: a Textbox's max_length binds only the
# browser, and the API accepts anything.
MAX_COMMENT_CHARS = 2_000
MAX_BATCH_COMMENTS = 20
QUEUE_MAX_SIZE = 32  # requests waiting (a busy Space's worth); more are turned away with a message, not piled up
CONCURRENCY_LIMIT = 1  # one decoding loop at a time: the model is shared, and a CPU has no room for two
NO_HELD_OUT_TEXT = (
    "This adapter carries no held-out comments (`heldout.jsonl` beside its weights), so there is no real reply "
    "of yours to compare with. An adapter trained by `python -m training.run` carries the ones it was evaluated on."
)
NO_ADAPTER = "none"  # --adapter none: the base model alone
NO_ADAPTER_TEXT = (
    "No adapter is loaded, so there is no fine-tuned reply. Train one with `python -m training.run`, "
    "then start the app with `ADAPTER=outputs/adapter python app.py`."
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
    return f"{reply.seconds:.2f} s · {len(reply.token_ids)} tokens · {reply.tokens_per_s:.1f} tokens/s{first} · {end}{warnings}"


BLIND_LETTERS = "ABCDE"  # one letter per reply in a blind round: every pane, and the real reply


def blind_round(replier: StreamingReplier, comment: str, real: str, rng: random.Random) -> list[tuple[str, str]]:
    """Every pane's reply to one comment and the real one, as (source, text), in a random order."""
    options = [(reply.pane, reply.text) for reply in replier.reply(comment, GenerationSettings())] + [("real", real)]
    rng.shuffle(options)
    return options


def blind_name(source: str) -> str:
    return "your real reply" if source == "real" else PANE_NAMES[source]


def tally_text(tally: dict[str, int]) -> str:
    rounds = sum(tally.values())
    if not rounds:
        return "No picks yet."
    counts = ", ".join(f"{blind_name(source)} {n}" for source, n in tally.items())
    passed = (
        f" The fine-tuned reply passed for your own in {tally['adapter'] / rounds:.0%} of the rounds."
        if "adapter" in tally
        else ""
    )
    return f"{rounds} round(s), picks: {counts}.{passed}"


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


def compare_batch(replier: StreamingReplier, labels: dict[str, str], text: str, max_new_tokens: float) -> Iterator[str]:
    """The Batch compare tab: the table, a row more as each comment is done."""
    comments = [c for c in (clean_comment(line.rstrip("\r"))[0] for line in (text or "").split("\n")) if c]
    if not comments:
        raise gr.Error("Paste one comment per line.")
    if len(comments) > MAX_BATCH_COMMENTS:
        raise gr.Error(
            f"At most {MAX_BATCH_COMMENTS} comments at a time (got {len(comments)}); use `python -m inference.compare` for more."
        )
    rows = []
    for row in compare(replier, comments, GenerationSettings(int(max_new_tokens)), replier.renderer.persona.signature):
        rows.append(row)
        yield to_html(rows, labels) + f"<p>{len(rows)} of {len(comments)} done</p>"


def next_round(
    replier: StreamingReplier, pairs: list[tuple[str, str]], rng: random.Random, state: dict | None
) -> tuple:
    """The Blind test tab: a held-out comment and every pane's reply and the real one, shuffled."""
    if not pairs:
        raise gr.Error(NO_HELD_OUT_TEXT)
    comment, real = rng.choice(pairs)
    options = blind_round(replier, comment, real, rng)
    state = {**(state or {}), "comment": comment, "options": options, "picked": False}
    return (state, comment, *[text for _, text in options], "Which reply sounds most like you?")


def pick(flywheel_dir: Path | None, choice: str, state: dict | None) -> tuple:
    """A pick in the blind test: reveal the sources, count it, and save it as preference pairs."""
    if not state or "options" not in state:
        raise gr.Error("Start a round first.")
    if state["picked"]:
        raise gr.Error("This round is decided; start the next one.")
    sources = [source for source, _ in state["options"]]
    index = BLIND_LETTERS.index(choice)
    if index >= len(sources):
        raise gr.Error(f"This round has {len(sources)} replies; pick one of {BLIND_LETTERS[: len(sources)]}.")
    tally = dict(state.get("tally") or dict.fromkeys(sources, 0))
    tally[sources[index]] += 1
    state = {**state, "picked": True, "tally": tally}
    reveal = " · ".join(f"**{letter}**: {blind_name(source)}" for letter, source in zip(BLIND_LETTERS, sources))
    stored = ""
    if flywheel_dir is not None:
        chosen = state["options"][index][1]
        for i, (_, text) in enumerate(state["options"]):
            if i != index:
                save_preference(flywheel_dir, state["comment"], chosen, text)
        stored = f" Saved as preference pairs in `{flywheel_dir / PREFERENCES_FILE}`."
    return state, f"You picked **{choice}**: {blind_name(sources[index])}. {reveal}.{stored}", tally_text(tally)


def build_demo(
    replier: StreamingReplier,
    labels: dict[str, str],
    flywheel_dir: Path | None,
    held_out: list[tuple[str, str]],
    verdict: str = "",
    inbox_dir: Path | None = None,
) -> gr.Blocks:
    """The page. ``held_out``: the (comment, real reply) pairs that travelled with the adapter, for
    the blind test and the example comments; ``verdict``: what the adapter's voice evaluation found
    against the strongest prompt (training.evaluate.verdict), said plainly in the header;
    ``inbox_dir``: the comment inbox's state folder, if any."""
    examples = [comment for comment, _ in held_out[:12]]
    with gr.Blocks(title="replytune: prompt vs fine-tuned") as demo:
        gr.Markdown(
            "# replytune\nType a YouTube comment and compare replies from the same base model: steered by a prompt "
            "(the persona alone, or the persona with your most similar past replies), and with the fine-tuned LoRA adapter."
            + (f"\n\n**Measured:** {verdict}" if verdict else ""),
            elem_id="header",
        )
        with gr.Tab("Reply"):
            max_new_tokens = reply_tab(replier, labels, flywheel_dir, examples)
        if replier.has_adapter:
            with gr.Tab("Blind test"):
                blind_tab(replier, held_out, flywheel_dir)
        with gr.Tab("Batch compare"):
            batch_tab(replier, labels, max_new_tokens, examples)
        if inbox_dir is not None:
            with gr.Tab("Inbox"):
                inbox_tab(replier, inbox_dir, demo)
    return demo


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
    prompt_panes = [pane for pane in replier.panes if pane in ("base", "examples")]
    with gr.Row():
        with gr.Column():
            prompt_pane = gr.Radio(
                [(PANE_NAMES[pane], pane) for pane in prompt_panes],
                value=replier.best_prompt_pane,
                label="Prompt side",
                info=f"what the base model gets without fine-tuning (default: the one that measured stronger, {PANE_NAMES[replier.best_prompt_pane]})",
                elem_id="prompt-pane",
            )
            base_box = gr.Textbox(
                label=labels[replier.best_prompt_pane], lines=6, interactive=False, elem_id="base-reply"
            )
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
    with gr.Accordion("Generation settings", open=False):
        max_new_tokens = gr.Slider(
            *LIMITS["max_new_tokens"], value=GenerationSettings.max_new_tokens, step=1, label="Max new tokens"
        )
        temperature = gr.Slider(
            *LIMITS["temperature"],
            value=GenerationSettings.temperature,
            step=0.05,
            label="Temperature",
            info="0 = greedy: the same comment always gets the same replies",
        )
        top_p = gr.Slider(
            *LIMITS["top_p"], value=GenerationSettings.top_p, step=0.05, label="Top-p", info="used when temperature > 0"
        )
        repetition_penalty = gr.Slider(
            *LIMITS["repetition_penalty"],
            value=GenerationSettings.repetition_penalty,
            step=0.05,
            label="Repetition penalty",
            info="1 = off; > 1 makes tokens already in the reply less likely",
        )
        no_repeat_ngram = gr.Slider(
            *LIMITS["no_repeat_ngram"],
            value=GenerationSettings.no_repeat_ngram,
            step=1,
            label="No repeated phrase of N tokens",
            info="0 = off; stops loops without touching single words",
        )
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
    inputs = [comment, max_new_tokens, temperature, top_p, repetition_penalty, no_repeat_ngram, prompt_pane]
    gr.on([reply_button.click, comment.submit], functools.partial(respond, replier), inputs, outputs, api_name="reply")
    prompt_pane.change(lambda pane: gr.Textbox(label=labels[pane]), prompt_pane, base_box, api_name=False)
    save_button.click(
        functools.partial(save_reply, flywheel_dir),
        [comment, better, edited, base_box, tuned_box],
        saved,
        api_name="save",
    )
    return max_new_tokens


def blind_tab(replier: StreamingReplier, pairs: list[tuple[str, str]], flywheel_dir: Path | None) -> None:
    """Three replies to a held-out comment in a random order; which one sounds like the creator?"""
    intro = (
        f"A held-out comment and {len(replier.panes) + 1} replies in a random order: "
        + ", ".join(PANE_NAMES[pane] for pane in replier.panes)
        + ", and the one you really wrote. Pick the one that sounds most like you."
    )
    gr.Markdown(intro if pairs else NO_HELD_OUT_TEXT, elem_id="blind-intro")
    blind_state = gr.State(None)
    start = gr.Button("Next comment", variant="primary")
    blind_comment = gr.Textbox(label="Comment", interactive=False)
    with gr.Row():
        letters = BLIND_LETTERS[: len(replier.panes) + 1]
        blind_replies = [gr.Textbox(label=f"Reply {letter}", lines=5, interactive=False) for letter in letters]
    with gr.Row():
        pick_buttons = [gr.Button(f"{letter} sounds like me") for letter in letters]
    verdict = gr.Markdown()
    tally = gr.Markdown("No picks yet.")
    start.click(
        functools.partial(next_round, replier, pairs, random.Random()),
        blind_state,
        [blind_state, blind_comment, *blind_replies, verdict],
        api_name="blind_round",
    )
    for letter, button in zip(letters, pick_buttons):
        button.click(
            functools.partial(pick, flywheel_dir),
            [gr.State(letter), blind_state],
            [blind_state, verdict, tally],
            api_name=f"blind_pick_{letter}",
        )


def batch_tab(
    replier: StreamingReplier, labels: dict[str, str], max_new_tokens: gr.Slider, examples: list[str]
) -> None:
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


def inbox_view(inbox_dir: Path, selected: str | None = None) -> tuple:
    """The Inbox tab's counts, table and comment picker (keeping ``selected`` while it is listed)."""
    items = inbox_state.to_answer(inbox_dir)
    rows = [[i.status, i.author, i.text, i.final] for i in items]
    choices = [(f"{i.author}: {i.text[:80]}", i.id) for i in items]
    keep = selected if selected in {i.id for i in items} else (items[0].id if items else None)
    return inbox_state.counts_line(inbox_dir), rows, gr.Dropdown(choices=choices, value=keep)


def inbox_pick(inbox_dir: Path, comment_id: str | None) -> tuple[str, str]:
    """The picked comment (with its author, as the creator sees it on YouTube) and its reply."""
    item = inbox_state.load(inbox_dir).get(comment_id or "")
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
            message = (
                f"Posted: {posting.post(inbox_dir, Client(default_api_url(), sign_in=sign_in), echo=logger.info)}."
            )
    except YouTubeError as exc:
        raise gr.Error(str(exc)) from None
    return (*inbox_view(inbox_dir), message)


def inbox_tab(replier: StreamingReplier, inbox_dir: Path, demo: gr.Blocks) -> None:
    """The comments waiting for an answer, each with its draft: Edit, Approve, Skip, Regenerate,
    and Post for what was approved. The state is youtube.inbox's; drafts come from
    `python -m youtube.inbox draft` (Refresh shows them)."""
    gr.Markdown(
        f"Comments pulled with `python -m youtube.inbox pull --state {inbox_dir}`, drafted by `... draft`. Nothing is posted until you approve it and press Post."
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
            for action in ("edit", "approve", "skip", "regenerate")
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


@dataclass(frozen=True)
class AppSettings:
    base_model: str
    adapter: str | None
    quantization: Quantization
    backend: Backend
    host: str | None
    port: int | None
    flywheel_dir: Path | None
    inbox_dir: Path | None = None


def parse_app_settings(argv: list[str] | None = None) -> AppSettings:
    env = os.environ
    on_space = bool(env.get("SPACE_ID"))
    parser = argparse.ArgumentParser(
        prog="python app.py", description="Side-by-side replies: base model + prompt vs fine-tuned adapter."
    )
    parser.add_argument(
        "--base-model",
        default=env.get("BASE_MODEL", DEFAULT_BASE_MODEL),
        help="local folder or Hub id [env BASE_MODEL]",
    )
    parser.add_argument(
        "--adapter",
        default=env.get("ADAPTER", str(DEFAULT_ADAPTER)),
        help=f"adapter folder or Hub id, '{NO_ADAPTER}' for the base alone [env ADAPTER]",
    )
    parser.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        default=env.get("QUANTIZATION", "nf4"),
        help="how the base is stored for the transformers backend: nf4 (4-bit), int8 or none [env QUANTIZATION]",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default=env.get("BACKEND", "auto"),
        help="auto: llama.cpp on a CPU, transformers on a GPU (and for GPTQ) [env BACKEND]",
    )
    parser.add_argument(
        "--host", default=env.get("GRADIO_SERVER_NAME"), help="address to listen on [env GRADIO_SERVER_NAME]"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(env["GRADIO_SERVER_PORT"]) if env.get("GRADIO_SERVER_PORT") else None,
        help="port [env GRADIO_SERVER_PORT]",
    )
    parser.add_argument(
        "--flywheel-dir",
        default=env.get("FLYWHEEL_DIR", "" if on_space else str(ROOT / "flywheel")),
        help="folder for saved corrections and preferences; empty turns saving off (off on a public Space unless set) [env FLYWHEEL_DIR]",
    )
    parser.add_argument(
        "--inbox",
        default=env.get("INBOX_DIR", ""),
        help="the comment inbox's state folder (python -m youtube.inbox pull --state DIR); shows the Inbox tab, where whoever reaches the app can approve and post: keep such an app private [env INBOX_DIR]",
    )
    args = parser.parse_args(argv)
    adapter = None if args.adapter.strip().lower() in (NO_ADAPTER, "") else args.adapter
    if adapter and not Path(adapter).exists() and Path(adapter) == DEFAULT_ADAPTER:
        adapter = None  # no shipped adapter in this checkout: run with the base alone and say so
    return AppSettings(
        base_model=args.base_model,
        adapter=adapter,
        quantization=args.quantization,
        backend=args.backend,
        host=args.host,
        port=args.port,
        flywheel_dir=Path(args.flywheel_dir) if args.flywheel_dir else None,
        inbox_dir=Path(args.inbox) if args.inbox else None,
    )


@exits_on_error
def main(argv: list[str] | None = None) -> int:
    from inference.engines import load_replier

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings: AppSettings = parse_app_settings(argv)
    if settings.adapter is None:
        logger.info("no adapter loaded: the app shows the base model's reply only")
    replier = load_replier(settings.base_model, settings.adapter, settings.quantization, backend=settings.backend)
    logger.info("replies generated by %s", replier.backend)
    replier.warm_up()
    from inference.adapter_files import adapter_held_out, adapter_verdict

    held_out = adapter_held_out(settings.adapter)
    labels = pane_labels(settings.base_model, settings.adapter, replier.backend, replier.panes)
    demo = build_demo(
        replier, labels, settings.flywheel_dir, held_out, adapter_verdict(settings.adapter), settings.inbox_dir
    )
    launch(demo, settings.host, settings.port)
    return 0


def launch(demo: gr.Blocks, host: str | None = None, port: int | None = None, block: bool = True) -> gr.Blocks:
    """Serve the app with its limits: a bounded queue, one generation at a time, no stack traces.

    No ``allowed_paths``: the server hands out no file beyond Gradio's own assets.
    """
    demo.queue(max_size=QUEUE_MAX_SIZE, default_concurrency_limit=CONCURRENCY_LIMIT)
    demo.launch(server_name=host, server_port=port, show_error=False, prevent_thread_lock=not block, quiet=not block)
    return demo


if __name__ == "__main__":
    sys.exit(main())
