"""`python -m training.run`: comments + the creator's replies -> a LoRA adapter in their voice.

parse config -> load and check data -> load model -> train (or resume) -> save -> push.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inference.default_model import DEFAULT_BASE_MODEL, DEFAULT_BASE_MODEL_HUB_ID, DefaultModelUnavailable
from prompts.render import Example, Persona, PromptError, PromptRenderer, renderer_for
from training.config import ConfigError, TrainConfig, load_config
from training.data import (
    DataError,
    DataSummary,
    Pair,
    add_signature,
    check_enough_rows,
    check_no_overlap,
    check_signature,
    expand_sources,
    file_hash,
    read_pairs,
    remove_duplicates,
    split_pairs,
    summarize_tokens,
    tokenize_pairs,
)

from training.checkpoints import (
    CHECKPOINTS,
    NO_ROOM_ERRNOS,
    CheckpointWriteError,
    DiskSpaceError,
    check_disk_space,
    checkpoint_folders,
    last_complete_checkpoint,
    remove_incomplete_after,
    write_failure,
    write_json_atomic,
)
from training.doctor import DoctorError, Finding, diagnose, format_report
from training.estimate import EstimateError

if TYPE_CHECKING:
    from inference.generate import Replier, StreamingReplier

RUN_FILE = "run.json"  # beside the checkpoints: what they were trained from, checked on --resume


class ResumeError(RuntimeError):
    """--resume cannot continue: no unfinished run, or the data or settings changed since."""


class TrainingStopped(RuntimeError):
    """Training stopped on a diverging loss or out of memory; the message names the step and the way on."""


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    threading.excepthook = _quiet_when_disk_full
    try:
        config, sources = load_config(argv)
        print_settings(config, sources)
        return train(config)
    except (ConfigError, DataError, PromptError, DefaultModelUnavailable, ResumeError, DoctorError, DiskSpaceError, CheckpointWriteError, TrainingStopped, EstimateError, PermissionError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _quiet_when_disk_full(args: threading.ExceptHookArgs) -> None:
    """A full disk stops TensorBoard's writer thread; the main thread reports it once, clearly."""
    if isinstance(args.exc_value, OSError) and args.exc_value.errno in NO_ROOM_ERRNOS:
        print(f"{args.thread.name if args.thread else 'a thread'} stopped: {args.exc_value}", file=sys.stderr)
        return
    threading.__excepthook__(args)


def print_settings(config: TrainConfig, sources: dict[str, str]) -> None:
    print("settings:")
    for name, value in dataclasses.asdict(config).items():
        print(f"  {name:24} {value!s:48} ({sources[name]})")


def load_data(config: TrainConfig, summary: DataSummary, persona: Persona):
    """Read, validate, sign, de-duplicate and split the data; returns (train pairs, eval pairs)."""
    fields = (config.comment_field, config.response_field)
    summary.files = expand_sources(config.data)
    pairs = []
    for source in summary.files:  # each file keeps its own names in every message and mapping
        rows, columns = read_pairs(source, *fields)
        pairs += rows
        summary.columns += columns
    if config.signature:
        check_signature(config.signature, persona.signature, persona.source)
        pairs, summary.signatures_added = add_signature(pairs, config.signature)
        summary.signature = config.signature
    pairs, summary.duplicates_removed = remove_duplicates(pairs)
    summary.rows = len(pairs) + len(summary.duplicates_removed)
    if config.max_rows is not None and config.max_rows < len(pairs):
        # A seeded sample, in file order: the same subset every run with the same --seed.
        keep = sorted(random.Random(config.seed).sample(range(len(pairs)), config.max_rows))
        summary.subset = f"{config.max_rows} of {len(pairs)} rows (--max-rows, seed {config.seed})"
        pairs = [pairs[i] for i in keep]
    if config.eval_data:
        evals, columns = read_pairs(config.eval_data, *fields)
        summary.columns += columns
        if config.signature:
            evals, signed = add_signature(evals, config.signature)
            summary.signatures_added += signed
        evals, removed = remove_duplicates(evals)
        summary.rows += len(evals) + len(removed)
        summary.duplicates_removed += removed
        train = pairs
    else:
        train, evals = split_pairs(pairs, config.eval_fraction, config.seed)
    check_no_overlap(train, evals)
    check_enough_rows(train, ", ".join(summary.files), summary)
    summary.train_rows, summary.eval_rows = len(train), len(evals)
    return train, evals


