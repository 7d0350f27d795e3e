"""`python app.py`: type a YouTube comment, watch the base model (prompt only) and the fine-tuned
adapter reply side by side, streamed from one model in memory.

UI only: the model is loaded once in ``main()``, never at import; what it serves comes from flags
or the environment (what Hugging Face Spaces sets as Space variables and secrets; flags win).
The tabs are built in ``ui/``, one module each; replies, comparison and model loading live in
``inference/``, the flywheel's files in ``training/``, the comment inbox in ``youtube/``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from errors import exits_on_error
from inference.compare import pane_labels
from inference.default_model import DEFAULT_ADAPTER, DEFAULT_BASE_MODEL, ROOT
from inference.generate import StreamingReplier
from inference.loading import BACKENDS, QUANTIZATIONS, Backend, Quantization
from ui.batch import batch_tab
from ui.blind_test import blind_tab
from ui.inbox import inbox_tab
from ui.reply import reply_tab

logger = logging.getLogger("replytune.app")

QUEUE_MAX_SIZE = 32  # requests waiting (a busy Space's worth); more are turned away with a message, not piled up
CONCURRENCY_LIMIT = 1  # one decoding loop at a time: the model is shared, and a CPU has no room for two
NO_ADAPTER = "none"  # --adapter none: the base model alone


def build_demo(
    replier: StreamingReplier,
    labels: dict[str, str],
    flywheel_dir: Path | None,
    held_out: list[tuple[str, str]],
    verdict: str = "",
    inbox_dir: Path | None = None,
) -> gr.Blocks:
    """The page. ``held_out``: the (comment, real reply) pairs that travelled with the adapter, for
    the blind test and the example comments; ``verdict``: what the adapter's voice evaluation found
    against the strongest prompt (training.evaluate.verdict), said plainly in the header;
    ``inbox_dir``: the comment inbox's state folder, if any."""
    examples = [comment for comment, _ in held_out[:12]]
    with gr.Blocks(title="replytune: prompt vs fine-tuned") as demo:
        gr.Markdown(
            "# replytune\nType a YouTube comment and compare replies from the same base model: steered by a "
            "prompt (the persona alone, or the persona with your most similar past replies), and with the "
            "fine-tuned LoRA adapter." + (f"\n\n**Measured:** {verdict}" if verdict else ""),
            elem_id="header",
        )
        with gr.Tab("Reply"):
            max_new_tokens = reply_tab(replier, labels, flywheel_dir, examples)
        if replier.has_adapter:
            with gr.Tab("Blind test"):
                blind_tab(replier, held_out, flywheel_dir)
        with gr.Tab("Batch compare"):
            batch_tab(replier, labels, max_new_tokens, examples)
        if inbox_dir is not None:
            with gr.Tab("Inbox"):
                inbox_tab(replier, inbox_dir, demo)
    return demo


@dataclass(frozen=True)
class AppSettings:
    base_model: str
    adapter: str | None
    quantization: Quantization
    backend: Backend
    host: str | None
    port: int | None
    flywheel_dir: Path | None
    inbox_dir: Path | None = None


def parse_app_settings(argv: list[str] | None = None) -> AppSettings:
    args = app_parser().parse_args(argv)
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
        inbox_dir=Path(args.inbox) if args.inbox else None,
    )


def app_parser() -> argparse.ArgumentParser:
    """The flags, each defaulting to its environment variable (a Space's variables and secrets)."""
    env = os.environ
    on_space = bool(env.get("SPACE_ID"))
    parser = argparse.ArgumentParser(
        prog="python app.py", description="Side-by-side replies: base model + prompt vs fine-tuned adapter."
    )
    parser.add_argument(
        "--base-model",
        default=env.get("BASE_MODEL", DEFAULT_BASE_MODEL),
        help="local folder or Hub id [env BASE_MODEL]",
    )
    parser.add_argument(
        "--adapter",
        default=env.get("ADAPTER", str(DEFAULT_ADAPTER)),
        help=f"adapter folder or Hub id, '{NO_ADAPTER}' for the base alone [env ADAPTER]",
    )
    parser.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        default=env.get("QUANTIZATION", "nf4"),
        help="how the base is stored for the transformers backend: nf4 (4-bit), int8 or none [env QUANTIZATION]",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default=env.get("BACKEND", "auto"),
        help="auto: llama.cpp on a CPU, transformers on a GPU (and for GPTQ) [env BACKEND]",
    )
    parser.add_argument(
        "--host", default=env.get("GRADIO_SERVER_NAME"), help="address to listen on [env GRADIO_SERVER_NAME]"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(env["GRADIO_SERVER_PORT"]) if env.get("GRADIO_SERVER_PORT") else None,
        help="port [env GRADIO_SERVER_PORT]",
    )
    parser.add_argument(
        "--flywheel-dir",
        default=env.get("FLYWHEEL_DIR", "" if on_space else str(ROOT / "flywheel")),
        help="folder for saved corrections and preferences; empty turns saving off "
        "(off on a public Space unless set) [env FLYWHEEL_DIR]",
    )
    parser.add_argument(
        "--inbox",
        default=env.get("INBOX_DIR", ""),
        help="the comment inbox's state folder (python -m youtube.inbox pull --state DIR); shows the Inbox tab, "
        "where whoever reaches the app can approve and post: keep such an app private [env INBOX_DIR]",
    )
    return parser


@exits_on_error
def main(argv: list[str] | None = None) -> int:
    from inference.engines import load_replier

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings: AppSettings = parse_app_settings(argv)
    if settings.adapter is None:
        logger.info("no adapter loaded: the app shows the base model's reply only")
    replier = load_replier(settings.base_model, settings.adapter, settings.quantization, backend=settings.backend)
    logger.info("replies generated by %s", replier.backend)
    replier.warm_up()
    from inference.adapter_files import adapter_held_out, adapter_verdict

    held_out = adapter_held_out(settings.adapter)
    labels = pane_labels(settings.base_model, settings.adapter, replier)
    demo = build_demo(
        replier, labels, settings.flywheel_dir, held_out, adapter_verdict(settings.adapter), settings.inbox_dir
    )
    launch(demo, settings.host, settings.port)
    return 0


def launch(demo: gr.Blocks, host: str | None = None, port: int | None = None, block: bool = True) -> gr.Blocks:
    """Serve the app with its limits: a bounded queue, one generation at a time, no stack traces.

    No ``allowed_paths``: the server hands out no file beyond Gradio's own assets.
    """
    demo.queue(max_size=QUEUE_MAX_SIZE, default_concurrency_limit=CONCURRENCY_LIMIT)
    demo.launch(server_name=host, server_port=port, show_error=False, prevent_thread_lock=not block, quiet=not block)
    return demo


if __name__ == "__main__":
    sys.exit(main())
