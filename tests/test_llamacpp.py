"""Replies through llama.cpp: a tiny model and adapter exported to GGUF by llama.cpp's own converters
decode the same greedy tokens as transformers in float32, from one model in memory for both rows."""

from __future__ import annotations

import contextlib

import pytest
import torch

from inference.engines import load_replier
from inference.generate import PANE_ROW, GenerationSettings
from inference.gguf_convert import adapter_gguf, base_gguf
from inference.llamacpp import CONTEXT_TOKENS, MAX_SEQUENCES, LlamaCppReplier

GREEDY = GenerationSettings(max_new_tokens=16)
COMMENTS = [
    "Thanks!",
    "How do I pick k in k-means? <|im_end|>",
    "¿Cómo elijo k?",
    'She said "hi"\nthen left.',
    "这个视频太棒了",
]


@pytest.fixture(scope="module")
def transformers_replier(tiny_model_dir, tiny_adapter_dir):
    return load_replier(str(tiny_model_dir), str(tiny_adapter_dir), quantization="none", backend="transformers")


@pytest.fixture(scope="module")
def llama_replier(tiny_model_dir, tiny_adapter_dir, transformers_replier):
    """float32 GGUF files, so that both engines compute the same numbers up to summation order."""
    base = base_gguf(str(tiny_model_dir), outtype="f32")
    adapter = adapter_gguf(tiny_adapter_dir, str(tiny_model_dir))
    replier = LlamaCppReplier(
        base, adapter, transformers_replier.tokenizer, transformers_replier.renderer, transformers_replier.examples
    )
    yield replier
    replier.close()


TIE = 0.01  # logits this close are a coin toss for float32 sums taken in another order


def top_two(transformers_replier, prompt_ids: list[int], row: str) -> tuple[list[int], float]:
    """transformers' two best next tokens after ``prompt_ids`` for a row, and their logit gap."""
    model = transformers_replier.model
    with torch.inference_mode(), model.disable_adapter() if row == "base" else contextlib.nullcontext():
        top = torch.topk(model(input_ids=torch.tensor([prompt_ids])).logits[0, -1], 2)
    return top.indices.tolist(), (top.values[0] - top.values[1]).item()


def assert_same_or_parted_at_a_tie(transformers_replier, prompt_ids: list[int], mine, theirs) -> bool:
    """Whether two greedy replies are identical; if not, they must part where transformers sees a
    near-tie between the two tokens chosen."""
    if mine.token_ids == theirs.token_ids:
        return True
    at = next(i for i, (a, b) in enumerate(zip(mine.token_ids, theirs.token_ids)) if a != b)
    (best, runner_up), gap = top_two(transformers_replier, prompt_ids + theirs.token_ids[:at], PANE_ROW[mine.pane])
    assert {mine.token_ids[at], theirs.token_ids[at]} == {best, runner_up} and gap < TIE, (mine.pane, at, gap)
    return False


def test_greedy_replies_equal_transformers_float32(llama_replier, transformers_replier):
    """Token for token, 16 tokens, both rows, tricky comments; a reply may part only at a near-tie."""
    identical = 0
    for comment in COMMENTS:
        ours = llama_replier.reply(comment, GREEDY)
        reference = transformers_replier.reply(comment, GREEDY)
        assert [r.pane for r in ours] == ["base", "examples", "adapter", "adapter+examples"]
        assert ours[0].token_ids != ours[2].token_ids  # the adapter really is applied to its row
        assert ours[0].token_ids != ours[1].token_ids  # and the creator's examples reach the base model
        for mine, theirs in zip(ours, reference):
            assert mine.pane == theirs.pane
            for reply in (mine, theirs):
                # Short of the cap only on the end-of-turn token: a reply cut off early fails here.
                assert reply.done and reply.stopped == (len(reply.token_ids) < GREEDY.max_new_tokens), (
                    reply.pane,
                    reply.token_ids,
                )
            identical += assert_same_or_parted_at_a_tie(
                transformers_replier, llama_replier.prompt(comment, mine.pane).input_ids, mine, theirs
            )
    assert identical >= 4 * len(COMMENTS) - 2, identical


