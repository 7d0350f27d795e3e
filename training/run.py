"""`python -m training.run`: comments + the creator's replies -> a LoRA adapter in their voice.

parse config -> load and check data -> load model -> train (or resume) -> save -> evaluate -> push.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from errors import EXIT_ERROR, ReplytuneError
from inference.default_model import hub_id
from prompts.render import Persona, PromptError
from training.checkpoints import (
    CHECKPOINTS,
    NO_ROOM_ERRNOS,
    RUN_FILE,
    check_disk_space,
    last_complete_checkpoint,
    prepare_output,
    write_failure,
    write_json_atomic,
)
from training.config import ConfigError, TrainConfig, load_config
from training.data import DataError, Pair, file_hash
from training.distributed import check_launch, error_prefix, is_main, quiet_unless_main, wait_for_everyone, world_size
from training.doctor import DoctorError, diagnose_prepared, format_report
from training.examples import Prepared, prepare_examples

if TYPE_CHECKING:
    import torch

    from training.callbacks import BaseEvaluation, RunStats
    from training.footprint import Estimate
    from training.trainer import ReplyTrainer


class TrainingStopped(ReplytuneError, RuntimeError):
    """Training stopped on a diverging loss or out of memory; the message names the step and the way on."""


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    threading.excepthook = _quiet_when_disk_full
    quiet_unless_main()
    try:
        config, sources = load_config(argv)
        check_launch()
        print_settings(config, sources)
        return train(config)
    except (ReplytuneError, PermissionError, FileNotFoundError) as exc:
        # Besides replytune's own errors, two that the OS or a library raises with a message naming
        # the fix: no Hugging Face token to push with, or a folder it may not write (PermissionError),
        # and a path given that is not there (FileNotFoundError).
        # Every process of a launched run reads the same settings and files: the main one says
        # what is wrong with them. Anything else may be one process's own (its GPU ran out of memory).
        if is_main() or not isinstance(exc, (ConfigError, DataError, PromptError)):
            print(f"{error_prefix()}error: {exc}", file=sys.stderr)
        return EXIT_ERROR


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


def train(config: TrainConfig) -> int:
    started = time.perf_counter()
    prepared = prepare_examples(config)
    print("data:\n  " + "\n  ".join(prepared.summary.lines()))
    if config.check_data:
        return 0
    output = Path(config.output_dir)
    run_info = {
        "data_hash": file_hash(*prepared.summary.files, config.eval_data, config.persona),
        "config_hash": config.training_hash(),
        "processes": world_size(),
    }
    checkpoint = check_and_prepare_output(prepared, output, run_info)
    base = base_evaluation(checkpoint, output / CHECKPOINTS / RUN_FILE, run_info)
    run = set_up(prepared, base)
    fit(run, checkpoint)
    base_eval = base.loss
    final_eval = run.trainer.evaluate()["eval_loss"]
    if not math.isfinite(final_eval):
        raise TrainingStopped(f"held-out loss is {final_eval} after training; the adapter is not saved")
    weights = run.trainer.trained_weights()  # under FSDP gathered from every process's shard
    if not is_main():
        return 0  # the adapter, its evaluation and the reports are the main process's
    model = run.trainer.accelerator.unwrap_model(run.trainer.model)
    if config.method == "lora":
        model.peft_config["default"].base_model_name_or_path = hub_id(config.base_model)
    save_adapter(
        model, prepared.tokenizer, prepared.persona, prepared.eval_pairs, prepared.train_pairs, output, weights
    )
    result = write_reports(run, prepared, model, run_info, base_eval, final_eval, time.perf_counter() - started)
    # The adapter is saved; the checkpoints (weights + optimizer state) only served a resume.
    shutil.rmtree(output / CHECKPOINTS)
    print(
        f"done: trained in {result['wall_seconds'] / 60:.1f} min, "
        f"evaluated in {result['evaluation_seconds'] / 60:.1f} min; "
        f"held-out loss {base_eval:.4f} (base) -> {final_eval:.4f} (adapter); "
        f"{result['tokens_per_second']:.0f} tokens/s, peak memory {result['peak_memory_gib']:.2f} GiB\n"
        f"adapter saved to {output}"
    )
    if config.push_to_hub:
        from training.hub import push_adapter

        print(f"pushed to {push_adapter(output, config.push_to_hub, config.private)}")
    return 0


def check_and_prepare_output(prepared: Prepared, output: Path, run_info: dict[str, Any]) -> Path | None:
    """The data doctor's checks and the output folder (new, or the checkpoint a --resume goes on
    from). Under a launcher the main process checks and prepares the folder; the others find the
    checkpoint it chose once it has."""
    config = prepared.config
    if is_main():
        run_doctor(prepared)
        checkpoint = prepare_output(output, config.resume, run_info)
    wait_for_everyone()
    if not is_main():
        checkpoint = last_complete_checkpoint(output) if config.resume else None
    return checkpoint


def write_reports(
    run: Run,
    prepared: Prepared,
    model: torch.nn.Module,
    run_info: dict[str, Any],
    base_eval: float,
    final_eval: float,
    train_seconds: float,
) -> dict[str, Any]:
    """The run's record with its voice evaluation, written as the summary, the loss plot and the
    model card beside the saved adapter; the record."""
    from training import report
    from training.callbacks import peak_memory_gib
    from training.evaluate import voice_evaluation
    from training.hub import CARD_FILE, model_card

    output = Path(prepared.config.output_dir)
    history = run.trainer.state.log_history
    result = report.run_record(
        prepared,
        run_info,
        base_eval,
        final_eval,
        run.trainer.state,
        run.trainable,
        run.total,
        peak_memory_gib(),
        run.stats.tokens_per_second,
        train_seconds,
    )
    evaluation_started = time.perf_counter()
    voice_evaluation(prepared, model, {"base": base_eval, "adapter": final_eval}, result)
    result["evaluation_seconds"] = round(time.perf_counter() - evaluation_started, 1)
    report.write_summary(output, result)
    report.plot_losses(output, history, base_eval)
    model_card(result, prepared.persona.template).save(output / CARD_FILE)
    return result


def run_doctor(prepared: Prepared) -> None:
    """The data doctor's checks (training.doctor), which stop the run when one fails."""
    if not prepared.config.doctor:
        return
    if prepared.seq2seq:
        print("doctor: skipped, its checks are about chat templates and this is a seq2seq model")
        return
    findings, example = diagnose_prepared(prepared)
    text = format_report(findings, example)
    if not all(f.ok for f in findings):
        raise DoctorError(f"{text}\nfix the data or prompt above, or pass --no-doctor to train anyway")
    print(text)


