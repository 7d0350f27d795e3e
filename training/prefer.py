"""`python -m training.prefer`: the creator's picks train the model (preference tuning of an adapter).

parse config -> read preferences / draft self-pairs and select -> render + doctor -> load base +
adapter -> DPO (TRL) with the starting adapter as the reference -> save -> voice before/after.

The starting adapter is the reference: TRL's DPOTrainer, given a PeftModel and no reference model,
copies the adapter into a frozen second adapter named "ref" on the same base (trl 1.16
``DPOTrainer.__init__``), so one base is in memory. The output is an ordinary adapter folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from errors import EXIT_ERROR, ReplytuneError
from inference.default_model import ROOT, hub_id
from inference.loading import BACKENDS, QUANTIZATIONS, Backend, Quantization
from training.checkpoints import CHECKPOINTS, check_disk_space, prepare_output, write_json_atomic
from training.config import ConfigError
from training.data import DataError, Pair, file_hash, read_pairs
from training.preferences import (
    SELF_SOURCE,
    Draft,
    PreferenceExample,
    PreferencePair,
    PreferenceSummary,
    load_preferences,
    remove_duplicate_preferences,
    render_preferences,
    select_self_pairs,
)

if TYPE_CHECKING:
    from inference.generate import StreamingReplier
    from prompts.render import PromptRenderer

# In the checkpoints folder: the pairs of the run and the self-pair counts, read back on --resume.
PAIRS_FILE = "preference_pairs.jsonl"
SELF_PAIRS_FILE = "self_pairs.json"
TRAINER = "DPO"  # TRL's DPOTrainer, sigmoid loss; the run's summary and card say so


@dataclass
class PreferConfig:
    # --- what to prefer
    adapter: str | None = field(
        default=None,
        metadata={"help": "the adapter folder to tune (from python -m training.run); it is also the reference"},
    )
    preferences: list[str] = field(
        default_factory=list,
        metadata={
            "help": "files with comment, chosen, rejected columns (the app's flywheel/preferences.jsonl, .json or .csv)"
        },
    )
    self_pairs: bool = field(
        default=False,
        metadata={
            "help": (
                "pair the creator's real replies (chosen) with the adapter's own "
                "greedy drafts that loop, talk like an AI or run to the cap (rejected)"
            )
        },
    )
    data: list[str] = field(
        default_factory=list,
        metadata={
            "help": (
                "the comments and real replies of --self-pairs (default: "
                "the pairs the adapter was trained on, its examples.jsonl)"
            )
        },
    )
    max_rows: int | None = field(
        default=None,
        metadata={"help": "draft self-pairs for a seeded random subset of this many rows of --data (all when unset)"},
    )
    # --- model
    base_model: str | None = field(
        default=None,
        metadata={"help": "the adapter's base (default: the one its training summary or adapter config names)"},
    )
    quantization: Quantization = field(
        default="nf4", metadata={"help": "how the frozen base is stored: nf4 (QLoRA), int8 or none"}
    )
    backend: Backend = field(
        default="auto",
        metadata={
            "help": (
                "what drafts the self-pairs and writes the voice replies: "
                "auto (llama.cpp on a CPU), llama.cpp or transformers"
            )
        },
    )
    # --- optimisation
    epochs: float = field(default=3.0, metadata={"help": "passes over the preference pairs"})
    learning_rate: float = field(
        default=1e-4,
        metadata={
            "help": (
                "peak learning rate (issue 29's trial: 1e-4 over 3 "
                "epochs moved the greedy replies, 2e-5 over 1 did not)"
            )
        },
    )
    beta: float = field(
        default=0.1, metadata={"help": "DPO's beta: how far the adapter may move from the reference (lower: further)"}
    )
    batch_size: int = field(
        default=4, metadata={"help": "pairs per forward pass (each is two rows: chosen and rejected)"}
    )
    grad_accum: int = field(default=1, metadata={"help": "forward passes whose gradients are summed into one update"})
    max_length: int = field(
        default=512, metadata={"help": "longest prompt + reply in tokens; longer comments are cut, replies never"}
    )
    max_new_tokens: int = field(
        default=120,
        metadata={"help": "the token cap of the self-pair drafts (a draft that reaches it is 'cut at the cap')"},
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute every layer's activations in the backward pass"}
    )
    memory_limit_gib: float | None = field(
        default=None,
        metadata={"help": "checkpoint only as many layers as keep the memory estimate under this many GiB"},
    )
    save_total_limit: int = field(default=2, metadata={"help": "checkpoints kept on disk"})
    seed: int = field(default=42, metadata={"help": "seed for the subset and the data order"})
    # --- run
    output_dir: str = field(
        default=str(ROOT / "outputs" / "preferred"),
        metadata={"help": "where the tuned adapter, summary, card, logs and checkpoints go"},
    )
    resume: bool = field(default=False, metadata={"help": "continue from the last complete checkpoint in --output-dir"})
    doctor: bool = field(
        default=True, metadata={"help": "check the rendered pairs before training (--no-doctor skips it)"}
    )
    voice: bool = field(
        default=True,
        metadata={"help": "write the voice table of the held-out comments before and after (--no-voice skips it)"},
    )

    def __post_init__(self) -> None:
        for name in ("epochs", "learning_rate", "beta"):
            if isinstance(getattr(self, name), int):
                setattr(self, name, float(getattr(self, name)))
        problems = []
        if not self.adapter:
            problems.append("adapter: name the adapter folder to tune with --adapter DIR")
        elif not (Path(self.adapter) / "adapter_config.json").is_file():
            problems.append(f"adapter: {self.adapter} is not an adapter folder (no adapter_config.json)")
        if not self.preferences and not self.self_pairs:
            problems.append("nothing to prefer: pass --preferences FILE..., --self-pairs, or both")
        if self.data and not self.self_pairs:
            problems.append("data: only applies with --self-pairs")
        if self.quantization not in QUANTIZATIONS:
            problems.append(f"quantization: must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        if self.backend not in BACKENDS:
            problems.append(f"backend: must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        for name in ("batch_size", "grad_accum", "max_new_tokens"):
            if getattr(self, name) < 1:
                problems.append(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.max_length < 32:
            problems.append(f"max_length: {self.max_length} leaves no room for the prompt; use at least 32")
        if self.epochs <= 0:
            problems.append(f"epochs: must be positive, got {self.epochs}")
        if not 0 < self.learning_rate < 1:
            problems.append(f"learning_rate: must be in (0, 1), got {self.learning_rate}")
        if self.beta <= 0:
            problems.append(f"beta: must be positive, got {self.beta}")
        if self.max_rows is not None and self.max_rows < 1:
            problems.append(f"max_rows: must be at least 1, got {self.max_rows}")
        if self.save_total_limit < 1:
            problems.append(f"save_total_limit: must be at least 1, got {self.save_total_limit}")
        if problems:
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
        if self.base_model is None:
            from inference.export import base_model_of

            self.base_model = base_model_of(Path(self.adapter))

    def training_hash(self) -> str:
        """Every setting that changes what is trained (paths are in the data hash)."""
        skip = {
            "adapter",
            "preferences",
            "data",
            "output_dir",
            "resume",
            "doctor",
            "voice",
            "memory_limit_gib",
            "backend",
        }
        values = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def parse_config(argv: list[str] | None) -> tuple[PreferConfig, set[str]]:
    """The config, and the names of the settings given as flags."""
    import argparse

    from transformers import HfArgumentParser

    parser = HfArgumentParser(
        PreferConfig,
        prog="python -m training.prefer",
        description="Preference-tune an adapter on the creator's picks (DPO).",
    )
    for action in parser._actions:
        if action.dest in PreferConfig.__dataclass_fields__ and action.default is not argparse.SUPPRESS:
            if (
                action.help is not None and action.const is not False and "(default" not in action.help
            ):  # --no-X shares its default
                action.help = (action.help + f" (default: {action.default})").replace("%", "%%")
            action.default = argparse.SUPPRESS  # only the flags given come back
    given = vars(parser.parse_args(argv))
    return PreferConfig(**given), set(given)


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config, given = parse_config(argv)
        print("settings:")
        for name, value in dataclasses.asdict(config).items():
            print(f"  {name:24} {value!s:48} ({'flag' if name in given else 'default'})")
        return prefer(config)
    except (ReplytuneError, PermissionError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR


def prefer(config: PreferConfig) -> int:
    started = time.perf_counter()
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    adapter = Path(config.adapter)
    sources = [*config.preferences, *self_pair_sources(config)]
    run_info = {
        "data_hash": file_hash(*sources, adapter / "adapter_model.safetensors", adapter / "persona.txt"),
        "config_hash": config.training_hash(),
        "processes": 1,
    }
    summary = PreferenceSummary()
    pairs = read_preference_files(config, summary)  # malformed files fail before any model loads
    checkpoint = prepare_output(output, config.resume, run_info)
    saved_pairs, saved_counts = output / CHECKPOINTS / PAIRS_FILE, output / CHECKPOINTS / SELF_PAIRS_FILE
    if config.self_pairs:
        if config.resume and saved_pairs.is_file() and saved_counts.is_file():
            # The drafts of the interrupted run, so that the resumed run trains on the very same pairs.
            rows = map(json.loads, saved_pairs.read_text(encoding="utf-8").splitlines())
            pairs += [PreferencePair(**row) for row in rows if row["source"] == SELF_SOURCE]
            restore_self_pair_counts(summary, json.loads(saved_counts.read_text(encoding="utf-8")))
        else:
            pairs += draft_self_pairs(config, summary)
            write_json_atomic(saved_counts, self_pair_counts(summary))
    pairs, summary.duplicates_removed = remove_duplicate_preferences(pairs)
    write_pairs(saved_pairs, pairs)
    print("data:\n  " + "\n  ".join(summary.lines()))
    if not pairs:
        shutil.rmtree(output / CHECKPOINTS)
        raise DataError("no preference pairs to train on: " + "; ".join(summary.lines()))
    by_source = {source: sum(p.source == source for p in pairs) for source in dict.fromkeys(p.source for p in pairs)}
    print("pairs by source: " + ", ".join(f"{n} {source}" for source, n in by_source.items()))

    from inference.adapter_files import adapter_persona
    from inference.loading import load_tokenizer
    from prompts.render import Persona, PromptRenderer

    persona = (
        adapter_persona(str(adapter)) or Persona.from_file()
    )  # as the app reads it (inference.generate.load_replier)
    tokenizer = load_tokenizer(config.base_model)
    renderer = PromptRenderer(tokenizer, persona)
    examples = render_preferences(pairs, renderer, config.max_length)
    if config.doctor:
        run_doctor(config, pairs, examples, renderer)

    model, trainer, estimate, trainable, total = set_up(config, tokenizer, examples)
    from training.run import Run, fit, save_adapter

    if checkpoint is not None:
        print(f"resuming from {checkpoint}")
    fit(
        Run(config, trainer, None, estimate, trainable, total), checkpoint
    )  # NaN stop, out of memory, full disk: one message each
    model = trainer.accelerator.unwrap_model(trainer.model)
    if "ref" in model.peft_config:
        model.delete_adapter("ref")  # the frozen reference copy: the output holds the tuned adapter alone
    model.peft_config["default"].base_model_name_or_path = hub_id(config.base_model)
    held_out, trained_on = adapter_pairs(adapter)
    save_adapter(model, tokenizer, persona, held_out, trained_on, output)
    from training.callbacks import peak_memory_gib

    accuracy = [h["rewards/accuracies"] for h in trainer.state.log_history if "rewards/accuracies" in h]
    margins = [h["rewards/margins"] for h in trainer.state.log_history if "rewards/margins" in h]
    last = max(1, len(accuracy) // max(1, round(config.epochs)))  # the last epoch's logged steps
    import trl

    result: dict[str, Any] = {
        "name": output.name,
        "base_model": config.base_model,
        "base_model_hub_id": hub_id(config.base_model),
        "method": "preference",
        "trainer": (
            f"{TRAINER} (trl {trl.__version__}, sigmoid loss, beta "
            f"{config.beta}; reference: the starting adapter, frozen)"
        ),
        "start_adapter": str(adapter),
        "pairs": len(pairs),
        "pairs_by_source": by_source,
        "selection": self_pair_counts(summary),
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k not in ("resume",)},
        "config_hash": run_info["config_hash"],
        "data_hash": run_info["data_hash"],
        "reward_accuracy": round(sum(accuracy[-last:]) / len(accuracy[-last:]), 4) if accuracy else None,
        "reward_margin": round(sum(margins[-last:]) / len(margins[-last:]), 4) if margins else None,
        "steps": trainer.state.global_step,
        "trainable_parameters": trainable,
        "peak_memory_gib": round(peak_memory_gib(), 3),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    del trainer, model
    if config.voice:
        voice_before_after(config, adapter, output, held_out, trained_on, result)
    from training.report import environment, write_summary

    result["environment"] = environment()
    write_summary(output, result)
    (output / "README.md").write_text(model_card(result, persona.template), encoding="utf-8")
    shutil.rmtree(output / CHECKPOINTS)
    print(
        f"done: {len(pairs)} pairs ({', '.join(f'{n} {s}' for s, n in by_source.items())}), {result['steps']} steps in "
        f"{result['wall_seconds'] / 60:.1f} min; reward accuracy {result['reward_accuracy']}, "
        f"margin {result['reward_margin']}\n"
        f"adapter saved to {output}"
    )
    return 0


def self_pair_sources(config: PreferConfig) -> list[str]:
    if not config.self_pairs:
        return []
    return config.data or [str(Path(config.adapter) / "examples.jsonl")]


def read_preference_files(config: PreferConfig, summary: PreferenceSummary) -> list[PreferencePair]:
    pairs: list[PreferencePair] = []
    for source in config.preferences:
        pairs += load_preferences(source, summary)
    return pairs


def self_pair_counts(summary: PreferenceSummary) -> dict[str, Any]:
    """The selection step's counts (and the preference files' skips), for the summary and the card."""
    return {
        "drafted": summary.drafted,
        "draft_equals_reply": summary.draft_equals_reply,
        "selected": dict(summary.selected),
        "self_pairs": summary.self_pairs,
        "merely_different": summary.merely_different,
        "same_skipped": summary.same_skipped,
        "rows": summary.rows,
        "files": summary.files,
    }


def restore_self_pair_counts(summary: PreferenceSummary, counts: dict[str, Any]) -> None:
    from collections import Counter

    summary.drafted, summary.draft_equals_reply, summary.self_pairs, summary.merely_different = (
        counts[k] for k in ("drafted", "draft_equals_reply", "self_pairs", "merely_different")
    )
    summary.selected = Counter(counts["selected"])


def write_pairs(path: Path, pairs: list[PreferencePair]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(
        "".join(json.dumps(dataclasses.asdict(p), ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8"
    )
    tmp.replace(path)


def draft_self_pairs(config: PreferConfig, summary: PreferenceSummary) -> list[PreferencePair]:
    """The adapter's greedy drafts of the --data comments, and the selection of the rejected ones."""
    from inference.engines import load_replier

    pairs: list[Pair] = []
    for source in self_pair_sources(config):
        if not Path(source).is_file():
            raise DataError(
                f"{source}: file not found; --self-pairs needs the comments and real replies (pass --data FILE)"
            )
        pairs += read_pairs(source)[0]
    if config.max_rows is not None and config.max_rows < len(pairs):
        keep = sorted(random.Random(config.seed).sample(range(len(pairs)), config.max_rows))
        pairs = [pairs[i] for i in keep]
    replier = load_replier(config.base_model, config.adapter, config.quantization, backend=config.backend)
    started = time.perf_counter()
    drafts = draft(replier, [p.comment for p in pairs], config.max_new_tokens)
    print(f"self-pairs: {len(drafts)} drafts by {replier.backend} in {time.perf_counter() - started:.0f} s")
    return select_self_pairs(pairs, drafts, summary)


