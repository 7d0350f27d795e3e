"""Which engine writes the replies, decided in one place, and the loader that builds it.

Two engines implement :class:`inference.generate.StreamingReplier`: llama.cpp
(:class:`inference.llamacpp.LlamaCppReplier`, the CPU default) and transformers
(:class:`inference.transformers_engine.Replier`: GPUs, GPTQ bases, ``--backend transformers``).
:func:`engine_replier` is the one rule between them, used by the app's loader and by training's
voice evaluation alike.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from inference.adapter_files import adapter_examples, adapter_examples_shown, adapter_persona
from inference.generate import StreamingReplier
from inference.gguf_convert import gguf_files
from inference.llamacpp import LlamaCppReplier
from inference.loading import (
    Backend,
    Engine,
    Quantization,
    is_gptq,
    load_adapter,
    load_base_model,
    load_tokenizer,
    local_model_dir,
)
from inference.retrieval import K_EXAMPLES, ExampleBank
from inference.transformers_engine import Replier
from prompts.render import Persona, PromptRenderer


def resolve_backend(backend: Backend, base_model: str) -> Engine:
    """``auto``: llama.cpp on a CPU (its kernels decode several times faster there than torch's),
    transformers on a GPU and for a GPTQ base (llama.cpp cannot read GPTQ weights)."""
    if backend != "auto":
        return backend
    import torch

    if torch.cuda.is_available():
        return "transformers"
    return "transformers" if is_gptq(local_model_dir(base_model)) else "llama.cpp"


def engine_replier(
    backend: Backend,
    base_model: str,
    adapter: str | None,
    renderer: PromptRenderer,
    examples: ExampleBank | None,
    transformers_replier: Callable[[], Replier],
) -> StreamingReplier:
    """llama.cpp if it is the engine for this base on this machine and its GGUF files can be had
    for this base and adapter, else the transformers model that ``transformers_replier`` gives
    (called only then: loading it is the expensive part)."""
    if resolve_backend(backend, base_model) == "llama.cpp" and (files := gguf_files(base_model, adapter, backend)):
        return LlamaCppReplier(*files, renderer.tokenizer, renderer, examples)
    return transformers_replier()


def load_replier(
    base_model: str,
    adapter: str | None,
    quantization: Quantization = "nf4",
    trust_remote_code: bool = False,
    backend: Backend = "auto",
) -> StreamingReplier:
    """Load the base once, attach the adapter if one is given, and use the prompt that travelled with it.

    With llama.cpp (the CPU default) the base is a GGUF file and ``quantization`` does not apply:
    the GGUF file carries its own (the embedded default is re-encoded as Q8_0). The loading runs on a thread of
    its own that ends with it. Replies are generated on short-lived threads (see
    StreamingReplier.stream); a thread that has run torch keeps its OpenMP worker threads, and when
    they outnumber the cores libgomp stops spin-waiting between parallel regions, which made every
    reply 1.7x slower after a model was loaded on the main thread (measured: 3.5 s instead of
    2.0 s for a 31-token pair).
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="load-model") as pool:
        return pool.submit(_load_replier, base_model, adapter, quantization, trust_remote_code, backend).result()


def _load_replier(
    base_model: str, adapter: str | None, quantization: Quantization, trust_remote_code: bool, backend: Backend
) -> StreamingReplier:
    tokenizer = load_tokenizer(base_model, trust_remote_code)
    persona = (adapter_persona(adapter) if adapter else None) or Persona.from_file()
    renderer = PromptRenderer(tokenizer, persona)
    pairs = adapter_examples(adapter)
    examples = ExampleBank(pairs, adapter_examples_shown(adapter) or K_EXAMPLES) if pairs else None

    def transformers_replier() -> Replier:
        model = load_base_model(base_model, quantization, trust_remote_code=trust_remote_code)
        if adapter:
            model = load_adapter(model, adapter)
        return Replier(model, tokenizer, renderer, has_adapter=adapter is not None, examples=examples)

    return engine_replier(backend, base_model, adapter, renderer, examples, transformers_replier)
