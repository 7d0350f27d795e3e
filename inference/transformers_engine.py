"""Replies through transformers: the engine for GPUs, GPTQ bases and ``--backend transformers``
(inference/llamacpp.py is the CPU one); the streaming protocol is inference.generate's.

The base reply and the fine-tuned reply are two rows of one batch: peft's per-row ``adapter_names``
routes the ``"__base__"`` row around the LoRA weights and the other row through them, so there is
one copy of the base weights and one decode loop. Like nanochat's engine, the loop yields one token
per row per step, and a row that has ended leaves the batch (its KV cache rows are dropped): the
fine-tuned reply is often a few words and the base reply a paragraph, and a step of two rows costs
~1.3x a step of one on the CPU, so the longer reply should not pay for the shorter one's ghost.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import queue
import threading
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from inference.generate import (
    GenerationSettings,
    Job,
    Row,
    StreamingReplier,
    choose,
)
from inference.internals.peft import routed, rows_can_have_different_adapters
from inference.loading import unwrapped
from inference.retrieval import ExampleBank
from prompts.render import PromptRenderer

BASE_ADAPTER_NAME = "__base__"  # peft's name for "no adapter" in adapter_names
ADAPTER_NAME = "default"


class Replier(StreamingReplier):
    """Replies with a transformers model (+ persona prompt) and, if loaded, its peft adapter: the
    GPU path, the GPTQ path and ``--backend transformers``."""

    backend = "transformers"

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        renderer: PromptRenderer,
        has_adapter: bool,
        examples: ExampleBank | None = None,
    ) -> None:
        super().__init__(tokenizer, renderer, has_adapter, examples)
        self.model = model.eval()
        self._prefix_caches: dict[tuple[Row, ...], Any] = {}

    @functools.cached_property
    def mixed_batches(self) -> bool:
        """Whether base and adapter rows share one batch (else the two replies decode in turn)."""
        return rows_can_have_different_adapters(self.model)

    def _generate(
        self, jobs: list[Job], settings: GenerationSettings, out: queue.Queue, cancel: threading.Event
    ) -> None:
        """The jobs that share a prompt decode as rows of one batch; prompts with the creator's
        examples differ from the persona-only one, and decode after it."""
        by_prompt: dict[tuple[int, ...], list[int]] = {}
        for place, (ids, _) in enumerate(jobs):
            by_prompt.setdefault(tuple(ids), []).append(place)
        for prompt_ids, places in by_prompt.items():
            rows = tuple(jobs[place][1] for place in places)
            if not self.has_adapter or self.mixed_batches:
                self._decode(list(prompt_ids), rows, settings, out, cancel, places)
            else:
                for place, row in zip(places, rows):
                    with self.model.disable_adapter() if row == "base" else contextlib.nullcontext():
                        self._decode(list(prompt_ids), (row,), settings, out, cancel, places=[place])

    @torch.inference_mode()
    def _decode(
        self,
        prompt_ids: list[int],
        rows: tuple[Row, ...],
        settings: GenerationSettings,
        out: queue.Queue,
        cancel: threading.Event,
        places: list[int] | None = None,
    ) -> None:
        """Decode every row from the same prompt with a KV cache; put ``{place: token}`` per step on ``out``.

        A row leaves the batch on its end-of-turn token; all stop at ``max_new_tokens`` or when the
        consumer cancels. ``places`` says where each row's reply sits in the caller's list.
        """
        places = list(places or range(len(rows)))
        device = next(self.model.parameters()).device
        names = (
            [ADAPTER_NAME if r == "adapter" else BASE_ADAPTER_NAME for r in rows]
            if self.has_adapter and self.mixed_batches
            else None
        )
        # Stop on the chat template's end of turn, not only on the tokenizer's EOS: with pad == EOS
        # and no explicit stop, a reply never ends.
        stops = set(self.renderer.stop_ids)
        histories: list[list[int]] = [[] for _ in rows]
        with contextlib.ExitStack() as routing:
            routing.enter_context(routed(self.model, names))
            cache = self._prefix_cache(rows, prompt_ids, device)
            done = cache.get_seq_length() if cache is not None else 0
            ids = torch.tensor([prompt_ids[done:]] * len(rows), device=device)
            for _ in range(settings.max_new_tokens):
                if cancel.is_set():
                    return
                output = self._causal_lm(input_ids=ids, past_key_values=cache, use_cache=True, **self._last_logits_only)
                cache, logits = output.past_key_values, output.logits[:, -1, :]
                chosen = choose(logits, histories, settings)
                out.put(dict(zip(places, chosen)))
                for history, token in zip(histories, chosen):
                    history.append(token)
                tokens = torch.tensor(chosen, device=device)
                keep = [i for i, token in enumerate(chosen) if token not in stops]
                if not keep:
                    return
                if len(keep) < len(chosen):
                    cache.batch_select_indices(torch.tensor(keep, device=device))
                    tokens, places = tokens[keep], [places[i] for i in keep]
                    histories = [histories[i] for i in keep]
                    if names:
                        names = [names[i] for i in keep]
                        routing.close()
                        routing.enter_context(routed(self.model, names))
                ids = tokens[:, None]

    @functools.cached_property
    def _causal_lm(self) -> PreTrainedModel:
        return unwrapped(self.model)

    @functools.cached_property
    def _last_logits_only(self) -> dict[str, int]:
        """``logits_to_keep=1`` where the model takes it: the prompt's other logits are never read."""
        return (
            {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(self._causal_lm.forward).parameters else {}
        )

    def _prefix_cache(self, rows: tuple[Row, ...], prompt_ids: list[int], device: torch.device) -> Any:
        """A KV cache holding the prompt's shared prefix (computed once per set of rows, under their
        adapter routing), or None.

        The persona is most of a prompt (143 of ~160 tokens for the default), so the first token
        waits only for the comment's own tokens. Each request gets a copy: decoding extends it.
        """
        prefix = self.prefix_ids
        if len(prefix) < 2 or len(prompt_ids) <= len(prefix) or prompt_ids[: len(prefix)] != prefix:
            return None
        if rows not in self._prefix_caches:
            ids = torch.tensor([prefix] * len(rows), device=device)
            self._prefix_caches[rows] = self._causal_lm(
                input_ids=ids, use_cache=True, **self._last_logits_only
            ).past_key_values
        return copy.deepcopy(self._prefix_caches[rows])