def draft(replier: StreamingReplier, comments: list[str], max_new_tokens: int) -> list[Draft]:
    """Plain greedy replies of the adapter pane: no repetition rules, so the model's own loops show."""
    from tqdm.auto import tqdm

    from inference.generate import GenerationSettings

    settings = GenerationSettings(
        max_new_tokens=max_new_tokens, temperature=0.0, repetition_penalty=1.0, no_repeat_ngram=0
    )
    replies = replier.replies(comments, settings, panes=("adapter",), background=False)
    return [Draft(r[0].text, r[0].stopped) for r in tqdm(replies, total=len(comments), desc="drafting self-pairs")]


def run_doctor(
    config: PreferConfig, pairs: list[PreferencePair], examples: list[PreferenceExample], renderer: PromptRenderer
) -> None:
    """The data doctor's checks on preference pairs: the app's prompt, the end of turn learned on
    both sides, and the loss on the replies only."""
    from training.config import TrainConfig
    from training.doctor import DoctorError, Finding, app_renderer, check_app_prompt, format_report

    eot = renderer.end_of_turn_id
    no_end = [p.where for p, e in zip(pairs, examples) if e.chosen_ids[-1:] != [eot] or e.rejected_ids[-1:] != [eot]]
    uncut = [(p, e) for p, e in zip(pairs, examples) if not e.comment_tokens_cut]
    leaks = [p.where for p, e in uncut if e.prompt_ids != renderer.prompt(p.comment).input_ids]
    app = app_renderer(TrainConfig(base_model=config.base_model, eval_data=None), renderer.persona)
    findings = [
        Finding(
            "end of turn in chosen and rejected",
            not no_end,
            f"missing at {', '.join(no_end[:5])}"
            if no_end
            else f"every pair ends both replies with {renderer.tokenizer.convert_ids_to_tokens(eot)!r}",
        ),
        Finding(
            "loss on the replies only",
            not leaks,
            f"the prompt differs from the generation prompt at {', '.join(leaks[:5])}"
            if leaks
            else "the prompt is the generation prompt; only the replies and their end of turn are scored",
        ),
        check_app_prompt(pairs, renderer, app),
    ]
    first = examples[0]
    shown = (
        renderer.tokenizer.decode(first.prompt_ids[-8:])
        + " ["
        + renderer.tokenizer.decode(first.chosen_ids)
        + "] / ["
        + renderer.tokenizer.decode(first.rejected_ids)
        + "]"
    )
    text = format_report(findings, repr(shown))
    if not all(f.ok for f in findings):
        raise DoctorError(f"{text}\nfix the data or prompt above, or pass --no-doctor to train anyway")
    print(text)


