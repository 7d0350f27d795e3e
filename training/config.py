"""The training configuration: one typed dataclass; a YAML recipe sets values, CLI flags win.

Every field's help text lives in its metadata and becomes the ``--help`` of ``python -m training.run``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from errors import ReplytuneError
from inference.default_model import DEFAULT_BASE_MODEL, ROOT
from inference.loading import BACKENDS, QUANTIZATIONS, Backend, Quantization

CONFIGS_DIR = ROOT / "training" / "configs"


class ConfigError(ReplytuneError, ValueError):
    """A configuration that cannot run, with every problem listed."""


@dataclass
class TrainConfig:
    # --- data and prompt
    data: list[str] = field(
        default_factory=lambda: [str(ROOT / "data" / "train.jsonl")],
        metadata={
            "help": (
                "training pairs: one or more .jsonl, .json or .csv files or globs "
                "(merged in order, duplicates across files removed), or a Hub dataset id"
            )
        },
    )
    eval_data: str | None = field(
        default=str(ROOT / "data" / "heldout.jsonl"),
        metadata={"help": "held-out pairs; 'none' splits --data instead (see --eval-fraction)"},
    )
    eval_fraction: float = field(
        default=0.12, metadata={"help": "share of --data held out for evaluation when there is no --eval-data"}
    )
    persona: str = field(
        default=str(ROOT / "prompts" / "persona.txt"),
        metadata={"help": "persona instruction with one {comment} slot; copied into the adapter"},
    )
    max_rows: int | None = field(
        default=None, metadata={"help": "train on a seeded random subset of this many rows of --data (all when unset)"}
    )
    max_length: int = field(
        default=512,
        metadata={"help": "longest example in tokens; longer comments are cut (and counted), replies never"},
    )
    examples_in_prompt: int = field(
        default=0,
        metadata={
            "help": "put this many of the creator's other training pairs (the most similar, BM25, as the app's "
            "examples panes retrieve them) before each comment as earlier turns, and show as many in the "
            "adapter's examples panes; 0: the comment alone"
        },
    )
    comment_field: str | None = field(
        default=None,
        metadata={
            "help": "the column or key holding the comment, when the file's names are not recognised (or two could be)"
        },
    )
    response_field: str | None = field(
        default=None, metadata={"help": "the column or key holding the creator's reply, likewise"}
    )
    signature: str | None = field(
        default=None,
        metadata={
            "help": (
                "append this sign-off (e.g. ' –Maya', as written in the "
                "persona) to every reply that does not already end with it"
            )
        },
    )
    # --- model
    base_model: str = field(
        default=DEFAULT_BASE_MODEL,
        metadata={"help": f"local model folder or Hub id; '{DEFAULT_BASE_MODEL}' is the bundled SmolLM2-135M-Instruct"},
    )
    quantization: Quantization = field(
        default="nf4",
        metadata={"help": "how the frozen base is stored: nf4 (QLoRA), int8 (LLM.int8) or none (full precision)"},
    )
    method: Literal["lora", "full"] = field(
        default="lora",
        metadata={"help": "lora trains a small adapter; full trains every weight of an unquantized base"},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "run code shipped with a Hub model (only for models you trust)"}
    )
    backend: Backend = field(
        default="auto",
        metadata={
            "help": (
                "what writes the replies of the voice evaluation: auto (llama.cpp "
                "on a CPU, transformers on a GPU), llama.cpp or transformers"
            )
        },
    )
    # --- LoRA
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={"help": "module names that get LoRA adapters"},
    )
    # --- optimisation
    epochs: float = field(
        default=5.0, metadata={"help": "passes over the training data (early stopping may end sooner)"}
    )
    learning_rate: float = field(default=3e-4, metadata={"help": "peak learning rate"})
    batch_size: int = field(default=8, metadata={"help": "examples per forward pass"})
    grad_accum: int = field(
        default=1,
        metadata={
            "help": (
                "forward passes whose gradients are summed into one update (effective batch = batch_size x grad_accum)"
            )
        },
    )
    warmup_ratio: float = field(default=0.05, metadata={"help": "share of updates spent warming up the learning rate"})
    optim: Literal["adamw_torch", "paged_adamw_8bit"] = field(
        default="adamw_torch",
        metadata={"help": "optimizer; paged_adamw_8bit (bitsandbytes, GPU) keeps its states in 8 bits"},
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "recompute every layer's activations in the backward pass: least memory, about 30% slower"},
    )
    memory_limit_gib: float | None = field(
        default=None,
        metadata={
            "help": (
                "checkpoint only as many layers as keep the memory estimate under this many GiB "
                "(unset: 90% of the GPU; on a CPU half the memory available when the run starts)"
            )
        },
    )
    early_stopping_patience: int = field(
        default=1, metadata={"help": "epochs without a better eval loss before training stops"}
    )
    save_total_limit: int = field(
        default=2, metadata={"help": "checkpoints kept on disk, the best and the latest among them; never more"}
    )
    seed: int = field(default=42, metadata={"help": "seed for the split, LoRA init and data order"})
    # --- run
    output_dir: str = field(
        default=str(ROOT / "outputs" / "adapter"),
        metadata={"help": "where the adapter, summary, plots, logs and checkpoints go"},
    )
    resume: bool = field(default=False, metadata={"help": "continue from the last complete checkpoint in --output-dir"})
    doctor: bool = field(
        default=True,
        metadata={"help": "check the rendered examples for silent mistakes before training (--no-doctor skips it)"},
    )
    check_data: bool = field(
        default=False, metadata={"help": "validate the data, print its summary and exit (no model, no training)"}
    )
    push_to_hub: str | None = field(
        default=None,
        metadata={
            "help": "Hub repo id to upload the adapter and model card to (token from HF_TOKEN or the cached login)"
        },
    )
    private: bool = field(default=False, metadata={"help": "create the Hub repo as private"})

    def __post_init__(self) -> None:
        if isinstance(self.data, str):  # one source, as a recipe or a caller names it
            self.data = [self.data]
        if isinstance(self.eval_data, str) and self.eval_data.lower() in ("", "none", "null"):
            self.eval_data = None
        # 2 and 2.0 are the same setting; without this, a YAML "epochs: 2" and "--epochs 2" would
        # hash differently and --resume would refuse.
        for f in dataclasses.fields(self):
            if (
                f.type in ("float", float)
                and isinstance(getattr(self, f.name), int)
                and not isinstance(getattr(self, f.name), bool)
            ):
                setattr(self, f.name, float(getattr(self, f.name)))
        problems = []
        if self.backend not in BACKENDS:
            problems.append(f"backend: must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.quantization not in QUANTIZATIONS:
            problems.append(f"quantization: must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        for name in ("lora_r", "lora_alpha", "batch_size", "grad_accum", "max_length"):
            if getattr(self, name) < 1:
                problems.append(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.method == "full" and self.quantization != "none":
            problems.append(
                f"method full and quantization {self.quantization}: a quantized base "
                "cannot be trained directly; use --quantization none, or --method lora"
            )
        if self.memory_limit_gib is not None and self.memory_limit_gib <= 0:
            problems.append(f"memory_limit_gib: must be positive, got {self.memory_limit_gib}")
        if self.max_rows is not None and self.max_rows < 1:
            problems.append(f"max_rows: must be at least 1, got {self.max_rows}")
        if self.save_total_limit < 2:
            problems.append(
                "save_total_limit: must be at least 2 (the best and the "
                f"latest checkpoint are both kept), got {self.save_total_limit}"
            )
        if self.examples_in_prompt < 0:
            problems.append(f"examples_in_prompt: must be 0 (off) or more, got {self.examples_in_prompt}")
        if self.max_length < 32:
            problems.append(f"max_length: {self.max_length} leaves no room for the prompt; use at least 32")
        if self.epochs <= 0:
            problems.append(f"epochs: must be positive, got {self.epochs}")
        if not 0 < self.learning_rate < 1:
            problems.append(f"learning_rate: must be in (0, 1), got {self.learning_rate}")
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"lora_dropout: must be in [0, 1), got {self.lora_dropout}")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if self.eval_data is None and not 0 < self.eval_fraction < 0.5:
            problems.append(f"eval_fraction: must be in (0, 0.5), got {self.eval_fraction}")
        if self.early_stopping_patience < 0:
            problems.append(f"early_stopping_patience: must be 0 (off) or more, got {self.early_stopping_patience}")
        if not self.data:
            problems.append("data: name at least one file, glob or Hub dataset id")
        if not self.target_modules:
            problems.append("target_modules: name at least one module, e.g. q_proj")
        if self.private and not self.push_to_hub:
            problems.append("private: only applies with push_to_hub REPO_ID")
        if self.check_data and self.resume:
            problems.append("check_data and resume: --check-data never trains, so there is nothing to resume")
        if problems:
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))

    def training_hash(self) -> str:
        """Hash of every setting that changes what is trained.

        Paths are left out (the data hash covers what the files hold), and so is where the output
        goes, whether it is pushed, or the memory limit (checkpointed layers compute the same).
        """
        skip = {
            "data",
            "eval_data",
            "persona",
            "output_dir",
            "resume",
            "check_data",
            "doctor",
            "push_to_hub",
            "private",
            "memory_limit_gib",
            "backend",
        }
        values = {
            k: v
            for k, v in dataclasses.asdict(self).items()
            if k not in skip and not (k in ADDED_LATER and v == ADDED_LATER[k])
        }
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


# Settings added after adapters were trained and shipped: hashed only when they differ from these
# defaults, so the hash recorded by an older run still matches the same settings today.
ADDED_LATER: dict[str, Any] = {
    "examples_in_prompt": 0,
    "method": "lora",
    "max_rows": None,
    "optim": "adamw_torch",
    "comment_field": None,
    "response_field": None,
    "signature": None,
}

Source = Literal["default", "config", "flag"]


def load_config(argv: list[str] | None = None) -> tuple[TrainConfig, dict[str, Source]]:
    """Parse ``--config FILE`` and flags into a TrainConfig, and say where each value came from."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    config_path = args.pop("config", None)
    values: dict[str, Any] = {}
    sources: dict[str, Source] = {f.name: "default" for f in dataclasses.fields(TrainConfig)}
    if config_path:
        values.update(read_yaml(Path(config_path)))
        sources.update(dict.fromkeys(values, "config"))
    values.update(args)  # argparse.SUPPRESS leaves only the flags that were given
    sources.update(dict.fromkeys(args, "flag"))
    return TrainConfig(**values), sources


