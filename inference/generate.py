"""Streaming replies for both panes from one model in memory, in one batched ``generate``.

The base reply and the fine-tuned reply are two rows of one batch: peft's per-row ``adapter_names``
routes the ``"__base__"`` row around the LoRA weights and the other row through them, so there is
one copy of the base weights and one decode loop. transformers' stock streamers take a batch of
one, so ``_RowStreamer`` hands each decoding step's tokens for every row to the caller through a
queue (nanochat's engine yields the same shape: one token per row per step).

Streaming is the primitive: :meth:`Replier.stream` yields the replies as they grow, and
:meth:`Replier.reply` just runs the stream to its end.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from prompts.render import Prompt, PromptRenderer

Row = Literal["base", "adapter"]
BASE_ADAPTER_NAME = "__base__"  # peft's name for "no adapter" in adapter_names
ADAPTER_NAME = "default"
# A decoding step slower than this means generate() is stuck or died without a word; fail loudly.
STEP_TIMEOUT_S = 300.0
_DONE = object()


@dataclass(frozen=True)
class GenerationSettings:
    """Greedy by default, so the same comment always gets the same replies."""

    max_new_tokens: int = 160
    temperature: float = 0.0  # 0 means greedy decoding
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_new_tokens <= 2048:
            raise ValueError(f"max_new_tokens must be between 1 and 2048, got {self.max_new_tokens}")
        if not 0 <= self.temperature <= 5:
            raise ValueError(f"temperature must be between 0 and 5, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Reply:
    """One pane's reply as it grows."""

    row: Row
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    done: bool = False
    stopped: bool = False  # ended on the end-of-turn token rather than the max_new_tokens cap
    first_token_s: float | None = None
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds else 0.0


class _RowStreamer(BaseStreamer):
    """Receives generate()'s tokens: first the prompt (skipped), then one token per row per step."""

    def __init__(self, out: queue.Queue, row: int = 0, rows: int = 1) -> None:
        self.out = out
        self.prompt_seen = False
        # When rows are generated one after the other, each step fills its own row's place and
        # leaves None in the others.
        self.row, self.rows = row, rows

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        tokens = value.reshape(-1).tolist()
        if self.rows > len(tokens):
            tokens = [None] * self.row + tokens + [None] * (self.rows - self.row - len(tokens))
        self.out.put(tokens)

    def end(self) -> None:
        pass  # the generating thread reports the end itself, after generate() returns or raises


