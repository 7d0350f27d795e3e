"""`python -m inference.export --adapter DIR --out DIR`: the voice model, where creators run models.

Three targets, all by default:

* ``gguf``: ``base.gguf`` and ``adapter.gguf`` for llama.cpp, LM Studio and anything else that reads
  GGUF, made by llama.cpp's own converters (see inference.gguf_convert). For the embedded default the
  base is the wheel's GGUF file as it is; an adapter trained on the NF4 base is applied to it.
* ``ollama``: a ``Modelfile`` beside them (``FROM`` the base, ``ADAPTER`` the LoRA, a ``TEMPLATE``
  that renders the very prompt replytune's renderer builds, persona included, stop tokens and
  greedy decoding): ``ollama create my-voice -f OUT/Modelfile``.
* ``merged``: ``merged/``, the adapter merged into the full-precision base as safetensors (for
  ``AutoModelForCausalLM``, vLLM, TGI), with the tokenizer, chat template and persona beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Literal

from errors import exits_on_error
from inference.adapter_files import PERSONA_FILE, SUMMARY_FILE
from inference.default_model import from_hub_id
from inference.gguf_convert import ExportError, adapter_gguf, base_gguf, check_adapter_dir
from prompts.render import PromptRenderer

Target = Literal["gguf", "ollama", "merged"]
TARGETS: tuple[Target, ...] = ("gguf", "ollama", "merged")
PROMPT_FIELD = "{{ .Prompt }}"  # Ollama's template variable for the user's message


def base_model_of(adapter: Path) -> str:
    """The base an adapter was trained on: its training summary's, else its adapter config's."""
    summary = adapter / SUMMARY_FILE
    if summary.is_file():
        return json.loads(summary.read_text(encoding="utf-8"))["base_model"]
    name = check_adapter_dir(adapter).get("base_model_name_or_path")
    if not name:
        raise ExportError(f"{adapter / 'adapter_config.json'}: no base_model_name_or_path; pass --base-model")
    return from_hub_id(name)


def go_template_text(text: str) -> str:
    """Literal text for a Go template: only ``{{`` starts an action there, so it is written as one."""
    return text.replace("{{", '{{ "{{" }}')


def modelfile(renderer: PromptRenderer, max_new_tokens: int) -> str:
    """An Ollama Modelfile whose TEMPLATE renders ``renderer.prompt(comment).text`` for any comment.

    replytune's prompt is the template's head, the comment, and its middle (see PromptRenderer), so
    the TEMPLATE is those two texts around Ollama's ``{{ .Prompt }}``; no system message or history
    is added. Ollama tokenizes the rendered text as a whole, so a comment that types a control token
    (``<|im_end|>``) reaches it as that token, where replytune keeps it plain text.
    """
    head, middle = renderer.prompt_parts
    template = go_template_text(head) + PROMPT_FIELD + go_template_text(middle)
    if '"""' in template:
        raise ExportError('the prompt contains """, which ends a Modelfile TEMPLATE; remove it from the persona')
    tokenizer = renderer.tokenizer
    stops = [tokenizer.convert_ids_to_tokens(token) for token in renderer.stop_ids]
    lines = [
        "# Made by `python -m inference.export`: replytune's own prompt (persona included), greedy decoding.",
        "# The fine-tuned pane only: the creator's examples that replytune retrieves into a prompt for each",
        "# comment are not part of this Modelfile (Ollama has no retrieval), and neither is replytune's",
        "# no-repeat n-gram rule (Ollama has no such option).",
        '# ollama create my-voice -f Modelfile && ollama run my-voice "Great video!"',
        "FROM ./base.gguf",
        "ADAPTER ./adapter.gguf",
        f'TEMPLATE """{template}"""',
        *[f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}" for stop in stops],
        "PARAMETER temperature 0",
        f"PARAMETER num_predict {max_new_tokens}",
    ]
    return "\n".join(lines) + "\n"


def export_merged(adapter: Path, base_model: str, out: Path) -> Path:
    """The adapter merged into the full-precision base, saved in the base's own dtype."""
    import torch

    from inference.loading import is_gptq, load_adapter, load_base_model, load_tokenizer, local_model_dir

    base_dir = local_model_dir(base_model)
    if is_gptq(base_dir):
        raise ExportError(
            f"{base_dir / 'config.json'}: a GPTQ base; LoRA weights cannot be merged "
            "into GPTQ's 4-bit integers. Pass --base-model the full-precision model it "
            "was quantized from, or export only --targets gguf ollama from that base"
        )
    saved = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    dtype = getattr(torch, saved.get("dtype") or saved.get("torch_dtype") or "float32")
    # Merged in float32 (W + BA without rounding in between), then stored as the base was.
    merged = load_adapter(load_base_model(base_model, "none", dtype=torch.float32), adapter).merge_and_unload()
    target = out / "merged"
    merged.to(dtype).save_pretrained(target)
    load_tokenizer(base_model).save_pretrained(target)
    shutil.copy(adapter / PERSONA_FILE, target / PERSONA_FILE)
    return target


def export(
    adapter: Path,
    out: Path,
    targets: tuple[Target, ...] = TARGETS,
    base_model: str | None = None,
    max_new_tokens: int = 160,
) -> list[Path]:
    """Write the targets into ``out``; the paths written."""
    check_adapter_dir(adapter)
    if not (adapter / PERSONA_FILE).is_file():
        raise ExportError(
            f"{adapter / PERSONA_FILE}: not found; an adapter folder written by "
            "`python -m training.run` carries the persona it was trained with"
        )
    base_model = base_model or base_model_of(adapter)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if "gguf" in targets or "ollama" in targets:
        for source, name in ((base_gguf(base_model), "base.gguf"), (adapter_gguf(adapter, base_model), "adapter.gguf")):
            shutil.copy(source, out / name)
            written.append(out / name)
    if "ollama" in targets:
        from inference.loading import load_tokenizer
        from prompts.render import Persona

        renderer = PromptRenderer(load_tokenizer(base_model), Persona.from_file(adapter / PERSONA_FILE))
        (out / "Modelfile").write_text(modelfile(renderer, max_new_tokens), encoding="utf-8")
        written.append(out / "Modelfile")
    if "merged" in targets:
        written.append(export_merged(adapter, base_model, out))
    return written


@exits_on_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m inference.export", description=__doc__.splitlines()[0].split(": ", 1)[1]
    )
    parser.add_argument(
        "--adapter", type=Path, required=True, help="adapter folder written by `python -m training.run`"
    )
    parser.add_argument("--out", type=Path, required=True, help="folder to write into")
    parser.add_argument(
        "--targets", nargs="+", choices=TARGETS, default=list(TARGETS), help="what to write (default: all)"
    )
    parser.add_argument(
        "--base-model",
        help="the base the adapter was trained on (default: from its training_summary.json or adapter_config.json)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    written = export(args.adapter, args.out, tuple(args.targets), args.base_model)
    for path in written:
        print(f"wrote {path}")
    if "ollama" in args.targets:
        print(f"run it in Ollama: ollama create my-voice -f {args.out / 'Modelfile'} && ollama run my-voice")
    return 0


if __name__ == "__main__":
    sys.exit(main())
