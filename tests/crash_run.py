"""Run `python -m training.run` in a child process and make it fail at a chosen moment, for real.

    python -m tests.crash_run POINT -- [training.run flags]

POINT is one of
  step:N            SIGKILL during training step N (after its backward pass, before the update)
  eval:N            SIGKILL in the middle of the N-th evaluation (1 = the base model's)
  save:N:FILE       SIGKILL half-way through writing FILE of checkpoint-N (a torn file on disk)
  final             SIGKILL while the finished adapter is being moved into place
  disk-full:N:B     after checkpoint-N is saved, no file may grow past B bytes (RLIMIT_FSIZE), so
                    the next write past it fails with the kernel's own error (EFBIG)
  memory            when training begins, the address space is capped 48 MiB above its current size
                    (RLIMIT_AS), so the first step's allocations fail as on a machine out of memory
  float32           no failure: compute in float32 even where the CPU has bfloat16 (its kernels
                    round differently for each batch shape, which two launches compare across)
  fsdp              no failure: FSDP on this CPU (gloo), as `accelerate launch` with
                    training/configs/accelerate/fsdp.yaml sets it up, except loading on the main
                    process only (see install)

POINT@R applies only in the process of rank R of a launched run (torchrun -m tests.crash_run ...);
several points are joined with +.

The kills are SIGKILL, which no handler can intercept: what the test checks afterwards is exactly
what a power cut or the OOM killer would leave (files written so far, nothing flushed later).
"""

from __future__ import annotations

import io
import json
import os
import resource
import signal
import sys


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str) -> None:
    import peft.peft_model
    import torch
    from safetensors.torch import save as safetensors_bytes
    from transformers import TrainerCallback, TrainerState

    from training import run, trainer

    kind, _, rest = point.partition(":")
    if kind == "float32":
        import inference.loading

        inference.loading.cpu_computes_bf16 = lambda: False
    elif kind == "fsdp":
        # accelerate turns FSDP on for accelerators only: on a CPU it decides on multi-CPU DDP, and
        # this switches its state to FSDP once it has decided (the FSDP wrapping, sharded
        # checkpoints and gathering are then accelerate's and torch's own, on gloo). Loading on the
        # main process only (cpu_ram_efficient_loading, with the sync of module states it needs)
        # makes the others' weights on an accelerator, so each process loads the model here.
        from accelerate.state import AcceleratorState, PartialState
        from accelerate.utils import DistributedType

        from tests.helpers import launch_environment
        from training.config import CONFIGS_DIR

        env = launch_environment(CONFIGS_DIR / "accelerate" / "fsdp.yaml")
        os.environ.update({k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))})
        os.environ.update(FSDP_CPU_RAM_EFFICIENT_LOADING="false", FSDP_SYNC_MODULE_STATES="false")
        original_init = AcceleratorState.__init__

        def init(self, *args, fsdp_plugin=None, **kwargs):
            original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
            if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
                # Both states: an AcceleratorState copies the PartialState's each time it is made.
                for state in (self.__dict__, PartialState._shared_state):
                    state.update(
                        distributed_type=DistributedType.FSDP, device=torch.device("cpu")
                    )  # the device as FSDP's CPU handle names it
                self.fsdp_plugin = fsdp_plugin

        AcceleratorState.__init__ = init
        run.check_launch = lambda: None  # which refuses FSDP without a GPU
    elif kind == "step":
        target = int(rest)
        original_step = trainer.ReplyTrainer.training_step

        def training_step(self, *args, **kwargs):
            loss = original_step(self, *args, **kwargs)
            if self.state.global_step + 1 == target:
                die()
            return loss

        trainer.ReplyTrainer.training_step = training_step
    elif kind == "eval":
        target, seen = int(rest), {"evaluations": 0}
        original_evaluate = trainer.ReplyTrainer.evaluate
        original_prediction = trainer.ReplyTrainer.prediction_step

        def evaluate(self, *args, **kwargs):
            seen["evaluations"] += 1
            seen["batches"] = 0
            return original_evaluate(self, *args, **kwargs)

        def prediction_step(self, *args, **kwargs):
            seen["batches"] += 1
            if seen["evaluations"] == target and seen["batches"] == 2:
                die()
            return original_prediction(self, *args, **kwargs)

        trainer.ReplyTrainer.evaluate = evaluate
        trainer.ReplyTrainer.prediction_step = prediction_step
    elif kind == "save":
        step, _, name = rest.partition(":")
        folder = f"checkpoint-{step}"
        original_save = torch.save
        original_json = TrainerState.save_to_json

        def torn(path, data: bytes) -> None:
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
            die()

        def save(obj, f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)) and folder in str(f) and str(f).endswith(name):
                buffer = io.BytesIO()
                original_save(obj, buffer, *args, **kwargs)
                torn(f, buffer.getvalue())
            return original_save(obj, f, *args, **kwargs)

        def save_to_json(self, path):
            if folder in str(path) and str(path).endswith(name):
                torn(path, json.dumps(self.__dict__, indent=2, default=str).encode())
            return original_json(self, path)

        original_safetensors = peft.peft_model.safe_save_file

        def save_safetensors(tensors, path, metadata=None):
            if folder in str(path) and str(path).endswith(name):
                torn(path, safetensors_bytes(tensors, metadata=metadata))
            return original_safetensors(tensors, path, metadata=metadata)

        torch.save = save
        TrainerState.save_to_json = save_to_json
        peft.peft_model.safe_save_file = save_safetensors
    elif kind == "final":
        original_replace = run.os.replace

        def replace(src, dst):
            original_replace(src, dst)
            die()  # one file of the finished adapter moved in, the rest still in the staging folder

        run.os.replace = replace
    elif kind == "disk-full":
        step, limit = map(int, rest.split(":"))

        class FillDisk(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                if state.global_step == step:
                    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

        _add_callback(trainer, FillDisk())
    elif kind == "memory":

        class CapMemory(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                with open("/proc/self/status") as f:
                    size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
                resource.setrlimit(resource.RLIMIT_AS, (size + 48 * 2**20, resource.RLIM_INFINITY))

        _add_callback(trainer, CapMemory())
    else:
        raise SystemExit(f"unknown point {point!r}")


def _add_callback(trainer_module, callback) -> None:
    original_build = trainer_module.build_trainer

    def build_trainer(*args, **kwargs):
        built, stats = original_build(*args, **kwargs)
        built.add_callback(callback)
        return built, stats

    trainer_module.build_trainer = build_trainer


if __name__ == "__main__":
    point, separator, *flags = sys.argv[1:]
    assert separator == "--", __doc__
    for one in point.split("+"):
        one, _, rank = one.partition("@")
        if not rank or int(rank) == int(os.environ.get("RANK", "0")):
            install(one)
    from training.run import main

    sys.exit(main(flags))
