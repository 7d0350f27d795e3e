"""Maps a TrainConfig onto transformers' Trainer: reply-only loss, per-epoch eval, one line per epoch."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from accelerate.utils import send_to_device
from transformers import (
    EarlyStoppingCallback,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.integrations import TensorBoardCallback
from transformers.trainer_callback import ProgressCallback

from errors import ReplytuneError
from inference.internals.transformers import attention_implementation, checkpoint_errors_named, trainer_hooks
from prompts.render import IGNORE_INDEX, Example
from training.attention import GROUPED
from training.callbacks import BaseEvaluation, QuietProgress, RunStats
from training.checkpoints import CHECKPOINTS, is_write_error, write_failure
from training.collate import ReplyCollator, TrainingCollator, segment_attention_mask, shared_prefix_mask
from training.config import TrainConfig
from training.distributed import is_main, world_size

RUNS = "runs"


class NonFiniteLoss(ReplytuneError, RuntimeError):
    """The training loss became NaN or infinite; the run stops before the update that would spread it."""

    def __init__(self, step: int, value: float) -> None:
        super().__init__(f"training loss became {value} at step {step}")
        self.step = step
        self.value = value


class StopOnNonFiniteLoss:
    """A Trainer mixin that raises NonFiniteLoss before the update a NaN or infinite loss would make
    (training.run's ReplyTrainer and training.prefer's preference trainer)."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # Checked before every optimizer step: one NaN gradient would make every weight NaN, and the
        # Trainer would go on logging and saving the ruined adapter. The losses of the accumulated
        # forward passes are checked together, so that the host waits for the GPU once per update.
        pending = self.__dict__.setdefault("_pending_losses", [])  # of the forward passes since the last update
        pending.append(loss.detach())
        if self.accelerator.sync_gradients:
            losses, self._pending_losses = torch.stack(pending), []
            if not torch.isfinite(losses).all():
                raise NonFiniteLoss(self.state.global_step + 1, losses[~torch.isfinite(losses)][0].item())
        return loss


