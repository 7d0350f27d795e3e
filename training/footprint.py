"""The memory footprint of a training run, counted from the model's shapes alone.

The architecture is built on PyTorch's ``meta`` device (shapes, no storage), so the estimate works
for Mistral-7B without downloading its 14 GB of weights. Each part is counted from those shapes:

* weights, by how the frozen base is stored (NF4 with double quantization, GPTQ 4-bit, int8, or
  16/32-bit floats); embeddings, norms and the output head stay in the compute dtype;
* trainable parameters (LoRA matrices, or every weight in a full fine-tune), their gradients and
  the optimizer's state (AdamW: two float32 moments; 8-bit AdamW: two bytes);
* activations kept for the backward pass, per token and layer, with and without gradient
  checkpointing (on a CPU also the attention probabilities), plus the output-head logits
  of the learned positions;
* on a CPU, the resident memory of Python, PyTorch and the libraries themselves (measured: see
  ``bench/RESULTS.md``), since a CPU run's peak is its whole process.

training.estimate applies it to a replytune run (`python -m training.estimate`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from training.architecture import EstimateError, linear_packing, meta_model, model_widths, text_config
from training.memory import GiB

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

Storage = Literal["nf4", "gptq", "int8", "bf16", "fp32"]
Optimizer = Literal["adamw", "adamw_8bit"]
# Bytes per stored weight. NF4: 4 bits + one 8-bit absmax per 64 weights + one float32 per 256 of
# those (double quantization); GPTQ: 4 bits + a float16 scale and a 4-bit zero per group of 128.
WEIGHT_BYTES: dict[str, float] = {
    "nf4": 0.5 + 1 / 64 + 4 / (64 * 256),
    "gptq": 0.5 + 2.5 / 128,
    "int8": 1.0 + 4 / 4096,
    "bf16": 2.0,
    "fp32": 4.0,
}
# Tensors a decoder layer keeps for backward, per token, in units of the hidden size h and the MLP
# width i: norm inputs and outputs (partly in float32), q/k/v, attention output and its
# log-sum-exp, residuals; gate, up, activation and product in the MLP. Fitted to peak memory
# measured on real runs (bench/RESULTS.md) within the tolerance stated there.
ACTIVATION_H, ACTIVATION_I = 16, 4
CPU_RUNTIME_BYTES = 0.75 * 2**30  # Python + torch + transformers + peft + bitsandbytes, resident


@dataclass
class Estimate:
    parameters: int
    trainable: int
    weights: float
    trainable_weights: float
    gradients: float
    optimizer: float
    layers: int
    layer_activations: float  # what one layer keeps for backward when it is not checkpointed
    layer_input: float  # what a checkpointed layer keeps: its input
    logits: float
    runtime: float
    loading: float
    checkpointed_layers: int  # 0 = no gradient checkpointing, layers = all of them
    gathered: float = 0.0  # under FSDP: the whole layers gathered from their shards at one time
    devices: int = 1

    def activations(self, checkpointed: int) -> float:
        """Peak activations with the first ``checkpointed`` layers recomputed in the backward pass.

        The peak is at the end of the forward pass, or, with every layer checkpointed, while one
        layer is recomputed: the backward pass reaches the first layers last, when the other
        layers' activations are already freed.
        """
        kept = (self.layers - checkpointed) * self.layer_activations + checkpointed * self.layer_input
        return max(kept, checkpointed * self.layer_input + (self.layer_activations if checkpointed else 0))

    def training_with(self, checkpointed: int) -> float:
        """Memory while training: every part counted once, the activations for ``checkpointed`` layers."""
        return (
            self.weights
            + self.trainable_weights
            + self.gradients
            + self.optimizer
            + self.gathered
            + self.logits
            + self.runtime
            + self.activations(checkpointed)
        )

    @property
    def while_loading(self) -> float:
        # The mapped checkpoint file is let go once the model is loaded (see inference.loading.own_memory).
        return self.runtime + self.weights + self.loading

    def total_with(self, checkpointed: int) -> float:
        """The peak: training, or loading when the mapped checkpoint file weighs more."""
        return max(self.training_with(checkpointed), self.while_loading)

    @property
    def total(self) -> float:
        return self.total_with(self.checkpointed_layers)

    def layers_to_fit(self, limit: float) -> int | None:
        """The fewest layers to checkpoint so that the estimate stays within ``limit`` bytes (None:
        not even with every layer checkpointed). Each checkpointed layer costs one more forward pass
        of that layer, so checkpointing only as many as memory needs keeps most of the speed."""
        return next((k for k in range(self.layers + 1) if self.total_with(k) <= limit), None)

    def summary(self) -> str:
        return (
            f"{self.total / GiB:.2f} GiB (weights {self.weights / GiB:.2f}, trainable + gradients + optimizer "
            f"{(self.trainable_weights + self.gradients + self.optimizer) / GiB:.2f}, activations "
            f"{self.activations(self.checkpointed_layers) / GiB:.2f}, "
            f"logits {self.logits / GiB:.2f}, runtime {self.runtime / GiB:.2f})"
        )

    def table(self) -> str:
        """Every part; the rows marked * add up to the training total, and the peak is the larger of
        that and the memory while loading."""
        k = self.checkpointed_layers
        activations = {0: "activations, no checkpointing", self.layers: "activations, gradient checkpointing"}
        activations.setdefault(k, f"activations, {k} of {self.layers} layers checkpointed")
        rows = [
            ("weights (frozen base)", self.weights, True),
            ("trainable parameters", self.trainable_weights, True),
            ("gradients", self.gradients, True),
            ("optimizer states", self.optimizer, True),
            *((("layers gathered from their shards (FSDP)", self.gathered, True),) if self.gathered else ()),
            *((name, self.activations(layers), layers == k) for layers, name in activations.items()),
            ("output-head logits", self.logits, True),
            ("runtime (CPU process)" if self.runtime else "runtime (not counted on GPU)", self.runtime, True),
        ]
        lines = [f"{'part':46} {'GiB':>8}"] + [
            f"{name + (' *' if counted else ''):46} {value / GiB:8.3f}" for name, value, counted in rows
        ]
        training = self.training_with(k)
        lines.append(f"{'training (the rows marked *)':46} {training / GiB:8.3f}")
        if self.loading:
            lines.append(f"{'loading (weights + runtime + the mapped file)':46} {self.while_loading / GiB:8.3f}")
        peak = "peak, " + ("while loading" if self.while_loading > training else "while training")
        lines.append(f"{peak:46} {self.total / GiB:8.3f}")
        return "\n".join(lines)


def estimate(
    config: PretrainedConfig,
    *,
    storage: Storage,
    compute_bytes: int,
    lora_r: int | None,
    target_modules: list[str] | None,
    batch_size: int,
    seq_len: int,
    shared_prefix: int = 0,
    learned_tokens: int | None = None,
    packed_tokens: int | None = None,
    checkpointed_layers: int = 0,
    optimizer: Optimizer = "adamw",
    on_cpu: bool = True,
    devices: int = 1,
    sharded: bool = False,
) -> Estimate:
    """Memory of one training run; ``lora_r=None`` means a full fine-tune (every weight trained, in
    the compute dtype; LoRA matrices are kept in float32). ``shared_prefix``: the tokens a batch
    computes once for all its rows, packed into one row (training.collate.shared_prefix_length).
    ``learned_tokens``: the positions of a batch whose logits the loss computes (ReplyTrainer
    projects only the learned ones); None counts every position, an upper bound.
    ``packed_tokens``: the longest packed row the data can make (the prefix plus the own tokens of
    its ``batch_size`` longest examples); None: ``batch_size`` examples of ``seq_len`` tokens.

    ``devices``: the processes of the run, each with ``batch_size`` examples per forward pass; the
    estimate is per device. ``sharded`` (FSDP, FULL_SHARD): each device keeps 1/devices of the
    weights, trainable parameters, gradients and optimizer state, and gathers whole layers while it
    computes them: the one it computes and the next, which it prefetches."""
    model = meta_model(config)
    total, frozen, trainable, in_layers = _weights(model, WEIGHT_BYTES[storage], compute_bytes, lora_r, target_modules)
    trained_bytes = 4 if lora_r is not None else compute_bytes
    layers = model_widths(config)[2]
    if not 0 <= checkpointed_layers <= layers:
        raise EstimateError(f"checkpointed_layers: {checkpointed_layers}, but the model has {layers} layers")
    tokens, layer_activations, layer_input = _activations(
        config, compute_bytes, batch_size, seq_len, shared_prefix, packed_tokens, on_cpu
    )
    share = devices if sharded else 1
    return Estimate(
        parameters=int(total),
        trainable=int(trainable),
        weights=frozen / share,
        trainable_weights=trainable * trained_bytes / share,
        gradients=trainable * trained_bytes / share,
        # AdamW keeps two moments in the parameter's dtype; 8-bit AdamW one byte each.
        optimizer=trainable * (2 * trained_bytes if optimizer == "adamw" else 2) / share,
        gathered=_gathered(frozen, in_layers, trainable * trained_bytes, layers, devices) if sharded else 0.0,
        devices=devices,
        layers=layers,
        layer_activations=layer_activations,
        layer_input=layer_input,
        logits=_logits(config, tokens, learned_tokens),
        runtime=CPU_RUNTIME_BYTES if on_cpu else 0.0,
        loading=_loading(config, total, frozen) if on_cpu else 0.0,
        checkpointed_layers=checkpointed_layers,
    )


def _gathered(frozen: float, in_layers: float, trained: float, layers: int, devices: int) -> float:
    """Bytes an FSDP device gathers from the other devices' shards: two layers (the one it computes
    and the next, prefetched), and what lies outside the layers (embeddings, head: gathered for the
    whole forward and backward pass)."""
    return ((frozen - in_layers) + 2 * (in_layers + trained) / layers) * (1 - 1 / devices)


def _loading(config: PretrainedConfig, total: float, frozen: float) -> float:
    """Bytes of the checkpoint file a CPU process maps while it loads (quantizing it, for NF4): those
    pages count in its resident memory until loading ends. A quantized checkpoint's file is about
    its quantized size."""
    if getattr(config, "quantization_config", None):
        return frozen
    stored = {"float32": 4, "float": 4}.get(
        str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32").removeprefix("torch."),
        2,
    )
    return total * stored


def _activations(
    config: PretrainedConfig,
    compute_bytes: int,
    batch_size: int,
    seq_len: int,
    shared_prefix: int,
    packed_tokens: int | None,
    on_cpu: bool,
) -> tuple[int, float, float]:
    """(tokens of the largest batch, what one layer keeps for backward when it is not checkpointed,
    what a checkpointed layer keeps: its input). A batch with a shared prefix is one packed row."""
    from training.collate import packed_row_length

    hidden, inner, _ = model_widths(config)
    rows, row_len = (
        (1, packed_tokens or packed_row_length(shared_prefix, batch_size, seq_len))
        if shared_prefix
        else (batch_size, seq_len)
    )
    tokens = rows * row_len
    per_layer_token = (ACTIVATION_H * hidden + ACTIVATION_I * inner) * compute_bytes
    scores = _attention_scores(config, rows, row_len, batch_size, seq_len, shared_prefix, on_cpu)
    return (
        tokens,
        tokens * per_layer_token + scores * _score_bytes(config, compute_bytes),
        tokens * hidden * compute_bytes,
    )


def _attention_scores(
    config: PretrainedConfig, rows: int, row_len: int, batch_size: int, seq_len: int, shared_prefix: int, on_cpu: bool
) -> int:
    """The attention probabilities one layer keeps, per head (0 on a GPU). On a CPU, training
    attention is the plain softmax(QK^T)V path (see load_base_model), which keeps them per head and
    query-key pair."""
    if not on_cpu:
        return 0
    text = text_config(config)
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "num_heads", 1)
    if shared_prefix and linear_packing(config, on_cpu):
        # Packed rows attend example by example (training.attention.packed_attention): the prefix
        # causally, each example's own tokens against the prefix and themselves.
        own = seq_len - shared_prefix
        return heads * (shared_prefix**2 + batch_size * own * (shared_prefix + own))
    return heads * rows * row_len**2


def _score_bytes(config: PretrainedConfig, compute_bytes: int) -> int:
    """Bytes per attention probability: in the compute dtype (inference.attention), or transformers'
    eager float32 softmax plus its compute-dtype copy."""
    from training.attention import GROUPED, training_attention

    text = text_config(config)
    return compute_bytes if training_attention(text) == GROUPED else 4 + compute_bytes


def _logits(config: PretrainedConfig, tokens: int, learned_tokens: int | None) -> float:
    """Bytes of the output head's float32 logits and their gradient, at the learned positions."""
    vocab = text_config(config).vocab_size
    return (tokens if learned_tokens is None else min(learned_tokens, tokens)) * vocab * 4 * 2


