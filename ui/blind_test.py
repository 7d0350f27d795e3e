"""The Blind test tab: a held-out comment, every pane's reply and the creator's real one in a random
order; which sounds like the creator? Each pick is counted, and saved as preference pairs."""

from __future__ import annotations

import functools
import random
from pathlib import Path

import gradio as gr

from inference.generate import PANE_NAMES, GenerationSettings, StreamingReplier
from training.flywheel import PREFERENCES_FILE, save_preference

BLIND_LETTERS = "ABCDE"  # one letter per reply in a blind round: every pane, and the real reply
NO_HELD_OUT_TEXT = (
    "This adapter carries no held-out comments (`heldout.jsonl` beside its weights), so there is no real reply "
    "of yours to compare with. An adapter trained by `python -m training.run` carries the ones it was evaluated on."
)


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


def next_round(
    replier: StreamingReplier, pairs: list[tuple[str, str]], rng: random.Random, state: dict | None
) -> tuple:
    """A held-out comment and every pane's reply and the real one, shuffled."""
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
