"""Retrieving the creator's own examples: the most similar comments, never the comment itself."""

from __future__ import annotations

import pytest

from inference.retrieval import ExampleBank

PAIRS = [
    ("What learning rate should I use for LoRA?", "Start around 2e-4. –Maya"),
    ("Which laptop do you use?", "A 5-year-old ThinkPad. –Maya"),
    ("Thanks!", "You're welcome! –Maya"),
    ("How do I pick k in k-means?", "Try the elbow method. –Maya"),
    ("Is the learning rate for full fine-tuning different?", "Yes, lower: 2e-5. –Maya"),
]


def test_the_most_similar_example_comes_last_nearest_the_comment():
    shown = ExampleBank(PAIRS, k=2).similar("what learning rate for LoRA fine-tuning")
    assert shown == [PAIRS[4], PAIRS[0]]


def test_a_comment_never_retrieves_itself():
    bank = ExampleBank(PAIRS, k=4)
    for comment, reply in PAIRS:
        shown = bank.similar(comment.upper() + "  ")  # case and spacing do not hide it
        assert len(shown) == 4 and (comment, reply) not in shown


def test_a_comment_with_no_known_word_still_gets_k_examples():
    assert len(ExampleBank(PAIRS, k=3).similar("zzzz qqqq")) == 3
    assert len(ExampleBank(PAIRS, k=3).similar("the a of")) == 3  # stopwords only


def test_k_larger_than_the_pool_gives_the_whole_pool():
    assert sorted(ExampleBank(PAIRS[:2], k=10).similar("laptop")) == sorted(PAIRS[:2])


def test_no_pairs_is_an_error():
    with pytest.raises(ValueError, match="no pairs"):
        ExampleBank([])
