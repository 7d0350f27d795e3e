"""The model card, and pushing a run's folder (a LoRA adapter, or a full fine-tune's model) to the Hugging Face Hub.

The token comes from ``HF_TOKEN`` or the cached ``hf auth login``; it is handed to the Hub client
and nowhere else: not to TrainingArguments (which would pickle it into training_args.bin), not to
logs, the summary or the card.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.utils import filter_repo_objects

from inference.adapter_files import EXAMPLES_FILE, HELD_OUT_FILE, PERSONA_FILE
from training.report import PLOT_FILE, SUMMARY_FILE

CARD_FILE = "README.md"
# The weights a run saves: a LoRA adapter's, or a full fine-tune's (--method full), which
# save_pretrained splits into shards named by an index file past its shard size.
WEIGHT_PATTERNS = ["adapter_model.safetensors", "model.safetensors", "model-*-of-*.safetensors"]
# What a push holds: everything a user needs to load and judge it, nothing heavy or private.
UPLOAD_PATTERNS = [
    *WEIGHT_PATTERNS,
    "adapter_config.json",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    PERSONA_FILE,
    HELD_OUT_FILE,  # anonymised: the app's blind test and example comments on a Space that loads from the Hub
    EXAMPLES_FILE,  # anonymised: the creator's examples that the prompt panes retrieve
    SUMMARY_FILE,
    PLOT_FILE,
    CARD_FILE,
    "runs/**",
]


# The card's metadata comes from huggingface_hub's ModelCardData; this is the body under it, which
# str.format fills (values are not re-parsed, so a persona's braces stay text).
CARD_LAYOUT = "---\n{{ card_data }}\n---\n\n{{ body }}"  # a Jinja template: ModelCard.from_template renders it
CARD_TEMPLATE = """# {name}

{what} that answers YouTube comments in a creator's voice, trained with
replytune on `{base_model}` ({quantization} base).

## Results

| | held-out loss (reply tokens) |
|---|---|
| base model + persona prompt | {base_eval_loss:.4f} |
| fine-tuned | {eval_loss:.4f} |

| epoch | train loss | held-out loss |
|---|---|---|
{epochs}

![loss curve]({plot})

{voice}
## Data

- training pairs: {train_rows}, held-out pairs: {eval_rows}
- data hash: `{data_hash}`, config hash: `{config_hash}`

## Prompt

Each comment is put into this persona prompt (the `{{comment}}` slot) and rendered with the base
model's chat template; the same file is in this repo as `persona.txt`.

```text
{persona}
```

## Hyperparameters

```json
{hyperparameters}
```

Peak memory {peak_memory_gib:.2f} GiB, {tokens_per_second:.0f} tokens/s,
{minutes:.1f} minutes on {machine}.

## How to use

```python
{imports}from transformers import {auto}, AutoTokenizer

{load}
tokenizer = AutoTokenizer.from_pretrained("THIS_REPO_OR_FOLDER")
```

