"""The typed config of `python -m training.prefer` and its command line (as training/config.py is
for `python -m training.run`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from inference.default_model import ROOT
from inference.loading import BACKENDS, QUANTIZATIONS, Backend, Quantization
from training.config import ConfigError

# TRL DPOTrainer's loss types offered by --loss, each with the beta it was measured at (bench/RESULTS.md,
# "Preference tuning"): IPO's 0.5 asks for a 1-nat gap per token, DPO's 0.1 is TRL's own default.
DEFAULT_BETA = {"ipo": 0.5, "sigmoid": 0.1, "apo_zero": 0.1}


@dataclass
class PreferConfig:
    # --- what to prefer
    adapter: str | None = field(
        default=None,
        metadata={"help": "the adapter folder to tune (from python -m training.run); it is also the reference"},
    )
    preferences: list[str] = field(
        default_factory=list,
        metadata={
            "help": "files with comment, chosen, rejected columns (the app's flywheel/preferences.jsonl, .json or .csv)"
        },
    )
    self_pairs: bool = field(
        default=False,
        metadata={
            "help": (
                "pair the creator's real replies (chosen) with the adapter's own "
                "greedy drafts that loop, talk like an AI or run to the cap (rejected)"
            )
        },
    )
    data: list[str] = field(
        default_factory=list,
        metadata={
            "help": (
                "the comments and real replies of --self-pairs (default: "
                "the pairs the adapter was trained on, its examples.jsonl)"
            )
        },
    )
    max_rows: int | None = field(
        default=None,
        metadata={"help": "draft self-pairs for a seeded random subset of this many rows of --data (all when unset)"},
    )
    # --- model
    base_model: str | None = field(
        default=None,
        metadata={"help": "the adapter's base (default: the one its training summary or adapter config names)"},
    )
    quantization: Quantization = field(
        default="nf4", metadata={"help": "how the frozen base is stored: nf4 (QLoRA), int8 or none"}
    )
    backend: Backend = field(
        default="auto",
        metadata={
            "help": (
                "what drafts the self-pairs and writes the voice replies: "
                "auto (llama.cpp on a CPU), llama.cpp or transformers"
            )
        },
    )
    # --- optimisation
    epochs: float = field(default=3.0, metadata={"help": "passes over the preference pairs"})
    learning_rate: float = field(
        default=1e-4,
        metadata={
            "help": (
                "peak learning rate (issue 29's trial: 1e-4 over 3 "
                "epochs moved the greedy replies, 2e-5 over 1 did not)"
            )
        },
    )
    loss: str = field(
        default="ipo",
        metadata={
            "help": (
                "TRL's preference loss: ipo (IPO: the per-token log-ratio gap regressed to 1/(2 beta); "
                "replies without loops, and the most postable to a blind reader), sigmoid (DPO) or apo_zero "
                "(APO-zero: the chosen replies' log-ratio up and the drafts' down, each on its own)"
            )
        },
    )
    beta: float | None = field(
        default=None,
        metadata={
            "help": (
                "how far the adapter may move from the reference, lower: further "
                "(default: 0.5 for ipo, 0.1 for sigmoid and apo_zero)"
            )
        },
    )
    sft_weight: float = field(
        default=0.0,
        metadata={
            "help": (
                "weight of a supervised loss on the chosen reply added to the preference loss (RPO with "
                "sigmoid): keeps the creator's real replies likely while the drafts are pushed down; 0 is the "
                "preference loss alone"
            )
        },
    )
    batch_size: int = field(
        default=4, metadata={"help": "pairs per forward pass (each is two rows: chosen and rejected)"}
    )
    grad_accum: int = field(default=1, metadata={"help": "forward passes whose gradients are summed into one update"})
    max_length: int = field(
        default=512, metadata={"help": "longest prompt + reply in tokens; longer comments are cut, replies never"}
    )
    max_new_tokens: int = field(
        default=120,
        metadata={"help": "the token cap of the self-pair drafts (a draft that reaches it is 'cut at the cap')"},
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute every layer's activations in the backward pass"}
    )
    memory_limit_gib: float | None = field(
        default=None,
        metadata={"help": "checkpoint only as many layers as keep the memory estimate under this many GiB"},
    )
    save_total_limit: int = field(default=2, metadata={"help": "checkpoints kept on disk"})
    seed: int = field(default=42, metadata={"help": "seed for the subset and the data order"})
    # --- run
    output_dir: str = field(
        default=str(ROOT / "outputs" / "preferred"),
        metadata={"help": "where the tuned adapter, summary, card, logs and checkpoints go"},
    )
    resume: bool = field(default=False, metadata={"help": "continue from the last complete checkpoint in --output-dir"})
    doctor: bool = field(
        default=True, metadata={"help": "check the rendered pairs before training (--no-doctor skips it)"}
    )
    voice: bool = field(
        default=True,
        metadata={"help": "write the voice table of the held-out comments before and after (--no-voice skips it)"},
    )

    def __post_init__(self) -> None:
        for name in ("epochs", "learning_rate", "beta", "sft_weight"):
            if isinstance(getattr(self, name), int):
                setattr(self, name, float(getattr(self, name)))
        problems = []
        if not self.adapter:
            problems.append("adapter: name the adapter folder to tune with --adapter DIR")
        elif not (Path(self.adapter) / "adapter_config.json").is_file():
            problems.append(f"adapter: {self.adapter} is not an adapter folder (no adapter_config.json)")
        if not self.preferences and not self.self_pairs:
            problems.append("nothing to prefer: pass --preferences FILE..., --self-pairs, or both")
        if self.data and not self.self_pairs:
            problems.append("data: only applies with --self-pairs")
        if self.quantization not in QUANTIZATIONS:
            problems.append(f"quantization: must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        if self.backend not in BACKENDS:
            problems.append(f"backend: must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        for name in ("batch_size", "grad_accum", "max_new_tokens"):
            if getattr(self, name) < 1:
                problems.append(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.max_length < 32:
            problems.append(f"max_length: {self.max_length} leaves no room for the prompt; use at least 32")
        if self.epochs <= 0:
            problems.append(f"epochs: must be positive, got {self.epochs}")
        if not 0 < self.learning_rate < 1:
            problems.append(f"learning_rate: must be in (0, 1), got {self.learning_rate}")
        if self.loss not in DEFAULT_BETA:
            problems.append(f"loss: must be one of {', '.join(DEFAULT_BETA)}, got {self.loss!r}")
        if self.beta is None:
            self.beta = DEFAULT_BETA.get(self.loss)
        elif self.beta <= 0:
            problems.append(f"beta: must be positive, got {self.beta}")
        if self.sft_weight < 0:
            problems.append(f"sft_weight: must be 0 (the preference loss alone) or positive, got {self.sft_weight}")
        if self.max_rows is not None and self.max_rows < 1:
            problems.append(f"max_rows: must be at least 1, got {self.max_rows}")
        if self.save_total_limit < 1:
            problems.append(f"save_total_limit: must be at least 1, got {self.save_total_limit}")
        if problems:
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
        if self.base_model is None:
            from inference.export import base_model_of

            self.base_model = base_model_of(Path(self.adapter))

    def training_hash(self) -> str:
        """Every setting that changes what is trained (paths are in the data hash)."""
        skip = {
            "adapter",
            "preferences",
            "data",
            "output_dir",
            "resume",
            "doctor",
            "voice",
            "memory_limit_gib",
            "backend",
        }
        values = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def parse_config(argv: list[str] | None) -> tuple[PreferConfig, set[str]]:
    """The config, and the names of the settings given as flags."""
    import argparse

    from transformers import HfArgumentParser

    parser = HfArgumentParser(
        PreferConfig,
        prog="python -m training.prefer",
        description="Preference-tune an adapter on the creator's picks (TRL's DPOTrainer, IPO loss by default).",
    )
    for action in parser._actions:
        if action.dest in PreferConfig.__dataclass_fields__ and action.default is not argparse.SUPPRESS:
            if (
                action.help is not None and action.const is not False and "(default" not in action.help
            ):  # --no-X shares its default
                action.help = (action.help + f" (default: {action.default})").replace("%", "%%")
            action.default = argparse.SUPPRESS  # only the flags given come back
    given = vars(parser.parse_args(argv))
    return PreferConfig(**given), set(given)
