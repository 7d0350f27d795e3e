"""The data doctor catches each silent mistake when it is planted, and passes on the defaults."""

from __future__ import annotations

import pytest
from transformers import DataCollatorForLanguageModeling

from prompts.render import Persona, PromptRenderer
from training.data import Pair, tokenize_pairs
from training.doctor import diagnose
from training.collate import ReplyCollator

PERSONA = Persona.from_file()


def pairs(n: int, sign: str = " –Maya", start: int = 0) -> list[Pair]:
    return [Pair(f"Nice video number {i}", f"Thanks for watching!{sign}", f"data.jsonl:{i + 1}") for i in range(start, start + n)]


@pytest.fixture
def renderer(chatml_tokenizer):
    return PromptRenderer(chatml_tokenizer, PERSONA)


def run(renderer, train, evals=None, app=None, collate=None):
    examples, _ = tokenize_pairs(train, renderer, 512)
    findings, example = diagnose(train, examples, evals or pairs(3, start=100), renderer, app or renderer, collate or ReplyCollator(renderer.tokenizer.pad_token_id))
    return {f.check: f for f in findings}, example


def test_defaults_pass_and_show_an_example(renderer):
    findings, example = run(renderer, pairs(8))
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
    assert "pad token equal to EOS" in findings["end of turn learned"].detail
    assert not findings["loss on the reply only"].ok  # that collator learns the prompt too


def test_doubled_bos_is_caught(mistral_tokenizer):
    renderer = PromptRenderer(mistral_tokenizer, PERSONA)
    renderer._head = [mistral_tokenizer.bos_token_id, *renderer._head]  # what a literal <s> in the template does
    findings, _ = run(renderer, pairs(8))
    assert not findings["one BOS"].ok and "data.jsonl:1" in findings["one BOS"].detail


def test_mask_that_leaks_the_prompt_is_caught(renderer):
    def no_mask(rows):
        batch = ReplyCollator(renderer.tokenizer.pad_token_id)(rows)
        batch["labels"] = batch["input_ids"].clone()
        return batch

    findings, _ = run(renderer, pairs(8), collate=no_mask)
    assert not findings["loss on the reply only"].ok
    assert "100.0%" in findings["loss on the reply only"].detail


def test_different_dash_in_signature_is_caught(renderer):
    findings, _ = run(renderer, pairs(8, sign=" -Maya"))
    detail = findings["signature"].detail
    assert not findings["signature"].ok
    assert "U+2013" in detail and "U+002D" in detail and "data.jsonl:1" in detail


def test_app_prompt_that_differs_from_training_is_caught(renderer, chatml_tokenizer):
    app = PromptRenderer(chatml_tokenizer, Persona(PERSONA.template.replace("friendly", "formal")))
    findings, _ = run(renderer, pairs(8), app=app)
    assert not findings["training prompt = app prompt"].ok
    assert "'riendly, plain" in findings["training prompt = app prompt"].detail


def test_train_eval_overlap_is_caught(renderer):
    findings, _ = run(renderer, pairs(8), evals=pairs(2))
    assert not findings["train/eval overlap"].ok


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
    args = ["--base-model", str(tiny_model_dir), "--data", str(tmp_path / "d.jsonl"), "--eval-data", "none", "--output-dir", str(tmp_path / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "[FAIL] signature" in err and "--no-doctor" in err
    assert not (tmp_path / "out").exists()
    assert TrainConfig(doctor=False).training_hash() == TrainConfig().training_hash()
