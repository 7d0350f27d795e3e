"""Preference tuning: the preference files' reader, the self-pair selection, and real DPO runs of
TRL on a tiny Llama built from a config, with the tiny adapter as the starting point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training.config import ConfigError
from training.data import DataError, Pair
from training.prefer import main, prefer
from training.prefer_config import PreferConfig
from training.preferences import (
    Draft,
    PreferencePair,
    PreferenceSummary,
    load_preferences,
    render_preferences,
    select_self_pairs,
)

CHOSEN = "Thanks so much, glad you liked it! –Maya"
REJECTED = "As an AI language model, I cannot watch videos."


def preference_rows(n: int, start: int = 0) -> str:
    return "".join(
        json.dumps({"comment": f"Comment {i}: loved part {i} of the series", "chosen": CHOSEN, "rejected": REJECTED})
        + "\n"
        for i in range(start, start + n)
    )


# --- reading


def test_preferences_are_read_with_their_columns_matched_and_handles_anonymised(write):
    path = write(
        "picks.jsonl",
        json.dumps({"Comment Text": "@bob great video", "preferred": "Thanks @bob!", "Rejected": "ok"}) + "\n",
    )
    summary = PreferenceSummary()
    [pair] = load_preferences(path, summary)
    assert (pair.comment, pair.chosen, pair.rejected) == ("@user great video", "Thanks @user!", "ok")
    assert pair.where == f"{path}:1" and pair.source == "preferences"
    assert summary.rows == 1 and summary.files == [str(path)]


def test_a_csv_of_preferences_reads_like_the_jsonl(write):
    path = write("picks.csv", 'comment,chosen,rejected\n"Hi, there",Hello!,Go away\n')
    [pair] = load_preferences(path)
    assert (pair.comment, pair.chosen, pair.rejected, pair.where) == ("Hi, there", "Hello!", "Go away", f"{path}:2")


def test_a_pair_whose_chosen_equals_its_rejected_is_skipped_and_counted(write):
    rows = preference_rows(2) + json.dumps({"comment": "Hi", "chosen": "Same reply ", "rejected": "Same reply"}) + "\n"
    path = write("picks.jsonl", rows)
    summary = PreferenceSummary()
    assert len(load_preferences(path, summary)) == 2
    assert summary.same_skipped == [f"{path}:3"]
    assert "1 skipped (chosen equals rejected)" in "\n".join(summary.lines())


def test_every_problem_of_a_malformed_file_is_named_by_file_and_line(write):
    path = write(
        "picks.jsonl",
        preference_rows(1)
        + '{"comment": "Hi", "chosen": "  ", "rejected": "x"}\n{not json\n'
        + '{"comment": "Hi", "chosen": "a"}\n{"comment": "Hi", "chosen": 3, "rejected": "x"}\n',
    )
    with pytest.raises(DataError) as error:
        load_preferences(path)
    message = str(error.value)
    assert "4 problem(s)" in message
    assert f"{path}:2: field 'chosen': blank" in message
    assert f"{path}:3: invalid JSON" in message
    assert f"{path}:4: field 'rejected': missing" in message
    assert f"{path}:5: field 'chosen': expected text, got int 3" in message


def test_a_malformed_preferences_file_stops_the_command_with_exit_2_before_any_model_loads(
    write, tiny_adapter_dir, tiny_model_dir, tmp_path, capsys
):
    path = write("picks.jsonl", preference_rows(1) + '{"comment": "Hi", "chosen": "", "rejected": "x"}\n')
    code = main(
        [
            "--adapter",
            str(tiny_adapter_dir),
            "--base-model",
            str(tiny_model_dir),
            "--preferences",
            str(path),
            "--output-dir",
            str(tmp_path / "out"),
        ]
    )
    assert code == 2
    assert f"{path}:2: field 'chosen': blank" in capsys.readouterr().err
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_the_command_needs_something_to_prefer(tiny_adapter_dir, tiny_model_dir, capsys):
    assert main(["--adapter", str(tiny_adapter_dir), "--base-model", str(tiny_model_dir)]) == 2
    assert "pass --preferences FILE..., --self-pairs, or both" in capsys.readouterr().err


# --- the self-pair selection


def test_only_drafts_a_reader_rejects_become_self_pairs_and_every_draft_is_counted():
    pairs = [Pair(f"comment {i}", "Thanks! –Maya", f"data.jsonl:{i + 1}") for i in range(5)]
    drafts = [
        Draft("Thanks! –Maya", True),  # already the real reply
        Draft("so good so good so good so good so good so good", True),  # loops
        Draft("As an AI, I cannot watch videos.", True),  # AI talk
        Draft("Well, let me tell you about the", False),  # cut at the token cap
        Draft("Glad you liked it!", True),  # merely different: a weak negative
    ]
    summary = PreferenceSummary()
    selected = select_self_pairs(pairs, drafts, summary)
    assert [(p.comment, p.reason) for p in selected] == [
        ("comment 1", "loops"),
        ("comment 2", "talks like an AI"),
        ("comment 3", "cut at the token cap"),
    ]
    assert all(p.chosen == "Thanks! –Maya" and p.source == "self-pairs" for p in selected)
    assert selected[0].where == "self-pair of data.jsonl:2"
    assert (summary.drafted, summary.draft_equals_reply, summary.self_pairs, summary.merely_different) == (5, 1, 3, 1)
    assert dict(summary.selected) == {"loops": 1, "talks like an AI": 1, "cut at the token cap": 1}
    assert "5 drafted; 1 already the real reply (skipped); 3 selected as rejected" in "\n".join(summary.lines())


# --- rendering


def test_both_replies_end_with_the_end_of_turn_after_the_apps_prompt(chatml_tokenizer):
    from prompts.render import Persona, PromptRenderer

    renderer = PromptRenderer(chatml_tokenizer, Persona.from_file())
    pair = PreferencePair("Loved part 3!", CHOSEN, REJECTED, "x:1")
    [example] = render_preferences([pair], renderer, 512)
    assert example.prompt_ids == renderer.prompt(pair.comment).input_ids
    supervised = renderer.example(pair.comment, CHOSEN, 512)
    assert example.prompt_ids + example.chosen_ids == supervised.input_ids
    assert example.chosen_ids[-1] == example.rejected_ids[-1] == renderer.end_of_turn_id


def test_a_pair_the_renderer_cannot_render_is_an_error_naming_the_pair_and_side(chatml_tokenizer):
    from prompts.render import Persona, PromptRenderer

    renderer = PromptRenderer(chatml_tokenizer, Persona.from_file())
    pairs = [
        PreferencePair("Hi", CHOSEN, REJECTED, "picks.jsonl:1"),
        PreferencePair("Hi", CHOSEN, "so long " * 300, "picks.jsonl:2"),
    ]
    with pytest.raises(
        DataError,
        match=(
            r"picks.jsonl:2: field 'rejected': the reply alone takes "
            r"\d+ tokens with the prompt, more than max_length=512"
        ),
    ):
        render_preferences(pairs, renderer, 512)


def test_a_long_comment_is_cut_to_fit_the_longer_reply_and_both_share_that_prompt(chatml_tokenizer):
    from prompts.render import Persona, PromptRenderer

    renderer = PromptRenderer(chatml_tokenizer, Persona.from_file())
    pair = PreferencePair("word " * 400, "Short.", "A much longer reply " * 10, "x:1")
    [example] = render_preferences([pair], renderer, 300)
    assert example.comment_tokens_cut > 0
    assert len(example.prompt_ids) + max(len(example.chosen_ids), len(example.rejected_ids)) <= 300


# --- real runs


def reply_log_probs(base: Path, adapter: Path, examples) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each pair's (chosen, rejected) reply-token log-probabilities under base + adapter (float32)."""
    from inference.loading import load_adapter, load_base_model

    model = load_adapter(load_base_model(str(base), "none"), adapter).eval()

    def logp(prompt: list[int], reply: list[int]) -> torch.Tensor:
        ids = torch.tensor([prompt + reply])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
        return torch.log_softmax(logits, -1).gather(1, torch.tensor(reply)[:, None])[:, 0]

    return [(logp(e.prompt_ids, e.chosen_ids), logp(e.prompt_ids, e.rejected_ids)) for e in examples]


