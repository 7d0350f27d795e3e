"""Whether this CPU computes bfloat16 natively, as torch's oneDNN backend decides it.

torch has no public question for it (``torch.backends.cpu.get_cpu_capability()`` says "AVX512" on
CPUs with and without AVX-512 BF16); oneDNN's own check is what its bf16 matmuls dispatch on. On
another torch version the answer is "no": float32, slower on a CPU with native bf16 and right on
every CPU, where emulated bf16 runs ~50x slower than float32.
"""

from __future__ import annotations

from inference.internals import written_for

WRITTEN_FOR = ">=2.13,<2.15"  # 2.13 (the default install) and 2.14 (the GPTQ extra's)


def cpu_computes_bf16() -> bool:
    import torch

    if not written_for("torch", WRITTEN_FOR, "torch.ops.mkldnn._is_mkldnn_bf16_supported"):
        return False
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
