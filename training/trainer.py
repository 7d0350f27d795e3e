"""Maps a TrainConfig onto transformers' Trainer with a LoRA model, reply-only loss and per-epoch eval."""

from __future__ import annotations

import ctypes
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
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

from prompts.render import IGNORE_INDEX, Example
from training.checkpoints import CHECKPOINTS, write_failure
from training.config import TrainConfig

RUNS = "runs"
# glibc serves an allocation from its heap once an mmapped one of that size has been freed (its
# mmap threshold rises, up to 32 MiB); a step's activations then land between longer-lived
# allocations, and the heap cannot give the freed space back: a default run's resident memory grew
# ~0.1 GiB per epoch, ~0.2 GiB above what it used. A fixed 1 MiB threshold returns each large
# tensor to the system when it is freed; replytune's bf16 steps ran at the same speed, while the
# article's recipe (float32 activations, recomputed) ran 30% slower with it, so it is set for
# training runs only (bench/RESULTS.md).
MMAP_THRESHOLD = 1 << 20
M_MMAP_THRESHOLD = -3  # mallopt's parameter number, from glibc's malloc.h


def return_large_blocks_to_the_system() -> None:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD for this process (glibc's own
    MALLOC_MMAP_THRESHOLD_ variable, when set, wins)."""
    if sys.platform != "linux" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    libc = ctypes.CDLL(None)
    if hasattr(libc, "mallopt"):  # glibc; other C libraries manage large blocks their own way
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite; the run stops before the update that would spread it."""

    def __init__(self, step: int, value: float) -> None:
        super().__init__(f"training loss became {value} at step {step}")
        self.step = step
        self.value = value


def lora_model(model: PreTrainedModel, config: TrainConfig, checkpointed_layers: int) -> PreTrainedModel:
    """Wrap the (quantized) base with fresh LoRA adapters; only those are trained.

    peft's prepare_model_for_kbit_training is not used: it casts every non-quantized weight to
    float32, which on a CPU made steps about 20% slower and activations larger, while the compute
    dtype (bfloat16 where native) already keeps the frozen norms and embeddings stable.
    """
    from peft import LoraConfig, get_peft_model

    enable_checkpointing(model, checkpointed_layers)
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules,
        task_type="SEQ_2_SEQ_LM" if model.config.is_encoder_decoder else "CAUSAL_LM",
    )
    model = get_peft_model(model, lora)  # target_modules were checked by the memory estimate, which runs first
    from peft.tuners.lora.bnb import Linear4bit

    on_cpu = next(model.parameters()).device.type == "cpu"  # a GPU's dropout is one fused kernel already
    for module in model.modules():
        if isinstance(module, Linear4bit):
            # peft copies every LoRA input to float32 (the adapter's dtype) and back; under the
            # autocast of ReplyTrainer the adapter's matmuls run in the compute dtype on the input as
            # it is, while its weights and optimizer state stay float32.
            module.cast_input_dtype_enabled = False
        if on_cpu and getattr(module, "lora_dropout", None) is not None:
            for name, dropout in module.lora_dropout.items():
                if isinstance(dropout, torch.nn.Dropout):
                    module.lora_dropout[name] = FastDropout(dropout.p)
    return model


def ready_for_generation(model: PreTrainedModel) -> None:
    """Undo the training-only settings of lora_model and load_base_model, before the trained model
    generates (outside the trainer's autocast)."""
    from inference.loading import use_cpu_inference_layout

    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = True
    use_cpu_inference_layout(model, True)


class FastDropout(torch.nn.Module):
    """Dropout whose mask comes from 16 random bits per element: keep with probability 1 - p.

    torch's CPU dropout draws one Bernoulli sample at a time; with a dropout on each of the 120 LoRA
    inputs of SmolLM2 that was a sixth of a training step. Sixteen bits of a 64-bit random word
    per element give p to within 1/65,536 (0.05 -> 0.050003) at a third of the cost.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.threshold = round(p * 65536) - 32768  # int16 values below it are dropped

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        words = torch.empty(x.numel() // 4 + 1, dtype=torch.int64, device=x.device).random_(-(2**63), None)
        bits = words.view(torch.int16)[: x.numel()].view(x.shape)
        return torch.where(bits >= self.threshold, x * (1 / (1 - self.p)), 0)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def enable_checkpointing(model: PreTrainedModel, layers: int) -> None:
    """Recompute the first ``layers`` decoder layers in the backward pass instead of keeping their
    activations (training.estimate picks how many a memory limit needs)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    if not layers:
        return
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()  # frozen embeddings would give checkpointed blocks no grad input
    # A model whose blocks are not GradientCheckpointingLayers checkpoints them all, by its own flag.
    for block in [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)][layers:]:
        block.gradient_checkpointing = False


