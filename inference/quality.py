"""Could the creator post this reply? The content measures, defined once for the voice table, the
model card, the app, ``inference.compare`` and ``bench/reply_quality.py``.

A signature and a plausible length say little: a reply that loops until the token cap, or that
explains it is an AI, is a failure however well it signs. These measures catch what a careful
reader rejects first; chrF against the creator's real reply says how close the content came.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from collections.abc import Sequence

LOOP_NGRAM = 4  # words; a 4-word phrase three times in one short reply is a loop, not style
LOOP_REPEATS = 3
# Whisper's test for a degenerate transcript: text that compresses too well repeats itself, even
# where no phrase comes back word for word. The no-repeat n-gram rule of the shipped decoding makes
# a loop mutate instead of repeat ("the data, the data science, the data scientist, and the data"),
# which the phrase count cannot see. The creator's 442 replies in data/ compress at most 1.86x (the
# longest, 770 characters, compress best); the rambling loops of the shipped voice table, 2.0-2.3x.
LOOP_COMPRESSION = 2.0
# Talk about being an AI, an assistant or a language model: the base model's own identity leaking
# into the creator's voice (its instruction tuning made it "a helpful AI assistant"; its chat
# template says so in any prompt without a system turn, which prompts.render no longer sends), and
# an assistant's stock refusal ("I can't help with that"), read blind as AI talk. Not "sorry for
# the confusion": a creator says it too, to a viewer stuck on an install.
AI_TALK = re.compile(
    r"\b(?:as an? (?:\w+ ){0,3}(?:ai|assistant|language model|chatbot|bot)\b"
    r"|i(?:'m| am) (?:just |only )?an? (?:\w+ ){0,3}(?:ai|assistant|language model|chatbot|bot)\b"
    r"|i(?:'m| am| was) (?:designed|programmed|trained) to"
    r"|i don'?t have (?:personal|feelings|emotions|opinions|a body|access|the ability|the capability)"
    r"|i (?:can'?t|cannot) (?:browse|access the internet|help with that|assist with that)"
    r"|smollm)",
    re.IGNORECASE,
)


def _words(text: str) -> list[str]:
    return re.findall(r"\w+(?:'\w+)?", text.lower())


def compression_ratio(text: str) -> float:
    """UTF-8 bytes over zlib-compressed bytes: about 1.5 for ordinary prose, higher the more it repeats."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def loops(text: str) -> bool:
    """Whether a phrase (LOOP_NGRAM words) or a sentence is repeated LOOP_REPEATS or more times, or
    the reply repeats itself in varied words (compresses LOOP_COMPRESSION times or more)."""
    words = _words(text)
    ngrams = Counter(tuple(words[i : i + LOOP_NGRAM]) for i in range(len(words) - LOOP_NGRAM + 1))
    sentences = Counter(" ".join(_words(s)) for s in re.split(r"[.!?\n]+", text) if _words(s))
    return (
        any(n >= LOOP_REPEATS for n in ngrams.values())
        or any(n >= LOOP_REPEATS for n in sentences.values())
        or compression_ratio(text) >= LOOP_COMPRESSION
    )


def talks_like_an_ai(text: str) -> bool:
    return bool(AI_TALK.search(text))


def chrf(replies: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu, 0-100) of the replies against the creator's real replies."""
    from sacrebleu.metrics import CHRF

    return CHRF().corpus_score(list(replies), [list(references)]).score


def content_stats(replies: Sequence[str], stopped: Sequence[bool], references: Sequence[str]) -> dict[str, float]:
    """The content measures of one pane's replies: rates in [0, 1], chrF in [0, 100]."""
    n = len(replies)
    return {
        "loop_rate": sum(map(loops, replies)) / n,
        "ai_talk_rate": sum(map(talks_like_an_ai, replies)) / n,
        "cut_rate": sum(not s for s in stopped) / n,
        "chrf": chrf(replies, references),
    }


def flags(text: str, stopped: bool) -> list[str]:
    """What a reader would reject at a glance, for one reply (the app's and compare's markers)."""
    found = []
    if loops(text):
        found.append("loops")
    if talks_like_an_ai(text):
        found.append("talks like an AI")
    if not stopped:
        found.append("cut at the token cap")
    return found
