"""The preference run's model and trainer: the memory plan, the base with the adapter to tune, and
TRL's DPOTrainer on replytune's rendered ids with the supervised run's safeguards."""

from __future__ import annotations

import json
from pathlib import Path

from training.checkpoints import CHECKPOINTS, check_disk_space
from training.prefer_config import PreferConfig
from training.preferences import PreferenceExample


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
    from trl import DPOTrainer

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
    args = dpo_arguments(config, dtype)
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


def dpo_arguments(config: PreferConfig, dtype):
    """TRL's DPOConfig for a preference run: the supervised run's schedule, logging and checkpoints."""
    import torch
    from trl import DPOConfig

    return DPOConfig(
        output_dir=str(Path(config.output_dir) / CHECKPOINTS),
        num_train_epochs=config.epochs,
        learning_rate=config.learning_rate,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        beta=config.beta,
        # --sft-weight: RPO (Pang et al. 2024), the chosen reply's per-token NLL added, so the real replies stay
        # likely while the drafts are pushed down (plain DPO lowered both and learned "shorter").
        loss_type=[config.loss, "sft"] if config.sft_weight else [config.loss],
        loss_weights=[1.0, config.sft_weight] if config.sft_weight else None,
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
        activation_checkpointing=False,  # replytune checkpoints the layers the memory plan chose (set_up)
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=not torch.cuda.is_available(),
        seed=config.seed,
        data_seed=config.seed,
        dataloader_num_workers=0,
        disable_tqdm=False,
        save_only_model=False,
    )