def trainable_model(model: PreTrainedModel, config: TrainConfig, checkpointed_layers: int) -> PreTrainedModel:
    """The model the optimizer updates: LoRA adapters on a frozen base, or (method full) every weight."""
    if config.method == "lora":
        return lora_model(model, config, checkpointed_layers)
    enable_checkpointing(model, checkpointed_layers)
    model.requires_grad_(True)
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, counting each packed 4-bit weight as the values it holds.

    bitsandbytes packs two 4-bit values per byte, so ``numel()`` of a Params4bit is half the real
    count; that is why peft's printout showed "264M" for a 7B model in the original article.
    """
    trainable = total = 0
    for param in model.parameters():
        n = math.prod(param.quant_state.shape) if getattr(param, "quant_state", None) is not None else param.numel()
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total


class ReplyCollator:
    """Pads a batch to its longest example; padding is masked from attention and from the loss.

    Labels come from the renderer (prompt already masked), so padding never touches the end-of-turn
    token even when the pad id equals the EOS id.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        # Labels are padded to their own width: for a causal LM they are as long as the inputs, for
        # a seq2seq model they are the decoder's targets.
        width = max(len(r["input_ids"]) for r in rows)
        label_width = max(len(r["labels"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), label_width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, : len(r["labels"])] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def packed_row_length(prefix: int, batch_size: int, length: int) -> int:
    """Tokens of one packed row: the shared prefix once, then each example's own tokens."""
    return prefix + batch_size * (length - prefix)


def shared_prefix_length(examples: list[Example], batch_size: int, hidden_size: int) -> int:
    """How many leading tokens a batch computes once for all its examples (0: each row computes its own).

    Every example opens with the same chat template and persona: 143 of the default data's ~181
    tokens. Within a step the weights are the same for every row, so those positions' activations
    are too: a batch packs into one row, the shared prefix once, then each example's own tokens,
    which attend to the prefix and to their own earlier tokens only, at the positions they have in
    the example. Logits, loss and gradients are the same as with padded rows (the prefix's gradient
    is the sum of the rows' contributions, as before), for about 2.5x fewer token computations on
    the default data. One thing differs: LoRA dropout on a prefix position draws one mask for the
    batch rather than one per row (same expectation, rows correlated at those positions).

    The prefix stops before the first position that predicts a learned token, since a shared
    position has one hidden state. The one packed row has more attention scores than each padded
    row: it is used when it costs less for a batch of the longest examples, counting a token's
    layer work (~24 hidden^2 FLOPs) as 6 hidden attention scores (4 hidden FLOPs each).
    """
    if batch_size < 2 or not examples:
        return 0
    prefix = len(os.path.commonprefix([e.input_ids for e in examples]))
    first_learned = min(next((i for i, label in enumerate(e.labels) if label != IGNORE_INDEX), len(e.labels)) for e in examples)
    prefix = min(prefix, first_learned - 1, min(len(e.input_ids) for e in examples) - 1)
    longest = max(len(e.input_ids) for e in examples)
    packed = packed_row_length(prefix, batch_size, longest)
    scores_per_token = 6 * hidden_size
    packed_cost = packed + packed**2 / scores_per_token
    padded_cost = batch_size * (longest + longest**2 / scores_per_token)
    return prefix if prefix > 0 and packed_cost < padded_cost else 0


class TrainingCollator(ReplyCollator):
    """Batches for ReplyTrainer's causal-LM loss: ``shift_labels``, the token each position predicts
    (IGNORE_INDEX where none is learned; the Trainer counts the learned tokens from it), and
    ``learned_positions``, their flat indices, found here on the CPU: selecting them on a GPU with a
    boolean mask would make the host wait for the GPU once per forward pass.

    With ``prefix`` (see shared_prefix_length) a batch is packed into one row: the prefix, then each
    example's remaining tokens, with ``position_ids`` and ``segments`` (-1 on the prefix, the row's
    index on its own tokens) from which ReplyTrainer builds the attention mask.
    """

    def __init__(self, pad_token_id: int, prefix: int = 0) -> None:
        super().__init__(pad_token_id)
        self.prefix = prefix

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.prefix:
            batch = self._packed(rows)
        else:
            batch = super().__call__(rows)
            labels = batch["labels"]
            batch["shift_labels"] = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
        batch["learned_positions"] = (batch["shift_labels"].flatten() != IGNORE_INDEX).nonzero().squeeze(1)
        return batch

    def _packed(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        p = self.prefix
        ids, labels, shift, positions, segments = [rows[0]["input_ids"][:p]], [[IGNORE_INDEX] * p], [[IGNORE_INDEX] * p], [range(p)], [[-1] * p]
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids.append(r["input_ids"][p:])
            labels.append(r["labels"][p:])
            shift.append([*r["labels"][p + 1 :], IGNORE_INDEX])  # the last token predicts nothing
            positions.append(range(p, n))
            segments.append([i] * (n - p))
        row = lambda parts: torch.tensor([[x for part in parts for x in part]], dtype=torch.long)  # noqa: E731
        return {"input_ids": row(ids), "labels": row(labels), "shift_labels": row(shift), "position_ids": row(positions), "segments": row(segments)}


def shared_prefix_mask(segments: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """The (1, 1, T, T) attention mask of a packed batch (TrainingCollator): a token sees the shared
    prefix and the earlier tokens of its own example. Boolean for SDPA; additive for eager-style
    attention, as transformers builds them."""
    from inference.attention import GROUPED

    segment = segments[0]
    allowed = torch.ones(segment.numel(), segment.numel(), dtype=torch.bool, device=segment.device).tril_()
    allowed &= (segment[None, :] < 0) | (segment[None, :] == segment[:, None])
    if implementation == "sdpa":
        return allowed[None, None]
    if implementation not in ("eager", GROUPED):
        raise NotImplementedError(f"packed batches need eager or sdpa attention, not {implementation}")
    return torch.zeros(allowed.shape, dtype=dtype, device=segment.device).masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]


class ReplyTrainer(Trainer):
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
        self._pending_losses: list[torch.Tensor] = []  # of the forward passes since the last update
        self._held_out_losses: list[torch.Tensor] = []  # of each learned token, in the running evaluation

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        losses = self.token_losses(model, inputs)
        loss = losses.sum() / (num_items_in_batch if num_items_in_batch is not None else max(losses.numel(), 1))
        return (loss, {"loss": loss}) if return_outputs else loss

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
        # The Trainer's evaluation loss is the mean of its batches' mean losses, weighted by
        # examples: it moved with how the held-out examples were batched (the base model's 4.444
        # with 4 to a batch read 4.485 with 8). Here it is the mean over every held-out learned token.
        self._held_out_losses = []
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        output.metrics[f"{metric_key_prefix}_loss"] = torch.cat(self._held_out_losses).mean().item()
        return output

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            losses = self.token_losses(model, inputs)
        self._held_out_losses.append(losses)
        return losses.mean(), None, None

    def token_losses(self, model, inputs) -> torch.Tensor:
        """The loss of each learned token of a batch, in batch order."""
        from inference.loading import unwrapped

        causal = unwrapped(model)
        config = causal.config
        if config.is_encoder_decoder:  # every decoder position is a reply token: the plain head is right
            logits = model(**inputs).logits.float()
            labels = inputs["labels"].flatten()
            learned = labels != IGNORE_INDEX
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1)[learned], labels[learned], reduction="none")
        if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
            raise NotImplementedError(f"{config.model_type}: logits are post-processed; the reply-only head does not apply")
        positions = inputs["learned_positions"]
        # The base model is called directly (the head comes below), past accelerate's autocast
        # wrapper of the top-level forward; the LoRA layers rely on autocast (see lora_model).
        dtype = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None
        forward = {"input_ids": inputs["input_ids"], "use_cache": False}  # a cache would copy every key and value
        if "segments" in inputs:
            mask_dtype = dtype or causal.get_input_embeddings().weight.dtype
            forward["attention_mask"] = shared_prefix_mask(inputs["segments"], config._attn_implementation, mask_dtype)
            forward["position_ids"] = inputs["position_ids"]
        else:
            forward["attention_mask"] = inputs["attention_mask"]
        with torch.autocast(inputs["input_ids"].device.type, dtype=dtype, enabled=dtype is not None):
            hidden = causal.base_model(**forward).last_hidden_state
        logits = causal.get_output_embeddings()(hidden.flatten(0, 1).index_select(0, positions)).float()
        return torch.nn.functional.cross_entropy(logits, inputs["shift_labels"].flatten().index_select(0, positions), reduction="none")

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # Checked before every optimizer step: one NaN gradient would make every weight NaN, and the
        # Trainer would go on logging and saving the ruined adapter. The losses of the accumulated
        # forward passes are checked together, so that the host waits for the GPU once per update.
        self._pending_losses.append(loss.detach())
        if self.accelerator.sync_gradients:
            losses, self._pending_losses = torch.stack(self._pending_losses), []
            if not torch.isfinite(losses).all():
                raise NonFiniteLoss(self.state.global_step + 1, losses[~torch.isfinite(losses)][0].item())
        return loss

    def _save_checkpoint(self, model, trial):
        try:
            super()._save_checkpoint(model, trial)
        except Exception as exc:
            # Disk full surfaces as torch's "unexpected pos", a safetensors IoError or a tokenizers
            # error, depending on which file hit it; the user gets one message and a resumable state
            # (the torn folder lacks trainer_state.json, so resume skips it).
            folder = Path(self.args.output_dir)
            raise write_failure(folder.parent, f"checkpoint-{self.state.global_step} in {folder}", exc) from exc


