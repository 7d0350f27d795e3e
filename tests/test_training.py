"""Real training runs on a tiny Llama built from a config: loss goes down, outputs load, resume works."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training.config import TrainConfig
from training.run import ResumeError, train
from training.trainer import RunStats, count_parameters


def style_pairs(n: int, start: int = 0) -> str:
    """Pairs in one consistent voice, so a few steps can learn it."""
    return "".join(
        json.dumps({"comment": f"Comment {i}: loved part {i} of the series", "response": "Thanks so much, glad you liked it! –Maya"}) + "\n"
        for i in range(start, start + n)
    )


@pytest.fixture
def tiny_config(tiny_model_dir, tmp_path):
    def make(**overrides) -> TrainConfig:
        (tmp_path / "train.jsonl").write_text(style_pairs(24))
        (tmp_path / "eval.jsonl").write_text(style_pairs(6, start=100))
        values = dict(
            base_model=str(tiny_model_dir),
            data=str(tmp_path / "train.jsonl"),
            eval_data=str(tmp_path / "eval.jsonl"),
            output_dir=str(tmp_path / "out"),
            epochs=3,
            learning_rate=2e-2,
            target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
            batch_size=4,
            grad_accum=1,
            lora_r=8,
            warmup_ratio=0.0,
            early_stopping_patience=0,
        )
        values.update(overrides)
        return TrainConfig(**values)

    return make


def test_qlora_training_lowers_held_out_loss_and_writes_a_loadable_adapter(tiny_config, capsys):
    config = tiny_config()
    assert train(config) == 0
    out = capsys.readouterr().out
    assert "epoch 3/3" in out and "base model held-out loss" in out

    folder = Path(config.output_dir)
    summary = json.loads((folder / "training_summary.json").read_text())
    assert summary["eval_loss"] < summary["base_eval_loss"] - 0.5
    assert [e["epoch"] for e in summary["epochs"]] == [1, 2, 3]
    assert summary["peak_memory_gib"] > 0 and summary["tokens_per_second"] > 0
    assert summary["data"]["hash"] and summary["config_hash"] == config.training_hash()
    assert summary["voice"]["table"]["adapter"]["held_out_loss"] < summary["voice"]["table"]["base"]["held_out_loss"]
    assert "## Voice fidelity" in (folder / "README.md").read_text()
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "persona.txt", "loss_curve.png", "README.md"):
        assert (folder / name).is_file(), name
    assert any((folder / "runs").rglob("events.out.tfevents.*"))
    assert not (folder / "checkpoints").exists()

    # Round trip: plain PeftModel.from_pretrained on the base gives back the trained held-out loss.
    from peft import PeftModel

    from inference.loading import load_base_model, load_tokenizer
    from prompts.render import Persona, PromptRenderer
    from training.data import load_pairs, tokenize_pairs
    from training.trainer import ReplyCollator

    base = load_base_model(config.base_model, "nf4")
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    tokenizer = load_tokenizer(config.base_model)
    examples, _ = tokenize_pairs(load_pairs(config.eval_data), PromptRenderer(tokenizer, Persona.from_file(folder / "persona.txt")), 512)
    batch = ReplyCollator(tokenizer.pad_token_id)([{"input_ids": e.input_ids, "labels": e.labels} for e in examples])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss.item()
    assert loss == pytest.approx(summary["eval_loss"], abs=0.05)


def test_true_parameter_count_includes_packed_4bit_weights(tiny_model_dir):
    from inference.loading import load_base_model

    quantized = load_base_model(str(tiny_model_dir), "nf4")
    full = load_base_model(str(tiny_model_dir), "none")
    naive = sum(p.numel() for p in quantized.parameters())
    assert count_parameters(quantized)[1] == sum(p.numel() for p in full.parameters())
    assert naive < count_parameters(quantized)[1]  # what peft's printout would have said


class Interrupted(Exception):
    pass


def interrupt_after_first_save(self, args, state, control, **kwargs):
    raise Interrupted(f"killed after saving step {state.global_step}")


def test_resume_after_interruption_finishes_like_an_uninterrupted_run(tiny_config, tmp_path, monkeypatch):
    reference = tiny_config(quantization="none", output_dir=str(tmp_path / "reference"), epochs=2)
    assert train(reference) == 0

    config = tiny_config(quantization="none", epochs=2)
    monkeypatch.setattr(RunStats, "on_save", interrupt_after_first_save, raising=False)
    with pytest.raises(Interrupted):
        train(config)
    monkeypatch.undo()
    assert (tmp_path / "out" / "checkpoints" / "checkpoint-6").is_dir()

    with pytest.raises(ResumeError, match="unfinished run; pass --resume"):
        train(config)
    with pytest.raises(ResumeError, match="training settings changed"):
        train(tiny_config(quantization="none", epochs=2, learning_rate=1e-3, resume=True))

    assert train(tiny_config(quantization="none", epochs=2, resume=True)) == 0
    resumed = load_file(tmp_path / "out" / "adapter_model.safetensors")
    expected = load_file(tmp_path / "reference" / "adapter_model.safetensors")
    assert resumed.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=0, atol=1e-6)
    summary = json.loads((tmp_path / "out" / "training_summary.json").read_text())
    assert summary["base_eval_loss"] == json.loads((tmp_path / "reference" / "training_summary.json").read_text())["base_eval_loss"]


def test_resume_skips_a_half_written_checkpoint(tiny_config, tmp_path, monkeypatch, capsys):
    config = tiny_config(quantization="none", epochs=2)
    monkeypatch.setattr(RunStats, "on_save", interrupt_after_first_save, raising=False)
    with pytest.raises(Interrupted):
        train(config)
    monkeypatch.undo()
    # A kill in the middle of writing checkpoint-12: its folder exists, its trainer_state.json does not.
    half = tmp_path / "out" / "checkpoints" / "checkpoint-12"
    half.mkdir()
    (half / "adapter_model.safetensors").write_bytes(b"partial")
    assert train(tiny_config(quantization="none", epochs=2, resume=True)) == 0
    assert "skipping incomplete checkpoint" in capsys.readouterr().out


def test_resume_without_checkpoint_is_a_clear_error(tiny_config):
    with pytest.raises(ResumeError, match="no unfinished run"):
        train(tiny_config(resume=True))


def test_unknown_target_module_lists_the_real_ones(tiny_config):
    with pytest.raises(ValueError, match="linear layers of this model: .*q_proj"):
        train(tiny_config(target_modules=["query_key_value"]))


def lora_gradients(trainer, batch) -> dict[str, torch.Tensor]:
    model = trainer.model
    model.train()
    model.zero_grad()
    trainer.compute_loss(model, batch).backward()
    return {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_evaluation_before_training_leaves_the_gradients_intact(tiny_config):
    """bitsandbytes repacks NF4 weights for a no-backward CPU kernel on an eval forward; a run
    evaluates the base before its first step, and must still train with the full gradient."""
    from inference.loading import compute_dtype, load_base_model
    from training.run import prepare_examples
    from training.trainer import ReplyCollator, build_trainer, trainable_model

    config = tiny_config(lora_dropout=0.0)
    prepared = prepare_examples(config)
    torch.manual_seed(0)
    model = trainable_model(load_base_model(config.base_model, "nf4", compute_dtype(), for_training=True), config)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # fresh LoRA B is zero, which would hide the gradient through A
            torch.nn.init.normal_(param, std=0.05)
    trainer, _ = build_trainer(config, model, prepared.tokenizer, prepared.train_examples, prepared.eval_examples, compute_dtype())
    batch = ReplyCollator(prepared.tokenizer.pad_token_id)([{"input_ids": e.input_ids, "labels": e.labels} for e in prepared.train_examples[:4]])

    before = lora_gradients(trainer, batch)
    trainer.evaluate()
    after = lora_gradients(trainer, batch)
    first_layer = [n for n in before if ".layers.0." in n and "lora_A" in n]
    assert first_layer and all(before[n].abs().max() > 0 for n in first_layer)
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0, msg=name)


def test_fast_dropout_drops_p_of_the_inputs_and_rescales_the_rest():
    from training.trainer import FastDropout

    dropout = FastDropout(0.05).train()
    x = torch.ones(1000, 1000, dtype=torch.bfloat16)
    torch.manual_seed(0)
    y = dropout(x)
    assert (y == 0).float().mean().item() == pytest.approx(0.05, abs=0.001)
    assert y.unique().tolist() == [0.0, pytest.approx(1 / 0.95, rel=1e-2)]
    assert y.float().mean().item() == pytest.approx(1.0, abs=0.005)  # the expectation is unchanged
    torch.manual_seed(0)
    assert torch.equal(dropout(x), y)  # the seed fixes the mask, so a resumed run draws the same ones
    assert not torch.equal(dropout(x), y)
    assert dropout.eval()(x) is x
    x.requires_grad_(True)
    dropout.train()(x).sum().backward()
    assert x.grad.unique().numel() == 2  # the gradient flows through the kept inputs only


def test_lora_model_uses_fast_dropout_on_every_lora_input(tiny_config):
    from inference.loading import load_base_model
    from training.trainer import FastDropout, lora_model

    model = lora_model(load_base_model(tiny_config().base_model, "nf4", for_training=True), tiny_config(lora_dropout=0.1))
    dropouts = [d for m in model.modules() if hasattr(m, "lora_dropout") for d in m.lora_dropout.values()]
    assert dropouts and all(isinstance(d, FastDropout) and d.p == 0.1 for d in dropouts)
