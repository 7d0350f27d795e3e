"""The GPTQ recipe (the original article's) on CPU: GPTQ-quantize the default model, train a few LoRA
steps on it with the gptq-mistral recipe, and load the adapter back.

gptqmodel needs torch>=2.14.1 (a CUDA build, several GB), so it lives in its own environment: this
test runs there, through the interpreter named by REPLYTUNE_GPTQ_PYTHON. `.ci/run` builds that
environment and sets it when its time budget allows; otherwise the test is skipped and says why.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from inference.default_model import ROOT

PYTHON = os.environ.get("REPLYTUNE_GPTQ_PYTHON")
pytestmark = [
    pytest.mark.gptq,
    pytest.mark.skipif(
        not PYTHON,
        reason=(
            "GPTQ extra not installed: set REPLYTUNE_GPTQ_PYTHON to a Python "
            "with requirements-gptq.txt (.ci/run does when time allows)"
        ),
    ),
]

LOAD_BACK = """
import sys, torch
from peft import PeftModel
from inference.loading import load_base_model, load_tokenizer
from inference.generate import GenerationSettings
from inference.transformers_engine import Replier
from prompts.render import Persona, PromptRenderer
base = load_base_model(sys.argv[1], "none")
assert getattr(base.config, "quantization_config", None), "not a GPTQ model"
model = PeftModel.from_pretrained(base, sys.argv[2])
tokenizer = load_tokenizer(sys.argv[1])
renderer = PromptRenderer(tokenizer, Persona.from_file(sys.argv[2] + "/persona.txt"))
replier = Replier(model, tokenizer, renderer, has_adapter=True)
base_reply, tuned = replier.reply("Great video, thanks!", GenerationSettings(max_new_tokens=16))
print("REPLIES", bool(base_reply.text), bool(tuned.text))
"""


def run(*args: str, timeout: int = 900) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([PYTHON, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_gptq_recipe_trains_lora_on_a_gptq_quantized_default_model(tmp_path):
    quantized, adapter = tmp_path / "smollm2-gptq", tmp_path / "adapter"
    run(
        "-m",
        "training.gptq",
        "--base-model",
        "embedded:SmolLM2-135M-Instruct",
        "--out",
        str(quantized),
        "--samples",
        "32",
    )
    assert json.loads((quantized / "config.json").read_text())["quantization_config"]["bits"] == 4
    # The recipe as written, but 2 epochs on 16 rows (one update each) without warm-up (its first
    # update would have a learning rate of 0), and plain AdamW: paged 8-bit AdamW needs CUDA.
    # 4 held-out rows keep the end-of-run voice evaluation (generation through the trainable GPTQ
    # kernel, two replies in turn) to a few minutes on 2 cores.
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("\n".join((ROOT / "data" / "heldout.jsonl").read_text().splitlines()[:4]) + "\n")
    # About 5 minutes alone (4 of them the voice evaluation: ~1 min per comment); the limit leaves
    # room for a machine shared with another job.
    run(
        "-m",
        "training.run",
        "--config",
        "gptq-mistral",
        "--base-model",
        str(quantized),
        "--epochs",
        "2",
        "--max-rows",
        "16",
        "--eval-data",
        str(heldout),
        "--warmup-ratio",
        "0",
        "--output-dir",
        str(adapter),
        "--optim",
        "adamw_torch",
        "--no-doctor",
        timeout=1800,
    )
    summary = json.loads((adapter / "training_summary.json").read_text())
    assert summary["config"]["target_modules"] == ["q_proj"] and summary["config"]["lora_alpha"] == 32
    assert summary["eval_loss"] <= summary["base_eval_loss"] + 0.01
    from safetensors.torch import load_file

    lora_b = [t for name, t in load_file(adapter / "adapter_model.safetensors").items() if "lora_B" in name]
    assert lora_b and any(t.abs().sum() > 0 for t in lora_b)  # LoRA B starts at zero: the updates happened
    assert "REPLIES True True" in run("-c", LOAD_BACK, str(quantized), str(adapter))