def to_dataset(examples: list[Example]):
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "input_ids": [e.input_ids for e in examples],
            "labels": [e.labels for e in examples],
            "length": [len(e.input_ids) for e in examples],
        }
    )


class RunStats(TrainerCallback):
    """Tracks wall time, real (non-padding) tokens/s and peak memory, and prints one line per epoch."""

    def __init__(self, tokens_per_epoch: int, steps_per_epoch: int) -> None:
        self.tokens_per_epoch = tokens_per_epoch
        self.steps_per_epoch = steps_per_epoch
        self.train_seconds = 0.0
        self.tokens_seen = 0
        self._epoch_start = 0.0
        self._reported_epoch = 0

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._epoch_start = time.perf_counter()
        self._step_at_start = state.global_step

    def on_epoch_end(self, args, state, control, **kwargs):
        seconds = time.perf_counter() - self._epoch_start
        self.train_seconds += seconds
        done = (state.global_step - self._step_at_start) / max(1, self.steps_per_epoch)
        self.tokens_seen += round(self.tokens_per_epoch * done)
        self._last_epoch_tokens_per_s = self.tokens_per_epoch * done / max(seconds, 1e-9)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics is None or state.epoch is None or round(state.epoch) <= self._reported_epoch:
            return  # the evaluation before training, or the final one repeating the last epoch
        epoch = self._reported_epoch = round(state.epoch)
        losses = [h["loss"] for h in state.log_history if "loss" in h and epoch - 1 < h["epoch"] <= epoch]
        train = f"{sum(losses) / len(losses):.4f}" if losses else "n/a"
        print(
            f"epoch {epoch}/{math.ceil(args.num_train_epochs)}: train loss {train}, "
            f"eval loss {metrics['eval_loss']:.4f}, {self._last_epoch_tokens_per_s:.0f} tokens/s, "
            f"peak memory {peak_memory_gib():.2f} GiB",
            flush=True,
        )

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_seen / self.train_seconds if self.train_seconds else 0.0