def reply_margin(base: Path, adapter: Path, examples) -> float:
    """Mean over pairs of log p(chosen) - log p(rejected)."""
    pairs = reply_log_probs(base, adapter, examples)
    return sum(chosen.sum().item() - rejected.sum().item() for chosen, rejected in pairs) / len(pairs)


SHORT_PERSONA = 'Reply to this comment as Maya, and sign with "–Maya": {comment}'


@pytest.fixture
def start_adapter(tiny_adapter_dir, tmp_path) -> Path:
    """The tiny adapter with a one-line persona: prompts of ~30 tokens instead of ~150 keep the
    DPO steps (two rows per pair, the reference's forward too) short on a shared CPU."""
    import shutil

    folder = tmp_path / "start"
    shutil.copytree(tiny_adapter_dir, folder)
    (folder / "persona.txt").write_text(SHORT_PERSONA + "\n")
    return folder


@pytest.fixture
def prefer_config(tiny_model_dir, start_adapter, tmp_path):
    def make(**overrides) -> PreferConfig:
        (tmp_path / "picks.jsonl").write_text(preference_rows(12))
        values = dict(
            adapter=str(start_adapter),
            base_model=str(tiny_model_dir),
            preferences=[str(tmp_path / "picks.jsonl")],
            output_dir=str(tmp_path / "out"),
            epochs=2,
            learning_rate=5e-3,
            batch_size=4,
            quantization="none",
            backend="transformers",
            voice=False,
        )
        values.update(overrides)
        return PreferConfig(**values)

    return make


