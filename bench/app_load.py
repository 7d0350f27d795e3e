"""The app under load: many concurrent gradio_client users, each sending several comments.

    python -m bench.app_load [--clients 20] [--comments 5] [--max-new-tokens 32]

Starts the real app on loopback (the embedded default model and the shipped adapter, as
`python app.py` would), sends the held-out comments from ``--clients`` threads at once, each with
its own gradio_client and one comment after another, and prints the latency percentiles (from
submission to the last streamed update, queue wait included), errors, the largest queue seen and the
server's memory before and after. tests/test_app.py runs the same driver on a tiny model.
"""

from __future__ import annotations

import argparse
import json
import resource
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from bench.reply_latency import percentile
from inference.compare import read_comments
from inference.default_model import ROOT


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)
    replies: list[tuple[str, str]] = field(default_factory=list)  # (base, fine-tuned) of each request
    errors: list[str] = field(default_factory=list)
    largest_queue: int = 0
    seconds: float = 0.0

    def percentile(self, q: float) -> float:
        return percentile(self.latencies, q)


def rss_mib(pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def run_load(url: str, comments: list[str], clients: int, per_client: int, settings: tuple) -> LoadResult:
    """``clients`` users at once, each sending ``per_client`` comments in turn through /reply."""
    from gradio_client import Client

    result = LoadResult()
    lock = threading.Lock()
    done = threading.Event()

    def user(index: int) -> None:
        client = Client(url, verbose=False)
        for k in range(per_client):
            comment = comments[(index * per_client + k) % len(comments)]
            started = time.perf_counter()
            try:
                _notice, base, _, tuned, _tuned_stats, _ = client.predict(comment, *settings, api_name="/reply")
            except Exception as exc:  # recorded and reported: the caller asserts there are none
                with lock:
                    result.errors.append(f"{type(exc).__name__}: {exc}")
                continue
            with lock:
                result.latencies.append(time.perf_counter() - started)
                result.replies.append((base, tuned))
        client.close()

    def watch_queue() -> None:
        while not done.is_set():
            with urllib.request.urlopen(f"{url.rstrip('/')}/gradio_api/queue/status", timeout=10) as response:
                size = json.load(response)["queue_size"]
            result.largest_queue = max(result.largest_queue, size)
            done.wait(0.05)

    started = time.perf_counter()
    watcher = threading.Thread(target=watch_queue, daemon=True)
    watcher.start()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(user, range(clients)))
    done.set()
    watcher.join()
    result.seconds = time.perf_counter() - started
    return result


def main() -> None:
    import app as app_module
    from inference.adapter_files import adapter_held_out
    from inference.compare import pane_labels
    from inference.default_model import DEFAULT_ADAPTER, DEFAULT_BASE_MODEL
    from inference.engines import load_replier
    from inference.generate import GenerationSettings
    from training.report import environment

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--comments", type=int, default=5, help="comments per client")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--port", type=int, default=7861)
    parser.add_argument("--backend", choices=("auto", "llama.cpp", "transformers"), default="auto")
    args = parser.parse_args()

    replier = load_replier(DEFAULT_BASE_MODEL, str(DEFAULT_ADAPTER), "nf4", backend=args.backend)
    replier.warm_up()
    demo = app_module.build_demo(
        replier,
        pane_labels(DEFAULT_BASE_MODEL, str(DEFAULT_ADAPTER), replier),
        None,
        adapter_held_out(str(DEFAULT_ADAPTER)),
    )
    app_module.launch(demo, "127.0.0.1", args.port, block=False)
    comments = read_comments(ROOT / "data" / "heldout.jsonl")
    defaults = GenerationSettings()
    settings = (
        args.max_new_tokens,
        0.0,
        1.0,
        defaults.repetition_penalty,
        defaults.no_repeat_ngram,
        replier.best_prompt_pane,
    )
    before = rss_mib()
    result = run_load(demo.local_url, comments, args.clients, args.comments, settings)
    after = rss_mib()
    demo.close()
    total = args.clients * args.comments
    print(json.dumps(environment(), indent=1))
    print(
        "| clients x comments | completed | errors | p50 | p95 | max | largest queue "
        f"(limit {app_module.QUEUE_MAX_SIZE}) | wall | server RSS before -> after |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {args.clients} x {args.comments} | {len(result.latencies)}/{total} | {len(result.errors)} | "
        f"{result.percentile(0.5):.1f} s | {result.percentile(0.95):.1f} s | {max(result.latencies):.1f} s | "
        f"{result.largest_queue} | {result.seconds:.0f} s | {before:.0f} -> {after:.0f} MiB |"
    )
    print(
        f"mean service time per request: {result.seconds / max(1, len(result.latencies)):.2f} s; "
        f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
    )
    if result.errors:
        print("errors:", *sorted(set(result.errors)), sep="\n  ")


if __name__ == "__main__":
    main()
