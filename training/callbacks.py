"""What a training run reports while it trains: one summary line per epoch (tokens/s, peak memory),
the base model's held-out loss, and the Trainer's progress bar without its raw log dicts."""

from __future__ import annotations

import math
import resource
import time

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback


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


class BaseEvaluation(TrainerCallback):
    """The base model's held-out loss: from the evaluation the Trainer runs before its first step
    (eval_on_start), handed to ``record`` then, before any checkpoint exists; or, on a resumed
    run, the ``loss`` measured when it started."""

    def __init__(self, record=None, loss: float | None = None) -> None:
        self.record = record
        self.loss = loss

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if state.global_step == 0 and self.loss is None:
            self.loss = metrics["eval_loss"]
            self.record(self.loss)


class QuietProgress(ProgressCallback):
    """The Trainer's progress bar without its raw log dicts; RunStats prints one line per epoch."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
