"""Voice-fidelity metrics: computed from real replies, deterministic, and stored with the adapter."""

from __future__ import annotations

import pytest

from inference.engines import load_replier
from inference.retrieval import K_EXAMPLES
from training.data import Pair
from training.evaluate import evaluate, held_out_losses, language, markdown_table, reply_stats, verdict

HELD = [
    Pair("Danke, sehr gut erklärt, vielen Dank für das Video!", "Danke dir, freut mich sehr! –Maya", "h:1"),
    Pair("How do I choose the number of clusters in k-means?", "Try the elbow method first. –Maya", "h:2"),
    Pair("Thanks!", "You're welcome! –Maya", "h:3"),
]


def test_reply_stats_measure_what_they_say():
    replies = [
        "Danke, das freut mich wirklich sehr! –Maya",
        "You're welcome! –Maya",
        "Great question 🎉 I think the answer is long and rambling here",
    ]
    stats = reply_stats(replies, HELD, "–Maya", trained_replies={"You're welcome! –Maya"})
    assert stats["signature_rate"] == pytest.approx(2 / 3)
    assert stats["emoji_rate"] == pytest.approx(1 / 3)
    assert stats["memorized_rate"] == pytest.approx(1 / 3)
    assert stats["length_ratio"] == pytest.approx(7 / 6)  # median of 7/6, 3/6 and 11/3 words
    # Only the two long comments have a confident language; the German one is answered in German.
    assert stats["same_language_rate"] == pytest.approx(1 / 2)


def test_language_is_none_for_short_text():
    assert language("Thanks!") is None
    assert language("Danke, sehr gut erklärt, vielen Dank für das Video!") == "de"


@pytest.mark.parametrize("backend", ["transformers", "llama.cpp"])
def test_evaluation_is_deterministic_and_compares_three_sources(tiny_model_dir, tiny_adapter_dir, backend):
    """The replies come from either backend; the losses from the transformers model."""
    scorer = load_replier(str(tiny_model_dir), str(tiny_adapter_dir), quantization="none", backend="transformers")
    replier = load_replier(str(tiny_model_dir), str(tiny_adapter_dir), quantization="none", backend=backend)
    losses = held_out_losses(scorer, HELD, 512, scorer.panes)
    first = evaluate(replier, HELD, [Pair("x", "You're welcome! –Maya", "t:1")], losses)
    second = evaluate(replier, HELD, [Pair("x", "You're welcome! –Maya", "t:1")], losses)
    assert {
        k: first["table"][k]["held_out_loss"] for k in ("base", "examples", "adapter", "adapter+examples")
    } == losses
    assert first["settings"]["backend"] == backend
    assert first["settings"]["examples_shown"] == replier.examples.k == K_EXAMPLES
    assert first == second
    assert set(first["table"]) == {"base", "examples", "adapter", "adapter+examples", "real"}
    assert set(first["table"]["examples"]) >= {"loop_rate", "ai_talk_rate", "cut_rate", "chrf", "held_out_loss"}
    assert first["table"]["real"]["signature_rate"] == 1.0 and first["table"]["real"]["length_ratio"] == 1.0
    assert first["table"]["base"]["held_out_loss"] != first["table"]["adapter"]["held_out_loss"]
    assert len(first["replies"]) == 3 and first["replies"][0]["real"] == HELD[0].response
    table = markdown_table(first)
    assert "| ends with the signature |" in table and "creator's real replies" in table
    assert f"the examples panes show the creator's {K_EXAMPLES} most similar past pairs" in table


def test_the_verdict_says_plainly_where_fine_tuning_wins_and_where_it_loses():
    row = {"loop_rate": 0.0, "ai_talk_rate": 0.0, "chrf": 21.6, "held_out_loss": 3.09}
    prompt = {"loop_rate": 0.03, "ai_talk_rate": 0.06, "chrf": 22.5, "held_out_loss": 3.306}
    result = {
        "comments": 32,
        "table": {"base": {**prompt, "chrf": 25.2}, "examples": prompt, "adapter": row, "adapter+examples": row},
    }
    text = verdict(result)
    assert text.startswith("On 32 held-out comments, fine-tuned + your examples against prompt + your examples:")
    assert "better on held-out loss (3.090 vs 3.306), loops (0% vs 3%), AI talk (0% vs 6%)" in text
    assert "worse on chrF to the real replies (21.6 vs 22.5)" in text
    assert (
        verdict({"comments": 3, "table": {"base": {"signature_rate": 0.0}, "adapter": {"signature_rate": 1.0}}}) == ""
    )  # a table from before chrF