def read_yaml(path: Path) -> dict[str, Any]:
    """A recipe file's values; unknown keys and wrong types fail with the key and the file named."""
    if not path.is_file():
        candidate = CONFIGS_DIR / f"{path}.yaml"
        if not candidate.is_file():
            recipes = ", ".join(sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml")))
            raise ConfigError(f"{path}: config file not found (recipes in {CONFIGS_DIR}: {recipes})")
        path = candidate
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of setting: value, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    hints = typing.get_type_hints(TrainConfig)
    problems = []
    for key, value in data.items():
        if key == "data" and isinstance(value, str):
            value = data[key] = [value]  # a recipe names its one data source as a string
        if key not in fields:
            problems.append(f"unknown key {key!r}")
        elif not _matches(value, hints[key]):
            problems.append(f"{key}: expected {_type_name(hints[key])}, got {value!r}")
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems) + f" (known keys: {', '.join(fields)})")
    return data


def build_parser() -> argparse.ArgumentParser:
    """transformers' HfArgumentParser over TrainConfig (a flag per field, ``--no-doctor`` for a
    setting that is on by default), with every default suppressed so that only the flags given
    come back, and shown in the help instead."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(
        TrainConfig,
        prog="python -m training.run",
        description="Fine-tune a LoRA adapter so a model answers comments in a creator's voice.",
    )
    parser.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        help="YAML recipe (a path, or a name from training/configs/); flags override it",
    )
    for f in dataclasses.fields(TrainConfig):
        if f.type in ("bool", bool) and f.default is False:  # HfArgumentParser adds --no-X only for a default of True
            parser.add_argument(
                f"--no-{f.name.replace('_', '-')}",
                dest=f.name,
                action="store_false",
                default=argparse.SUPPRESS,
                help=argparse.SUPPRESS,
            )
    for action in parser._actions:
        if action.dest in TrainConfig.__dataclass_fields__ and action.default is not argparse.SUPPRESS:
            if action.help is not None and action.const is not False:  # --no-X shares its field's default
                action.help = (action.help + f" (default: {action.default})").replace(
                    "%", "%%"
                )  # argparse %-formats help
            action.default = argparse.SUPPRESS
    return parser


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(hint))
    if origin is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    return getattr(hint, "__name__", str(hint))
