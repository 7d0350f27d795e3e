"""The model a run trains: the base loaded for training, LoRA adapters on it (or every weight), and
the layers recomputed in the backward pass."""

from __future__ import annotations

from typing import TYPE_CHECKING

from inference.internals.bitsandbytes import use_cpu_inference_layout
from inference.internals.peft import adapter_state_dicts_under_fsdp, cast_lora_inputs, replace_lora_dropout
from inference.internals.transformers import checkpoint_first_layers
from inference.loading import Quantization, fsdp_enabled, load_base_model, resolve_base_model
from training.attention import training_attention
from training.config import TrainConfig
from training.cpu import FastDropout

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


def load_training_base(
    name: str, quantization: Quantization, dtype: torch.dtype | None = None, trust_remote_code: bool = False
) -> PreTrainedModel:
    """The frozen base of a run, as inference.loading loads it for training; on a CPU with the
    plain softmax(QK^T)V attention in the fewest passes (see training.attention)."""
    import torch
    from transformers import AutoConfig

    attention = None
    if not torch.cuda.is_available():
        attention = training_attention(
            AutoConfig.from_pretrained(resolve_base_model(name), trust_remote_code=trust_remote_code)
        )
    return load_base_model(
        name, quantization, dtype, trust_remote_code, for_training=True, attn_implementation=attention
    )


def lora_model(model: PreTrainedModel, config: TrainConfig, checkpointed_layers: int) -> PreTrainedModel:
    """Wrap the (quantized) base with fresh LoRA adapters; only those are trained.

    peft's prepare_model_for_kbit_training is not used: it casts every non-quantized weight to
    float32, which on a CPU made steps about 20% slower and activations larger, while the compute
    dtype (bfloat16 where native) already keeps the frozen norms and embeddings stable.
    """
    from peft import LoraConfig, get_peft_model

    checkpoint_first_layers(model, checkpointed_layers)
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules,
        task_type="SEQ_2_SEQ_LM" if model.config.is_encoder_decoder else "CAUSAL_LM",
    )
    model = get_peft_model(model, lora)  # target_modules were checked by the memory estimate, which runs first
    if fsdp_enabled():
        adapter_state_dicts_under_fsdp()
    # Under the autocast of ReplyTrainer the adapter's matmuls run in the compute dtype on the input
    # as it is, while its weights and optimizer state stay float32.
    cast_lora_inputs(model, False)
    if next(model.parameters()).device.type == "cpu":  # a GPU's dropout is one fused kernel already
        replace_lora_dropout(model, FastDropout)
    return model


def ready_for_generation(model: PreTrainedModel) -> None:
    """Undo the training-only settings of lora_model and load_base_model, before the trained model
    generates (outside the trainer's autocast)."""
    cast_lora_inputs(model, True)
    use_cpu_inference_layout(model, True)


def trainable_model(model: PreTrainedModel, config: TrainConfig, checkpointed_layers: int) -> PreTrainedModel:
    """The model the optimizer updates: LoRA adapters on a frozen base, or (method full) every weight."""
    if config.method == "lora":
        return lora_model(model, config, checkpointed_layers)
    checkpoint_first_layers(model, checkpointed_layers)
    model.requires_grad_(True)
    return model


def count_parameters(model: PreTrainedModel) -> tuple[int, int]:
    """(trainable, total) parameters, each packed 4-bit weight counted as the values it holds (peft's
    and transformers' counts both do; ``numel()`` of a Params4bit is half of it, which is why the
    original article's printout read "264M" for a 7B model)."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    return model.num_parameters(only_trainable=True), model.num_parameters()