or, with replytune's app: `ADAPTER=THIS_REPO_OR_FOLDER python app.py`.
"""


def model_card(summary: dict[str, Any], persona: str) -> ModelCard:
    config = summary["config"]
    epochs = "\n".join(
        f"| {e['epoch']} | {e['train_loss']:.4f} | {e['eval_loss']:.4f} |"
        for e in summary["epochs"]
        if e.get("train_loss") is not None
    )
    lora = config.get("method", "lora") == "lora"
    keys = (
        ("method", "quantization", "lora_r", "lora_alpha", "lora_dropout", "target_modules")
        if lora
        else ("method", "quantization")
    )
    hyper = {
        k: config[k]
        for k in (*keys, "epochs", "learning_rate", "batch_size", "grad_accum", "max_length", "seed")
        if k in config
    }
    auto = "AutoModelForSeq2SeqLM" if summary.get("seq2seq") else "AutoModelForCausalLM"
    load = (
        f'base = {auto}.from_pretrained("{summary["base_model_hub_id"]}")\n'
        'model = PeftModel.from_pretrained(base, "THIS_REPO_OR_FOLDER")'
        if lora
        else f'model = {auto}.from_pretrained("THIS_REPO_OR_FOLDER")'
    )
    # A full fine-tune's folder is a whole model: it loads without peft.
    imports = "from peft import PeftModel\n" if lora else ""
    data = ModelCardData(
        base_model=summary["base_model_hub_id"],
        library_name="peft" if lora else "transformers",
        pipeline_tag="text2text-generation" if summary.get("seq2seq") else "text-generation",
        license="apache-2.0",
        tags=[*(["lora", "qlora"] if lora else []), "replytune", "youtube-comments"],
    )
    body = CARD_TEMPLATE.format(
        name=summary.get("name", "replytune adapter"),
        what="A LoRA adapter" if lora else "A fully fine-tuned model",
        base_model=summary["base_model"],
        quantization=config["quantization"],
        base_eval_loss=summary["base_eval_loss"],
        eval_loss=summary["eval_loss"],
        epochs=epochs,
        plot=PLOT_FILE,
        voice=voice_section(summary),
        train_rows=summary["data"]["train_rows"],
        eval_rows=summary["data"]["eval_rows"],
        data_hash=summary["data"]["hash"],
        config_hash=summary["config_hash"],
        persona=persona,
        hyperparameters=json.dumps(hyper, indent=2),
        peak_memory_gib=summary["peak_memory_gib"],
        tokens_per_second=summary["tokens_per_second"],
        minutes=summary["wall_seconds"] / 60,
        machine=summary["environment"]["gpu"] or summary["environment"]["cpu"],
        imports=imports,
        auto=auto,
        load=load,
    )
    return ModelCard.from_template(data, template_str=CARD_LAYOUT, body=body)


def voice_section(summary: dict[str, Any]) -> str:
    if "voice" not in summary:
        return ""
    from training.evaluate import markdown_table, verdict

    return (
        "## Voice fidelity\n\nGenerated replies to the held-out comments from every pane (the "
        "base model with the persona prompt, with the persona and the creator's most similar past "
        "replies as earlier turns, and fine-tuned), compared with the creator's real replies:\n\n"
        + markdown_table(summary["voice"])
        + "\n"
        + verdict(summary["voice"])
        + "\n"
    )


def upload_files(folder: Path) -> list[Path]:
    """The files a push uploads from ``folder``, matched the way upload_folder matches them."""
    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    return sorted(folder / name for name in filter_repo_objects(files, allow_patterns=UPLOAD_PATTERNS))


def weight_files(folder: Path) -> list[Path]:
    """The weights a push uploads: the adapter's, or a full fine-tune's (every shard); an error if none."""
    files = [p.relative_to(folder).as_posix() for p in folder.iterdir() if p.is_file()]
    weights = sorted(folder / name for name in filter_repo_objects(files, allow_patterns=WEIGHT_PATTERNS))
    if not weights:
        raise FileNotFoundError(
            f"{folder}: no adapter_model.safetensors or model.safetensors; "
            "pass a folder written by `python -m training.run`"
        )
    return weights


def check_finite(weights: Path) -> None:
    """A diverged model (NaN or infinite weights) is never uploaded."""
    from safetensors.torch import load_file

    bad = [name for name, tensor in load_file(weights).items() if not tensor.isfinite().all()]
    if bad:
        raise ValueError(
            f"{weights}: {len(bad)} tensor(s) hold NaN or infinite values ({bad[0]}); this model is not pushed"
        )


def push_adapter(folder: Path, repo_id: str, private: bool, api: HfApi | None = None) -> str:
    """Create (or reuse) the model repo and upload the run's folder (adapter or full model); returns the repo URL."""
    for weights in weight_files(folder):
        check_finite(weights)
    token = get_token()
    if token is None:
        raise PermissionError("no Hugging Face token: set HF_TOKEN or run `hf auth login`, then push again")
    api = api or HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        allow_patterns=UPLOAD_PATTERNS,
        commit_message="Upload a model trained with replytune",
    )
    return str(url)
