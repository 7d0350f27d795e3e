"""What the app and the compare tool run: base model, adapter and quantization, from flags or env.

Environment variables are what Hugging Face Spaces sets (as Space variables and secrets); flags win.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from inference.default_model import DEFAULT_ADAPTER, DEFAULT_BASE_MODEL, ROOT, hub_id
from inference.loading import BACKENDS, QUANTIZATIONS, Backend, Quantization
NO_ADAPTER = "none"


@dataclass(frozen=True)
class AppSettings:
    base_model: str
    adapter: str | None
    quantization: Quantization
    backend: Backend
    host: str | None
    port: int | None
    flywheel_dir: Path | None


def parse_app_settings(argv: list[str] | None = None) -> AppSettings:
    env = os.environ
    on_space = bool(env.get("SPACE_ID"))
    parser = argparse.ArgumentParser(prog="python app.py", description="Side-by-side replies: base model + prompt vs fine-tuned adapter.")
    parser.add_argument("--base-model", default=env.get("BASE_MODEL", DEFAULT_BASE_MODEL), help="local folder or Hub id [env BASE_MODEL]")
    parser.add_argument("--adapter", default=env.get("ADAPTER", str(DEFAULT_ADAPTER)), help=f"adapter folder or Hub id, '{NO_ADAPTER}' for the base alone [env ADAPTER]")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default=env.get("QUANTIZATION", "nf4"), help="how the base is stored for the transformers backend: nf4 (4-bit), int8 or none [env QUANTIZATION]")
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default=env.get("BACKEND", "auto"),
        help="auto: llama.cpp on a CPU, transformers on a GPU (and for GPTQ) [env BACKEND]",
    )
    parser.add_argument("--host", default=env.get("GRADIO_SERVER_NAME"), help="address to listen on [env GRADIO_SERVER_NAME]")
    parser.add_argument("--port", type=int, default=int(env["GRADIO_SERVER_PORT"]) if env.get("GRADIO_SERVER_PORT") else None, help="port [env GRADIO_SERVER_PORT]")
    parser.add_argument(
        "--flywheel-dir",
        default=env.get("FLYWHEEL_DIR", "" if on_space else str(ROOT / "flywheel")),
        help="folder for saved corrections and preferences; empty turns saving off (off on a public Space unless set) [env FLYWHEEL_DIR]",
    )
    args = parser.parse_args(argv)
    adapter = None if args.adapter.strip().lower() in (NO_ADAPTER, "") else args.adapter
    if adapter and not Path(adapter).exists() and Path(adapter) == DEFAULT_ADAPTER:
        adapter = None  # no shipped adapter in this checkout: run with the base alone and say so
    return AppSettings(
        base_model=args.base_model,
        adapter=adapter,
        quantization=args.quantization,
        backend=args.backend,
        host=args.host,
        port=args.port,
        flywheel_dir=Path(args.flywheel_dir) if args.flywheel_dir else None,
    )


def pane_labels(base_model: str, adapter: str | None, backend: str) -> dict[str, str]:
    """Names for the two panes that say which model each one is, and which engine runs it."""
    base = f"{hub_id(base_model)} (embedded)" if base_model == DEFAULT_BASE_MODEL else base_model
    labels = {"base": f"{base} · prompt only · {backend}"}
    if adapter:
        path = Path(adapter).resolve()
        name = (str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)) if path.exists() else adapter
        labels["adapter"] = f"{name} · fine-tuned · {backend}"
    return labels