@dataclass
class Run:
    """What set_up builds: the Trainer with the model it trains, and what the run prints and records."""

    config: TrainConfig
    trainer: ReplyTrainer
    stats: RunStats
    estimate: Estimate
    trainable: int
    total: int


def set_up(prepared: Prepared, base_eval: BaseEvaluation) -> Run:
    """Seed, compute dtype, memory plan, model and Trainer (with ``base_eval``, which records the base
    model's held-out loss); prints what was chosen."""
    from transformers import set_seed

    from inference.loading import compute_dtype
    from training.cpu import return_large_blocks_to_the_system
    from training.estimate import checkpointing_plan, estimate_for_config
    from training.memory import GiB, memory_limit
    from training.model import count_parameters, load_training_base, trainable_model
    from training.trainer import build_trainer

    config, summary = prepared.config, prepared.summary
    return_large_blocks_to_the_system()
    set_seed(config.seed)  # before the LoRA weights are initialised, so --seed fixes them too
    dtype = compute_dtype()
    # Batches are grouped by length, so the longest example's batch is the run's peak.
    limit, limit_source = memory_limit(config)
    prefix = prepared.shared_prefix()
    # The loss projects only the learned positions; a packed row holds the prefix once.
    packed, learned = prepared.largest_batch(prefix)
    estimate = estimate_for_config(
        config,
        summary.longest,
        limit=limit,
        shared_prefix=prefix,
        learned_tokens=None if prepared.seq2seq else learned,
        packed_tokens=packed if prefix else None,
    )
    base = load_training_base(config.base_model, config.quantization, dtype, config.trust_remote_code)
    model = trainable_model(base, config, estimate.checkpointed_layers)
    trainable, total = count_parameters(model)
    what = "LoRA" if config.method == "lora" else "full fine-tune"
    print(
        f"model: {total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M "
        f"trainable ({what}), compute in {str(dtype).removeprefix('torch.')}"
    )
    print(check_disk_space(Path(config.output_dir) / CHECKPOINTS, trainable, config.save_total_limit))
    if prefix:
        print(
            f"batches: the {prefix} tokens every example starts with (chat template and persona) are computed once per "
            f"batch: the longest batch is at most {packed} tokens instead of {config.batch_size} x {summary.longest}"
        )
    print(f"memory limit: {limit / GiB:.2f} GiB ({limit_source})")
    print(f"memory estimate (batches up to {summary.longest} tokens): {estimate.summary()}")
    print(checkpointing_plan(estimate, limit, config.gradient_checkpointing))
    trainer, stats = build_trainer(
        config, model, prepared.tokenizer, prepared.train_examples, prepared.eval_examples, dtype, prefix, base_eval
    )
    return Run(config, trainer, stats, estimate, trainable, total)