def set_up(config: PreferConfig, tokenizer, examples: list[PreferenceExample]):
    """The memory plan, the base with the adapter (trainable) and TRL's DPOTrainer; prints what was chosen."""
    from transformers import set_seed

    from inference.internals.transformers import checkpoint_first_layers
    from inference.loading import compute_dtype, load_adapter
    from training.config import TrainConfig
    from training.cpu import return_large_blocks_to_the_system
    from training.estimate import checkpointing_plan, estimate_for_config
    from training.memory import GiB, memory_limit
    from training.model import count_parameters, load_training_base

    return_large_blocks_to_the_system()
    set_seed(config.seed)
    dtype = compute_dtype()
    lora = json.loads((Path(config.adapter) / "adapter_config.json").read_text(encoding="utf-8"))
    targets = lora["target_modules"] if isinstance(lora["target_modules"], list) else [lora["target_modules"]]
    # The estimate of a supervised run whose batch holds the chosen and the rejected row of every
    # pair; the reference's forward is without gradients, its activations freed before the policy's.
    as_run = TrainConfig(
        base_model=config.base_model,
        quantization=config.quantization,
        batch_size=2 * config.batch_size,
        max_length=config.max_length,
        lora_r=lora["r"],
        lora_alpha=lora["lora_alpha"],
        target_modules=sorted(targets),
        eval_data=None,
        gradient_checkpointing=config.gradient_checkpointing,
        memory_limit_gib=config.memory_limit_gib,
    )
    longest = max(len(e.prompt_ids) + max(len(e.chosen_ids), len(e.rejected_ids)) for e in examples)
    limit, limit_source = memory_limit(as_run)
    estimate = estimate_for_config(as_run, longest, limit=limit)
    print(f"memory limit: {limit / GiB:.2f} GiB ({limit_source})")
    print(f"memory estimate (pairs up to {longest} tokens, chosen and rejected rows): {estimate.summary()}")
    print(checkpointing_plan(estimate, limit, config.gradient_checkpointing))
    base = load_training_base(config.base_model, config.quantization, dtype)
    checkpoint_first_layers(base, estimate.checkpointed_layers)
    model = load_adapter(base, config.adapter, trainable=True)
    trainer = build_trainer(config, model, tokenizer, examples, dtype)
    trainable, total = count_parameters(trainer.model)
    print(
        f"model: {total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable (the adapter; its frozen copy is the "
        f"reference), compute in {str(dtype).removeprefix('torch.')}"
    )
    print(check_disk_space(Path(config.output_dir) / CHECKPOINTS, trainable, config.save_total_limit))
    return model, trainer, estimate, trainable, total