class _QuietProgress(ProgressCallback):
    """The Trainer's progress bar without its raw log dicts; RunStats prints one line per epoch."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def build_trainer(
    config: TrainConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train: list[Example],
    evals: list[Example],
    compute_dtype: torch.dtype,
    prefix: int = 0,
) -> tuple[Trainer, RunStats]:
    """The Trainer of a run; ``prefix``: the tokens a batch shares (shared_prefix_length)."""
    from torch.utils.tensorboard import SummaryWriter

    output = Path(config.output_dir)
    steps_per_epoch = math.ceil(len(train) / config.batch_size / config.grad_accum)
    args = TrainingArguments(
        output_dir=str(output / CHECKPOINTS),
        num_train_epochs=config.epochs,
        learning_rate=config.learning_rate,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        warmup_steps=config.warmup_ratio,
        lr_scheduler_type="cosine",
        eval_strategy="epoch",
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
        report_to="none",  # TensorBoard is attached below, with its folder in the output
        remove_unused_columns=False,
        prediction_loss_only=True,  # evaluation needs the loss only; gathering logits costs GBs of memory
        save_only_model=False,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    stats = RunStats(sum(len(e.input_ids) for e in train), steps_per_epoch)
    callbacks: list[TrainerCallback] = [stats, TensorBoardCallback(SummaryWriter(log_dir=str(output / RUNS)))]
    if config.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience))
    trainer = ReplyTrainer(
        model=model,
        args=args,
        train_dataset=to_dataset(train),
        eval_dataset=to_dataset(evals),
        data_collator=ReplyCollator(tokenizer.pad_token_id) if model.config.is_encoder_decoder else TrainingCollator(tokenizer.pad_token_id, prefix),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_QuietProgress)
    return trainer, stats
