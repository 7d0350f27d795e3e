"""Model loading and quantization: the one place that calls ``from_pretrained``.

Training and the app both come here, so the base model is loaded the same way for both: NF4 4-bit
with double quantization (QLoRA's recipe) by default, or full precision. A checkpoint that is already
quantized (a GPTQ model, say) keeps its own quantization; it needs the optional GPTQ extra.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from inference.default_model import DEFAULT_BASE_MODEL, default_model_dir
from inference.internals.bitsandbytes import use_cpu_inference_layout
from inference.internals.gptqmodel import keep_gptq_layers_trainable
from inference.internals.torch import cpu_computes_bf16

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

Quantization = Literal["nf4", "int8", "none"]
QUANTIZATIONS: tuple[Quantization, ...] = ("nf4", "int8", "none")
Engine = Literal["llama.cpp", "transformers"]  # what writes the replies (inference.engines picks one)
ENGINES: tuple[Engine, ...] = ("llama.cpp", "transformers")
Backend = Literal["auto", "llama.cpp", "transformers"]  # an engine, or auto: the one for this machine
BACKENDS: tuple[Backend, ...] = ("auto", *ENGINES)


# oneDNN, behind torch's bfloat16 CPU matmuls, keeps a compiled kernel for every shape it has met,
# up to 1,024 by default. Every batch width of a training run and every prompt length in the app is
# a new shape: those kernels grew the default recipe's peak from 2.6 to 3.6 GiB over two epochs.
# A training step and a reply reuse a few shapes of their own, so 32 kept the same speed.
ONEDNN_KERNEL_CACHE = 32


def is_seq2seq(name: str, trust_remote_code: bool = False) -> bool:
    """Whether the model is an encoder-decoder (T5, BART): it reads the comment and writes the reply
    with separate stacks, and is trained on input -> target pairs rather than a chat template."""
    from transformers import AutoConfig

    return bool(
        getattr(
            AutoConfig.from_pretrained(resolve_base_model(name), trust_remote_code=trust_remote_code),
            "is_encoder_decoder",
            False,
        )
    )


def resolve_base_model(name: str) -> str:
    """A local folder or Hub id as given; the embedded default's name becomes its cached folder."""
    return str(default_model_dir()) if name == DEFAULT_BASE_MODEL else name


def is_gptq(model_dir: Path) -> bool:
    """Whether the model in ``model_dir`` is a GPTQ checkpoint (its config.json says so)."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    return (config.get("quantization_config") or {}).get("quant_method") == "gptq"


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
    return torch.bfloat16 if cpu_computes_bf16() else torch.float32


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
        if tokenizer.unk_token is not None and tokenizer.unk_token_id not in (
            tokenizer.eos_token_id,
            tokenizer.bos_token_id,
        ):
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
    attn_implementation: str | None = None,
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
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    path = resolve_base_model(name)
    dtype = dtype or (torch.float32 if quantization == "none" else compute_dtype())
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    kwargs: dict = {"dtype": dtype, "trust_remote_code": trust_remote_code, "use_safetensors": True}
    quantization_config, alone = quantization_settings(name, config, quantization, dtype, for_training)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if torch.cuda.is_available() and alone is not None and (placement := device_map(alone)) is not None:
        kwargs["device_map"] = placement
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    model = auto.from_pretrained(path, **kwargs)
    own_memory(model)
    use_cpu_inference_layout(model, not for_training)
    if for_training:
        keep_gptq_layers_trainable(model)
    return model


def quantization_settings(
    name: str, config, quantization: Quantization, dtype: torch.dtype, for_training: bool
) -> tuple[Any, str | dict[str, int] | None]:
    """The ``quantization_config`` for from_pretrained (None: full precision), and where a GPU puts
    the model in a run of one process (None: transformers' default)."""
    from transformers import BitsAndBytesConfig

    if getattr(config, "quantization_config", None):
        method = config.quantization_config.get("quant_method", "?")
        logger.info("%s is already quantized (%s); keeping its quantization", name, method)
        if for_training and method == "gptq":
            from transformers import GPTQConfig

            # gptqmodel's default CPU kernel is inference-only (it refuses .train()); ask for one that trains.
            return GPTQConfig.from_dict({**config.quantization_config, "backend": "auto_trainable"}), "auto"
        return None, "auto"
    if quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            # FSDP shards parameters of one dtype into flat buffers: the packed 4-bit weights are
            # stored as that dtype too (the transformers/peft FSDP-QLoRA recipe).
            **({"bnb_4bit_quant_storage": dtype} if fsdp_enabled() else {}),
        ), {"": 0}
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True), {"": 0}
    if quantization != "none":
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    return None, None


def fsdp_enabled() -> bool:
    """Whether this process is one of an FSDP run: ``accelerate launch`` with an FSDP config sets
    ACCELERATE_USE_FSDP for each process it starts."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def device_map(alone: str | dict[str, int]) -> str | dict[str, int] | None:
    """Where a GPU process puts the model it loads: under FSDP nowhere yet (None: FSDP moves each
    shard to its GPU, and with accelerate's cpu_ram_efficient_loading only the main process reads
    the weights); in a run a launcher started (torchrun, accelerate launch) all of it on this
    process's own GPU, the one LOCAL_RANK names; else ``alone``."""
    if fsdp_enabled():
        return None
    if "LOCAL_RANK" in os.environ:
        return {"": int(os.environ["LOCAL_RANK"])}
    return alone


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


def load_adapter(model: PreTrainedModel, adapter: str | Path, trainable: bool = False) -> PeftModel:
    """Attach a LoRA adapter (local folder or Hub id) as the adapter named ``default``."""
    from peft import PeftModel

    local = Path(adapter)
    if local.exists() and not (local / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(
            f"{local}: no adapter_model.safetensors; replytune loads adapters from safetensors only"
        )
    return PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable)
