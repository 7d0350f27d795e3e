"""CPU tuning of a training process: how glibc returns memory, and a cheaper dropout mask."""

from __future__ import annotations

import ctypes
import os
import sys

import torch

# glibc serves an allocation from its heap once an mmapped one of that size has been freed (its
# mmap threshold rises, up to 32 MiB); a step's activations then land between longer-lived
# allocations, and the heap cannot give the freed space back: a default run's resident memory grew
# ~0.1 GiB per epoch, ~0.2 GiB above what it used. A fixed 1 MiB threshold returns each large
# tensor to the system when it is freed; replytune's bf16 steps ran at the same speed, while the
# article's recipe (float32 activations, recomputed) ran 30% slower with it, so it is set for
# training runs only (bench/RESULTS.md).
MMAP_THRESHOLD = 1 << 20
M_MMAP_THRESHOLD = -3  # mallopt's parameter number, from glibc's malloc.h


def return_large_blocks_to_the_system() -> None:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD for this process (glibc's own
    MALLOC_MMAP_THRESHOLD_ variable, when set, wins)."""
    if sys.platform != "linux" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    libc = ctypes.CDLL(None)
    if hasattr(libc, "mallopt"):  # glibc; other C libraries manage large blocks their own way
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


class FastDropout(torch.nn.Module):
    """Dropout whose mask comes from 16 random bits per element: keep with probability 1 - p.

    torch's CPU dropout draws one Bernoulli sample at a time; with a dropout on each of the 120 LoRA
    inputs of SmolLM2 that was a sixth of a training step. Sixteen bits of a 64-bit random word
    per element give p to within 1/65,536 (0.05 -> 0.050003) at a third of the cost.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.threshold = round(p * 65536) - 32768  # int16 values below it are dropped

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        words = torch.empty(x.numel() // 4 + 1, dtype=torch.int64, device=x.device).random_(-(2**63), None)
        bits = words.view(torch.int16)[: x.numel()].view(x.shape)
        return torch.where(bits >= self.threshold, x * (1 / (1 - self.p)), 0)

    def extra_repr(self) -> str:
        return f"p={self.p}"
