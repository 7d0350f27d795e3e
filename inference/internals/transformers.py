"""transformers from the inside: which layers recompute in the backward pass, the attention a
loaded model runs, the Trainer's checkpoint writer, train sampler and optimizer loading, and the
quantizer a model loaded from GGUF keeps.

On another transformers version: every layer is checkpointed when any is asked for (least memory,
slower), batches are padded rather than packed, a failed checkpoint write surfaces as the
library raised it, length grouping is sized by one process's share of an update (the same batches
in a run of one process, other ones in a run of several), a resumed FSDP run starts its optimizer's
moments afresh (accelerate has no entries to load them into), and the default model's conversion
saves through the quantizer's own path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from inference.internals import written_for

if TYPE_CHECKING:
    from transformers import PreTrainedModel

WRITTEN_FOR = "==5.23.*"


def checkpoint_first_layers(model: PreTrainedModel, layers: int) -> None:
    """Recompute the first ``layers`` decoder layers in the backward pass instead of keeping their
    activations (training.estimate picks how many a memory limit needs)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    if not layers:
        return
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()  # frozen embeddings would give checkpointed blocks no grad input
    if not written_for("transformers", WRITTEN_FOR, "GradientCheckpointingLayer.gradient_checkpointing per layer"):
        return
    # A model whose blocks are not GradientCheckpointingLayers checkpoints them all, by its own flag.
    for block in [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)][layers:]:
        block.gradient_checkpointing = False


def attention_known() -> bool:
    """Whether attention_implementation can answer: packed batches need it for their mask."""
    return written_for("transformers", WRITTEN_FOR, "PretrainedConfig._attn_implementation")


def attention_implementation(config: Any) -> str:
    """The attention a loaded model runs (``config._attn_implementation``); only where attention_known."""
    if not attention_known():
        raise RuntimeError(
            "the attention implementation of a model is unknown on "
            "this transformers version; batches must not be packed"
        )
    return config._attn_implementation


def checkpoint_errors_named(trainer_class: type) -> type:
    """``trainer_class`` with its checkpoint writer's failures passed to ``self.checkpoint_failed(exc)``,
    which returns the exception to raise in their place, or None to raise the failure as it is."""
    if not written_for("transformers", WRITTEN_FOR, "Trainer._save_checkpoint"):
        return trainer_class

    class Named(trainer_class):
        def _save_checkpoint(self, model, trial):
            try:
                super()._save_checkpoint(model, trial)
            except Exception as exc:
                replacement = self.checkpoint_failed(exc)
                if replacement is None:
                    raise
                raise replacement from exc

    Named.__name__ = Named.__qualname__ = trainer_class.__name__
    Named.__doc__ = trainer_class.__doc__
    return Named


def trainer_hooks(trainer_class: type) -> type:
    """``trainer_class`` with two private steps of the Trainer handed to public methods of its own:
    ``train_sampler(dataset)`` makes the training sampler (``_get_train_sampler``), and
    ``before_loading_optimizer(checkpoint)`` runs before a checkpoint's optimizer and scheduler
    states are loaded into the new ones (``_load_optimizer_and_scheduler``)."""
    if not written_for(
        "transformers", WRITTEN_FOR, "Trainer._get_train_sampler and Trainer._load_optimizer_and_scheduler"
    ):
        return trainer_class

    class Hooked(trainer_class):
        def _get_train_sampler(self, train_dataset=None):
            return self.train_sampler(train_dataset if train_dataset is not None else self.train_dataset)

        def _load_optimizer_and_scheduler(self, checkpoint):
            self.before_loading_optimizer(checkpoint)
            super()._load_optimizer_and_scheduler(checkpoint)

    Hooked.__name__ = Hooked.__qualname__ = trainer_class.__name__
    Hooked.__doc__ = trainer_class.__doc__
    return Hooked


def drop_gguf_quantizer(model: PreTrainedModel) -> None:
    """Forget the GGUF quantizer of a model whose GGUF weights were loaded as plain tensors: it
    refuses to save the model, and would make later loads look for the GGUF file again. Done by the
    quantizer's own ``remove_quantization_config`` (the GGUF one has no ``dequantize``)."""
    if written_for("transformers", WRITTEN_FOR, "PreTrainedModel.hf_quantizer"):
        model.hf_quantizer.remove_quantization_config(model)
    else:
        del model.config.quantization_config  # the public part; save_pretrained says if the rest blocks it