@dataclass
class Prepared:
    """The data of a run, validated and rendered once: what the doctor checks and the trainer uses."""

    config: TrainConfig
    persona: Persona
    tokenizer: Any
    renderer: PromptRenderer
    train_pairs: list[Pair]
    eval_pairs: list[Pair]
    train_examples: list[Example]
    eval_examples: list[Example]
    summary: DataSummary

    seq2seq: bool

    def shared_prefix(self) -> int:
        """The tokens a training batch computes once for all its rows (training.trainer.shared_prefix_length)."""
        from training.estimate import model_widths, read_model_config
        from training.trainer import shared_prefix_length

        if self.seq2seq:
            return 0
        hidden = model_widths(read_model_config(self.config.base_model))[0]
        return shared_prefix_length(self.train_examples + self.eval_examples, self.config.batch_size, hidden)

    def diagnose(self) -> tuple[list[Finding], str]:
        from inference.loading import load_tokenizer
        from training.trainer import ReplyCollator

        # The app loads the tokenizer afresh and reads the persona copied into the adapter.
        app = PromptRenderer(load_tokenizer(self.config.base_model, self.config.trust_remote_code), Persona.from_file(self.config.persona))
        return diagnose(self.train_pairs, self.train_examples, self.eval_pairs, self.renderer, app, ReplyCollator(self.tokenizer.pad_token_id))


def prepare_examples(config: TrainConfig) -> Prepared:
    from inference.loading import is_seq2seq, load_tokenizer

    persona = Persona.from_file(config.persona)
    summary = DataSummary()
    train_pairs, eval_pairs = load_data(config, summary, persona)
    tokenizer = load_tokenizer(config.base_model, config.trust_remote_code)
    seq2seq = is_seq2seq(config.base_model, config.trust_remote_code)
    renderer = renderer_for(tokenizer, persona, seq2seq)
    train_examples, cut = tokenize_pairs(train_pairs, renderer, config.max_length)
    summarize_tokens(summary, train_examples, cut)
    eval_examples, cut = tokenize_pairs(eval_pairs, renderer, config.max_length)
    summarize_tokens(summary, eval_examples, cut)
    return Prepared(config, persona, tokenizer, renderer, train_pairs, eval_pairs, train_examples, eval_examples, summary, seq2seq)


