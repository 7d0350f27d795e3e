"""Model loading and quantization: the one place that calls ``from_pretrained``.

Training and the app both come here, so the base model is loaded the same way for both: NF4 4-bit
with double quantization (QLoRA's recipe) by default, or full precision. A checkpoint that is already
quantized (a GPTQ model, say) keeps its own quantization; it needs the optional GPTQ extra.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from inference.default_model import DEFAULT_BASE_MODEL, default_model_dir

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

Quantization = Literal["nf4", "int8", "none"]
QUANTIZATIONS: tuple[Quantization, ...] = ("nf4", "int8", "none")
Backend = Literal["auto", "llama.cpp", "transformers"]
BACKENDS: tuple[Backend, ...] = ("auto", "llama.cpp", "transformers")


def resolve_backend(backend: Backend, base_model: str) -> Literal["llama.cpp", "transformers"]:
    """``auto``: llama.cpp on a CPU (its kernels decode several times faster there than torch's),
    transformers on a GPU and for a GPTQ base (llama.cpp cannot read GPTQ weights)."""
    if backend != "auto":
        return backend
    import torch

    if torch.cuda.is_available():
        return "transformers"
    from inference.gguf_convert import is_gptq

    return "transformers" if is_gptq(local_model_dir(base_model)) else "llama.cpp"


# oneDNN, behind torch's bfloat16 CPU matmuls, keeps a compiled kernel for every shape it has met,
# up to 1,024 by default. Every batch width of a training run and every prompt length in the app is
# a new shape: those kernels grew the default recipe's peak from 2.6 to 3.6 GiB over two epochs.
# A training step and a reply reuse a few shapes of their own, so 32 kept the same speed.
ONEDNN_KERNEL_CACHE = 32


def is_seq2seq(name: str, trust_remote_code: bool = False) -> bool:
    """Whether the model is an encoder-decoder (T5, BART): it reads the comment and writes the reply
    with separate stacks, and is trained on input -> target pairs rather than a chat template."""
    from transformers import AutoConfig

    return bool(getattr(AutoConfig.from_pretrained(resolve_base_model(name), trust_remote_code=trust_remote_code), "is_encoder_decoder", False))


def resolve_base_model(name: str) -> str:
    """A local folder or Hub id as given; the embedded default's name becomes its cached folder."""
    return str(default_model_dir()) if name == DEFAULT_BASE_MODEL else name


def local_model_dir(name: str) -> Path:
    """A folder holding the model's files: a local folder as given, the embedded default's cached one,
    or a Hub model's snapshot (downloaded by huggingface_hub, the one step here that needs the network)."""
    path = Path(resolve_base_model(name))
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name))


def compute_dtype() -> torch.dtype:
    """bfloat16 where the hardware computes it natively (recent x86 CPUs, Ampere+ GPUs), else float32.

    Emulated bfloat16 is several times slower than float32, so it is only used where it is native.
    """
    import torch

    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


