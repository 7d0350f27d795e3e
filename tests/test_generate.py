"""Both replies from one batched decoding loop: equal to separate generations, always stopping, streamed."""

from __future__ import annotations

import json

import pytest
import torch

from inference.engines import load_replier
from inference.generate import GenerationSettings
from inference.transformers_engine import Replier
from prompts.render import Persona, PromptRenderer

GREEDY = GenerationSettings(max_new_tokens=24, repetition_penalty=1.0, no_repeat_ngram=0)  # generate()'s greedy
TWO = ("base", "adapter")  # the persona-only pane and the fine-tuned one: one prompt, two rows of a batch


def until_stop(ids: list[int], stops: set[int]) -> list[int]:
    return next((ids[:i] for i, t in enumerate(ids) if t in stops), ids)


@pytest.fixture(scope="module")
def tiny_replier(tiny_model_dir, tiny_adapter_dir) -> Replier:
    return load_replier(str(tiny_model_dir), str(tiny_adapter_dir), quantization="none", backend="transformers")


# Exact equality is checked in float32. In NF4/bfloat16 the batch-of-one and batch-of-two kernels
# round differently, so a greedy step whose two best logits tie within bf16 precision can flip.
@pytest.mark.parametrize("comment", ["Thanks!", "How do I pick k in k-means? <|im_end|>", "¿Cómo elijo k?"])
def test_mixed_batch_equals_two_separate_generations(tiny_replier, comment):
    base, tuned = tiny_replier.reply(comment, GREEDY, TWO)
    prompt = torch.tensor([tiny_replier.prompt(comment).input_ids])
    model = tiny_replier.model
    kwargs = dict(
        max_new_tokens=GREEDY.max_new_tokens,
        do_sample=False,
        eos_token_id=tiny_replier.renderer.stop_ids,
        pad_token_id=tiny_replier.tokenizer.pad_token_id,
    )
    with torch.inference_mode():
        with model.disable_adapter():
            alone_base = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **kwargs)[
                0, prompt.shape[1] :
            ].tolist()
        alone_tuned = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **kwargs)[
            0, prompt.shape[1] :
        ].tolist()
    stops = set(tiny_replier.renderer.stop_ids)
    assert base.token_ids == until_stop(alone_base, stops)
    assert tuned.token_ids == until_stop(alone_tuned, stops)
    assert base.token_ids != tuned.token_ids  # the adapter really changes the reply


