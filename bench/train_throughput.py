"""Training throughput: the original article's recipe vs `python -m training.run`, same data, model
and epochs, each in its own process, plus the machine's matmul ceiling in the dtype training computes in.

    python -m bench.train_throughput [--epochs 2] [--data realistic short]
    python -m bench.train_throughput --mistral-7b     # on a GPU: a random-weight Mistral-7B

``--data``: the sample at realistic lengths (data/, comments median ~150 characters with a tail
past 600) and the short sample it grew from (data/short/, comments median ~30), each compared in
the same run on the same machine.

The reference is the article's recipe as written (bench/article_recipe.py), on the embedded default
with NF4: transformers ``Trainer`` + ``DataCollatorForLanguageModeling`` (dynamic padding, loss on
every token, pad = EOS), gradient checkpointing, LoRA r=8 alpha=32 on q_proj, batch 4, grad. acc. 4,
lr 2e-4, computing in bfloat16 where the CPU has it natively and in float32 elsewhere (as the
article's recipe would run there). Both runs are scored the same way afterwards: the held-out loss
on reply tokens, with replytune's renderer.

``--mistral-7b`` runs the same comparison on Mistral-7B-Instruct-v0.2's architecture (its shipped
config.json, random weights: memory and speed do not depend on the values, and nothing is
downloaded) with NF4, LoRA r=16 on q/k/v/o/gate, max length 512, batch 4, as the speed issue asks.
It needs a tokenizer: the embedded SmolLM2's (``--tokenizer`` names another folder), so the
vocabulary is 49,152 instead of Mistral's 32,000. Held-out losses are not scored there (random
weights: they say nothing). Prints a Markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from bench.article_recipe import LoraShape
from inference.default_model import ROOT

MISTRAL = "mistralai/Mistral-7B-Instruct-v0.2"
DATA_SETS = {"realistic": ROOT / "data", "short": ROOT / "data" / "short"}  # each holds train.jsonl and heldout.jsonl


def flop_per_token(model_config) -> float:
    """The speed issue's convention: a LoRA step costs about 6 FLOP per weight per token (forward,
    backward through the activations, and the weight-gradient share the 6N rule counts); the input
    embedding is a lookup, so it counts only when it is also the output head (tied)."""
    from training.architecture import meta_model

    model = meta_model(model_config)
    embedding = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is embedding
    return 6 * (sum(p.numel() for p in model.parameters()) - (0 if tied else embedding.numel()))


def matmul_ceiling_gflops(repeats: int = 20) -> float:
    """Matrix-product throughput of this machine's training device in the compute dtype (a
    training step's speed limit): bf16 where it is native, float32 on a CPU without it, where
    emulated bf16 would take many minutes to measure a ceiling no run uses."""
    import torch

    from inference.loading import compute_dtype

    cuda = torch.cuda.is_available()
    size = 8192 if cuda else 2048
    a = torch.randn(size, size, dtype=compute_dtype(), device="cuda" if cuda else "cpu")
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if cuda:
        torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def random_mistral(folder: Path, tokenizer_path: str) -> Path:
    """Mistral-7B-Instruct-v0.2's architecture with random bf16 weights, saved with a tokenizer so
    that training.run loads it like any model folder (and quantizes it to NF4 as it loads)."""
    import torch
    from transformers import AutoModelForCausalLM

    from inference.loading import load_tokenizer
    from training.architecture import read_model_config

    tokenizer = load_tokenizer(tokenizer_path)
    config = read_model_config(MISTRAL)
    config.vocab_size = len(tokenizer)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return folder


def held_out_loss(base_model: str, adapter: Path, heldout_file: Path) -> float:
    """Reply-token loss on a held-out file, measured the same way for every adapter."""
    from inference.engines import load_replier
    from training.data import load_pairs
    from training.evaluate import held_out_losses

    replier = load_replier(base_model, str(adapter), backend="transformers")  # the NF4 model that was trained
    return held_out_losses(replier, load_pairs(heldout_file), 512)["adapter"]


def compare(
    out: Path,
    epochs: float,
    base_model: str,
    lora: LoraShape,
    ours: dict[str, list[str]],
    common: list[str],
    folder: Path,
    score: bool,
) -> dict[str, dict]:
    """The reference and each of ``ours`` on one data set (``folder``'s train.jsonl and heldout.jsonl),
    each in its own process, so that peak memory is each run's own."""
    train_file, heldout_file = folder / "train.jsonl", folder / "heldout.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    rows = {"reference (article recipe)": reference_process(out, epochs, base_model, lora, train_file)}
    print(rows["reference (article recipe)"], flush=True)
    for name, flags in ours.items():
        eval_flags = [] if "--eval-data" in common else ["--eval-data", str(heldout_file)]
        rows[name] = training_run_process(
            name,
            [*flags, *common, "--data", str(train_file)],
            eval_flags,
            epochs,
            out / name.replace(" ", "_").replace(",", ""),
        )
        print(rows[name], flush=True)
    for r in rows.values():
        r["loss"] = held_out_loss(base_model, r["adapter"], heldout_file) if score else None
    return rows


def reference_process(out: Path, epochs: float, base_model: str, lora: LoraShape, train_file: Path) -> dict:
    """The article's recipe (bench.article_recipe) in a child process."""
    ref = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.article_recipe",
            "--out",
            str(out),
            "--epochs",
            str(epochs),
            "--base-model",
            base_model,
            "--lora",
            json.dumps(asdict(lora)),
            "--train-file",
            str(train_file),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if ref.returncode:
        raise SystemExit(f"the reference run failed:\n{ref.stderr[-3000:]}")
    return {**json.loads(ref.stdout.strip().splitlines()[-1]), "adapter": out / "reference"}


def training_run_process(name: str, flags: list[str], eval_flags: list[str], epochs: float, run_dir: Path) -> dict:
    """`python -m training.run FLAGS` in a child process: its speed, peak memory and memory plan."""
    cmd = [
        sys.executable,
        "-m",
        "training.run",
        *flags,
        "--early-stopping-patience",
        "0",
        "--epochs",
        str(epochs),
        "--output-dir",
        str(run_dir),
        *eval_flags,
    ]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"{name} failed:\n{run.stderr[-3000:]}")
    summary = json.loads((run_dir / "training_summary.json").read_text())
    plan = [
        line
        for line in run.stdout.splitlines()
        if line.startswith(("memory limit:", "gradient checkpointing:", "batches:"))
    ]
    return {
        "tokens_per_s": summary["tokens_per_second"],
        "seconds": summary["wall_seconds"],
        "peak_gib": summary["peak_memory_gib"],
        "adapter": run_dir,
        "plan": plan,
    }


