"""Streaming replies for every pane from one model in memory: what every engine shares.

:class:`StreamingReplier` holds the panes, prompts, streaming, stop tokens and limits;
:class:`GenerationSettings` and :func:`choose` are the one decoding rule both engines apply.
inference.transformers_engine (GPUs, GPTQ, ``--backend transformers``) and inference.llamacpp (the
CPU) implement ``_generate``; inference.engines picks one for the machine and loads it.

Streaming is the primitive: :meth:`StreamingReplier.stream` yields the replies as they grow, and
:meth:`StreamingReplier.reply` just runs the stream to its end.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import (
    NoRepeatNGramLogitsProcessor,
    PreTrainedTokenizerBase,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from inference.retrieval import ExampleBank
from prompts.render import Prompt, PromptRenderer

Row = Literal["base", "adapter"]  # which weights answer: the base alone, or the base with the adapter
# What a pane shows: the base with the persona prompt, the base with the persona and the creator's
# most similar past pairs as earlier turns, the adapter, the adapter with those examples too.
Pane = Literal["base", "examples", "adapter", "adapter+examples"]
PANE_ROW: dict[Pane, Row] = {"base": "base", "examples": "base", "adapter": "adapter", "adapter+examples": "adapter"}
WITH_EXAMPLES: frozenset[Pane] = frozenset({"examples", "adapter+examples"})
# Measured on the held-out set (bench/reply_quality.py, bench/RESULTS.md): with the creator's
# examples the base model loops, talks like an AI and runs to the cap far less, and a blind reader
# found 7 of 20 replies postable against 0 with the persona alone.
BEST_PROMPT_PANE: Pane = "examples"
PANE_NAMES: dict[str, str] = {
    "base": "prompt only",
    "examples": "prompt + your examples",
    "adapter": "fine-tuned",
    "adapter+examples": "fine-tuned + your examples",
}
# A decoding step slower than this means the decoding loop is stuck or died without a word; fail loudly.
STEP_TIMEOUT_S = 300.0
_DONE = object()


@dataclass(frozen=True)
class GenerationSettings:
    """Greedy by default, so the same comment always gets the same replies. The limits are the app's
    slider ranges too."""

    max_new_tokens: int = 160
    temperature: float = 0.0  # 0 means greedy decoding
    top_p: float = 1.0
    # Repetition control over the reply written so far (never the prompt: repeating the comment's
    # words is fine). The defaults were chosen on the held-out set (bench/reply_quality.py).
    repetition_penalty: float = 1.1  # transformers' and llama.cpp's meaning: a seen token's logit / p (x p if negative)
    no_repeat_ngram: int = 4  # no n-gram of this many tokens twice in a reply; 0 = off

    def __post_init__(self) -> None:
        for name, (low, high) in LIMITS.items():
            if not low <= getattr(self, name) <= high:
                raise ValueError(f"{name} must be between {low} and {high}, got {getattr(self, name)}")


# (lowest, highest) of each setting. A reply past 512 tokens is no YouTube reply; above 1.5 the
# temperature gives noise; below 0.05 top-p is greedy decoding by another name.
LIMITS: dict[str, tuple[float, float]] = {
    "max_new_tokens": (1, 512),
    "temperature": (0.0, 1.5),
    "top_p": (0.05, 1.0),
    "repetition_penalty": (1.0, 2.0),
    "no_repeat_ngram": (0, 12),
}


def choose(
    logits: torch.Tensor,
    histories: Sequence[Sequence[int]],
    settings: GenerationSettings,
    generator: torch.Generator | None = None,
) -> list[int]:
    """The next token of each row (``logits``: rows x vocabulary) after the repetition rules applied
    to each row's reply so far (``histories``), greedy or sampled.

    The one decoding rule of both engines: llama.cpp's logits come through here as well, so the
    panes of the GPU path and the CPU path obey the same penalties. The rules are transformers'
    own processors: RepetitionPenalty is llama.cpp's ``repeat_penalty`` over the reply's tokens.
    """
    logits = logits.float()
    for row, history in enumerate(histories):
        if history and (settings.repetition_penalty != 1.0 or settings.no_repeat_ngram):
            ids = torch.tensor([list(history)], device=logits.device)
            scores = logits[row : row + 1]
            if settings.repetition_penalty != 1.0:
                scores = RepetitionPenaltyLogitsProcessor(settings.repetition_penalty)(ids, scores)
            if settings.no_repeat_ngram:
                scores = NoRepeatNGramLogitsProcessor(settings.no_repeat_ngram)(ids, scores)
            logits[row] = scores[0]
    if settings.temperature <= 0:
        return logits.argmax(dim=-1).tolist()
    logits = TopPLogitsWarper(settings.top_p)(None, TemperatureLogitsWarper(settings.temperature)(None, logits))
    return torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1, generator=generator).squeeze(1).tolist()


@dataclass
class Reply:
    """One pane's reply as it grows."""

    pane: Pane
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    done: bool = False
    stopped: bool = False  # ended on the end-of-turn token rather than the max_new_tokens cap
    first_token_s: float | None = None
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds else 0.0