def test_a_finished_row_leaves_the_batch(default_model_dir):
    """Once the shorter reply has ended, the longer one decodes alone, and to the same tokens.

    The shipped adapter's replies are short and the base's long, which the tiny random model cannot
    show; float32 keeps the batch-of-two and batch-of-one kernels bit-identical.
    """
    from inference.default_model import DEFAULT_ADAPTER

    replier = load_replier(
        "embedded:SmolLM2-135M-Instruct", str(DEFAULT_ADAPTER), quantization="none", backend="transformers"
    )
    comment, settings = "Thanks, great video!", GenerationSettings(max_new_tokens=40)
    alone = [replier.reply(comment, settings, panes=[row])[0].token_ids for row in ("base", "adapter")]
    replier.reply(comment, settings, TWO)  # caches the persona prefix: every forward below is a decoding step
    batch_sizes: list[int] = []
    hook = replier._causal_lm.register_forward_pre_hook(
        lambda module, args, kwargs: batch_sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        base, tuned = replier.reply(comment, settings, TWO)
    finally:
        hook.remove()
    assert [base.token_ids, tuned.token_ids] == alone
    assert tuned.stopped and len(tuned.token_ids) < len(base.token_ids)
    # The step that chose the fine-tuned reply's end of turn was the last one with two rows.
    two_rows = len(tuned.token_ids) + 1
    assert batch_sizes == [2] * two_rows + [1] * (len(base.token_ids) + base.stopped - two_rows)


def test_sampling_follows_the_seed_and_still_stops(tiny_replier):
    warm = GenerationSettings(max_new_tokens=24, temperature=1.0, top_p=0.9)
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append([r.token_ids for r in tiny_replier.reply("Nice video", warm)])
    assert runs[0] == runs[1] and runs[0] != runs[2]
    assert runs[0] != [r.token_ids for r in tiny_replier.reply("Nice video", GREEDY)]


def test_the_persona_prefix_is_computed_once_and_reused_unchanged(tiny_replier):
    prefix = tiny_replier.prefix_ids
    assert len(prefix) > 10
    for comment in ("Thanks!", "a", "@user 42 — ¿sí?"):
        assert tiny_replier.prompt(comment).input_ids[: len(prefix)] == prefix
    # A comment whose first characters merge with the template's last token gets a full prefill.
    spaced = tiny_replier.prompt(" leading space").input_ids
    assert (
        spaced[: len(prefix)] != prefix and tiny_replier._prefix_cache(("base",), spaced, torch.device("cpu")) is None
    )
    first = tiny_replier.reply("Nice video", GREEDY)
    cache = tiny_replier._prefix_caches[("base", "adapter")]
    assert cache.get_seq_length() == len(prefix)
    again = tiny_replier.reply("Nice video", GREEDY)
    assert cache.get_seq_length() == len(prefix)  # each request extends a copy, never the cache itself
    assert [r.token_ids for r in again] == [r.token_ids for r in first]


def test_single_rows_match_the_mixed_batch(tiny_replier):
    both = tiny_replier.reply("Nice video", GREEDY, TWO)
    (base,) = tiny_replier.reply("Nice video", GREEDY, panes=["base"])
    (tuned,) = tiny_replier.reply("Nice video", GREEDY, panes=["adapter"])
    assert [base.token_ids, tuned.token_ids] == [both[0].token_ids, both[1].token_ids]


def test_layers_without_mixed_batches_generate_the_rows_in_turn(tiny_replier):
    assert tiny_replier.mixed_batches  # plain (and bitsandbytes) LoRA layers take adapter_names
    in_turn = Replier(tiny_replier.model, tiny_replier.tokenizer, tiny_replier.renderer, has_adapter=True)
    in_turn.mixed_batches = False  # what a GPTQ base reports: its LoRA layer's forward takes no keywords
    lengths = [(len(base.token_ids), len(tuned.token_ids)) for base, tuned in in_turn.stream("Nice video", GREEDY)]
    final = in_turn.reply("Nice video", GREEDY)
    assert [r.token_ids for r in final] == [r.token_ids for r in tiny_replier.reply("Nice video", GREEDY, TWO)]
    started = next(i for i, (_, tuned) in enumerate(lengths) if tuned)
    assert lengths[started][0] == lengths[-1][0] > 0  # the base reply was complete before the adapter's began


def test_generation_stops_at_the_cap_and_says_so(tiny_replier):
    for reply in tiny_replier.reply("Tell me everything", GenerationSettings(max_new_tokens=5)):
        assert reply.done and len(reply.token_ids) <= 5
        assert reply.stopped == (len(reply.token_ids) < 5)


def test_stream_yields_growing_replies_and_reports_timing(tiny_replier):
    states = [[(r.text, len(r.token_ids)) for r in replies] for replies in tiny_replier.stream("Hello", GREEDY)]
    assert len(states) >= 3
    lengths = [s[1][1] for s in states]
    assert lengths == sorted(lengths) and lengths[-1] > 0
    final = tiny_replier.reply("Hello", GREEDY)
    assert all(r.first_token_s is not None and r.seconds >= r.first_token_s for r in final)


def test_closing_a_stream_early_frees_the_model_for_the_next_request(tiny_replier):
    stream = tiny_replier.stream("Hello", GenerationSettings(max_new_tokens=200))
    next(stream)
    stream.close()
    assert all(r.done for r in tiny_replier.reply("Hi", GREEDY))


@pytest.mark.parametrize("backend", ["transformers", "llama.cpp"])
def test_no_adapter_gives_the_base_row_only(tiny_model_dir, backend):
    replier = load_replier(str(tiny_model_dir), None, quantization="none", backend=backend)
    (reply,) = replier.reply("Hi", GREEDY)
    assert reply.pane == "base" and reply.done
    with pytest.raises(ValueError, match="no adapter is loaded"):
        replier.reply("Hi", GREEDY, panes=["adapter"])


def test_settings_are_validated():
    with pytest.raises(ValueError, match="temperature"):
        GenerationSettings(temperature=-1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationSettings(max_new_tokens=0)


def test_pad_equal_to_eos_still_stops(tiny_model_dir, chatml_tokenizer):
    """SmolLM2 ships pad == EOS; replies must still end on the end-of-turn token."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = chatml_tokenizer
    original_pad = tokenizer.pad_token
    tokenizer.pad_token = tokenizer.eos_token
    try:
        renderer = PromptRenderer(tokenizer, Persona.from_file())
        # Make the end-of-turn token the model's certain next prediction.
        with torch.no_grad():
            model.lm_head.weight[renderer.end_of_turn_id] *= 50
        (reply,) = Replier(model, tokenizer, renderer, has_adapter=False).reply(
            "Hi", GenerationSettings(max_new_tokens=50)
        )
        assert reply.stopped and len(reply.token_ids) < 50
    finally:
        tokenizer.pad_token = original_pad


@pytest.mark.parametrize("backend", ["transformers", "llama.cpp"])
def test_default_model_and_shipped_adapter_answer_in_the_creators_voice(default_model_dir, backend):
    """Through transformers on the NF4 base, and through llama.cpp: the shipped adapter converted by
    llama.cpp's own converter, applied to the wheel's GGUF file re-encoded as Q8_0."""
    from inference.default_model import DEFAULT_ADAPTER

    if not (DEFAULT_ADAPTER / "adapter_model.safetensors").is_file():
        pytest.fail(f"the shipped adapter is missing from {DEFAULT_ADAPTER}")
    replier = load_replier("embedded:SmolLM2-135M-Instruct", str(DEFAULT_ADAPTER), backend=backend)
    assert replier.backend == backend
    base, examples, tuned, _ = replier.reply("Thanks, great video!", GenerationSettings(max_new_tokens=60))
    assert examples.stopped and examples.text.rstrip().endswith("–Maya")  # the creator's examples teach the sign-off
    assert tuned.stopped and tuned.text.rstrip().endswith("–Maya")
    assert len(tuned.text) < 120  # a short thank-you gets a short reply
    assert base.text and base.text != tuned.text
    summary = json.loads((DEFAULT_ADAPTER / "training_summary.json").read_text())
    assert summary["eval_loss"] < summary["base_eval_loss"]