def train(config: TrainConfig) -> int:
    started = time.perf_counter()
    prepared = prepare_examples(config)
    persona, tokenizer, summary = prepared.persona, prepared.tokenizer, prepared.summary
    train_examples, eval_examples = prepared.train_examples, prepared.eval_examples
    print("data:\n  " + "\n  ".join(summary.lines()))
    if config.check_data:
        return 0
    if config.doctor and prepared.seq2seq:
        print("doctor: skipped, its checks are about chat templates and this is a seq2seq model")
    elif config.doctor:
        findings, example = prepared.diagnose()
        text = format_report(findings, example)
        if not all(f.ok for f in findings):
            raise DoctorError(f"{text}\nfix the data or prompt above, or pass --no-doctor to train anyway")
        print(text)

    output = Path(config.output_dir)
    run_info = {
        "data_hash": file_hash(*summary.files, config.eval_data, config.persona),
        "config_hash": config.training_hash(),
    }
    checkpoint = prepare_output(output, config, run_info)

    import torch

    from training import report
    from training.estimate import checkpointing_plan, estimate_for_config, memory_limit
    from training.trainer import (
        RUNS,
        NonFiniteLoss,
        build_trainer,
        count_parameters,
        packed_row_length,
        peak_memory_gib,
        ready_for_generation,
        return_large_blocks_to_the_system,
        trainable_model,
    )

    from transformers import set_seed

    from inference.loading import compute_dtype, load_base_model

    return_large_blocks_to_the_system()
    set_seed(config.seed)  # before the LoRA weights are initialised, so --seed fixes them too
    dtype = compute_dtype()
    # Batches are grouped by length, so the longest example's batch is the run's peak.
    limit = memory_limit(config)
    prefix = prepared.shared_prefix()
    estimate = estimate_for_config(config, summary.longest, limit=limit, shared_prefix=prefix)
    model = load_base_model(config.base_model, config.quantization, dtype, config.trust_remote_code, for_training=True)
    model = trainable_model(model, config, estimate.checkpointed_layers)
    trainable, total = count_parameters(model)
    what = "LoRA" if config.method == "lora" else "full fine-tune"
    print(f"model: {total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable ({what}), compute in {str(dtype).removeprefix('torch.')}")
    print(check_disk_space(output / CHECKPOINTS, trainable, config.save_total_limit))
    if prefix:
        packed = packed_row_length(prefix, config.batch_size, summary.longest)
        print(f"batches: the {prefix} tokens every example starts with (chat template and persona) are computed once per batch: "
              f"the longest batch is {packed} tokens instead of {config.batch_size} x {summary.longest}")
    print(f"memory estimate (batches up to {summary.longest} tokens): {estimate.summary()}")
    print(checkpointing_plan(estimate, limit, config.gradient_checkpointing))

    trainer, stats = build_trainer(config, model, tokenizer, train_examples, eval_examples, dtype, prefix)
    run_file = output / CHECKPOINTS / RUN_FILE
    if checkpoint is None:
        base_eval = trainer.evaluate()["eval_loss"]
        run_info["base_eval_loss"] = base_eval
        write_json_atomic(run_file, run_info)
        print(f"base model held-out loss (before training): {base_eval:.4f}")
    else:
        base_eval = json.loads(run_file.read_text(encoding="utf-8"))["base_eval_loss"]
        print(f"resuming from {checkpoint}")
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except NonFiniteLoss as exc:
        good = last_complete_checkpoint(output)
        raise TrainingStopped(
            f"{exc} (epoch {trainer.state.epoch or 0:.2f}); stopped before that update, and no adapter was saved. "
            f"Last good checkpoint: {good or 'none yet'}. Lower --learning-rate (now {config.learning_rate:g}) and start over, "
            "or look for broken rows in the data"
        ) from exc
    except (RuntimeError, MemoryError) as exc:
        # torch.OutOfMemoryError on a GPU; on a CPU, the allocator's RuntimeError or Python's MemoryError.
        if not isinstance(exc, (torch.OutOfMemoryError, MemoryError)) and "can't allocate memory" not in str(exc):
            raise
        raise TrainingStopped(out_of_memory_message(config, trainer.state.global_step + 1, estimate)) from exc
    except OSError as exc:
        if exc.errno not in NO_ROOM_ERRNOS:
            raise
        # A full disk can hit the TensorBoard log before any checkpoint; its writer thread raises
        # without a file name.
        raise write_failure(output, exc.filename or f"the training logs in {output / RUNS}", exc) from exc
    final_eval = trainer.evaluate()["eval_loss"]
    if not math.isfinite(final_eval):
        raise TrainingStopped(f"held-out loss is {final_eval} after training; the adapter is not saved")

    model = trainer.model
    if config.method == "lora":
        model.peft_config["default"].base_model_name_or_path = hub_id(config.base_model)
    save_adapter(model, tokenizer, persona, prepared.eval_pairs, output)
    history = trainer.state.log_history
    result = {
        "name": output.name,
        "base_model": config.base_model,
        "base_model_hub_id": hub_id(config.base_model),
        "seq2seq": prepared.seq2seq,
        "data": {
            "train": [report.display_path(source) for source in summary.files],
            "eval": report.display_path(config.eval_data),
            "hash": run_info["data_hash"],
            "train_rows": summary.train_rows,
            "eval_rows": summary.eval_rows,
            "duplicates_removed": len(summary.duplicates_removed),
            "columns": summary.columns,
            "signatures_added": summary.signatures_added,
            "truncated": summary.truncated,
            "tokens": summary.tokens,
        },
        "config": {
            k: [report.display_path(s) for s in v] if k == "data" else report.display_path(v) if k in ("eval_data", "persona", "output_dir") else v
            for k, v in dataclasses.asdict(config).items()
            if k not in ("resume", "check_data", "push_to_hub", "private")
        },
        "config_hash": run_info["config_hash"],
        "base_eval_loss": base_eval,
        "eval_loss": final_eval,
        "epochs": report.epoch_losses(history),
        "best_checkpoint": Path(trainer.state.best_model_checkpoint).name if trainer.state.best_model_checkpoint else None,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "peak_memory_gib": round(peak_memory_gib(), 3),
        "tokens_per_second": round(stats.tokens_per_second, 1),
        "wall_seconds": round(time.perf_counter() - started, 1),  # data to saved adapter; evaluation_seconds is extra
        "environment": report.environment(),
    }
    from inference.generate import Replier
    from training.evaluate import evaluate, markdown_table

    evaluation_started = time.perf_counter()
    if config.method == "lora" and not prepared.seq2seq:
        ready_for_generation(model)
        trained = Replier(model, tokenizer, prepared.renderer, has_adapter=True)
        # The held-out losses of the table are the ones just measured, with the adapter off (before
        # training) and on: the same reply tokens of the same pairs.
        losses = {"base": base_eval, "adapter": final_eval}
        voice = evaluate(voice_replier(config, trained, output), prepared.eval_pairs, prepared.train_pairs, config.max_length, losses=losses)
        result["voice"] = voice
        print("voice fidelity on the held-out comments:\n" + markdown_table(voice))
    else:
        # The comparison generates base and fine-tuned replies from one model with and without the
        # adapter, which needs LoRA on a causal LM; the held-out losses above still compare the two.
        print("voice fidelity: skipped (it needs a LoRA adapter on a causal LM)")
    result["evaluation_seconds"] = round(time.perf_counter() - evaluation_started, 1)
    report.write_summary(output, result)
    report.plot_losses(output, history, base_eval)

    from training.hub import CARD_FILE, model_card, push_adapter

    model_card(result, persona.template).save(output / CARD_FILE)
    # The adapter is saved; the checkpoints (weights + optimizer state) only served a resume.
    shutil.rmtree(output / CHECKPOINTS)
    print(
        f"done: trained in {result['wall_seconds'] / 60:.1f} min, evaluated in {result['evaluation_seconds'] / 60:.1f} min; held-out loss {base_eval:.4f} (base) -> {final_eval:.4f} "
        f"(adapter); {result['tokens_per_second']:.0f} tokens/s, peak memory {result['peak_memory_gib']:.2f} GiB\n"
        f"adapter saved to {output}"
    )
    if config.push_to_hub:
        print(f"pushed to {push_adapter(output, config.push_to_hub, config.private)}")
    return 0