def rendered(config: PreferConfig):
    from inference.adapter_files import adapter_persona
    from inference.loading import load_tokenizer
    from prompts.render import PromptRenderer

    renderer = PromptRenderer(load_tokenizer(config.base_model), adapter_persona(config.adapter))
    return render_preferences(load_preferences(config.preferences[0]), renderer, config.max_length)


def test_the_reference_is_a_frozen_copy_of_the_starting_adapter_on_the_same_base(prefer_config):
    from training.prefer_trainer import set_up

    config = prefer_config()
    examples = rendered(config)
    _model, trainer, *_ = set_up(config, trainer_tokenizer(config), examples)
    assert trainer.ref_model is None  # no second model: the reference is an adapter on the policy's base
    assert set(trainer.model.peft_config) == {"default", "ref"}
    params = dict(trainer.model.named_parameters())
    ref = {name: p for name, p in params.items() if ".ref." in name}
    assert ref and not any(p.requires_grad for p in ref.values())
    for name, p in ref.items():
        torch.testing.assert_close(p, params[name.replace(".ref.", ".default.")], rtol=0, atol=0)
        assert params[name.replace(".ref.", ".default.")].requires_grad


def trainer_tokenizer(config: PreferConfig):
    from inference.loading import load_tokenizer

    return load_tokenizer(config.base_model)


def test_a_few_ipo_steps_raise_the_chosen_reply_over_the_rejected_one_and_save_an_ordinary_adapter(
    prefer_config, tiny_model_dir, capsys
):
    from inference.engines import load_replier
    from inference.generate import GenerationSettings

    config = prefer_config()
    assert prefer(config) == 0
    out = Path(config.output_dir)
    printed = capsys.readouterr().out
    assert "data doctor: all checks passed" in printed and "pairs by source: 12 preferences" in printed
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["trainer"].startswith("DPOTrainer (trl 1.16.0, ipo loss, beta 0.5;")
    assert summary["pairs_by_source"] == {"preferences": 12}
    assert summary["reward_accuracy"] is not None and summary["steps"] == 6
    assert "## Preference tuning" in (out / "README.md").read_text()
    # An ordinary adapter folder: the tuned adapter alone (no "ref" copy), its persona and pairs.
    assert not (out / "ref").exists() and not (out / "checkpoints").exists()
    for name in ("adapter_model.safetensors", "adapter_config.json", "persona.txt", "heldout.jsonl", "examples.jsonl"):
        assert (out / name).is_file(), name
    assert (out / "persona.txt").read_text().strip() == SHORT_PERSONA

    examples = rendered(config)
    before, after = (
        reply_margin(tiny_model_dir, Path(config.adapter), examples),
        reply_margin(tiny_model_dir, out, examples),
    )
    assert after > before + 1.0, (before, after)

    # The app's two engines load it as they load a supervised adapter.
    replier = load_replier(str(tiny_model_dir), str(out), "none", backend="transformers")
    [reply] = replier.reply("Loved part 3!", panes=("adapter",))
    assert reply.token_ids
    llama = load_replier(str(tiny_model_dir), str(out), backend="llama.cpp")
    try:
        assert llama.backend == "llama.cpp" and "adapter" in llama.panes
        [reply] = llama.reply("Loved part 3!", GenerationSettings(max_new_tokens=8), panes=("adapter",))
        assert reply.token_ids
    finally:
        llama.close()


