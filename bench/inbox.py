"""The comment inbox at its target size: pull 200 threads, draft them all, post 50 approved replies,
against the tests' local YouTube API (127.0.0.1), with the shipped adapter on llama.cpp; the app
(`python app.py --inbox DIR`, its own process) is asked for the inbox every second while the
drafts are made. The voice evaluation's batched path runs in the same process for comparison.

    python -m bench.inbox [--threads 200] [--post 50]

Prints the numbers with the machine, its CPU flags and the library versions.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from inference.compare import read_comments
from inference.default_model import DEFAULT_ADAPTER, DEFAULT_BASE_MODEL, ROOT
from inference.engines import load_replier
from tests.helpers import (
    FakeYouTube,
    comment_thread,
    start_app,
    thread_page,
)  # the tests' local API: the only fake, at the network edge
from training.evaluate import EVAL_SETTINGS
from training.report import environment
from youtube import auth
from youtube.inbox import cli, review
from youtube.inbox import state as inbox_state

CHANNEL = "UCbench000000000000000"
APP_START_TIMEOUT_S = 600


def recorded_pages(comments: list[str], threads: int) -> dict[str | None, dict]:
    """``threads`` unanswered threads, newest first, 100 a page, the comments cycled."""
    items = []
    for i in range(threads):
        thread = comment_thread(
            i, CHANNEL, False, published=f"2026-11-{28 - i // 100:02d}T{23 - i % 100 // 5:02d}:{59 - i % 5:02d}:00Z"
        )
        thread["snippet"]["topLevelComment"]["snippet"]["textOriginal"] = comments[i % len(comments)]
        items.append(thread)
    pages: dict[str | None, dict] = {}
    for start in range(0, threads, 100):
        token = f"P{start // 100 + 1}" if start else None
        pages[token] = thread_page(
            items[start : start + 100], next_page=f"P{start // 100 + 2}" if start + 100 < threads else None
        )
    return pages


@contextlib.contextmanager
def app_polled(state: Path, env: dict[str, str]) -> Iterator[list[float]]:
    """`python app.py --inbox STATE` in its own process, asked for the inbox every second; yields
    the list the latencies (s) go into while the block runs."""
    from gradio_client import Client

    process, url = start_app(["--inbox", str(state), "--flywheel-dir", ""], env, APP_START_TIMEOUT_S)
    client, latencies, stop = Client(url, verbose=False), [], threading.Event()

    def poll() -> None:
        while not stop.wait(1.0):
            started = time.perf_counter()
            client.predict(None, api_name="/inbox")
            latencies.append(time.perf_counter() - started)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        yield latencies
    finally:
        stop.set()
        poller.join(timeout=60)
        process.terminate()
        process.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=200)
    parser.add_argument("--post", type=int, default=50)
    args = parser.parse_args()
    comments = [c for name in ("heldout.jsonl", "train.jsonl") for c in read_comments(ROOT / "data" / name)]
    notes = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        FakeYouTube(
            recorded_pages(comments, args.threads), CHANNEL, "bench-key", "bench-refresh", "bench-secret"
        ) as api,
    ):
        state = Path(tmp) / "inbox"
        env = signed_in_env(api, Path(tmp) / "config" / "youtube-token.json")
        os.environ.update(env)

        started = time.perf_counter()
        if cli.main(["pull", "--state", str(state), "--channel", CHANNEL, "--since", "2026-01-01"]) != 0:
            raise SystemExit("the pull failed")
        notes.append(f"pull: {len(inbox_state.load(state))} threads in {time.perf_counter() - started:.2f} s")

        replier = load_replier(DEFAULT_BASE_MODEL, str(DEFAULT_ADAPTER))
        replier.warm_up()
        notes.append(voice_evaluation_note(replier, comments[:23]))
        notes += drafting_notes(state, env, replier)

        for item in inbox_state.to_answer(state)[: args.post]:
            review.approve(state, item.id, item.final)
        started = time.perf_counter()
        if cli.main(["post", "--state", str(state)]) != 0:
            raise SystemExit("the post failed")
        posted = len(api.inserts)
        notes.append(
            f"post: {posted} replies in {time.perf_counter() - started:.2f} s, "
            f"{len({s['parentId'] for s in api.inserts})} distinct comments"
        )

    env_info = environment()
    libs = env_info["libraries"]
    print(
        f"{time.strftime('%Y-%m-%d')}, {env_info['cpu']} "
        f"({env_info.get('cpu_flags', '?')}), {env_info['cores']} cores; "
        + ", ".join(f"{name} {libs[name]}" for name in sorted(libs))
    )
    print("\n".join(f"- {note}" for note in notes))


def signed_in_env(api: FakeYouTube, token_file: Path) -> dict[str, str]:
    """A sign-in saved to ``token_file``, and the environment that points every command at ``api``."""
    from google.oauth2.credentials import Credentials

    auth.save(
        Credentials(
            None,
            refresh_token="bench-refresh",
            token_uri=api.token_url,
            client_id="bench",
            client_secret="bench-secret",
        ),
        token_file,
    )
    return {
        **os.environ,
        "YOUTUBE_API_KEY": "bench-key",
        "YOUTUBE_API_URL": api.api_url,
        "YOUTUBE_TOKEN_URL": api.token_url,
        "YOUTUBE_TOKEN_FILE": str(token_file),
    }


def voice_evaluation_note(replier, comments: list[str]) -> str:
    """Both replies of the 23 held-out ``comments``, decoded the way the voice evaluation does."""
    started = time.perf_counter()
    evaluated = [r for replies in replier.replies(comments, EVAL_SETTINGS, background=False) for r in replies]
    seconds = time.perf_counter() - started
    tokens = sum(len(r.token_ids) for r in evaluated)
    return (
        f"voice evaluation path ({replier.backend}, every pane of the 23 held-out comments, "
        f"max {EVAL_SETTINGS.max_new_tokens} new tokens): "
        f"{seconds:.1f} s, {tokens / seconds:.1f} tokens/s, {23 / seconds:.2f} comments/s"
    )


def drafting_notes(state: Path, env: dict[str, str], replier) -> list[str]:
    """Draft every waiting comment while the app, in its own process, is asked for the inbox every
    second: the drafting rate, and the app's read latency idle and while drafting."""
    with app_polled(state, env) as latencies:
        time.sleep(5)
        idle = latencies[:]
        run = review.draft(state, replier)
        during = latencies[len(idle) :]
    rate = (
        f"draft ({replier.backend}, fine-tuned pane, max {EVAL_SETTINGS.max_new_tokens} "
        f"new tokens): {run}; {run.tokens / run.comments:.0f} tokens per draft"
    )
    responsiveness = (
        f"app responsiveness: the inbox read in {statistics.median(idle):.2f} s idle (median of {len(idle)}), "
        f"{statistics.median(during):.2f} s median / {max(during):.2f} s max "
        f"over {len(during)} reads while drafting"
    )
    return [rate, responsiveness]


if __name__ == "__main__":
    main()