def _weights(
    model: torch.nn.Module,
    quantized_bytes: float,
    compute_bytes: int,
    lora_r: int | None,
    target_modules: list[str] | None,
) -> tuple[float, float, float, float]:
    """(parameters, bytes of the frozen weights, trainable parameters, bytes of the frozen block
    linear weights) of a meta model: its block linear layers stored at ``quantized_bytes`` per
    weight, the rest in the compute dtype, LoRA of rank ``lora_r`` on ``target_modules`` (None:
    every weight trained)."""
    import torch

    head = model.get_output_embeddings()
    head_weight = head.weight if head is not None else None
    total = frozen = trainable = in_layers = 0.0
    targets = set(target_modules or [])
    matched = set()
    for name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            n = param.numel()
            total += n
            if lora_r is None:
                continue
            is_block_linear = isinstance(module, torch.nn.Linear) and param is not head_weight and pname == "weight"
            frozen += n * (quantized_bytes if is_block_linear else compute_bytes)
            in_layers += n * quantized_bytes if is_block_linear else 0
        leaf = name.rsplit(".", 1)[-1]
        if lora_r is not None and isinstance(module, torch.nn.Linear) and leaf in targets:
            trainable += lora_r * (module.in_features + module.out_features)
            matched.add(leaf)
    if lora_r is not None and targets - matched:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise EstimateError(
            f"target_modules {sorted(targets - matched)} are not in this model; its linear layers: {', '.join(linear)}"
        )
    tied = head_weight is not None and head_weight is model.get_input_embeddings().weight
    total -= head_weight.numel() if tied else 0  # named_modules visits a tied weight twice
    return total, frozen, total if lora_r is None else trainable, in_layers
