"""The creator's own examples, retrieved: for a new comment, the past (comment, reply) pairs whose
comments are most like it, ranked by BM25 (bm25s).

They go into the prompt as earlier chat turns (prompts.render), so the prompt-only pane can show
the model how this creator answers this kind of comment: few-shot prompting at its strongest, the
honest opponent of the fine-tuned adapter. The pairs come from the adapter folder
(``examples.jsonl``: the training pairs, anonymised), so the app, a Hub copy and the evaluation
retrieve from the same pool, and never from the held-out pairs.

BM25 over the comments rather than an embedding model: none can be had offline here, and the
comments that benefit most are the ones that ask what an earlier comment asked, in its words.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

K_EXAMPLES = 2  # earlier turns in a prompt: half the first token of 4, replies as good (bench/RESULTS.md)


def _key(text: str) -> str:
    """Comments that differ only in case, spacing and punctuation are the same comment."""
    return " ".join(re.findall(r"\w+", text.lower()))


class ExampleBank:
    """The pairs a prompt may show, and the BM25 index over their comments."""

    def __init__(self, pairs: Sequence[tuple[str, str]], k: int = K_EXAMPLES) -> None:
        import bm25s

        if not pairs:
            raise ValueError("no pairs to retrieve examples from")
        self.pairs = list(pairs)
        self.k = k  # how many a prompt shows
        self._bm25s = bm25s
        self._index = bm25s.BM25()
        self._index.index(self._tokens([comment for comment, _ in self.pairs]), show_progress=False)

    def _tokens(self, texts: list[str]):
        return self._bm25s.tokenize(texts, stopwords="en", show_progress=False)

    def similar(self, comment: str) -> list[tuple[str, str]]:
        """The bank's ``k`` pairs whose comments are most like ``comment``, the most similar last
        (nearest the comment in the prompt). A pair with the same comment is never its own example,
        so a held-out or training comment is not answered by its own reply."""
        own = _key(comment)
        wanted = min(len(self.pairs), self.k + sum(_key(c) == own for c, _ in self.pairs))
        # A comment with no word in common with any pair (or only stopwords) still gets k pairs:
        # they show the creator's voice, if not an answer.
        ids, _ = self._index.retrieve(self._tokens([comment]), k=wanted, show_progress=False, n_threads=1)
        chosen = [self.pairs[i] for i in map(int, ids[0]) if _key(self.pairs[i][0]) != own][: self.k]
        return chosen[::-1]