def build_trainer(config: PreferConfig, model, tokenizer, examples: list[PreferenceExample], dtype):
    """TRL's DPOTrainer on the rendered ids, with replytune's NaN stop, checkpoint errors, quiet
    progress bar and TensorBoard log in the output folder."""
    import torch
    from datasets import Dataset
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback
    from transformers.trainer_callback import ProgressCallback
    from trl import DPOConfig, DPOTrainer

    from inference.internals.transformers import checkpoint_errors_named
    from inference.internals.trl import takes_token_ids
    from training.callbacks import QuietProgress
    from training.checkpoints import is_write_error, write_failure
    from training.trainer import RUNS, StopOnNonFiniteLoss

    output = Path(config.output_dir)

    class PreferenceTrainer(StopOnNonFiniteLoss, takes_token_ids(DPOTrainer)):
        def checkpoint_failed(self, exc: Exception) -> Exception | None:
            return write_failure(output, f"checkpoint-{self.state.global_step}", exc) if is_write_error(exc) else None

    rows = {
        # For the length-grouped order: a batch pads every row to its longest pair.
        "length": [len(e.prompt_ids) + max(len(e.chosen_ids), len(e.rejected_ids)) for e in examples],
        "prompt_ids": [e.prompt_ids for e in examples],
        "chosen_ids": [e.chosen_ids for e in examples],
        "rejected_ids": [e.rejected_ids for e in examples],
        # The same pairs as text, for TRL's stock path on another version (inference/internals/trl.py).
        "prompt": [tokenizer.decode(e.prompt_ids) for e in examples],
        "chosen": [tokenizer.decode(e.chosen_ids) for e in examples],
        "rejected": [tokenizer.decode(e.rejected_ids) for e in examples],
    }
    args = DPOConfig(
        output_dir=str(output / CHECKPOINTS),
        num_train_epochs=config.epochs,
        learning_rate=config.learning_rate,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        beta=config.beta,
        loss_type=["sigmoid"],
        max_length=None,  # the renderer cut each pair to --max-length, the comment and never a reply
        # The reference (the starting adapter, frozen) scores every pair once before the first step,
        # not again in every step of every epoch; pairs of like length share a batch, so little of
        # it is padding.
        precompute_ref_log_probs=True,
        train_sampling_strategy="group_by_length",
        remove_unused_columns=False,  # keeps "length" for the sampler; the collator reads its own keys
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        save_strategy="epoch",
        save_total_limit=config.save_total_limit,
        logging_strategy="steps",
        logging_steps=1,
        logging_nan_inf_filter=False,  # the default filter hides a diverging run
        report_to="none",  # TensorBoard is attached below, with its folder in the output
        gradient_checkpointing=False,  # replytune checkpoints the layers the memory plan chose (set_up)
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=not torch.cuda.is_available(),
        seed=config.seed,
        data_seed=config.seed,
        dataloader_num_workers=0,
        disable_tqdm=False,
        save_only_model=False,
    )
    trainer = checkpoint_errors_named(PreferenceTrainer)(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict(rows),
        processing_class=tokenizer,
        callbacks=[TensorBoardCallback(SummaryWriter(log_dir=str(output / RUNS)))],
    )
    # TRL stores a quantized base's trainable LoRA weights in bfloat16 (the QLoRA paper's choice); a
    # supervised replytune run keeps them, and AdamW's state, in float32, where a step of 1e-4 is
    # not lost to rounding. Cast back before the optimizer is made (in train()).
    for _name, param in trainer.model.named_parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(QuietProgress)
    return trainer


def adapter_pairs(adapter: Path) -> tuple[list[Pair], list[Pair]]:
    """The held-out and trained-on pairs that travel with the adapter, carried to the tuned one."""
    from inference.adapter_files import EXAMPLES_FILE, HELD_OUT_FILE

    return tuple(
        read_pairs(adapter / name)[0] if (adapter / name).is_file() else [] for name in (HELD_OUT_FILE, EXAMPLES_FILE)
    )


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

    selection = result["selection"]
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
        f"- pairs: {result['pairs']} ("
        + ", ".join(f"{n} from {s}" for s, n in result["pairs_by_source"].items())
        + ")",
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
    lines += [f"- reward accuracy (last epoch): {result['reward_accuracy']}, margin {result['reward_margin']}", ""]
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


if __name__ == "__main__":
    sys.exit(main())