def voice_replier(config: TrainConfig, trained: Replier, output: Path) -> StreamingReplier:
    """What writes the voice evaluation's replies: the saved adapter in llama.cpp on a CPU (seconds
    instead of minutes), or the trained model itself."""
    from inference.loading import resolve_backend

    if resolve_backend(config.backend, config.base_model) != "llama.cpp":
        return trained
    from inference.gguf_convert import gguf_files
    from inference.llamacpp import LlamaCppReplier

    files = gguf_files(config.base_model, output, config.backend)
    return LlamaCppReplier(*files, trained.tokenizer, trained.renderer) if files else trained


def save_adapter(model, tokenizer, persona: Persona, held_out: list[Pair], output: Path) -> None:
    """Write the adapter, tokenizer, persona and held-out pairs so that a kill leaves the old files or
    the new ones. The held-out pairs (anonymised) travel with the adapter: the app's blind test and
    examples are the creator's own comments, not this repository's sample.

    Everything is written into a staging folder first and then moved in file by file (a rename
    within one filesystem is atomic): an app loading the folder never reads a torn safetensors file.
    """
    import torch

    from inference.generate import HELD_OUT_FILE

    bad = [name for name, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if bad:
        raise TrainingStopped(f"the adapter has NaN or infinite weights ({bad[0]} and {len(bad) - 1} more); it is not saved")
    staging = output / ".saving"
    if staging.exists():
        shutil.rmtree(staging)  # left by a save that was killed
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "persona.txt").write_text(persona.template + "\n", encoding="utf-8")
    rows = (json.dumps({"comment": p.comment, "response": p.response}, ensure_ascii=False) + "\n" for p in held_out)
    (staging / HELD_OUT_FILE).write_text("".join(rows), encoding="utf-8")
    for path in staging.iterdir():
        os.replace(path, output / path.name)
    staging.rmdir()


def out_of_memory_message(config: TrainConfig, step: int, estimate) -> str:
    return (
        f"out of memory at step {step}. Estimated need for this run: {estimate.summary()}. "
        f"Lower --batch-size (now {config.batch_size}; raise --grad-accum to keep the effective batch) "
        f"or --max-length (now {config.max_length})"
        + ("" if estimate.checkpointed_layers == estimate.layers else ", or set a lower --memory-limit-gib (more layers checkpointed) or --gradient-checkpointing")
    )


def hub_id(base_model: str) -> str:
    return DEFAULT_BASE_MODEL_HUB_ID if base_model == DEFAULT_BASE_MODEL else base_model


def prepare_output(output: Path, config: TrainConfig, run_info: dict) -> Path | None:
    """The checkpoint to resume from (None: start at step 0), after checking it matches this run.

    ``run.json`` records what the checkpoints are trained from; it is written before the first step,
    so a run killed before its first complete checkpoint still resumes (from the beginning).
    """
    checkpoints = output / CHECKPOINTS
    run_file = checkpoints / RUN_FILE
    if not config.resume:
        if checkpoint_folders(output):
            raise ResumeError(
                f"{checkpoints} holds checkpoints of an unfinished run; pass --resume to continue it, "
                "or delete that folder to start over"
            )
        checkpoints.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_file, run_info)
        return None
    if not run_file.is_file():
        raise ResumeError(f"--resume: no unfinished run in {checkpoints}; run without --resume to start one")
    saved = json.loads(run_file.read_text(encoding="utf-8"))
    changed = [k for k in ("data_hash", "config_hash") if saved.get(k) != run_info[k]]
    if changed:
        what = " and ".join({"data_hash": "the data (or persona)", "config_hash": "the training settings"}[k] for k in changed)
        raise ResumeError(f"--resume: {what} changed since the run in {checkpoints} started; restore them, or start over without --resume")
    checkpoint = last_complete_checkpoint(output)
    remove_incomplete_after(output, checkpoint)
    if checkpoint is None:
        print(f"--resume: no complete checkpoint in {checkpoints} yet; starting from the first step")
    return checkpoint


if __name__ == "__main__":
    sys.exit(main())
