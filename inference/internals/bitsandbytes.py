"""bitsandbytes' CPU inference layout for NF4 weights: its on/off flag, its packed format, and a
prompt path beside its kernel.

On its first no-grad forward in eval mode, a CPU ``Linear4bit`` repacks its weight for an AVX-512
kernel (decoding ~2.5x faster) that has no backward. A training run evaluates the base model before
its first step, and every later step then silently lost the gradient through the frozen weights
(found by comparing gradients before and after an evaluation). Training turns the repacking off; a
trained model turns it back on before it generates. On another bitsandbytes version the layer is
left as the library makes it.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from inference.internals import written_for

if TYPE_CHECKING:
    import torch

WRITTEN_FOR = "==0.50.*"
PREFILL_ROWS = 128  # from this many input rows on, dequantizing beats the CPU kernel (measured crossover ~100 rows)


def use_cpu_inference_layout(model: torch.nn.Module, allowed: bool) -> None:
    """Whether bitsandbytes may repack the model's NF4 weights into its CPU inference layout."""
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    if not layers or not written_for("bitsandbytes", WRITTEN_FOR, "the CPU inference layout of Linear4bit"):
        return
    from bitsandbytes.functional import has_avx512bf16
    from bitsandbytes.nn import Linear4bit

    for module in layers:
        module.support_avx512bf16_for_cpu = allowed and has_avx512bf16()
        module.__class__ = _prefill_linear4bit() if module.support_avx512bf16_for_cpu else Linear4bit


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
            if (
                x.requires_grad
                or not getattr(state, "packing_format_for_cpu", False)
                or x.numel() < PREFILL_ROWS * x.shape[-1]
            ):
                return super().forward(x)
            weight = dequantize_cpu_layout(self.weight.data, state)
            bias = None if self.bias is None else self.bias.to(weight.dtype)
            return torch.nn.functional.linear(x.to(weight.dtype), weight, bias).to(x.dtype)

    return PrefillLinear4bit


def pack_for_cpu(weight: torch.Tensor, state) -> tuple[torch.Tensor, object]:
    """bitsandbytes' own conversion into the CPU inference layout (pure torch: runs on any CPU)."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    return _convert_weight_packed_for_cpu(weight, state)


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
    weight = (
        values.view(n // 32, k // 2, 16, 2, 2).permute(0, 4, 2, 1, 3).reshape(n, k // state.blocksize, state.blocksize)
    )
    return (weight * state.absmax.t().reshape(n, k // state.blocksize, 1)).view(n, k)
