"""What a preference run reports: the voice table before and after, and the model card."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.data import Pair
from training.prefer_config import PreferConfig
from training.preferences import PreferencePair

TRAINER = "DPOTrainer"  # TRL's, whichever loss it runs; the summary and card name the loss (loss_name)


def loss_name(config: PreferConfig) -> str:
    name = f"{config.loss} loss"
    if config.sft_weight:
        # RPO (Pang et al. 2024) names DPO's sigmoid loss with the NLL; with another loss it is just the sum.
        name += f" + {config.sft_weight:g} x NLL of the chosen reply" + (" (RPO)" if config.loss == "sigmoid" else "")
    return name


def run_record(
    config: PreferConfig,
    trainer,
    pairs: list[PreferencePair],
    by_source: dict[str, int],
    selection: dict[str, Any],
    run_info: dict[str, Any],
    trainable: int,
) -> dict[str, Any]:
    """The summary of a finished preference run (before its voice table): what it trained on, how,
    and the reward accuracy and margin of its last epoch."""
    import dataclasses

    import trl

    from inference.default_model import hub_id
    from training.callbacks import peak_memory_gib

    accuracy = [h["rewards/accuracies"] for h in trainer.state.log_history if "rewards/accuracies" in h]
    margins = [h["rewards/margins"] for h in trainer.state.log_history if "rewards/margins" in h]
    last = max(1, len(accuracy) // max(1, round(config.epochs)))  # the last epoch's logged steps
    return {
        "name": Path(config.output_dir).name,
        "base_model": config.base_model,
        "base_model_hub_id": hub_id(config.base_model),
        "method": "preference",
        "trainer": (
            f"{TRAINER} (trl {trl.__version__}, {loss_name(config)}, beta "
            f"{config.beta}; reference: the starting adapter, frozen)"
        ),
        "start_adapter": str(config.adapter),
        "pairs": len(pairs),
        "pairs_by_source": by_source,
        "selection": selection,
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k not in ("resume",)},
        "config_hash": run_info["config_hash"],
        "data_hash": run_info["data_hash"],
        "reward_accuracy": round(sum(accuracy[-last:]) / len(accuracy[-last:]), 4) if accuracy else None,
        "reward_margin": round(sum(margins[-last:]) / len(margins[-last:]), 4) if margins else None,
        "steps": trainer.state.global_step,
        "trainable_parameters": trainable,
        "peak_memory_gib": round(peak_memory_gib(), 3),
    }


def voice_before_after(
    config: PreferConfig,
    start: Path,
    output: Path,
    held_out: list[Pair],
    trained_on: list[Pair],
    result: dict[str, Any],
) -> None:
    """The voice table of the held-out comments (content measures: loops, AI talk, cut at the cap,
    chrF) for the starting adapter and the tuned one, with the same greedy decoding."""
    from inference.engines import load_replier
    from training.evaluate import EVAL_SETTINGS, evaluate, markdown_table

    if not held_out:
        print("voice fidelity: skipped (the adapter has no heldout.jsonl)")
        return
    for key, folder in (("voice_before", start), ("voice", output)):
        replier = load_replier(config.base_model, str(folder), config.quantization, backend=config.backend)
        result[key] = evaluate(replier, held_out, trained_on, {}, panes=("adapter",), settings=EVAL_SETTINGS)
        del replier
        print(
            f"voice fidelity {'before' if key == 'voice_before' else 'after'} preference tuning:\n"
            + markdown_table(result[key])
        )


def model_card(result: dict[str, Any], persona: str) -> str:
    from training.evaluate import markdown_table

    lines = [
        "---",
        f"base_model: {result['base_model_hub_id']}",
        "library_name: peft",
        "pipeline_tag: text-generation",
        "license: apache-2.0",
        "tags:",
        "- lora",
        "- dpo",
        "- replytune",
        "- youtube-comments",
        "---",
        "",
        f"# {result['name']}",
        "",
        (
            "A LoRA adapter that answers YouTube comments in a creator's voice: "
            f"`{result['start_adapter']}` preference-tuned by replytune with {result['trainer']}."
        ),
        "",
        "## Preference tuning",
        "",
        *preference_lines(result),
        "",
    ]
    if "voice_before" in result:
        lines += [
            "## Voice fidelity",
            "",
            "Before preference tuning:",
            "",
            markdown_table(result["voice_before"]),
            "After:",
            "",
            markdown_table(result["voice"]),
        ]
    lines += [
        "## Prompt",
        "",
        "```text",
        persona,
        "```",
        "",
        "## How to use",
        "",
        "`ADAPTER=THIS_REPO_OR_FOLDER python app.py`",
        "",
    ]
    return "\n".join(lines)


def preference_lines(result: dict[str, Any]) -> list[str]:
    """The card's account of the pairs: by source, how the self-pairs were selected, the reward."""
    selection = result["selection"]
    lines = [
        f"- pairs: {result['pairs']} (" + ", ".join(f"{n} from {s}" for s, n in result["pairs_by_source"].items()) + ")"
    ]
    if selection["drafted"]:
        reasons = ", ".join(f"{n} {r}" for r, n in selection["selected"].items()) or "none"
        lines.append(
            f"- self-pairs: {selection['drafted']} drafts; {selection['draft_equals_reply']} already the real reply; "
            f"{selection['self_pairs']} rejected for {reasons}; "
            f"{selection['merely_different']} merely different, skipped"
        )
    if selection["rows"]:
        lines.append(
            f"- preference rows read: {selection['rows']}; "
            f"{len(selection['same_skipped'])} skipped (chosen equals rejected)"
        )
    lines.append(f"- reward accuracy (last epoch): {result['reward_accuracy']}, margin {result['reward_margin']}")
    return lines
