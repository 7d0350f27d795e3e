"""Model loading: safetensors only, no code from a model folder runs without --trust-remote-code,
bounded kernel cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from inference.default_model import ROOT
from inference.loading import load_adapter, load_base_model


def test_a_pickle_only_model_is_refused(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(OSError, match="safetensors"):
        load_base_model(str(folder), "none")


def test_a_pickle_only_adapter_is_refused(tiny_model_dir, tiny_adapter_dir, tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(tiny_adapter_dir, folder)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        load_adapter(load_base_model(str(tiny_model_dir), "none"), folder)


def test_code_shipped_in_a_model_folder_does_not_run_by_default(tiny_model_dir, tmp_path):
    folder = tmp_path / "remote-code"
    shutil.copytree(tiny_model_dir, folder)
    marker = tmp_path / "code-ran"
    (folder / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaForCausalLM as EvilModel, LlamaConfig as EvilConfig\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    try:
        model = load_base_model(str(folder), "none")
    except ValueError as exc:  # transformers may refuse outright instead of using its own class
        assert "trust_remote_code" in str(exc)
    else:
        assert type(model).__module__.startswith("transformers.")
    assert not marker.exists()


def test_prompts_on_the_cpu_inference_layout_match_bitsandbytes_kernel(tiny_model_dir):
    """Decoding uses bitsandbytes' AVX-512 layout; a prompt (many rows) is computed from the same
    4-bit weights dequantized, which must give what the kernel gives."""
    from bitsandbytes.functional import dequantize_4bit, has_avx512bf16
    from bitsandbytes.nn import Linear4bit

    from inference.internals.bitsandbytes import PREFILL_ROWS, dequantize_cpu_layout

    if not has_avx512bf16():  # the layout itself is checked on every CPU in test_internals
        pytest.skip("this CPU has no AVX-512 BF16, so bitsandbytes keeps the standard layout")
    model = load_base_model(str(tiny_model_dir), "nf4").eval()
    layer = model.model.layers[0].mlp.down_proj
    standard = dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16)
    x = torch.randn(2, PREFILL_ROWS, layer.in_features, dtype=torch.bfloat16)
    with torch.inference_mode():
        layer(x[:, :1])  # the first no-grad forward repacks the weight
        assert layer.weight.quant_state.packing_format_for_cpu
        torch.testing.assert_close(
            dequantize_cpu_layout(layer.weight.data, layer.weight.quant_state), standard, atol=0.02, rtol=0.01
        )
        kernel = Linear4bit.forward(layer, x)  # bitsandbytes' own path for every row count
        torch.testing.assert_close(layer(x), kernel, atol=0.05, rtol=0.02)
        torch.testing.assert_close(
            layer(x[:, :2]), Linear4bit.forward(layer, x[:, :2]), atol=0, rtol=0
        )  # decoding: the kernel itself


def test_a_model_loaded_for_training_never_switches_to_the_inference_layout(tiny_model_dir):
    model = load_base_model(str(tiny_model_dir), "nf4", for_training=True).eval()
    with torch.inference_mode():
        model(input_ids=torch.tensor([[1, 2, 3]]))
    layer = model.model.layers[0].self_attn.q_proj
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)


KERNEL_CACHE_PROBE = """
import os, sys
import torch
from inference.loading import load_base_model

load_base_model(sys.argv[1], "none", dtype=torch.bfloat16)
page = os.sysconf("SC_PAGE_SIZE")
def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page / 2**20
weight = torch.randn(576, 1536, dtype=torch.bfloat16, requires_grad=True)
before = rss_mib()
for width in range(100, 400):  # a new batch width per step, as in a training run
    (torch.randn(width, 576, dtype=torch.bfloat16, requires_grad=True) @ weight).sum().backward()