class _ReplyTrainer(StopOnNonFiniteLoss, Trainer):
    """A Trainer whose loss computes the LM head only where a label is learned.

    Only the reply tokens (about 13% of the default data) carry a loss, yet a plain causal-LM
    forward projects every position onto the whole vocabulary: for SmolLM2 that is a 576 x 49,152
    matmul per token, and a logits tensor that dominates activation memory. Selecting the learned
    positions first gives the same loss, for a fraction of the time and memory.
    """

    # The loss below is normalised by num_items_in_batch, the learned tokens of the whole
    # accumulated batch, so the Trainer must not divide it by the accumulation steps again.
    loss_is_scaled_for_ga = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._held_out_losses: list[
            torch.Tensor
        ] = []  # each example's (summed loss, learned tokens), in the running evaluation

    def train_sampler(self, dataset) -> torch.utils.data.Sampler:
        # Length grouping works in megabatches of some updates' examples: the Trainer sizes them by
        # one process's share of an update, so each process count would group (and train on)
        # other batches. Sized by the whole update, N processes see the batches one process does.
        from transformers.trainer_pt_utils import LengthGroupedSampler

        return LengthGroupedSampler(
            self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size,
            lengths=list(dataset["length"]),
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        losses = self.token_losses(model, inputs)
        loss = losses.sum() / (num_items_in_batch if num_items_in_batch is not None else max(losses.numel(), 1))
        # num_items_in_batch counts the learned tokens of every process's share of the batch, and
        # DDP averages the processes' gradients: times their number, the update is the one a single
        # process makes from the whole batch (as the Trainer's own loss does).
        loss = loss * self.accelerator.num_processes
        return (loss, {"loss": loss}) if return_outputs else loss

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        # The Trainer's evaluation loss is the mean of its batches' mean losses, weighted by
        # examples: it moved with how the held-out examples were batched (the base model's 4.444
        # with 4 to a batch read 4.485 with 8). Here it is the mean over every held-out learned token.
        self._held_out_losses = []
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        total, count = torch.cat(self._held_out_losses).sum(0).tolist()
        output.metrics[f"{metric_key_prefix}_loss"] = total / count
        return output

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = send_to_device(inputs, self.args.device)  # what the Trainer's prediction_step does first
        with torch.no_grad(), self.compute_loss_context_manager():
            losses = self.token_losses(model, inputs)
        # Each example's summed loss and learned tokens, gathered from every process: accelerate
        # drops the examples it repeated to even out the processes' last batches, so the mean is
        # over each held-out token once, however many processes evaluated.
        self._held_out_losses.append(self.accelerator.gather_for_metrics(per_example_sums(inputs, losses)))
        return losses.mean(), None, None

    def token_losses(self, model, inputs) -> torch.Tensor:
        """The loss of each learned token of a batch, in batch order."""
        from inference.loading import unwrapped

        causal = unwrapped(self.accelerator.unwrap_model(model))  # under DDP or FSDP, the model is theirs
        config = causal.config
        if config.is_encoder_decoder:  # every decoder position is a reply token: the plain head is right
            logits = model(**inputs).logits.float()
            labels = inputs["labels"].flatten()
            learned = labels != IGNORE_INDEX
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1)[learned], labels[learned], reduction="none")
        if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
            raise NotImplementedError(
                f"{config.model_type}: logits are post-processed; the reply-only head does not apply"
            )
        # The model is called as the Trainer wraps it (DDP syncs the gradients of what its forward
        # ran; FSDP gathers each layer's shards in it). The LoRA layers rely on autocast (see lora_model).
        dtype = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None
        forward = {
            "input_ids": inputs["input_ids"],
            "use_cache": False,
            "logits_to_keep": inputs["head_positions"],
        }  # a cache would copy every key and value
        if "segments" in inputs:
            mask_dtype = dtype or causal.get_input_embeddings().weight.dtype
            forward["position_ids"] = inputs["position_ids"]
            if attention_implementation(config) == GROUPED:
                # Masked segment by segment inside the attention; a 4D mask passes transformers'
                # mask building as it is, so no (row x row) mask is made.
                forward["attention_mask"] = torch.zeros(1, 1, 1, 1, dtype=mask_dtype, device=inputs["input_ids"].device)
                prefix = int(inputs["packed_prefix"])
                forward.update(
                    packed_prefix=prefix,
                    segment_index=inputs["segment_index"],
                    segment_valid=inputs["segment_valid"],
                    segment_mask=segment_attention_mask(inputs["segment_sees"], prefix, mask_dtype),
                )
            else:
                forward["attention_mask"] = shared_prefix_mask(
                    inputs["segments"], attention_implementation(config), mask_dtype
                )
        else:
            forward["attention_mask"] = inputs["attention_mask"]
        with torch.autocast(inputs["input_ids"].device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(**forward).logits
        logits = logits.flatten(0, 1).index_select(0, inputs["learned_positions"]).float()
        return torch.nn.functional.cross_entropy(logits, inputs["learned_labels"], reduction="none")

    def save_model(self, output_dir: str | None = None, *args, **kwargs) -> None:
        # Under FSDP with sharded checkpoints the Trainer writes a checkpoint's weights only after it
        # has looked for the folder of the best checkpoint, which then did not exist yet: the best
        # checkpoint was never recorded, and the end of the run loaded another (or none).
        if self.is_fsdp_enabled and output_dir is not None:
            os.makedirs(output_dir, exist_ok=True)
        super().save_model(output_dir, *args, **kwargs)

    def before_loading_optimizer(self, checkpoint: str | None) -> None:
        if checkpoint is not None and self.is_fsdp_enabled:
            initialize_optimizer_state(getattr(self.optimizer, "optimizer", self.optimizer))

    def trained_weights(self) -> dict[str, torch.Tensor] | None:
        """Under FSDP, the trained weights gathered whole from the shards (every process must call
        it), the frozen ones left out (a 70B base would not fit in the main process's memory).
        None otherwise: the model's own parameters are whole."""
        if not self.is_fsdp_enabled:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # From GPUs they are copied to the main process's CPU. On a CPU that copy frees the
        # gathered weights it copies from (torch 2.13), so each process keeps its own gathered copy.
        on_gpu = self.args.device.type != "cpu"
        options = StateDictOptions(full_state_dict=True, cpu_offload=on_gpu, ignore_frozen_params=True)
        return get_model_state_dict(self.model_wrapped, options=options)

    def checkpoint_failed(self, exc: Exception) -> Exception | None:
        # Disk full surfaces as torch's "unexpected pos", a safetensors IoError or a tokenizers
        # error, depending on which file hit it; the user gets one message and a resumable state
        # (the torn folder lacks trainer_state.json, so resume skips it). Any other failure is a
        # bug, raised as it is, with its traceback.
        if not is_write_error(exc):
            return None
        folder = Path(self.args.output_dir)
        return write_failure(folder.parent, f"checkpoint-{self.state.global_step} in {folder}", exc)


ReplyTrainer = checkpoint_errors_named(trainer_hooks(_ReplyTrainer))


def initialize_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give a new optimizer the state a checkpoint's is loaded into.

    accelerate loads an FSDP checkpoint's optimizer state into the entries the optimizer already
    has, and a new one has none (AdamW makes its moments on its first step): a resumed FSDP run
    went on with fresh moments. One step at learning rate 0 on zero gradients makes the entries
    without moving a weight; the load then overwrites them.
    """
    rates = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        for p in group["params"]:
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
    optimizer.step()
    for group, rate in zip(optimizer.param_groups, rates):
        group["lr"] = rate
    optimizer.zero_grad(set_to_none=True)


def per_example_sums(inputs: dict[str, torch.Tensor], losses: torch.Tensor) -> torch.Tensor:
    """(examples, 2): the summed loss and the count of each example's learned tokens, from the loss
    of each learned position of a batch (ReplyTrainer.token_losses). A packed row names each
    position's example in ``segments``; padded rows are examples; a seq2seq batch's labels are."""
    if "learned_positions" not in inputs:  # seq2seq: the learned labels' rows, in the order token_losses takes them
        examples, owner = inputs["labels"].shape[0], (inputs["labels"] != IGNORE_INDEX).nonzero()[:, 0]
    elif "segments" in inputs:  # one row: the head's positions are the row's
        examples, owner = (
            inputs["segment_index"].shape[0],
            inputs["segments"][0, inputs["head_positions"]][inputs["learned_positions"]],
        )
    else:
        examples, owner = inputs["input_ids"].shape[0], inputs["learned_positions"] // inputs["head_positions"].numel()
    sums = torch.zeros(examples, 2, dtype=torch.float64, device=losses.device)
    return sums.index_add_(0, owner, torch.stack([losses.double(), torch.ones_like(losses, dtype=torch.float64)], 1))


def to_dataset(examples: list[Example]):
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "input_ids": [e.input_ids for e in examples],
            "labels": [e.labels for e in examples],
            "length": [len(e.input_ids) for e in examples],
        }
    )


def build_trainer(
    config: TrainConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train: list[Example],
    evals: list[Example],
    compute_dtype: torch.dtype,
    prefix: int = 0,
    base: BaseEvaluation | None = None,
) -> tuple[Trainer, RunStats]:
    """The Trainer of a run; ``prefix``: the tokens a batch shares (shared_prefix_length); ``base``:
    the callback that records the base model's held-out loss, from an evaluation before the first
    step when it has none yet (a new run, not a resumed one)."""
    from torch.utils.tensorboard import SummaryWriter

    output = Path(config.output_dir)
    # Each process of a launched run takes batch_size examples of every forward pass.
    steps_per_epoch = math.ceil(len(train) / config.batch_size / config.grad_accum / world_size())
    measure_base = base is not None and base.loss is None
    args = training_arguments(config, compute_dtype, eval_on_start=measure_base)
    stats = RunStats(sum(len(e.input_ids) for e in train), steps_per_epoch)
    callbacks: list[TrainerCallback] = [stats]
    if is_main():  # one log of the run, in the main process (the others' writer would leave empty files)
        callbacks.append(TensorBoardCallback(SummaryWriter(log_dir=str(output / RUNS))))
    if config.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience))
    if measure_base:
        callbacks.append(base)
    trainer = ReplyTrainer(
        model=model,
        args=args,
        train_dataset=to_dataset(train),
        eval_dataset=to_dataset(evals),
        data_collator=ReplyCollator(tokenizer.pad_token_id)
        if model.config.is_encoder_decoder
        else TrainingCollator(tokenizer.pad_token_id, prefix),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(QuietProgress)
    return trainer, stats


def training_arguments(config: TrainConfig, compute_dtype: torch.dtype, eval_on_start: bool) -> TrainingArguments:
    """The Trainer's settings for a run: one evaluation and one checkpoint per epoch, the best kept
    by held-out loss, every step logged; ``eval_on_start``: measure the base model first."""
    return TrainingArguments(
        output_dir=str(Path(config.output_dir) / CHECKPOINTS),
        num_train_epochs=config.epochs,
        learning_rate=config.learning_rate,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        warmup_steps=config.warmup_ratio,
        lr_scheduler_type="cosine",
        eval_strategy="epoch",
        eval_on_start=eval_on_start,
        save_strategy="epoch",
        logging_strategy="steps",
        logging_steps=1,
        # The default filter replaces NaN/inf losses in the logs and hides a diverging run.
        logging_nan_inf_filter=False,
        save_total_limit=config.save_total_limit,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        seed=config.seed,
        data_seed=config.seed,
        optim=config.optim,
        bf16=compute_dtype == torch.bfloat16,
        fp16=compute_dtype == torch.float16,
        use_cpu=not torch.cuda.is_available(),
        train_sampling_strategy="group_by_length",
        report_to="none",  # TensorBoard is attached in build_trainer, with its folder in the output
        remove_unused_columns=False,
        prediction_loss_only=True,  # evaluation needs the loss only; gathering logits costs GBs of memory
        save_only_model=False,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