def test_an_adapter_that_is_zero_leaves_the_base_unchanged(tiny_model_dir, transformers_replier, tmp_path):
    """peft's default LoRA init (B = 0) adds nothing: its row must equal the base row exactly."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")).save_pretrained(
        tmp_path
    )
    replier = LlamaCppReplier(
        base_gguf(str(tiny_model_dir), outtype="f32"),
        adapter_gguf(tmp_path, str(tiny_model_dir)),
        transformers_replier.tokenizer,
        transformers_replier.renderer,
    )
    try:
        for comment in COMMENTS[:3]:
            base, tuned = replier.reply(comment, GREEDY)
            assert base.token_ids == tuned.token_ids
    finally:
        replier.close()


def test_many_comments_decode_together_to_the_same_replies(llama_replier, transformers_replier):
    """A batch of 8 sequences runs other kernels than a batch of one, so only a near-tie may part them."""
    comments = [f"Question {i}: what is topic {i}?" for i in range(MAX_SEQUENCES + 3)]
    together = list(llama_replier.replies(comments, GREEDY))
    assert len(together) == len(comments)
    identical = 0
    for comment, replies in zip(comments, together):
        alone = llama_replier.reply(comment, GREEDY)
        assert [r.pane for r in replies] == ["base", "examples", "adapter", "adapter+examples"]
        for mine, theirs in zip(replies, alone):
            identical += assert_same_or_parted_at_a_tie(
                transformers_replier, llama_replier.prompt(comment, mine.pane).input_ids, mine, theirs
            )
    assert identical >= 4 * len(comments) - 3


def test_the_same_request_always_gets_the_same_replies(llama_replier):
    """Whatever ran before: each request starts from the same KV cache layout."""
    first = [[r.token_ids for r in llama_replier.reply(c, GREEDY)] for c in COMMENTS]
    list(llama_replier.replies(COMMENTS * 2, GREEDY))
    assert [[r.token_ids for r in llama_replier.reply(c, GREEDY)] for c in reversed(COMMENTS)] == first[::-1]


def test_replies_stream_stop_at_the_cap_and_free_the_model(llama_replier):
    states = [[len(r.token_ids) for r in replies] for replies in llama_replier.stream("Hello", GREEDY)]
    assert len(states) >= 3 and states == sorted(states)
    for reply in llama_replier.reply("Tell me everything", GenerationSettings(max_new_tokens=5)):
        assert reply.done and len(reply.token_ids) <= 5 and reply.stopped == (len(reply.token_ids) < 5)
        assert reply.first_token_s is not None and reply.seconds >= reply.first_token_s
    first = llama_replier.reply("Hello", GREEDY)
    stream = llama_replier.stream("Hello", GenerationSettings(max_new_tokens=200))
    next(stream)
    stream.close()  # a request abandoned mid-reply leaves no sequence behind in the KV cache
    assert [r.token_ids for r in llama_replier.reply("Hello", GREEDY)] == [r.token_ids for r in first]


def test_sampling_varies_and_still_stops_at_the_cap(llama_replier):
    warm = GenerationSettings(max_new_tokens=12, temperature=1.0, top_p=0.9)
    runs = [[r.token_ids for r in llama_replier.reply("Nice video", warm)] for _ in range(3)]
    assert all(len(ids) <= 12 for run in runs for ids in run)
    assert len({str(run) for run in runs}) > 1


def test_a_comment_longer_than_the_context_is_a_clear_error(llama_replier):
    with pytest.raises(RuntimeError, match=f"context is full at {CONTEXT_TOKENS}"):
        llama_replier.reply("word " * 9000, GenerationSettings(max_new_tokens=4))
    assert all(r.done for r in llama_replier.reply("Hi", GREEDY))  # and the next request still works


def test_a_batch_that_overflows_the_context_fails_in_both_contexts_and_the_next_request_works(llama_replier):
    """Eight comments that fit alone but not together: llama.cpp runs out of cells while reading
    them, in both contexts at once; the error waits for both, so no context is still busy when the
    next request starts."""
    long = "word " * (CONTEXT_TOKENS // MAX_SEQUENCES)
    with pytest.raises(RuntimeError, match="context is full"):
        list(llama_replier.replies([long] * MAX_SEQUENCES, GenerationSettings(max_new_tokens=4)))
    assert all(r.done for r in llama_replier.reply("Hi", GREEDY))


def test_a_model_llama_cpp_cannot_convert_falls_back_to_transformers_when_auto(mistral_tokenizer, tmp_path, caplog):
    """llama.cpp's converter refuses a tokenizer whose pre-tokenizer it does not know (this test's
    own BPE): auto says why and replies through transformers; asked for by name, it is an error."""
    from transformers import AutoModelForCausalLM, MistralConfig

    from inference.gguf_convert import ExportError

    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=len(mistral_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    mistral_tokenizer.save_pretrained(tmp_path)
    with caplog.at_level("WARNING"):
        replier = load_replier(str(tmp_path), None, quantization="none")
    assert replier.backend == "transformers"
    assert "llama.cpp cannot run" in caplog.text and "pre-tokenizer" in caplog.text
    with pytest.raises(ExportError, match=r"convert_hf_to_gguf\.py could not convert"):
        load_replier(str(tmp_path), None, quantization="none", backend="llama.cpp")


PENALIZED = GenerationSettings(max_new_tokens=24, repetition_penalty=1.5, no_repeat_ngram=3)


def has_repeated_ngram(tokens: list[int], n: int) -> bool:
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) != len(set(grams))


def test_repetition_rules_mean_the_same_in_both_engines(llama_replier, transformers_replier):
    """Penalty and no-repeat n-gram change what greedy decoding writes, and change it the same way
    in llama.cpp as in transformers."""
    changed = identical = 0
    for comment in COMMENTS:
        plain = transformers_replier.reply(comment, GenerationSettings(max_new_tokens=PENALIZED.max_new_tokens))
        ours, reference = llama_replier.reply(comment, PENALIZED), transformers_replier.reply(comment, PENALIZED)
        for mine, theirs, before in zip(ours, reference, plain):
            assert not has_repeated_ngram(mine.token_ids, 3) and not has_repeated_ngram(theirs.token_ids, 3)
            identical += mine.token_ids == theirs.token_ids
            changed += theirs.token_ids != before.token_ids
    assert changed >= 1  # the tiny model loops without the rules
    assert identical >= 2 * len(COMMENTS) - 2, identical


def test_the_examples_pane_alone_decodes_as_in_the_full_request(llama_replier):
    """The base context serves the persona-only and the examples pane at once: either alone gives
    the same reply as both together (the examples are read into a sequence of their own)."""
    same = 0
    for comment in COMMENTS:
        together = llama_replier.reply(comment, GREEDY)
        (alone,) = llama_replier.reply(comment, GREEDY, ["examples"])
        same += alone.token_ids == together[1].token_ids
    assert same >= len(COMMENTS) - 1  # a batch of two runs other kernels: one near-tie may flip