def unwrapped(model: PreTrainedModel) -> PreTrainedModel:
    """The transformers model under peft's wrapper (itself when there is none): its LoRA layers are
    peft's, so calling it runs the adapter while skipping the wrapper's per-call work."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_base_model(name), trust_remote_code=trust_remote_code)
    # A pad token equal to EOS is harmless to replytune's own collator and generation (both track
    # real lengths), but other tools mask every EOS out of the labels then; give pad its own id
    # when the vocabulary has a spare one.
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        if tokenizer.unk_token is not None and tokenizer.unk_token_id not in (tokenizer.eos_token_id, tokenizer.bos_token_id):
            tokenizer.pad_token = tokenizer.unk_token
        elif tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(
    name: str,
    quantization: Quantization = "nf4",
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    for_training: bool = False,
) -> PreTrainedModel:
    """Load a causal LM for training or generation.

    With ``nf4`` the linear layers are stored in 4-bit NF4 and computed in ``dtype`` (default:
    :func:`compute_dtype`), and embeddings and norms are kept in ``dtype``; ``int8`` stores them in
    LLM.int8 8-bit. With ``none`` the model is loaded in full precision (float32) unless ``dtype``
    says otherwise. Encoder-decoder models (T5) load as seq2seq LMs.
    """
    # Read by oneDNN when it compiles its first kernel, so before the model runs; a value the user
    # set wins.
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_KERNEL_CACHE))
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, BitsAndBytesConfig

    path = resolve_base_model(name)
    dtype = dtype or (torch.float32 if quantization == "none" else compute_dtype())
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    kwargs: dict = {"dtype": dtype, "trust_remote_code": trust_remote_code, "use_safetensors": True}
    if getattr(config, "quantization_config", None):
        method = config.quantization_config.get("quant_method", "?")
        logger.info("%s is already quantized (%s); keeping its quantization", name, method)
        if for_training and method == "gptq":
            from transformers import GPTQConfig

            # gptqmodel's default CPU kernel is inference-only (it refuses .train()); ask for one that trains.
            kwargs["quantization_config"] = GPTQConfig.from_dict({**config.quantization_config, "backend": "auto_trainable"})
        if torch.cuda.is_available():
            kwargs["device_map"] = "auto"
    elif quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": 0}
    elif quantization == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": 0}
    elif quantization != "none":
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if for_training and not torch.cuda.is_available():
        from inference.attention import training_attention

        # The plain softmax(QK^T)V path, in the fewest passes (see inference.attention).
        kwargs["attn_implementation"] = training_attention(config)
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    model = auto.from_pretrained(path, **kwargs)
    own_memory(model)
    use_cpu_inference_layout(model, not for_training)
    if for_training:
        # gptqmodel's CPU kernel picks its path on the first forward: in eval mode it switches for
        # good to a fused no-grad path, so a model evaluated before training (as every run is)
        # never trains its LoRA. Pin the training path.
        for module in model.modules():
            if hasattr(module, "linear_mode") and module.linear_mode is None:
                module.linear_mode = "train"
    return model


def own_memory(model: PreTrainedModel) -> None:
    """Copy the weights that are still views of the memory-mapped checkpoint file into memory of their own.

    transformers hands out unquantized tensors (embeddings, norms) as views of the mmapped
    safetensors file; one view keeps the whole mapping alive, with every page that loading read
    (quantizing the rest) in the process's resident memory: ~200 MB for SmolLM2, in the peak of
    every CPU run. A file-backed storage is the one that cannot be resized.
    """
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type == "cpu" and not tensor.untyped_storage().resizable():
            tensor.data = tensor.data.clone()


def use_cpu_inference_layout(model: PreTrainedModel, allowed: bool) -> None:
    """Whether bitsandbytes may repack NF4 weights into its CPU inference layout.

    On its first no-grad forward in eval mode, a CPU Linear4bit repacks its weight for a fast AVX-512
    kernel (decoding ~2.5x faster) that has no backward. A training run evaluates the base model
    before its first step, and every later step then silently lost the gradient through the frozen
    weights (found by comparing gradients before and after an evaluation). Training turns the
    repacking off; a trained model turns it back on before it generates.
    """
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    if not layers:
        return
    from bitsandbytes.functional import has_avx512bf16
    from bitsandbytes.nn import Linear4bit

    for module in layers:
        module.support_avx512bf16_for_cpu = allowed and has_avx512bf16()
        module.__class__ = _prefill_linear4bit() if module.support_avx512bf16_for_cpu else Linear4bit


PREFILL_ROWS = 128  # from this many input rows on, dequantizing beats the CPU kernel (measured crossover ~100 rows)


@functools.cache
def _prefill_linear4bit() -> type:
    """bitsandbytes' Linear4bit, with prompts (many rows at once) computed as one bf16 matmul.

    The AVX-512 kernel of the CPU inference layout is fast for decoding (1-2 rows) but computes a
    140-token prompt at ~115 GFLOP/s, 3x slower than dequantizing the weight and using torch's
    matmul; the prompt is what the first token waits for.
    """
    import torch
    from bitsandbytes.nn import Linear4bit

    class PrefillLinear4bit(Linear4bit):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            state = self.weight.quant_state
            if x.requires_grad or not getattr(state, "packing_format_for_cpu", False) or x.numel() < PREFILL_ROWS * x.shape[-1]:
                return super().forward(x)
            weight = dequantize_cpu_layout(self.weight.data, state)
            bias = None if self.bias is None else self.bias.to(weight.dtype)
            return torch.nn.functional.linear(x.to(weight.dtype), weight, bias).to(x.dtype)

    return PrefillLinear4bit


def dequantize_cpu_layout(packed: torch.Tensor, state) -> torch.Tensor:
    """The bf16 weight [N, K] of a 4-bit weight in bitsandbytes' CPU inference layout.

    That layout (``_convert_weight_packed_for_cpu``) stores tiles of 32 output rows x 2 inputs in 32
    bytes: byte j holds row j // 2 in its low nibble and row 16 + j // 2 in its high one, input
    j % 2 of the pair; the absmax is transposed to [K / blocksize, N] in bf16.
    """
    import torch

    n, k = state.shape
    code = state.code.to(torch.bfloat16)
    byte = torch.arange(256, device=packed.device)
    table = torch.stack([code[byte & 0xF], code[byte >> 4]], dim=1)  # byte -> (low value, high value)
    values = torch.nn.functional.embedding(packed.view(torch.uint8).reshape(-1).long(), table)  # [n * k / 2, 2]
    weight = values.view(n // 32, k // 2, 16, 2, 2).permute(0, 4, 2, 1, 3).reshape(n, k // state.blocksize, state.blocksize)
    return (weight * state.absmax.t().reshape(n, k // state.blocksize, 1)).view(n, k)


def load_adapter(model: PreTrainedModel, adapter: str | Path, trainable: bool = False) -> PeftModel:
    """Attach a LoRA adapter (local folder or Hub id) as the adapter named ``default``."""
    from peft import PeftModel

    local = Path(adapter)
    if local.exists() and not (local / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(
            f"{local}: no adapter_model.safetensors; replytune loads adapters from safetensors only"
        )
    return PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable)