print(rss_mib() - before)
"""


@pytest.mark.skipif(
    not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
    reason="bfloat16 matmuls go through oneDNN only where the CPU computes bf16",
)
def test_loading_a_model_bounds_onednn_kernel_cache(tiny_model_dir):
    """A kernel per matmul shape, kept by oneDNN up to 1,024 shapes, grew training's peak by ~1 GiB."""

    def growth(env: dict[str, str]) -> float:
        run = subprocess.run(
            [sys.executable, "-c", KERNEL_CACHE_PROBE, str(tiny_model_dir)],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
            env={k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"} | env,
        )
        return float(run.stdout.strip().splitlines()[-1])

    bounded, unbounded = growth({}), growth({"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"})
    assert bounded < unbounded - 200, (bounded, unbounded)


@pytest.mark.parametrize("quantization", ["nf4", "none"])
def test_a_loaded_model_keeps_no_view_of_the_checkpoint_file(tiny_model_dir, tmp_path, quantization):
    """Weights left as views of the mmapped checkpoint would keep the file's pages in the process's
    resident memory for the whole run."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    # Stored in the compute dtype, as most checkpoints are: tensors that need no conversion are views.
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(folder)
    model = load_base_model(str(folder), quantization, torch.bfloat16, for_training=True)
    with open("/proc/self/maps") as maps:
        assert str(folder / "model.safetensors") not in maps.read()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


HEAP_PROBE = """
import os, sys
import torch
from training.cpu import return_large_blocks_to_the_system

return_large_blocks_to_the_system()  # as training.run does before it loads the model
page = os.sysconf("SC_PAGE_SIZE")
def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page / 2**20
torch.empty(2**21, dtype=torch.uint8).fill_(1)  # one 2 MiB block freed: glibc's threshold would rise above it
before = rss_mib()
# A step's activations (2 MiB each) between tensors that outlive it (optimizer state, logs). The
# long-lived ones are 32 KiB: 4 KiB ones all fitted in a hole that imports had left in the heap (a
# CI machine's), the large blocks then lay side by side at the top and glibc trimmed them.
kept, freed = [], []
for _ in range(100):
    freed.append(torch.ones(2**21, dtype=torch.uint8))
    kept.append(torch.ones(2**15, dtype=torch.uint8))
del freed
print(rss_mib() - before)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator")
def test_a_training_run_gives_large_tensors_back_to_the_system_when_freed():
    """Large blocks served from glibc's heap between long-lived small ones stay resident after they
    are freed: that made a training run's memory grow epoch after epoch."""

    def left_resident(env: dict[str, str]) -> float:
        run = subprocess.run(
            [sys.executable, "-c", HEAP_PROBE],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
            env={k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"} | env,
        )
        return float(run.stdout.strip().splitlines()[-1])

    assert left_resident({}) < 10  # the 3.2 MiB kept, and no freed block
    # The probe does show the problem: with the threshold where glibc's dynamic one ends up after a
    # step's activations were freed (4 MiB), the heap keeps 40-200 of the 200 MiB freed, or now
    # and then manages to trim it all; a few tries make that chance negligible.
    kept = [left_resident({"MALLOC_MMAP_THRESHOLD_": str(4 * 2**20)}) for _ in range(3)]
    assert max(kept) > 30, kept


def test_training_attention_on_a_cpu_gives_eager_attentions_outputs_and_gradients(tiny_model_dir):
    """Query heads grouped against their shared key/value head, the scale on the queries, the
    softmax in the compute dtype: in float32 (nothing rounds differently) the same logits and
    gradients as transformers' eager attention, padding included."""
    from transformers import AutoModelForCausalLM

    from training.attention import GROUPED
    from training.model import load_training_base

    grouped = load_training_base(str(tiny_model_dir), "none")
    assert grouped.config._attn_implementation == GROUPED
    eager = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager", dtype=torch.float32)
    assert eager.config.num_key_value_heads < eager.config.num_attention_heads  # grouped-query attention
    torch.manual_seed(0)
    ids = torch.randint(3, 500, (3, 24))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    mask[2, 6:] = 0
    results = []
    for model in (grouped, eager):
        model.train()
        logits = model(input_ids=ids, attention_mask=mask).logits
        (logits.square().mean(-1) * mask).sum().backward()
        results.append((logits.detach(), {name: p.grad for name, p in model.named_parameters()}))
    (grouped_logits, grouped_grads), (eager_logits, eager_grads) = results
    real = mask.bool()
    torch.testing.assert_close(grouped_logits[real], eager_logits[real], atol=1e-5, rtol=1e-5)
    assert grouped_grads.keys() == eager_grads.keys()
    for name, grad in grouped_grads.items():
        torch.testing.assert_close(grad, eager_grads[name], atol=1e-5, rtol=1e-4, msg=name)