Job = tuple[list[int], Row]  # a prompt's token ids and the weights (base or adapter) that answer it


class StreamingReplier:
    """What every reply engine shares: the prompt, the streaming of replies as they grow, the stop
    tokens and limits. ``examples``: the creator's pairs that the ``examples`` panes retrieve from
    (None: no such pane).

    An engine implements one method, ``_generate(jobs, settings, out, cancel)``, the protocol
    between a decoding loop and the consumer of the stream:

    - ``jobs`` is a list of :data:`Job`: a prompt's token ids and the :data:`Row` (base weights
      alone, or with the adapter) that answers it. A job's index in the list is its *place*, where
      its reply sits in the list that :meth:`stream` yields; several jobs may share a prompt.
    - After every decoding step it puts one ``{place: token}`` dict on the ``out`` queue, with a
      token for each job still decoding (a step may hold any subset of the places). A job's end-of-
      turn token is put like any other; the consumer ends that reply on it, and the engine must
      stop decoding that job. The consumer also ends a reply at ``settings.max_new_tokens`` tokens,
      so the engine must not decode more than that per job.
    - It returns when every job has ended. It never puts the end marker or its own exception:
      :meth:`_run` wraps it, puts whatever it raises on the queue (the consumer re-raises it) and
      then ``_DONE``. A step that takes longer than STEP_TIMEOUT_S raises TimeoutError in the
      consumer instead of hanging.
    - ``cancel`` is set when the consumer stops reading (the stream was closed early, or raised):
      the engine checks it between steps and returns at once.
    - It runs on a worker thread (or on the calling thread with ``background=False``) while the
      consumer holds ``self._lock``: an engine's decoding state (peft's routing hooks, llama.cpp's
      KV cache) is shared, so it is never entered by two decoding loops at once, and ``_generate``
      must not take the lock itself.
    """

    backend = "?"

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        renderer: PromptRenderer,
        has_adapter: bool,
        examples: ExampleBank | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.renderer = renderer
        self.has_adapter = has_adapter
        self.examples = examples
        # A backend's decoding state (peft's routing hooks, llama.cpp's KV cache) is shared, so two
        # decoding loops must never overlap; the app's queue also runs one at a time.
        self._lock = threading.Lock()

    @property
    def panes(self) -> tuple[Pane, ...]:
        """The panes this replier can show, in the app's order."""
        panes: list[Pane] = ["base"]
        if self.examples is not None:
            panes.append("examples")
        if self.has_adapter:
            panes.append("adapter")
            if self.examples is not None:
                panes.append("adapter+examples")
        return tuple(panes)

    @property
    def best_prompt_pane(self) -> Pane:
        """The prompt side the app shows first: the one that measured stronger, where it is offered."""
        return BEST_PROMPT_PANE if BEST_PROMPT_PANE in self.panes else "base"

    @property
    def tuned_pane(self) -> Pane:
        """The fine-tuned side of the app (and the inbox's drafts): the adapter with the creator's
        examples in its prompt where it has them, which measured better (no loops, every reply
        ending on its own: bench/RESULTS.md), and the same prompt as the prompt side's, so that
        the two panes differ by the fine-tuning alone."""
        return "adapter+examples" if "adapter+examples" in self.panes else "adapter"

    def prompt(self, comment: str, pane: Pane = "base") -> Prompt:
        """What ``pane`` sends the model for ``comment``."""
        if pane not in WITH_EXAMPLES:
            return self.renderer.prompt(comment)
        if self.examples is None:
            raise ValueError(
                f"the {pane!r} pane needs the creator's examples (examples.jsonl beside the adapter), "
                "and none are loaded"
            )
        return self.renderer.prompt(comment, self.examples.similar(comment))

    def _jobs(self, comment: str, panes: Sequence[Pane]) -> list[Job]:
        return [(self.prompt(comment, pane).input_ids, PANE_ROW[pane]) for pane in panes]

    def stream(
        self,
        comment: str,
        settings: GenerationSettings = GenerationSettings(),
        panes: Sequence[Pane] | None = None,
        background: bool = True,
    ) -> Iterator[list[Reply]]:
        """Yield the replies (one per pane, in ``panes`` order) after every decoding step.

        The model runs on a thread of its own that ends with the replies, so that the app's
        long-lived threads never keep OpenMP workers (see inference.engines.load_replier). ``background=False`` runs it
        on the calling thread before yielding anything: for batch evaluation on a main thread that
        has already trained, where a second set of OpenMP workers would slow every step.
        """
        panes = tuple(panes or self.panes)
        yield from self._stream_jobs(self._jobs(comment, panes), panes, settings, background)

    def _stream_jobs(
        self, jobs: list[Job], panes: Sequence[Pane], settings: GenerationSettings, background: bool
    ) -> Iterator[list[Reply]]:
        if any(row == "adapter" for _, row in jobs) and not self.has_adapter:
            raise ValueError("no adapter is loaded, so there is no fine-tuned reply to generate")
        replies = [Reply(pane) for pane in panes]
        with self._lock:
            steps: queue.Queue = queue.Queue()
            cancel = threading.Event()
            started = time.perf_counter()
            worker = (
                threading.Thread(target=self._run, args=(jobs, settings, steps, cancel), daemon=True)
                if background
                else None
            )
            if worker:
                worker.start()
            else:
                self._run(jobs, settings, steps, cancel)
            try:
                yield from self._collect(replies, steps, started, settings)
            finally:
                # Reached on normal exit, on error and when the consumer closes the stream early:
                # never leave a decoding loop running into the next request.
                cancel.set()
                if worker:
                    worker.join()
        for reply in replies:
            reply.done = True
            reply.text = self.tokenizer.decode(reply.token_ids, skip_special_tokens=False)
        yield replies

    def _collect(
        self, replies: list[Reply], steps: queue.Queue, started: float, settings: GenerationSettings
    ) -> Iterator[list[Reply]]:
        stops = set(self.renderer.stop_ids)
        while True:
            try:
                item = steps.get(timeout=STEP_TIMEOUT_S)
            except queue.Empty:
                raise TimeoutError(f"no token in {STEP_TIMEOUT_S:.0f} s; generation is stuck") from None
            if item is _DONE:
                break
            if isinstance(item, BaseException):
                raise item
            now = time.perf_counter() - started
            for place, token in item.items():
                reply = replies[place]
                if reply.first_token_s is None:
                    reply.first_token_s = now
                reply.seconds = now
                if token in stops:
                    reply.done = reply.stopped = True
                    continue
                reply.token_ids.append(token)
                text = self.tokenizer.decode(reply.token_ids, skip_special_tokens=False)
                # Hold back a half-decoded multi-byte character until its next token arrives.
                if not text.endswith("\ufffd"):
                    reply.text = text
                if len(reply.token_ids) >= settings.max_new_tokens:
                    reply.done = True
            yield replies

    def reply(
        self,
        comment: str,
        settings: GenerationSettings = GenerationSettings(),
        panes: Sequence[Pane] | None = None,
        background: bool = True,
    ) -> list[Reply]:
        """The finished replies: the last state of :meth:`stream`."""
        final: list[Reply] = []
        for final in self.stream(comment, settings, panes, background):  # noqa: B007 (the last value is the result)
            pass
        return final

    def replies(
        self,
        comments: Sequence[str],
        settings: GenerationSettings = GenerationSettings(),
        panes: Sequence[Pane] | None = None,
        background: bool = True,
    ) -> Iterator[list[Reply]]:
        """The finished replies to each comment, in order (evaluation, batch compare). A backend
        that decodes many sequences at once overrides this."""
        for comment in comments:
            yield self.reply(comment, settings, panes, background)

    def warm_up(self) -> None:
        """One short generation so the first visitor does not pay for lazy initialisation."""
        self.reply("Thanks!", GenerationSettings(max_new_tokens=2))

    @functools.cached_property
    def prefix_ids(self) -> list[int]:
        """The token ids every prompt starts with: the chat template and the persona up to the comment."""
        probes = [self.renderer.prompt(comment).input_ids for comment in ("a", "Zebra 42?", "¿Qué?")]
        shared = 0
        while all(len(p) > shared for p in probes) and len({p[shared] for p in probes}) == 1:
            shared += 1
        return probes[0][: shared - 1]  # the last shared token could merge with some comment's first characters

    def _run(self, jobs: list[Job], settings: GenerationSettings, out: queue.Queue, cancel: threading.Event) -> None:
        try:
            self._generate(jobs, settings, out, cancel)
        except BaseException as exc:  # handed to the consuming thread, which re-raises it
            out.put(exc)
        finally:
            out.put(_DONE)

    def _generate(
        self, jobs: list[Job], settings: GenerationSettings, out: queue.Queue, cancel: threading.Event
    ) -> None:
        """Decode ``jobs``, putting ``{place: token}`` on ``out`` after every step (the class docstring
        has the protocol)."""
        raise NotImplementedError

    def close(self) -> None:
        """Free what the engine holds outside Python's memory (llama.cpp's model and contexts); nothing here."""
