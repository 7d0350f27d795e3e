"""The data doctor catches each silent mistake when it is planted, and passes on the defaults."""

from __future__ import annotations

import pytest
from transformers import DataCollatorForLanguageModeling

from prompts.render import Persona, PromptRenderer
from training.collate import ReplyCollator, TrainingCollator, shared_prefix_length
from training.data import Pair, tokenize_pairs
from training.doctor import diagnose

PERSONA = Persona.from_file()


def pairs(n: int, sign: str = " –Maya", start: int = 0) -> list[Pair]:
    return [
        Pair(f"Nice video number {i}", f"Thanks for watching!{sign}", f"data.jsonl:{i + 1}")
        for i in range(start, start + n)
    ]


@pytest.fixture
def renderer(chatml_tokenizer):
    return PromptRenderer(chatml_tokenizer, PERSONA)


def packed(renderer, train):
    """What training feeds the model on a CPU: each batch packed into one row behind the prompt
    prefix every example shares (TrainingCollator, as training.trainer builds it)."""
    examples, _ = tokenize_pairs(train, renderer, 512)
    prefix = shared_prefix_length(examples, 8, 64, linear_attention=True)
    assert prefix > 0
    return TrainingCollator(renderer.tokenizer.pad_token_id, prefix)


def run(renderer, train, evals=None, app=None, collate=None):
    examples, _ = tokenize_pairs(train, renderer, 512)
    findings, example = diagnose(
        train, examples, evals or pairs(3, start=100), renderer, app or renderer, collate or packed(renderer, train)
    )
    return {f.check: f for f in findings}, example


@pytest.mark.parametrize("batches", ["packed", "padded"])
def test_defaults_pass_and_show_an_example(renderer, batches):
    collate = packed(renderer, pairs(8)) if batches == "packed" else TrainingCollator(renderer.tokenizer.pad_token_id)
    findings, example = run(renderer, pairs(8), collate=collate)
    assert list(findings) == [
        "end of turn learned",
        "one BOS",
        "loss on the reply only",
        "training prompt = app prompt",
        "signature",
    ]
    assert all(f.ok for f in findings.values()), [f.line() for f in findings.values() if not f.ok]
    assert example.endswith("[Thanks][ for][ watching][!][ –][Maya][<|im_end|>]")