def chosen_log_prob(base: Path, adapter: Path, examples) -> float:
    """Mean over pairs of log p(chosen), per reply token."""
    pairs = reply_log_probs(base, adapter, examples)
    return sum(chosen.mean().item() for chosen, _ in pairs) / len(pairs)


def test_an_sft_weight_keeps_the_chosen_replies_likely_where_plain_dpo_lets_them_fall(prefer_config, tmp_path):
    plain, anchored = (
        prefer_config(output_dir=str(tmp_path / "plain"), loss="sigmoid"),
        prefer_config(output_dir=str(tmp_path / "anchored"), loss="sigmoid", sft_weight=1.0),
    )
    assert prefer(plain) == 0 and prefer(anchored) == 0
    summary = json.loads((tmp_path / "anchored" / "training_summary.json").read_text())
    assert "+ 1 x NLL of the chosen reply (RPO)" in summary["trainer"]
    examples = rendered(plain)
    start, after_plain, after_anchored = (
        chosen_log_prob(plain.base_model, Path(folder), examples)
        for folder in (plain.adapter, plain.output_dir, anchored.output_dir)
    )
    assert after_anchored > max(start, after_plain) + 0.1, (start, after_plain, after_anchored)


@pytest.mark.parametrize("loss", ["sigmoid", "apo_zero"])
def test_the_other_losses_also_raise_the_chosen_reply_over_the_rejected_one(prefer_config, tmp_path, loss):
    config = prefer_config(loss=loss)
    assert config.beta == 0.1
    assert prefer(config) == 0
    summary = json.loads((tmp_path / "out" / "training_summary.json").read_text())
    assert f"{loss} loss" in summary["trainer"]
    examples = rendered(config)
    before, after = (
        reply_margin(config.base_model, Path(config.adapter), examples),
        reply_margin(config.base_model, Path(config.output_dir), examples),
    )
    assert after > before + 1.0, (before, after)


def test_the_summary_names_the_loss_and_calls_only_dpo_with_the_nll_rpo(prefer_config):
    from training.prefer_report import loss_name

    assert loss_name(prefer_config()) == "ipo loss"
    assert loss_name(prefer_config(sft_weight=0.5)) == "ipo loss + 0.5 x NLL of the chosen reply"
    assert loss_name(prefer_config(loss="sigmoid", sft_weight=1)) == "sigmoid loss + 1 x NLL of the chosen reply (RPO)"


def test_an_unknown_loss_is_named_with_the_choices(prefer_config):
    with pytest.raises(ConfigError, match=r"loss: must be one of ipo, sigmoid, apo_zero, got 'kto'"):
        prefer_config(loss="kto")


class Interrupted(Exception):
    pass


def interrupt_after_first_save(self, args, state, control, **kwargs):
    raise Interrupted(f"killed after saving step {state.global_step}")


def test_a_killed_run_resumes_to_the_same_adapter(prefer_config, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from training.callbacks import QuietProgress
    from training.checkpoints import ResumeError

    assert prefer(prefer_config(output_dir=str(tmp_path / "reference"))) == 0
    config = prefer_config()
    monkeypatch.setattr(QuietProgress, "on_save", interrupt_after_first_save, raising=False)
    with pytest.raises(Interrupted):
        prefer(config)
    monkeypatch.undo()
    assert (tmp_path / "out" / "checkpoints" / "checkpoint-3").is_dir()
    with pytest.raises(ResumeError, match="unfinished run; pass --resume"):
        prefer(config)
    assert prefer(prefer_config(resume=True)) == 0
    resumed, expected = (
        load_file(tmp_path / "out" / "adapter_model.safetensors"),
        load_file(tmp_path / "reference" / "adapter_model.safetensors"),
    )
    assert resumed.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=0, atol=1e-6)