def print_table(rows: dict[str, dict], per_token: float, ceiling: float) -> None:
    base = rows["reference (article recipe)"]["tokens_per_s"]
    print(
        "| run | real tokens/s | x reference | share of the matmul "
        "ceiling | peak memory | held-out loss (reply tokens) |"
    )
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        share = r["tokens_per_s"] * per_token / (ceiling * 1e9)
        loss = "n/a (random weights)" if r["loss"] is None else f"{r['loss']:.4f}"
        print(
            f"| {name} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base:.2f} "
            f"| {share:.0%} | {r['peak_gib']:.2f} GiB | {loss} |"
        )
    for name, r in rows.items():
        for line in r.get("plan", []):
            print(f"{name}: {line}")


def main() -> None:
    args = _parser().parse_args()
    from inference.default_model import DEFAULT_BASE_MODEL
    from training.architecture import read_model_config

    out = Path(tempfile.mkdtemp(prefix="replytune-bench-"))
    if args.mistral_7b:
        base_model, lora, ours, common = mistral_runs(out, args.tokenizer or DEFAULT_BASE_MODEL)
    else:
        base_model, lora, common = DEFAULT_BASE_MODEL, LoraShape(), []
        ours = {
            "training.run, article hyperparameters, no checkpointing": [
                "--config",
                "article",
                "--no-gradient-checkpointing",
            ],
            "training.run, default (memory limit from the machine)": [],
        }
    ceiling = matmul_ceiling_gflops()
    per_token = flop_per_token(read_model_config(base_model))
    results = {
        name: compare(
            out / name, args.epochs, base_model, lora, ours, common, DATA_SETS[name], score=not args.mistral_7b
        )
        for name in args.data
    }
    print_machine(args.epochs, ceiling, per_token)
    for name, rows in results.items():
        print(f"\n{name} set ({DATA_SETS[name].relative_to(ROOT)}/train.jsonl):\n")
        print_table(rows, per_token, ceiling)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument(
        "--data",
        nargs="+",
        choices=tuple(DATA_SETS),
        default=list(DATA_SETS),
        help="the data sets to compare on (default: both)",
    )
    parser.add_argument(
        "--mistral-7b", action="store_true", help="compare on a random-weight Mistral-7B (needs a GPU with ~16 GB)"
    )
    parser.add_argument(
        "--tokenizer", default=None, help="with --mistral-7b: a tokenizer folder (default: the embedded SmolLM2's)"
    )
    return parser


def mistral_runs(out: Path, tokenizer: str) -> tuple[str, LoraShape, dict[str, list[str]], list[str]]:
    """--mistral-7b: the random-weight model, its LoRA, the training.run variants and their common flags."""
    base_model = str(random_mistral(out / "mistral-7b-random", tokenizer))
    lora = LoraShape(r=16, alpha=32, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"])
    # The voice evaluation after training generates replies: 4 held-out comments are enough for
    # random weights, which never stop on their own.
    eval_data = out / "heldout-4.jsonl"
    eval_data.write_text("".join((ROOT / "data" / "heldout.jsonl").read_text().splitlines(keepends=True)[:4]))
    ours = {
        "training.run, same LoRA, default (limit: 90% of the GPU)": [],
        "training.run, same LoRA, --memory-limit-gib 9": ["--memory-limit-gib", "9"],
        "training.run, same LoRA, --gradient-checkpointing": ["--gradient-checkpointing"],
    }
    common = [
        "--base-model",
        base_model,
        "--eval-data",
        str(eval_data),
        *lora.flags(),
        "--batch-size",
        "4",
        "--grad-accum",
        "4",
        "--learning-rate",
        "2e-4",
        "--max-length",
        "512",
        "--no-doctor",
    ]
    return base_model, lora, ours, common


def print_machine(epochs: float, ceiling: float, per_token: float) -> None:
    """The date, the device, the libraries, and the compute the table's shares are of."""
    from inference.loading import compute_dtype
    from training.report import cpu_flags, environment

    env = environment()
    device = env["gpu"] or f"{env['cpu']}, {env['cores']} cores, CPU flags: {cpu_flags()}"
    print(
        f"{time.strftime('%Y-%m-%d')}, {device}, torch {env['libraries']['torch']}, "
        f"transformers {env['libraries']['transformers']}, peft "
        f"{env['libraries']['peft']}, bitsandbytes {env['libraries']['bitsandbytes']}"
    )
    print(
        f"{epochs:g} epochs; {str(compute_dtype()).removeprefix('torch.')} "
        f"matmul ceiling {ceiling:.0f} GFLOP/s; {per_token / 1e9:.2f} GFLOP per token"
    )


if __name__ == "__main__":
    main()