def test_pad_equals_eos_collator_is_caught(renderer, chatml_tokenizer):
    """The article's recipe: pad = EOS with a language-modeling collator masks every EOS."""
    tokenizer = chatml_tokenizer
    original = tokenizer.pad_token
    tokenizer.pad_token = tokenizer.eos_token
    try:
        findings, _ = run(renderer, pairs(8), collate=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    finally:
        tokenizer.pad_token = original
    assert not findings["end of turn learned"].ok
    assert findings["end of turn learned"].detail.startswith(
        f"8 example(s) do not learn the end-of-turn token (id {tokenizer.eos_token_id}), so the model "
        "never learns to stop; is the pad token equal to EOS in the collator? data.jsonl:1, data.jsonl:2"
    )
    assert not findings["loss on the reply only"].ok  # that collator learns the prompt too


def test_doubled_bos_is_caught(mistral_tokenizer):
    renderer = PromptRenderer(mistral_tokenizer, PERSONA)
    renderer._head = [mistral_tokenizer.bos_token_id, *renderer._head]  # what a literal <s> in the template does
    findings, _ = run(renderer, pairs(8))
    assert not findings["one BOS"].ok
    assert findings["one BOS"].detail == (
        "8 example(s) start with two BOS tokens (a literal BOS in the template plus the tokenizer's own): "
        "data.jsonl:1, data.jsonl:2, data.jsonl:3, data.jsonl:4, data.jsonl:5 and 3 more"
    )


def test_mask_that_leaks_the_prompt_is_caught(renderer):
    def no_mask(rows):
        batch = ReplyCollator(renderer.tokenizer.pad_token_id)(rows)
        batch["labels"] = batch["input_ids"].clone()
        return batch

    findings, _ = run(renderer, pairs(8), collate=no_mask)
    assert not findings["loss on the reply only"].ok
    assert findings["loss on the reply only"].detail.startswith(
        "8 example(s) learn tokens outside the reply (prompt or comment in the loss"
    )
    assert findings["loss on the reply only"].detail.endswith("tokens learned (100.0%)")


def test_different_dash_in_signature_is_caught(renderer):
    findings, _ = run(renderer, pairs(8, sign=" -Maya"))
    detail = findings["signature"].detail
    assert not findings["signature"].ok
    assert detail == (
        "the persona signs '–Maya' (U+2013), but 8 repl(ies) sign '-Maya' (U+002D): data.jsonl:1, data.jsonl:2, "
        "data.jsonl:3, data.jsonl:4, data.jsonl:5 and 3 more; write it the same way everywhere"
    )


def test_app_prompt_that_differs_from_training_is_caught(renderer, chatml_tokenizer):
    app = PromptRenderer(chatml_tokenizer, Persona(PERSONA.template.replace("friendly", "formal")))
    findings, _ = run(renderer, pairs(8), app=app)
    assert not findings["training prompt = app prompt"].ok
    assert findings["training prompt = app prompt"].detail.startswith(
        "11 comment(s) are rendered differently by the app (from character "
    )
    assert "'riendly, plain" in findings["training prompt = app prompt"].detail


def test_the_app_prompt_is_built_from_the_persona_the_adapter_folder_gives_back(
    chatml_tokenizer, monkeypatch, default_model_dir
):
    """The doctor asks the app's own reader (inference.adapter_files) for the persona; a folder that
    gave back another persona than training used would fail the check."""
    from inference import adapter_files
    from training.config import TrainConfig
    from training.doctor import app_renderer

    assert (
        app_renderer(TrainConfig(), PERSONA).prompt("Hi").input_ids
        == PromptRenderer(chatml_tokenizer, PERSONA).prompt("Hi").input_ids
    )
    monkeypatch.setattr(
        adapter_files, "adapter_persona", lambda folder: Persona(PERSONA.template.replace("friendly", "formal"))
    )
    assert "formal" in app_renderer(TrainConfig(), PERSONA).prompt("Hi").text


def test_doctor_cli_passes_on_the_project_defaults(capsys, default_model_dir):
    from training.doctor import main

    assert main([]) == 0
    out = capsys.readouterr().out
    assert "data doctor: all checks passed" in out and "learned tokens in [brackets]" in out


def test_training_stops_on_a_failed_check(tiny_model_dir, tmp_path, capsys):
    import json

    from training.config import TrainConfig
    from training.run import main

    rows = "".join(json.dumps({"comment": f"c{i}", "response": f"r{i} -Maya"}) + "\n" for i in range(12))
    (tmp_path / "d.jsonl").write_text(rows)
    args = [
        "--base-model",
        str(tiny_model_dir),
        "--data",
        str(tmp_path / "d.jsonl"),
        "--eval-data",
        "none",
        "--output-dir",
        str(tmp_path / "out"),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "[FAIL] signature" in err and "--no-doctor" in err
    assert not (tmp_path / "out").exists()
    assert TrainConfig(doctor=False).training_hash() == TrainConfig().training_hash()


def test_earlier_turns_in_training_prompts_pass_only_when_the_doctor_knows_them(renderer):
    """With the creator's other pairs as earlier turns (--examples_in_prompt), only the reply is
    learned and the app sends the same prompt; a doctor that assumed the bare prompt would see the
    earlier turns' replies as learned prompt tokens."""
    from inference.retrieval import ExampleBank

    train = [
        Pair(f"How do I pick k, take {i}?", f"Try the elbow method, take {i}. –Maya", f"d.jsonl:{i + 1}")
        for i in range(8)
    ]
    bank = ExampleBank([(p.comment, p.response) for p in train], k=2)

    def earlier(comment):
        return bank.similar(comment)

    examples, _ = tokenize_pairs(train, renderer, 512, earlier)
    text = renderer.tokenizer.decode(examples[0].input_ids)
    assert text.count("Try the elbow method") == 3 and text.count("take 0") == 2  # two others' replies, then its own
    evals = pairs(3, start=100)
    findings, _ = diagnose(train, examples, evals, renderer, renderer, packed(renderer, train), earlier)
    assert all(f.ok for f in findings), [f.line() for f in findings if not f.ok]
    findings, _ = diagnose(train, examples, evals, renderer, renderer, packed(renderer, train))
    assert not {f.check: f for f in findings}["loss on the reply only"].ok