def test_self_pairs_draft_with_the_adapter_select_by_the_content_measures_and_train_with_the_files(
    prefer_config, tmp_path, capsys
):
    (tmp_path / "real.jsonl").write_text(
        "".join(json.dumps({"comment": f"Comment {i}: loved it", "response": CHOSEN}) + "\n" for i in range(6))
    )
    # A 2-layer random model never stops within 6 tokens: every draft is cut at the cap.
    # The voice table before and after, on 8 of the held-out pairs that travel with the adapter.
    heldout = Path(prefer_config().adapter) / "heldout.jsonl"
    heldout.write_text("".join(heldout.read_text().splitlines(keepends=True)[:8]))
    config = prefer_config(self_pairs=True, data=[str(tmp_path / "real.jsonl")], max_new_tokens=6, epochs=1, voice=True)
    assert prefer(config) == 0
    printed = capsys.readouterr().out
    assert (
        "self-pairs: 6 drafted; 0 already the real reply (skipped); 6 selected as rejected (6 cut at the token cap)"
        in printed
    )
    summary = json.loads((Path(config.output_dir) / "training_summary.json").read_text())
    assert summary["pairs_by_source"] == {"preferences": 12, "self-pairs": 6}
    assert summary["selection"]["selected"] == {"cut at the token cap": 6}
    for key in ("voice_before", "voice"):
        assert summary[key]["comments"] == 8 and set(summary[key]["table"]["adapter"]) >= {
            "loop_rate",
            "ai_talk_rate",
            "cut_rate",
            "chrf",
        }
    card = (Path(config.output_dir) / "README.md").read_text()
    assert "Before preference tuning:" in card and "loops or repeats itself" in card
    assert "6 rejected for 6 cut at the token cap" in card


def test_the_apps_saved_picks_are_counted_and_read_by_the_preference_loader(tmp_path):
    from training.flywheel import PREFERENCES_FILE, save_correction, save_preference, waiting

    assert waiting(tmp_path) == f"0 pick(s) and 0 correction(s) waiting in `{tmp_path}`."
    save_preference(tmp_path, "Loved it @sam", "Thanks! –Maya", "As an AI I cannot")
    save_preference(tmp_path, "Part 2?", "Soon! –Maya", "Part 2 part 2 part 2")
    save_correction(tmp_path, "Part 2?", "Soon! –Maya")
    line = waiting(tmp_path, "outputs/adapter")
    assert line.startswith(f"2 pick(s) and 1 correction(s) waiting in `{tmp_path}`.")
    command = f"`python -m training.prefer --adapter outputs/adapter --preferences {tmp_path / PREFERENCES_FILE}"
    assert f"{command} --output-dir outputs/preferred`" in line
    pairs = load_preferences(tmp_path / PREFERENCES_FILE)
    assert [(p.comment, p.chosen) for p in pairs] == [("Loved it @user", "Thanks! –Maya"), ("Part 2?", "Soon! –Maya")]


def test_a_nan_loss_stops_the_run_within_a_step_and_saves_nothing(prefer_config, tmp_path, monkeypatch):
    """A weight of the trained adapter turned NaN after step 3 (as a diverging update would) stops the run at step 4."""
    from training.callbacks import QuietProgress
    from training.run import TrainingStopped

    def poison(self, args, state, control, model=None, **kwargs):
        if state.global_step == 3:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "lora_A.default" in n).fill_(float("nan"))

    monkeypatch.setattr(QuietProgress, "on_step_end", poison, raising=False)
    with pytest.raises(
        TrainingStopped, match=r"training loss became nan at step 4 .*Last good checkpoint: .*checkpoint-3"
    ):
        prefer(prefer_config())
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
