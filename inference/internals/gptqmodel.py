"""gptqmodel's CPU kernel: the path it picks on the first forward, and its loader's worker count.

Only the optional GPTQ extra installs gptqmodel (requirements-gptq.txt).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from inference.internals import written_for

if TYPE_CHECKING:
    import torch

WRITTEN_FOR = "==7.7.*"


def keep_gptq_layers_trainable(model: torch.nn.Module) -> None:
    """Pin gptqmodel's CPU layers to their training path.

    The kernel picks its path on the first forward: in eval mode it switches for good to a fused
    no-grad path, so a model evaluated before training (as every run is) never trains its LoRA.
    """
    layers = [m for m in model.modules() if hasattr(m, "linear_mode")]
    if not layers or not written_for("gptqmodel", WRITTEN_FOR, "QuantLinear.linear_mode"):
        return
    for module in layers:
        if module.linear_mode is None:
            module.linear_mode = "train"


def two_loader_workers() -> None:
    """gptqmodel 7.7 asks for 2 model-loader workers but gives its CPU pool (cores + 1) // 2 workers,
    which on a 2-core machine is 1 and fails with "only has 1"; 2 is what it needs."""
    if written_for("gptqmodel", WRITTEN_FOR, "gptqmodel._default_cpu_workers"):
        import gptqmodel

        gptqmodel._default_cpu_workers = lambda: 2
