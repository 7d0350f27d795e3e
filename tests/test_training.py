"""Real training runs on a tiny Llama built from a config: loss goes down, outputs load, resume works."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from inference.compare import pane_labels
from inference.engines import load_replier
from inference.retrieval import K_EXAMPLES
from training.callbacks import RunStats
from training.checkpoints import ResumeError
from training.config import TrainConfig
from training.model import count_parameters
from training.run import train


def style_pairs(n: int, start: int = 0) -> str:
    """Pairs in one consistent voice, so a few steps can learn it."""
    return "".join(
        json.dumps(
            {
                "comment": f"Comment {i}: loved part {i} of the series",
                "response": "Thanks so much, glad you liked it! –Maya",
            }
        )
        + "\n"
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
            # These tests are about training: their voice evaluation uses the trained model itself,
            # sparing each run a GGUF conversion (the llama.cpp path is tested in test_llamacpp.py,
            # test_youtube.py and the slow end-to-end run).
            backend="transformers",
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
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "persona.txt",
        "heldout.jsonl",
        "examples.jsonl",
        "loss_curve.png",
        "README.md",
    ):
        assert (folder / name).is_file(), name
    from inference.adapter_files import adapter_held_out
    from training.data import load_pairs

    assert adapter_held_out(str(folder)) == [
        (p.comment, p.response) for p in load_pairs(config.eval_data)
    ]  # the held-out set travels
    assert any((folder / "runs").rglob("events.out.tfevents.*"))
    assert not (folder / "checkpoints").exists()

    # Round trip: plain PeftModel.from_pretrained on the base gives back the trained held-out loss.
    from peft import PeftModel

    from inference.loading import load_base_model, load_tokenizer
    from prompts.render import Persona, PromptRenderer
    from training.collate import ReplyCollator
    from training.data import load_pairs, tokenize_pairs

    base = load_base_model(config.base_model, "nf4")
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    tokenizer = load_tokenizer(config.base_model)
    examples, _ = tokenize_pairs(
        load_pairs(config.eval_data), PromptRenderer(tokenizer, Persona.from_file(folder / "persona.txt")), 512
    )
    batch = ReplyCollator(tokenizer.pad_token_id)([{"input_ids": e.input_ids, "labels": e.labels} for e in examples])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss.item()
    assert loss == pytest.approx(summary["eval_loss"], abs=0.05)


def test_examples_in_prompt_show_other_training_pairs_to_every_comment(tiny_config):
    """Each training and held-out prompt carries the k training pairs most like its comment as
    earlier turns, never its own pair and never a held-out one (the app retrieves from the training
    pairs the adapter folder carries)."""
    from training.examples import prepare_examples

    prepared = prepare_examples(tiny_config(examples_in_prompt=2))
    decode = prepared.tokenizer.decode
    for pair, example in zip(
        prepared.train_pairs + prepared.eval_pairs, prepared.train_examples + prepared.eval_examples
    ):
        turns = prepared.earlier(pair.comment)
        assert len(turns) == 2 and pair.comment not in [c for c, _ in turns]
        assert all(c in [p.comment for p in prepared.train_pairs] for c, _ in turns)
        assert decode(example.input_ids).index(turns[0][0]) < decode(example.input_ids).index(pair.comment)


def test_a_run_trained_with_examples_reports_each_panes_own_held_out_loss(tiny_config):
    """Its own evaluation loss is measured on prompts with examples: the voice table's examples pane
    carries it, and the persona-only panes are measured without them."""
    config = tiny_config(examples_in_prompt=4, epochs=1)
    assert train(config) == 0
    summary = json.loads((Path(config.output_dir) / "training_summary.json").read_text())
    table = summary["voice"]["table"]
    assert summary["config"]["examples_in_prompt"] == 4
    assert table["adapter+examples"]["held_out_loss"] == pytest.approx(summary["eval_loss"], rel=1e-3)
    assert table["adapter"]["held_out_loss"] != pytest.approx(table["adapter+examples"]["held_out_loss"], rel=1e-3)
    assert table["base"]["held_out_loss"] != pytest.approx(table["examples"]["held_out_loss"], rel=1e-3)
    # The app shows such an adapter as many examples as it trained with (the default shows fewer).
    assert summary["voice"]["settings"]["examples_shown"] == 4 != K_EXAMPLES
    served = load_replier(config.base_model, config.output_dir, "none", backend="transformers")
    assert served.examples.k == 4
    assert (
        "fine-tuned + 4 of your most similar replies"
        in pane_labels(config.base_model, config.output_dir, served)["adapter+examples"]
    )


def test_an_article_style_csv_with_unsigned_replies_trains_with_signature(tiny_config, tmp_path, capsys):
    """The original article kept `Comment,Response` columns and signed every reply in code."""
    rows = "".join(
        f'"Comment {i}: loved part {i} of the series","Thanks so much, glad you liked it!"\n' for i in range(24)
    )
    (tmp_path / "article.csv").write_text("Comment,Response\n" + rows)
    config = tiny_config(data=str(tmp_path / "article.csv"), signature=" –Maya", epochs=1)
    assert train(config) == 0
    out = capsys.readouterr().out
    assert f"columns: {tmp_path / 'article.csv'}: Comment -> comment, Response -> response" in out
    summary = json.loads((Path(config.output_dir) / "training_summary.json").read_text())
    assert (
        summary["data"]["signatures_added"] == 24 and summary["data"]["columns"]
    )  # the held-out file is signed already


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
    assert (
        summary["base_eval_loss"]
        == json.loads((tmp_path / "reference" / "training_summary.json").read_text())["base_eval_loss"]
    )


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


def test_unknown_target_module_lists_the_real_ones(tiny_config, capsys):
    from training.run import main

    config = tiny_config()
    assert (
        main(
            [
                "--base-model",
                config.base_model,
                "--data",
                *config.data,
                "--eval-data",
                config.eval_data,
                "--output-dir",
                config.output_dir,
                "--target-modules",
                "query_key_value",
            ]
        )
        == 2
    )
    assert (
        "error: target_modules ['query_key_value'] are not in this model; its linear layers: "
        in capsys.readouterr().err
    )


def lora_gradients(trainer, batch) -> dict[str, torch.Tensor]:
    model = trainer.model
    model.train()
    model.zero_grad()
    trainer.compute_loss(model, batch).backward()
    return {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}


def trainer_and_batch(config: TrainConfig):
    """A run's trainer on the tiny model, its LoRA B matrices non-zero (fresh ones are zero, which
    would hide the gradient through A), and a batch of four training examples."""
    from inference.loading import compute_dtype
    from training.examples import prepare_examples
    from training.model import load_training_base, trainable_model
    from training.trainer import build_trainer

    prepared = prepare_examples(config)
    torch.manual_seed(0)
    model = trainable_model(load_training_base(config.base_model, "nf4", compute_dtype()), config, 0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    trainer, _ = build_trainer(
        config, model, prepared.tokenizer, prepared.train_examples, prepared.eval_examples, compute_dtype()
    )
    return trainer, trainer.data_collator(
        [{"input_ids": e.input_ids, "labels": e.labels} for e in prepared.train_examples[:4]]
    )


def test_evaluation_before_training_leaves_the_gradients_intact(tiny_config):
    """bitsandbytes repacks NF4 weights for a no-backward CPU kernel on an eval forward; a run
    evaluates the base before its first step, and must still train with the full gradient."""
    trainer, batch = trainer_and_batch(tiny_config(lora_dropout=0.0))
    before = lora_gradients(trainer, batch)
    trainer.evaluate()
    after = lora_gradients(trainer, batch)
    first_layer = [n for n in before if ".layers.0." in n and "lora_A" in n]
    assert first_layer and all(before[n].abs().max() > 0 for n in first_layer)
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0, msg=name)


def test_fast_dropout_drops_p_of_the_inputs_and_rescales_the_rest():
    from training.cpu import FastDropout

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
    from training.cpu import FastDropout
    from training.model import load_training_base, lora_model

    model = lora_model(load_training_base(tiny_config().base_model, "nf4"), tiny_config(lora_dropout=0.1), 0)
    dropouts = [d for m in model.modules() if hasattr(m, "lora_dropout") for d in m.lora_dropout.values()]
    assert dropouts and all(isinstance(d, FastDropout) and d.p == 0.1 for d in dropouts)


def test_checkpointing_some_layers_recomputes_only_those_with_the_same_gradients(tiny_config, monkeypatch):
    """k of the layers are recomputed in the backward pass (their MLP runs twice), fewer activations
    are kept, and the LoRA gradients are those of the run without checkpointing (dropout included)."""
    from inference.internals.transformers import checkpoint_first_layers

    trainer, batch = trainer_and_batch(tiny_config(lora_dropout=0.1))
    model = trainer.model
    layers = model.base_model.model.model.layers
    calls = [0] * len(layers)
    # Counted in forward itself: module hooks do not fire when checkpointing recomputes a layer.
    mlp_forward = type(layers[0].mlp).forward

    def counted(self, *args, **kwargs):
        calls[[layer.mlp for layer in layers].index(self)] += 1
        return mlp_forward(self, *args, **kwargs)

    monkeypatch.setattr(type(layers[0].mlp), "forward", counted)

    def step() -> tuple[dict[str, torch.Tensor], int]:
        calls[:] = [0] * len(layers)
        saved = []
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout masks in every run
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.nbytes) or t, lambda t: t):
            loss = trainer.compute_loss(model, batch)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, sum(saved)

    model.train()
    plain, plain_bytes = step()
    assert calls == [1, 1]
    checkpoint_first_layers(model, 1)
    one, one_bytes = step()
    assert calls == [2, 1]  # only the first layer is recomputed
    checkpoint_first_layers(model, 2)
    both, both_bytes = step()
    assert calls == [2, 2]
    assert both_bytes < one_bytes < plain_bytes
    for name in plain:
        torch.testing.assert_close(one[name], plain[name], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(both[name], plain[name], rtol=1e-4, atol=1e-6)


def test_a_memory_limit_checkpoints_the_fewest_layers_that_fit(tiny_config, capsys):
    from training.estimate import estimate_for_config
    from training.memory import GiB

    config = tiny_config(epochs=1)
    estimate = estimate_for_config(config, 64, limit=None)
    assert estimate.checkpointed_layers == 0 and estimate.layers == 2
    # Checkpointing the last layer saves nothing: the backward pass recomputes it first thing.
    assert estimate.total_with(1) < estimate.total_with(0) and estimate.total_with(2) > estimate.total_with(1)
    # A limit between one and no checkpointed layer: exactly one is checkpointed.
    between = (estimate.total_with(1) + estimate.total_with(0)) / 2
    assert estimate_for_config(config, 64, limit=between).checkpointed_layers == 1
    assert estimate_for_config(config, 64, limit=estimate.total_with(0)).checkpointed_layers == 0
    assert (
        estimate_for_config(config, 64, limit=estimate.total_with(1) - 1).checkpointed_layers == 2
    )  # cannot fit: all of them
    assert estimate_for_config(tiny_config(gradient_checkpointing=True), 64, limit=None).checkpointed_layers == 2

    # In a run, the limit applies to batches of the data's longest example (sharing the prompt's
    # prefix: smaller than padded rows), and the plan is printed.
    from training.examples import prepare_examples

    prepared = prepare_examples(config)
    assert prepared.shared_prefix() > 0
    prefix = prepared.shared_prefix()
    packed, learned = prepared.largest_batch(prefix)  # what the run estimates: the largest batch the data can make
    longest = estimate_for_config(
        config, prepared.summary.longest, limit=None, shared_prefix=prefix, learned_tokens=learned, packed_tokens=packed
    )
    assert longest.total_with(0) < estimate_for_config(config, prepared.summary.longest, limit=None).total_with(0)
    with_limit = tiny_config(epochs=1, memory_limit_gib=(longest.total_with(0) - 1) / GiB)
    assert train(with_limit) == 0
    out = capsys.readouterr().out
    assert "gradient checkpointing: 1 of 2 layers, the fewest that keep the estimate under the memory limit" in out
    assert "memory limit: " in out and "(--memory-limit-gib)" in out
    assert (
        json.loads((Path(with_limit.output_dir) / "training_summary.json").read_text())["config"]["memory_limit_gib"]
        == with_limit.memory_limit_gib
    )


def test_shared_prefix_stops_before_the_first_learned_prediction_and_only_where_it_saves_work():
    from prompts.render import IGNORE_INDEX, Example
    from training.collate import shared_prefix_length

    def example(ids, learned_from):
        return Example(ids, [IGNORE_INDEX] * learned_from + ids[learned_from:], 0)

    same = [example([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 20 + i], 11) for i in range(4)]
    assert shared_prefix_length(same, 4, 64) == 10  # position 10 predicts the learned token 11
    assert shared_prefix_length(same, 1, 64) == 0  # one row: nothing to share
    assert shared_prefix_length([example([1, 2, 3, 4], 2), example([9, 2, 3, 4], 2)], 2, 64) == 0  # no common start
    # 100 of 400 tokens shared by 8 rows: one row of 2,500 tokens would do fewer token computations
    # than 8 x 400, but its 6.25M attention scores (vs 1.28M) cost more for a 64-wide model, not
    # for a 4,096-wide one.
    rows = [example([*range(100), *range(1000 * i, 1000 * i + 300)], 100) for i in range(1, 9)]
    assert shared_prefix_length(rows, 8, 64) == 0
    assert shared_prefix_length(rows, 8, 4096) == 99
    # Attending example by example (the CPU's packed attention), the row never has more scores
    # than the padded rows: the prefix always pays.
    assert shared_prefix_length(rows, 8, 64, linear_attention=True) == 99


@pytest.mark.parametrize("attention", ["replytune_grouped", "eager", "sdpa"])
def test_a_packed_batch_computes_the_prefix_once_with_the_loss_and_gradients_of_padded_rows(
    tiny_config, tmp_path, attention
):
    """The chat template and persona that every example starts with are computed once per batch;
    the examples' own tokens see them and their own earlier tokens only, at their own positions."""
    from training.collate import TrainingCollator
    from training.examples import prepare_examples
    from training.model import load_training_base, trainable_model
    from training.trainer import build_trainer

    config = tiny_config(lora_dropout=0.0, quantization="none")
    comments = [
        "hi",
        "what camera do you use for the outdoor shots?",
        "great video",
        "could you explain the loss curve at 12:30 again, slower?",
    ]
    Path(config.data[0]).write_text(
        "".join(json.dumps({"comment": c, "response": f"Thanks! ({len(c)}) –Maya"}) + "\n" for c in comments)
    )
    prepared = prepare_examples(config)
    prefix = prepared.shared_prefix()
    lengths = [len(e.input_ids) for e in prepared.train_examples]
    assert prefix > 0 and len(set(lengths)) == 4

    torch.manual_seed(0)
    model = trainable_model(load_training_base(config.base_model, "none", torch.float32), config, 0)
    model.set_attn_implementation(attention)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    trainer, _ = build_trainer(
        config, model, prepared.tokenizer, prepared.train_examples, prepared.eval_examples, torch.float32, prefix
    )
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in prepared.train_examples]
    packed = trainer.data_collator(rows)
    padded = TrainingCollator(prepared.tokenizer.pad_token_id)(rows)
    assert packed["input_ids"].shape == (1, prefix + sum(n - prefix for n in lengths))
    assert (packed["shift_labels"] != -100).sum() == (padded["shift_labels"] != -100).sum()

    def loss_and_gradients(batch):
        model.zero_grad()
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    model.train()
    packed_loss, packed_grads = loss_and_gradients(packed)
    padded_loss, padded_grads = loss_and_gradients(padded)
    assert packed_loss == pytest.approx(padded_loss, rel=1e-5)
    assert all(g.abs().max() > 0 for n, g in padded_grads.items() if ".layers.0." in n)
    for name in padded_grads:
        torch.testing.assert_close(packed_grads[name], padded_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_evaluation_loss_is_the_mean_over_held_out_reply_tokens_however_they_are_batched(tiny_config):
    """Early stopping, the best checkpoint and the reported held-out loss read this number: one
    reply token weighs the same in it whether the held-out examples come 1, 4 or 5 to a batch."""
    from dataclasses import replace

    from training.collate import ReplyCollator
    from training.examples import prepare_examples
    from training.model import load_training_base, trainable_model
    from training.trainer import build_trainer

    config = tiny_config(quantization="none")
    replies = [
        "Thanks!",
        "Glad it helped, and thanks for watching the whole series –Maya",
        "Yes",
        "I use a small mirrorless camera and one prime lens for all of it –Maya",
        "Noted, fixed in the description –Maya",
    ]
    Path(config.eval_data).write_text(
        "".join(json.dumps({"comment": f"comment {i}", "response": r}) + "\n" for i, r in enumerate(replies))
    )
    prepared = prepare_examples(config)
    torch.manual_seed(0)
    model = trainable_model(load_training_base(config.base_model, "none", torch.float32), config, 0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    model.eval()
    batch = ReplyCollator(prepared.tokenizer.pad_token_id)(
        [{"input_ids": e.input_ids, "labels": e.labels} for e in prepared.eval_examples]
    )
    with torch.no_grad():
        token_mean = model(**batch).loss.item()  # transformers' causal-LM loss: the mean over every learned token

    for batch_size in (1, 4, 5):
        prefix = prepared.shared_prefix() if batch_size > 1 else 0
        trainer, _ = build_trainer(
            replace(config, batch_size=batch_size),
            model,
            prepared.tokenizer,
            prepared.train_examples,
            prepared.eval_examples,
            torch.float32,
            prefix,
        )
        assert trainer.evaluate()["eval_loss"] == pytest.approx(token_mean, rel=1e-5), batch_size
