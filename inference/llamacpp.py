"""Replies through llama.cpp: the engine the ecosystem runs on CPUs (Ollama, LM Studio).

One ``llama_model`` holds the base weights (a GGUF file); two contexts share it, one with no adapter
for the prompt-only pane and one with the LoRA adapter applied, each with a KV cache of its own.
llama.cpp applies an adapter to every sequence of a context, so this is how one model in memory
serves both panes without switching the adapter between decoding calls (a switch makes llama.cpp
re-plan its compute graph). The two contexts decode at the same time, each on its share of the
cores. Within a context, every sequence that is still writing decodes in one ``llama_decode`` call
per step: 8 sequences step in ~5x the time of one, so the voice evaluation's 23 comments take
seconds per comment rather than tens.

The prompt tokens come from replytune's renderer, never from llama.cpp's own template. The persona
prefix is decoded once per context and its KV state kept; a request restores it and copies it to
each of its sequences (``llama_memory_seq_cp`` shares the cells), so the first token waits only for
the comment's own tokens. Tokens are turned into text by the same tokenizer as the transformers path.
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from inference.generate import PANE_ROW, GenerationSettings, Job, Pane, Reply, Row, StreamingReplier, choose
from inference.retrieval import ExampleBank
from prompts.render import PromptRenderer

# KV cells of one context: the persona prefix plus every sequence a step decodes (comment + reply).
CONTEXT_TOKENS = 8192
BATCH_TOKENS = 512  # tokens per llama_decode call while reading prompts
PREFIX_SEQ = 0  # the sequence that keeps the persona prefix between requests
MAX_SEQUENCES = 8  # comments decoded together per context in replies(); past ~8 a step costs its rows' worth


def _silence(level: int, text: bytes, data: ctypes.c_void_p) -> None:
    """llama.cpp prints every tensor it loads to stderr; errors reach the caller as return codes."""


_LOG_CALLBACK = None  # kept alive: llama.cpp holds a raw pointer to it


def llama_library():
    """llama-cpp-python's bindings, initialised once with llama.cpp's logging silenced."""
    import llama_cpp

    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:
        _LOG_CALLBACK = llama_cpp.llama_log_callback(_silence)
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p())
        llama_cpp.llama_backend_init()
    return llama_cpp


def cpu_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class _Sequence:
    """A job being decoded: where its reply goes, its KV sequence, the position of its next token."""

    place: int
    seq: int
    pos: int
    next_token: int = -1
    history: list[int] = field(default_factory=list)  # the reply's tokens so far, for the repetition rules


class _Context:
    """One llama.cpp context (KV cache, compute buffers), with or without the adapter."""

    def __init__(self, model, adapter, n_threads: int) -> None:
        ll = llama_library()
        self.ll = ll
        params = ll.llama_context_default_params()
        params.n_ctx = CONTEXT_TOKENS
        params.n_batch = BATCH_TOKENS
        params.n_ubatch = BATCH_TOKENS
        params.n_seq_max = MAX_SEQUENCES + 1
        params.n_threads = params.n_threads_batch = n_threads
        params.kv_unified = True  # one pool of cells, so the prefix is shared by reference
        params.no_perf = True
        self.ctx = ll.llama_init_from_model(model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context (out of memory?)")
        if adapter is not None:
            adapters = (ll.llama_adapter_lora_p_ctypes * 1)(adapter)
            scales = (ctypes.c_float * 1)(1.0)
            if ll.llama_set_adapters_lora(self.ctx, adapters, 1, scales) != 0:
                raise RuntimeError("llama.cpp could not apply the LoRA adapter")
        self.memory = ll.llama_get_memory(self.ctx)
        self.threads = n_threads
        self.batch = ll.llama_batch_init(BATCH_TOKENS, 0, 1)
        self.prefix: list[int] = []
        self._prefix_state = (ctypes.c_uint8 * 0)()

    def close(self) -> None:
        self.ll.llama_batch_free(self.batch)
        self.ll.llama_free(self.ctx)

    def decode(self, entries: list[tuple[int, int, int, bool]]) -> list[int]:
        """Decode up to BATCH_TOKENS ``(token, position, sequence, wants_logits)`` entries in one call;
        the batch indices of the entries that want logits, for :meth:`logits`."""
        if len(entries) > BATCH_TOKENS:
            raise ValueError(f"at most {BATCH_TOKENS} tokens per llama_decode call, got {len(entries)}")
        batch = self.batch
        for i, (token, pos, seq, logits) in enumerate(entries):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits
        batch.n_tokens = len(entries)
        status = self.ll.llama_decode(self.ctx, batch)
        if status != 0:
            reason = (
                "the context is full; shorten the comment or lower max_new_tokens"
                if status == 1
                else "see llama.cpp's log"
            )
            raise RuntimeError(f"llama.cpp could not decode a batch (status {status}): {reason}")
        return [i for i, entry in enumerate(entries) if entry[3]]

    def logits(self, index: int, n_vocab: int) -> np.ndarray:
        return np.ctypeslib.as_array(self.ll.llama_get_logits_ith(self.ctx, index), shape=(n_vocab,))

    def start(self, prefix: list[int]) -> None:
        """An empty KV cache holding only the persona prefix in PREFIX_SEQ, laid out the same way for
        every request.

        The prefix is decoded once and its KV state kept; each request clears the cache and restores
        that state, so the same request always lands in the same cells. Where cells sit changes the
        order of float sums in the attention, which is enough to flip a greedy near-tie: without
        this, the same comment could get a different reply after another request.
        """
        ll = self.ll
        if self.prefix != prefix:
            ll.llama_memory_clear(self.memory, False)
            entries = [(token, pos, PREFIX_SEQ, False) for pos, token in enumerate(prefix)]
            for start in range(0, len(entries), BATCH_TOKENS):
                self.decode(entries[start : start + BATCH_TOKENS])
            size = ll.llama_state_seq_get_size(self.ctx, PREFIX_SEQ)
            self._prefix_state = (ctypes.c_uint8 * size)()
            ll.llama_state_seq_get_data(self.ctx, self._prefix_state, size, PREFIX_SEQ)
            self.prefix = list(prefix)
        ll.llama_memory_clear(self.memory, False)
        if prefix and not ll.llama_state_seq_set_data(
            self.ctx, self._prefix_state, len(self._prefix_state), PREFIX_SEQ
        ):
            raise RuntimeError("llama.cpp could not restore the persona prefix into its KV cache")

    def set_threads(self, n: int) -> None:
        if n != self.threads:
            self.ll.llama_set_n_threads(self.ctx, n, n)
            self.threads = n

    def drop(self, seq: int) -> None:
        self.ll.llama_memory_seq_rm(self.memory, seq, -1, -1)


class LlamaCppReplier(StreamingReplier):
    """Both panes from one GGUF model in llama.cpp; same settings, stop tokens and streaming as
    the transformers path."""

    backend = "llama.cpp"

    def __init__(
        self,
        model_path: Path,
        adapter_path: Path | None,
        tokenizer: PreTrainedTokenizerBase,
        renderer: PromptRenderer,
        examples: ExampleBank | None = None,
        n_threads: int | None = None,
    ) -> None:
        super().__init__(tokenizer, renderer, has_adapter=adapter_path is not None, examples=examples)
        ll = llama_library()
        self.ll = ll
        self.model_path, self.adapter_path = model_path, adapter_path
        self._model = ll.llama_model_load_from_file(str(model_path).encode(), ll.llama_model_default_params())
        if not self._model:
            raise RuntimeError(f"{model_path}: llama.cpp could not load this GGUF file")
        self.n_vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(self._model))
        adapter = None
        if adapter_path is not None:
            adapter = ll.llama_adapter_lora_init(self._model, str(adapter_path).encode())
            if not adapter:
                raise RuntimeError(f"{adapter_path}: llama.cpp could not load this LoRA adapter for {model_path.name}")
        self.n_threads = n_threads or cpu_threads()
        self._contexts: dict[Row, _Context] = {"base": _Context(self._model, None, self.n_threads)}
        if adapter is not None:
            self._contexts["adapter"] = _Context(self._model, adapter, self.n_threads)
        # llama_decode releases the GIL, so the two contexts can decode at the same time.
        self._pool = ThreadPoolExecutor(max_workers=len(self._contexts), thread_name_prefix="llama.cpp")
        self._rng = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)

    def replies(
        self,
        comments: Sequence[str],
        settings: GenerationSettings = GenerationSettings(),
        panes: Sequence[Pane] | None = None,
        background: bool = True,
    ) -> Iterator[list[Reply]]:
        """As many comments decode together as fill MAX_SEQUENCES in the busiest context (the base
        one serves both the persona-only and the examples pane)."""
        panes = tuple(panes or self.panes)
        chunk_size = max(1, MAX_SEQUENCES // max(Counter(PANE_ROW[pane] for pane in panes).values()))
        for start in range(0, len(comments), chunk_size):
            chunk = comments[start : start + chunk_size]
            jobs = [job for comment in chunk for job in self._jobs(comment, panes)]
            final: list[Reply] = []
            for final in self._stream_jobs(jobs, panes * len(chunk), settings, background):  # noqa: B007 (the last value is the result)
                pass
            for i in range(len(chunk)):
                yield final[i * len(panes) : (i + 1) * len(panes)]

    def _generate(
        self, jobs: list[Job], settings: GenerationSettings, out: queue.Queue, cancel: threading.Event
    ) -> None:
        stops = set(self.renderer.stop_ids)
        prefix = self.prefix_ids
        prompts: dict[Row, list[tuple[int, list[int]]]] = {}
        for place, (ids, row) in enumerate(jobs):
            prompts.setdefault(row, []).append((place, ids))
        if any(len(p) > MAX_SEQUENCES for p in prompts.values()):
            raise ValueError(
                f"at most {MAX_SEQUENCES} sequences per context, got {max(len(p) for p in prompts.values())}"
            )
        longest = max(len(ids) for ids, _ in jobs)
        if longest >= CONTEXT_TOKENS:
            raise RuntimeError(
                f"the prompt is {longest} tokens and the context is full at {CONTEXT_TOKENS}; shorten the comment"
            )

        def begin(row: Row) -> list[_Sequence]:
            self._contexts[row].start(prefix)
            return self._read_prompts(self._contexts[row], prompts[row], prefix, settings, out, stops)

        def step(row: Row) -> list[_Sequence]:
            context, states = self._contexts[row], active[row]
            wanted = context.decode([(s.next_token, s.pos, s.seq, True) for s in states])
            return self._advance(context, wanted, states, settings, out, stops)

        active = dict(zip(prompts, self._side_by_side(begin, list(prompts))))
        while not cancel.is_set() and (busy := [row for row, states in active.items() if states]):
            active.update(zip(busy, self._side_by_side(step, busy)))

    def _side_by_side(self, work, rows: list[Row]) -> list:
        """``work(row)`` for each row, the contexts at once, each on its share of the cores.

        One token's step does not keep two cores busy (its threads wait on memory and on each
        other), so two contexts on a core each beat running them in turn on both: both replies took
        1.27x the longer one alone instead of 1.34x (bench/RESULTS.md). A context left alone gets
        every core back.
        """
        threads = max(1, self.n_threads // len(rows))
        for row in rows:
            self._contexts[row].set_threads(threads)
        if len(rows) == 1:
            return [work(rows[0])]
        # Every context finishes before a failure in one is raised: the next request must not
        # start on a context that is still decoding this one.
        futures = [self._pool.submit(work, row) for row in rows]
        wait(futures)
        return [future.result() for future in futures]

    def _read_prompts(
        self, context: _Context, prompts: list[tuple[int, list[int]]], prefix: list[int], settings, out, stops
    ) -> list[_Sequence]:
        """Decode every prompt (after the shared prefix, copied in) into a sequence of its own and
        pick each one's first token; the sequences still writing."""
        entries, states = [], {}
        for seq, (place, ids) in enumerate(prompts, start=PREFIX_SEQ + 1):
            start = 0
            if prefix and len(ids) > len(prefix) and ids[: len(prefix)] == prefix:
                self.ll.llama_memory_seq_cp(context.memory, PREFIX_SEQ, seq, -1, -1)
                start = len(prefix)
            entries.extend((token, pos, seq, pos == len(ids) - 1) for pos, token in enumerate(ids[start:], start=start))
            states[seq] = _Sequence(place, seq, pos=len(ids))
        still: list[_Sequence] = []
        for start in range(0, len(entries), BATCH_TOKENS):
            chunk = entries[start : start + BATCH_TOKENS]
            wanted = context.decode(chunk)
            still += self._advance(
                context, wanted, [states[chunk[i][2]] for i in wanted], settings, out, stops, moved=False
            )
        return still

    def _advance(
        self, context: _Context, wanted: list[int], states: list[_Sequence], settings, out, stops, moved: bool = True
    ) -> list[_Sequence]:
        """Pick each sequence's next token from its logits and put them on ``out``; the sequences still writing.
        ``moved``: the decoded entries were the sequences' own last tokens, so their positions advance."""
        step, still = {}, []
        for index, state in zip(wanted, states):
            logits = torch.from_numpy(context.logits(index, self.n_vocab).copy())[None]
            token = choose(logits, [state.history], settings, self._rng)[0]
            step[state.place] = token
            if moved:
                state.pos += 1
            state.next_token = token
            state.history.append(token)
            if token in stops or len(state.history) >= settings.max_new_tokens:
                context.drop(state.seq)
            else:
                still.append(state)
        if step:
            out.put(step)
        return still

    def close(self) -> None:
        self._pool.shutdown()
        for context in self._contexts.values():
            context.close()
        self.ll.llama_model_free(self._model)
