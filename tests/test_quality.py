"""The content measures a careful reader applies first: loops, talk about being an AI, chrF."""

from __future__ import annotations

import pytest

from inference.default_model import ROOT
from inference.quality import chrf, content_stats, flags, loops, talks_like_an_ai


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("Thanks! Thanks! Thanks!", True),  # a sentence three times
        ("I love this video and I love this video and I love this video so much", True),  # a phrase three times
        ("Great question! Start with the elbow method, then check the silhouette score. –Maya", False),
        ("Thanks! Thanks a lot, really. –Maya", False),  # twice is style, not a loop
        ("k-means, k-means and more k-means: the elbow method helps with k-means. –Maya", False),
        # A loop that mutates (what the no-repeat n-gram rule leaves): no phrase three times.
        (
            (
                "You should ask questions about the data, the data science, the data scientist, and the data. You "
                "should also ask about the data scientist's experience, their experience with data science, and their "
                "experience with machine learning. You should ask about the experience with pandas, about the "
                "experience of the team, and about the experience you'll have. –Maya"
            ),
            True,
        ),
    ],
)
def test_loops(reply, expected):
    assert loops(reply) is expected


def test_no_real_reply_loops_or_talks_like_an_ai():
    """The measures must not mark the creator's own replies: every one in data/, long ones included."""
    from training.data import load_pairs

    replies = [
        p.response
        for name in ("train", "heldout", "short/train", "short/heldout")
        for p in load_pairs(ROOT / "data" / f"{name}.jsonl")
    ]
    assert len(replies) > 400
    assert [r for r in replies if loops(r)] == []
    assert [r for r in replies if talks_like_an_ai(r)] == []


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("As a data science AI, I'm designed to help you learn. –Maya", True),
        ("I'm just an AI assistant, but here's what I think", True),
        ("As a language model I don't have personal opinions", True),
        ("I don't have personal experience with that laptop", True),
        # An assistant's refusal, read blind as AI talk (prompt pane, penalty 1.1; bench/RESULTS.md)
        ("I'm sorry, but I don't have the ability to create a custom template.", True),
        ("I'm sorry for the misunderstanding, but I can't help with that. –Maya", True),
        ("I'm sorry for the confusion, but yes, there is a Colab link in the description now. –Maya", False),
        ("Sorry, I can't help with your homework, but the elbow method is a start. –Maya", False),
        ("Language models like GPT learn from next-token prediction. –Maya", False),
        ("I built a chatbot with LangChain in the last video. –Maya", False),
        ("AI is moving fast, I agree! –Maya", False),
    ],
)
def test_talks_like_an_ai(reply, expected):
    assert talks_like_an_ai(reply) is expected


def test_chrf_rewards_the_closer_reply():
    real = ["Try the elbow method first. –Maya", "You're welcome! –Maya"]
    assert chrf(real, real) == pytest.approx(100.0)
    close = chrf(["Try the elbow method. –Maya", "You're welcome –Maya"], real)
    far = chrf(["Bananas are yellow.", "The weather is nice today."], real)
    assert 0 <= far < close < 100


def test_content_stats_and_flags_count_each_failure():
    replies = ["Hi! Hi! Hi!", "As an AI I cannot say.", "Thanks for watching! –Maya", "Long reply that was cut"]
    stats = content_stats(
        replies, [True, True, True, False], ["Hi –Maya", "Good point –Maya", "Thanks for watching! –Maya", "Sure –Maya"]
    )
    assert stats["loop_rate"] == 0.25 and stats["ai_talk_rate"] == 0.25 and stats["cut_rate"] == 0.25
    assert flags("Hi! Hi! Hi!", stopped=False) == ["loops", "cut at the token cap"]
    assert flags("Thanks! –Maya", stopped=True) == []
