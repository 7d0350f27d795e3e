"""The memory estimate checked against measured peaks: each recipe runs for real on this CPU.

    python -m bench.memory_estimate [--gptq-python .venv-gptq/bin/python]

Each recipe's settings (quantization, LoRA targets, method, batch, checkpointing) run on a small
model in its own process, 1 epoch on 48 training rows; the estimate is the line that
`python -m training.run` prints before training (for batches as long as the data's longest
example), and the measured peak is the process's peak RSS from training_summary.json. The table
says whether they agree within 20%.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from inference.default_model import ROOT

SMOL = "embedded:SmolLM2-135M-Instruct"
# recipe, what runs it, extra flags; models stay small so a CPU can run them all in minutes.
CASES = [
    ("default", SMOL, []),
    ("article", SMOL, []),
    ("nf4-mistral-dolly", SMOL, ["--persona", str(ROOT / "prompts" / "persona.txt")]),
    ("full-qwen-guanaco", SMOL, ["--persona", str(ROOT / "prompts" / "persona.txt")]),
    ("flan-t5-lora", "t5", []),
]


def random_t5(folder: Path) -> Path:
    """A T5 of t5-small's shape (60M parameters, random weights) with SmolLM2's tokenizer."""
    from transformers import T5Config, T5ForConditionalGeneration

    from inference.loading import load_tokenizer

    tokenizer = load_tokenizer(SMOL)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=512,
        d_ff=1024,
        num_layers=6,
        num_decoder_layers=6,
        num_heads=8,
        d_kv=64,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_case(python: str, recipe: str, model: str, flags: list[str], work: Path) -> dict:
    out = work / f"{recipe}-out"
    eval_file = work / "eval.jsonl"
    command = [
        python,
        "-m",
        "training.run",
        "--config",
        recipe,
        "--base-model",
        model,
        "--data",
        str(ROOT / "data" / "train.jsonl"),
        "--eval-data",
        str(eval_file),
        "--max-rows",
        "48",
        "--epochs",
        "1",
        "--output-dir",
        str(out),
        "--no-doctor",
        *flags,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{recipe} failed:\n{done.stderr[-3000:]}")
    estimate = float(re.search(r"memory estimate \(batches up to \d+ tokens\): ([\d.]+) GiB", done.stdout).group(1))
    measured = json.loads((out / "training_summary.json").read_text())["peak_memory_gib"]
    return {
        "recipe": recipe,
        "model": model,
        "estimate": estimate,
        "measured": measured,
        "error": estimate / measured - 1,
    }


def main() -> None:
    from training.report import environment

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gptq-python", default=None, help="a Python with requirements-gptq.txt: adds the GPTQ recipe")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        heldout = (ROOT / "data" / "heldout.jsonl").read_text().splitlines()[:4]
        (work / "eval.jsonl").write_text("\n".join(heldout) + "\n")
        cases = [
            (recipe, str(random_t5(work / "t5")) if model == "t5" else model, flags) for recipe, model, flags in CASES
        ]
        for recipe, model, flags in cases:
            rows.append(run_case(sys.executable, recipe, model, flags, work))
            print(rows[-1], flush=True)
        if args.gptq_python:
            quantized = work / "smollm2-gptq"
            subprocess.run(
                [
                    args.gptq_python,
                    "-m",
                    "training.gptq",
                    "--base-model",
                    SMOL,
                    "--out",
                    str(quantized),
                    "--samples",
                    "32",
                ],
                cwd=ROOT,
                env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"},
                check=True,
                capture_output=True,
            )
            rows.append(run_case(args.gptq_python, "gptq-mistral", str(quantized), ["--optim", "adamw_torch"], work))
            print(rows[-1], flush=True)
    print(json.dumps(environment(), indent=1))
    print("| recipe | model | estimate | measured peak RSS | estimate / measured - 1 | within 20% |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        model = (
            "SmolLM2-135M (GPTQ 4-bit, group 64)"
            if r["recipe"] == "gptq-mistral"
            else ("random T5 (t5-small shape, 6+6 layers)" if r["recipe"] == "flan-t5-lora" else "SmolLM2-135M")
        )
        print(
            f"| {r['recipe']} | {model} | {r['estimate']:.2f} GiB | {r['measured']:.2f} GiB | "
            f"{r['error']:+.0%} | {'yes' if abs(r['error']) <= 0.2 else 'NO'} |"
        )


if __name__ == "__main__":
    main()