def base_evaluation(checkpoint: Path | None, run_file: Path, run_info: dict[str, Any]) -> BaseEvaluation:
    """The base model's held-out loss: measured by the Trainer before its first step (build_trainer
    asks for that evaluation when this callback has no loss yet), read back on --resume.

    Not with trainer.evaluate() before train(): in a run of several processes, the model that
    evaluate() prepared is never wrapped in DDP afterwards (accelerate skips a model it has
    prepared), and each process would train on its own gradients.
    """
    from training.callbacks import BaseEvaluation

    if checkpoint is not None:
        print(f"resuming from {checkpoint}")
        return BaseEvaluation(loss=json.loads(run_file.read_text(encoding="utf-8"))["base_eval_loss"])

    def record(loss: float) -> None:
        if is_main():
            write_json_atomic(run_file, {**run_info, "base_eval_loss": loss})
        print(f"base model held-out loss (before training): {loss:.4f}")

    return BaseEvaluation(record)


def fit(run: Run, checkpoint: Path | None) -> None:
    """trainer.train, with its failures turned into one message that says what to do."""
    import torch

    from training.trainer import RUNS, NonFiniteLoss

    config, trainer, output = run.config, run.trainer, Path(run.config.output_dir)
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except NonFiniteLoss as exc:
        good = last_complete_checkpoint(output)
        raise TrainingStopped(
            f"{exc} (epoch {trainer.state.epoch or 0:.2f}); stopped before that update, and no "
            f"adapter was saved. Last good checkpoint: {good or 'none yet'}. Lower --learning-rate "
            f"(now {config.learning_rate:g}) and start over, or look for broken rows in the data"
        ) from exc
    except (RuntimeError, MemoryError) as exc:
        # torch.OutOfMemoryError on a GPU; on a CPU, the allocator's RuntimeError or Python's MemoryError.
        if not isinstance(exc, (torch.OutOfMemoryError, MemoryError)) and "can't allocate memory" not in str(exc):
            raise
        raise TrainingStopped(out_of_memory_message(config, trainer.state.global_step + 1, run.estimate)) from exc
    except OSError as exc:
        if exc.errno not in NO_ROOM_ERRNOS:
            raise
        # A full disk can hit the TensorBoard log before any checkpoint; its writer thread raises
        # without a file name.
        raise write_failure(output, exc.filename or f"the training logs in {output / RUNS}", exc) from exc


def save_adapter(
    model,
    tokenizer,
    persona: Persona,
    held_out: list[Pair],
    trained_on: list[Pair],
    output: Path,
    weights: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write the adapter, tokenizer, persona, held-out and training pairs so that a kill leaves the
    old files or the new ones. The pairs (anonymised) travel with the adapter: the app's blind test
    and example comments are the creator's own, not this repository's sample, and the prompt panes
    retrieve the creator's examples from the training pairs. ``weights``: the trained
    weights gathered from FSDP's shards (ReplyTrainer.trained_weights), when the model's are shards.

    Everything is written into a staging folder first and then moved in file by file (a rename
    within one filesystem is atomic): an app loading the folder never reads a torn safetensors file.
    """
    import torch

    from inference.adapter_files import write_examples, write_held_out, write_persona

    trained = weights if weights is not None else {name: p for name, p in model.named_parameters() if p.requires_grad}
    bad = [name for name, p in trained.items() if not torch.isfinite(p).all()]
    if bad:
        raise TrainingStopped(
            f"the adapter has NaN or infinite weights ({bad[0]} and {len(bad) - 1} more); it is not saved"
        )
    staging = output / ".saving"
    if staging.exists():
        shutil.rmtree(staging)  # left by a save that was killed
    model.save_pretrained(staging, state_dict=weights)
    tokenizer.save_pretrained(staging)
    write_persona(staging, persona)
    write_held_out(staging, ((p.comment, p.response) for p in held_out))
    write_examples(staging, ((p.comment, p.response) for p in trained_on))
    for path in staging.iterdir():
        os.replace(path, output / path.name)
    staging.rmdir()


def out_of_memory_message(config: TrainConfig, step: int, estimate: Estimate) -> str:
    return (
        f"out of memory at step {step}. Estimated need for this run: {estimate.summary()}. "
        f"Lower --batch-size (now {config.batch_size}; raise --grad-accum to keep the effective batch) "
        f"or --max-length (now {config.max_length})"
        + (
            ""
            if estimate.checkpointed_layers == estimate.layers
            else ", or set a lower --memory-limit-gib (more layers checkpointed) or --gradient-checkpointing"
        )
    )


if __name__ == "__main__":
    sys.exit(main())
