"""peft's LoRA layers from the inside: per-row adapter routing held across decoding steps, the
float32 copy of every LoRA input, and the dropout modules on those inputs.

On another peft version: the two panes decode in turn (``disable_adapter``, public), LoRA inputs
are copied to float32 as peft does, and the dropout is torch's.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING

from inference.internals import written_for

if TYPE_CHECKING:
    import torch

WRITTEN_FOR = "==0.21.*"


def rows_can_have_different_adapters(model: torch.nn.Module) -> bool:
    """Whether base and adapter rows can share one batch (peft's ``adapter_names``).

    peft implements it for its plain and bitsandbytes LoRA layers; a layer whose forward takes no
    keyword arguments (GPTQ's) cannot, and the two replies are then generated in turn.
    """
    from peft.tuners.lora import LoraLayer

    if not written_for("peft", WRITTEN_FOR, "PeftModel._enable_peft_forward_hooks"):
        return False

    def takes_adapter_names(module) -> bool:
        params = inspect.signature(module.forward).parameters.values()
        return any(p.name == "adapter_names" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)

    return all(takes_adapter_names(m) for m in model.modules() if isinstance(m, LoraLayer))


def routed(model: torch.nn.Module, adapter_names: list[str] | None) -> contextlib.AbstractContextManager:
    """peft's per-row adapter routing, held for as long as a batch keeps its rows (only where
    rows_can_have_different_adapters).

    Passing ``adapter_names`` to every forward instead makes peft walk all modules twice per step
    to add and remove its hooks: measured 2-3 ms of a ~33 ms decoding step.
    """
    return model._enable_peft_forward_hooks(adapter_names=adapter_names) if adapter_names else contextlib.nullcontext()


def cast_lora_inputs(model: torch.nn.Module, enabled: bool) -> None:
    """Whether peft copies every LoRA input of a 4-bit layer to float32 (the adapter's dtype) and back.

    Under the autocast of training the adapter's matmuls run in the compute dtype on the input as
    it is, while its weights and optimizer state stay float32; generation outside autocast needs
    the copy back on. (``peft.helpers.disable_input_dtype_casting`` sets the same attribute, for
    the length of a ``with`` block; a training run and the model it leaves need it for longer.)
    """
    from peft.tuners.lora.bnb import Linear4bit

    if not written_for("peft", WRITTEN_FOR, "LoraLayer.cast_input_dtype_enabled"):
        return
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.cast_input_dtype_enabled = enabled


def replace_lora_dropout(model: torch.nn.Module, make: Callable[[float], torch.nn.Module]) -> None:
    """Swap each torch Dropout on a LoRA input for ``make(p)``."""
    import torch

    if not written_for("peft", WRITTEN_FOR, "LoraLayer.lora_dropout"):
        return
    for module in model.modules():
        for name, dropout in (getattr(module, "lora_dropout", None) or {}).items():
            if isinstance(dropout, torch.nn.Dropout):
                module.lora_dropout[name] = make(dropout.p)


FSDP_WRAPPER = "_fsdp_wrapped_module."


def adapter_state_dicts_under_fsdp() -> None:
    """peft's adapter state dicts under FSDP (the checkpoints of an FSDP run, which the Trainer saves
    and loads through peft): two fixes, for peft 0.21.

    - Saving: peft finds an adapter's keys from the names of its modules, with FSDP's wrapper
      prefix removed from the front of each name only. With each decoder layer its own FSDP unit
      (the TRANSFORMER_BASED_WRAP of the FSDP-QLoRA recipe) the names hold it inside as well, no
      key matched, and every checkpoint held an adapter of no weights.
    - Loading: peft decides whether the keys keep their ``base_model.model.`` from the names of the
      model's parameters, which FSDP's flat parameters hide, so it dropped it and no key matched:
      a resumed run, and the best checkpoint loaded at the end, went on from untrained LoRA
      weights. Loaded into the module FSDP wraps, the names are the model's own.
    """
    import peft
    from peft.tuners import tuners_utils
    from torch.distributed.fsdp import FullyShardedDataParallel

    if not written_for("peft", WRITTEN_FOR, "tuners_utils._get_tuner_state_dict_key_prefixes"):
        return
    prefixes, load = tuners_utils._get_tuner_state_dict_key_prefixes, peft.set_peft_model_state_dict
    if getattr(prefixes, "under_fsdp", False):
        return

    def of_every_unit(model, adapter_name=None):
        return {p.replace(FSDP_WRAPPER, "") for p in prefixes(model, adapter_name)}

    def into_the_wrapped_module(model, *args, **kwargs):
        return load(model.module if isinstance(model, FullyShardedDataParallel) else model, *args, **kwargs)

    of_every_unit.under_fsdp = True
    tuners_utils._get_tuner_state_dict_key_prefixes = of_every_unit
    peft.set_peft_model_state_dict = into_the_wrapped_module  # accelerate imports it from peft when it loads
