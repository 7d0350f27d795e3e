"""`python -m inference.export`: GGUF files llama.cpp loads, an Ollama Modelfile whose template
renders replytune's exact prompt (checked with Go's own text/template, the engine Ollama runs), and
merged safetensors equal to base + adapter."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch

from inference.default_model import DEFAULT_BASE_MODEL
from inference.engines import load_replier
from inference.export import export, main, modelfile
from inference.generate import GenerationSettings
from inference.gguf_convert import ExportError
from inference.llamacpp import LlamaCppReplier
from inference.loading import load_tokenizer
from prompts.render import Persona, PromptRenderer

TRICKY = [
    "Great video!",
    'She said "hi" and {{ .System }} {curly} {{',
    "line one\nline two\n\n  indented",
    "这个视频太棒了 🎉 Привет",
    "back\\slash and <|im_end|> typed out",
]
GO_RENDER = """package main

import (
	"bytes"
	"encoding/json"
	"os"
	"text/template"
)

// Renders a Modelfile TEMPLATE the way Ollama does: Go's text/template, .Prompt = the user message.
func main() {
	text, _ := os.ReadFile(os.Args[1])
	raw, _ := os.ReadFile(os.Args[2])
	var comments []string
	if err := json.Unmarshal(raw, &comments); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("modelfile").Parse(string(text)))
	out := []string{}
	for _, c := range comments {
		var buf bytes.Buffer
		if err := tmpl.Execute(&buf, map[string]any{"Prompt": c}); err != nil {
			panic(err)
		}
		out = append(out, buf.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""


def go_render(template: str, comments: list[str], tmp_path) -> list[str]:
    go = shutil.which("go")
    if go is None:
        if os.environ.get("CI"):
            pytest.fail("go is not installed: apt-get install golang-go (.ci/run does this)")
        pytest.skip("Go's text/template is the reference renderer; apt-get install golang-go")
    (tmp_path / "render.go").write_text(GO_RENDER)
    (tmp_path / "template.txt").write_text(template, encoding="utf-8")
    (tmp_path / "comments.json").write_text(json.dumps(comments), encoding="utf-8")
    env = {**os.environ, "GOCACHE": str(tmp_path / "gocache"), "GO111MODULE": "off"}
    result = subprocess.run(
        [go, "run", str(tmp_path / "render.go"), str(tmp_path / "template.txt"), str(tmp_path / "comments.json")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def template_of(modelfile_text: str) -> str:
    return modelfile_text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]


@pytest.mark.parametrize("persona_text", [None, "Say {{{{ hi }}}} and 'quote' \\n, then answer:\n\n{comment}\n\n(end)"])
def test_modelfile_template_renders_the_renderers_prompt_byte_for_byte(default_model_dir, persona_text, tmp_path):
    persona = Persona(persona_text) if persona_text else Persona.from_file()
    renderer = PromptRenderer(load_tokenizer(DEFAULT_BASE_MODEL), persona)
    text = modelfile(renderer, max_new_tokens=160)
    assert 'PARAMETER stop "<|im_end|>"' in text and "PARAMETER temperature 0" in text
    instructions = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert instructions[:2] == ["FROM ./base.gguf", "ADAPTER ./adapter.gguf"]
    assert "examples" in text and "not part of this Modelfile" in text  # says what Ollama does not get
    rendered = go_render(template_of(text), TRICKY, tmp_path)
    assert rendered == [renderer.prompt(comment).text for comment in TRICKY]


def test_gguf_and_ollama_export_of_the_shipped_adapter_replies_signed(default_model_dir, tmp_path):
    from inference.default_model import DEFAULT_ADAPTER

    assert main(["--adapter", str(DEFAULT_ADAPTER), "--out", str(tmp_path), "--targets", "gguf", "ollama"]) == 0
    assert {p.name for p in tmp_path.iterdir()} >= {"base.gguf", "adapter.gguf", "Modelfile"}
    tokenizer = load_tokenizer(DEFAULT_BASE_MODEL)
    renderer = PromptRenderer(tokenizer, Persona.from_file(DEFAULT_ADAPTER / "persona.txt"))
    replier = LlamaCppReplier(tmp_path / "base.gguf", tmp_path / "adapter.gguf", tokenizer, renderer)
    try:
        replies = list(
            replier.replies(
                ["Thanks, great video!", "Which laptop do you use for data science?", "Loved the part on k-means!"],
                GenerationSettings(max_new_tokens=80),
                panes=["adapter"],
            )
        )
    finally:
        replier.close()
    signed = [reply.text.rstrip().endswith("–Maya") and reply.stopped for (reply,) in replies]
    assert sum(signed) >= 2, [reply.text for (reply,) in replies]


def test_merged_weights_equal_base_plus_adapter(tiny_model_dir, tiny_adapter_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    (merged_dir,) = export(tiny_adapter_dir, tmp_path, ("merged",), base_model=str(tiny_model_dir))
    assert (merged_dir / "persona.txt").read_text() == (tiny_adapter_dir / "persona.txt").read_text()
    assert (merged_dir / "chat_template.jinja").is_file() or "chat_template" in (
        merged_dir / "tokenizer_config.json"
    ).read_text()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), tiny_adapter_dir
    )
    ids = torch.tensor([load_tokenizer(str(tiny_model_dir))("Thanks for the video!")["input_ids"]])
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-4)
        with reference.disable_adapter():
            assert not torch.allclose(reference(input_ids=ids).logits, expected, atol=1e-3)  # the adapter matters


def test_the_gguf_export_loads_in_llama_cpp(tiny_model_dir, tiny_adapter_dir, tmp_path):
    export(tiny_adapter_dir, tmp_path, ("gguf",), base_model=str(tiny_model_dir))
    transformers_replier = load_replier(
        str(tiny_model_dir), str(tiny_adapter_dir), quantization="none", backend="transformers"
    )
    replier = LlamaCppReplier(
        tmp_path / "base.gguf", tmp_path / "adapter.gguf", transformers_replier.tokenizer, transformers_replier.renderer
    )
    try:
        base, tuned = replier.reply("Hi", GenerationSettings(max_new_tokens=8))
        assert base.token_ids and tuned.token_ids and base.token_ids != tuned.token_ids
    finally:
        replier.close()


def test_bad_input_gets_one_clear_error(tiny_model_dir, tiny_adapter_dir, tmp_path, capsys):
    assert main(["--adapter", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert f"{tmp_path / 'adapter_config.json'}: not found" in capsys.readouterr().err

    gptq = tmp_path / "gptq-base"
    shutil.copytree(tiny_model_dir, gptq)
    config = json.loads((gptq / "config.json").read_text())
    (gptq / "config.json").write_text(
        json.dumps({**config, "quantization_config": {"quant_method": "gptq", "bits": 4}})
    )
    for targets in (("merged",), ("gguf",)):
        with pytest.raises(ExportError, match=r"config\.json: a GPTQ"):
            export(tiny_adapter_dir, tmp_path / "out", targets, base_model=str(gptq))

    weightless = tmp_path / "no-weights"
    weightless.mkdir()
    shutil.copy(tiny_model_dir / "config.json", weightless / "config.json")
    with pytest.raises(ExportError, match=r"no-weights: no model weights"):
        export(tiny_adapter_dir, tmp_path / "out", ("gguf",), base_model=str(weightless))


def test_a_corrupt_converters_sdist_is_refused_and_deleted(tmp_path):
    """The llama.cpp converters' download has an error of its own, not the default model's."""
    from inference.gguf_convert import SDIST_NAME, ConvertersUnavailable, _download_sdist

    sdist = tmp_path / SDIST_NAME
    sdist.write_bytes(b"not the sdist")
    with pytest.raises(ConvertersUnavailable, match=r"is not the pinned \w+ \(corrupt download\); it was deleted"):
        _download_sdist(tmp_path)
    assert not sdist.exists()