class _Cancelled(StoppingCriteria):
    """Ends generate() when the consumer of the stream goes away (a closed browser tab, say)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class Replier:
    """Replies to comments with the base model (+ persona prompt) and, if loaded, the adapter."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, renderer: PromptRenderer, has_adapter: bool) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.renderer = renderer
        self.has_adapter = has_adapter
        # peft applies adapter_names through hooks on the shared modules, so two generate() calls
        # must never overlap; the app's queue also runs one at a time.
        self._lock = threading.Lock()
        self._prefix_caches: dict[tuple[Row, ...], Any] = {}

    @functools.cached_property
    def mixed_batches(self) -> bool:
        """Whether base and adapter rows can share one batch (peft's ``adapter_names``).

        peft implements it for its plain and bitsandbytes LoRA layers; a layer whose forward takes
        no keyword arguments (GPTQ's) cannot, and the two replies are then generated in turn.
        """
        from peft.tuners.lora import LoraLayer

        def takes_adapter_names(module) -> bool:
            params = inspect.signature(module.forward).parameters.values()
            return any(p.name == "adapter_names" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)

        return all(takes_adapter_names(m) for m in self.model.modules() if isinstance(m, LoraLayer))

    @property
    def rows(self) -> tuple[Row, ...]:
        return ("base", "adapter") if self.has_adapter else ("base",)

    def prompt(self, comment: str) -> Prompt:
        return self.renderer.prompt(comment)

    def stream(
        self, comment: str, settings: GenerationSettings = GenerationSettings(), rows: Sequence[Row] | None = None, background: bool = True
    ) -> Iterator[list[Reply]]:
        """Yield the replies (one per row, in ``rows`` order) after every decoding step.

        The model runs on a thread of its own that ends with the replies, so that the app's
        long-lived threads never keep OpenMP workers (see load_replier). ``background=False`` runs it
        on the calling thread before yielding anything: for batch evaluation on a main thread that
        has already trained, where a second set of OpenMP workers would slow every step.
        """
        rows = tuple(rows or self.rows)
        if "adapter" in rows and not self.has_adapter:
            raise ValueError("no adapter is loaded, so there is no fine-tuned reply to generate")
        prompt = self.renderer.prompt(comment)
        replies = [Reply(row) for row in rows]
        with self._lock:
            steps: queue.Queue = queue.Queue()
            cancel = threading.Event()
            started = time.perf_counter()
            worker = threading.Thread(target=self._generate, args=(prompt, rows, settings, steps, cancel), daemon=True) if background else None
            if worker:
                worker.start()
            else:
                self._generate(prompt, rows, settings, steps, cancel)
            try:
                yield from self._collect(replies, steps, started, settings)
            finally:
                # Reached on normal exit, on error and when the consumer closes the stream early:
                # never leave a generate() running into the next request.
                cancel.set()
                if worker:
                    worker.join()
        for reply in replies:
            reply.done = True
            reply.text = self.tokenizer.decode(reply.token_ids, skip_special_tokens=False)
        yield replies

    def _collect(self, replies: list[Reply], steps: queue.Queue, started: float, settings: GenerationSettings) -> Iterator[list[Reply]]:
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
            for reply, token in zip(replies, item):
                if reply.done or token is None:
                    continue  # a finished row is padded until the other row ends; None: not its turn
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
        self, comment: str, settings: GenerationSettings = GenerationSettings(), rows: Sequence[Row] | None = None, background: bool = True
    ) -> list[Reply]:
        """The finished replies: the last state of :meth:`stream`."""
        final: list[Reply] = []
        for final in self.stream(comment, settings, rows, background):
            pass
        return final

    def warm_up(self) -> None:
        """One short generation so the first visitor does not pay for lazy initialisation."""
        self.reply("Thanks!", GenerationSettings(max_new_tokens=2))

    def _generate(self, prompt: Prompt, rows: tuple[Row, ...], settings: GenerationSettings, out: queue.Queue, cancel: threading.Event) -> None:
        try:
            device = next(self.model.parameters()).device
            input_ids = torch.tensor([prompt.input_ids] * len(rows), device=device)
            kwargs = {
                "input_ids": input_ids,
                "attention_mask": torch.ones_like(input_ids),
                "max_new_tokens": settings.max_new_tokens,
                # Stop on the chat template's end of turn, not only on the tokenizer's EOS: with
                # pad == EOS and no explicit stop, a reply never ends.
                "eos_token_id": self.renderer.stop_ids,
                "pad_token_id": self.tokenizer.pad_token_id,
                "use_cache": True,
                "streamer": _RowStreamer(out),
                "stopping_criteria": StoppingCriteriaList([_Cancelled(cancel)]),
            }
            if settings.temperature > 0:
                kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p)
            else:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            if not self.has_adapter or self.mixed_batches:
                if self.has_adapter:
                    kwargs["adapter_names"] = [ADAPTER_NAME if r == "adapter" else BASE_ADAPTER_NAME for r in rows]
                with torch.inference_mode():
                    self.model.generate(**kwargs, **self._prefix_cache(rows, input_ids, kwargs.get("adapter_names")))
            else:
                for index, row in enumerate(rows):
                    one = {**kwargs, "input_ids": input_ids[:1], "attention_mask": torch.ones_like(input_ids[:1]), "streamer": _RowStreamer(out, index, len(rows))}
                    with torch.inference_mode(), self.model.disable_adapter() if row == "base" else contextlib.nullcontext():
                        self.model.generate(**one, **self._prefix_cache((row,), input_ids[:1], None))
        except BaseException as exc:  # handed to the consuming thread, which re-raises it
            out.put(exc)
        finally:
            out.put(_DONE)

    @functools.cached_property
    def prefix_ids(self) -> list[int]:
        """The token ids every prompt starts with: the chat template and the persona up to the comment."""
        probes = [self.renderer.prompt(comment).input_ids for comment in ("a", "Zebra 42?", "¿Qué?")]
        shared = 0
        while all(len(p) > shared for p in probes) and len({p[shared] for p in probes}) == 1:
            shared += 1
        return probes[0][: shared - 1]  # the last shared token could merge with some comment's first characters

    def _prefix_cache(self, rows: tuple[Row, ...], input_ids: torch.Tensor, adapter_names: list[str] | None) -> dict:
        """``past_key_values`` holding the prompt's shared prefix, computed once per set of rows.

        The persona is most of a prompt (143 of ~160 tokens for the default), so the first token
        waits only for the comment's own tokens. Each request gets a copy: generate extends it.
        """
        prefix = self.prefix_ids
        if len(prefix) < 2 or input_ids.shape[1] <= len(prefix) or input_ids[0, : len(prefix)].tolist() != prefix:
            return {}
        if rows not in self._prefix_caches:
            ids = torch.tensor([prefix] * len(rows), device=input_ids.device)
            extra = {"adapter_names": adapter_names} if adapter_names else {}
            self._prefix_caches[rows] = self.model(input_ids=ids, use_cache=True, **extra).past_key_values
        return {"past_key_values": copy.deepcopy(self._prefix_caches[rows])}


def load_replier(
    base_model: str,
    adapter: str | None,
    quantization: Literal["nf4", "none"] = "nf4",
    trust_remote_code: bool = False,
) -> Replier:
    """Load the base once, attach the adapter if one is given, and use the prompt that travelled with it.

    The loading runs on a thread of its own that ends with it. Replies are generated on short-lived
    threads (see stream); a thread that has run torch keeps its OpenMP worker threads, and when they
    outnumber the cores libgomp stops spin-waiting between parallel regions, which made every reply
    1.7x slower after a model was loaded on the main thread (measured: 3.5 s instead of 2.0 s for
    a 31-token pair).
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="load-model") as pool:
        return pool.submit(_load_replier, base_model, adapter, quantization, trust_remote_code).result()


def _load_replier(base_model: str, adapter: str | None, quantization: Literal["nf4", "none"], trust_remote_code: bool) -> Replier:
    from inference.loading import load_adapter, load_base_model, load_tokenizer
    from prompts.render import Persona

    tokenizer = load_tokenizer(base_model, trust_remote_code)
    model = load_base_model(base_model, quantization, trust_remote_code=trust_remote_code)
    persona = Persona.from_file()
    if adapter:
        model = load_adapter(model, adapter)
        persona = adapter_persona(adapter) or persona
    return Replier(model, tokenizer, PromptRenderer(tokenizer, persona), has_adapter=adapter is not None)


def adapter_persona(adapter: str) -> "Persona | None":
    """The persona an adapter was trained with (persona.txt beside its weights), if it has one."""
    from pathlib import Path

    from prompts.render import Persona

    local = Path(adapter) / "persona.txt"
    if Path(adapter).exists():
        return Persona.from_file(local) if local.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Persona.from_file(hf_hub_download(adapter, "persona.txt"))
    except EntryNotFoundError:
        return None
