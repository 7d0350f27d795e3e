"""Helpers the tests share (fixtures live in conftest.py)."""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch


def build_tiny_model(tokenizer, folder: Path, seed: int = 0) -> Path:
    """A 2-layer Llama with SmolLM2's vocabulary, saved with its tokenizer so the real loader runs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        # Wide enough weights that a 64-wide model can make confident predictions at all: with
        # the usual 0.02 the largest reachable logit is about 1, and no training can lower the loss.
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def pairs_jsonl(n: int, start: int = 0) -> str:
    return "".join(
        json.dumps(
            {
                "comment": f"Question number {i}: what is topic {i}?",
                "response": f"Topic {i} is explained in part {i}. –Maya",
            }
        )
        + "\n"
        for i in range(start, start + n)
    )


def write_run_data(folder: Path) -> Path:
    """A tiny model's run: 24 training pairs (6 updates of 4 per epoch) and 6 held-out ones."""
    (folder / "train.jsonl").write_text(pairs_jsonl(24))
    (folder / "eval.jsonl").write_text(pairs_jsonl(6, start=100))
    return folder


def launch_environment(config: Path) -> dict[str, str]:
    """The variables `accelerate launch --config_file CONFIG` gives each process it starts, as
    accelerate's own launch code computes them."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "-m", "training.run"])
    args, _, _ = _validate_launch_command(args)
    return prepare_multi_gpu_env(args)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(flags: list[str], env: dict[str, str], timeout_s: float = 120) -> tuple[subprocess.Popen, str]:
    """`python app.py FLAGS` in its own process on a free port of 127.0.0.1, once it answers; its URL."""
    from inference.default_model import ROOT

    port = free_port()
    command = [sys.executable, "app.py", *flags, "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url, deadline = f"http://127.0.0.1:{port}/", time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).close()
            return process, url
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"app.py did not start: {process.stderr.read()[-2000:]}") from None
            time.sleep(0.5)


def comment_thread(
    i: int, channel: str, owner_reply: bool, others: int = 0, published: str = "2026-11-30T12:00:00Z"
) -> dict:
    """A commentThreads item as the API gives it: viewer i's question, ``others`` viewers' replies
    and, with ``owner_reply``, the channel's answer."""
    replies = [
        {
            "kind": "youtube#comment",
            "snippet": {"textOriginal": f"Same question here {j}", "authorChannelId": {"value": f"UCviewer{j}"}},
        }
        for j in range(others)
    ]
    if owner_reply:
        replies.append(
            {
                "kind": "youtube#comment",
                "snippet": {
                    "textOriginal": f"Great question {i}: start with part {i}. –Maya",
                    "authorChannelId": {"value": channel},
                },
            }
        )
    top = {
        "kind": "youtube#comment",
        "id": f"thread{i}",
        "snippet": {
            "videoId": "vid1",
            "textOriginal": f"How do I start with topic {i}, @viewer{i}?",
            "authorDisplayName": f"@viewer{i}",
            "authorChannelId": {"value": f"UCviewer{i}"},
            "publishedAt": published,
        },
    }
    return {
        "kind": "youtube#commentThread",
        "id": f"thread{i}",
        "snippet": {"channelId": channel, "videoId": "vid1", "topLevelComment": top, "totalReplyCount": len(replies)},
        **({"replies": {"comments": replies}} if replies else {}),
    }


def thread_page(threads: list[dict], next_page: str | None = None) -> dict:
    return {
        "kind": "youtube#commentThreadListResponse",
        **({"nextPageToken": next_page} if next_page else {}),
        "pageInfo": {"resultsPerPage": len(threads)},
        "items": threads,
    }


class FakeYouTube:
    """The YouTube Data API v3 and Google's OAuth token endpoint on 127.0.0.1, the tests' only fake
    (the network edge): recorded commentThreads pages, comments.list/insert on replies it keeps, and
    switches for the failures (a quota error on a page or after N inserts, deleted comments, expired
    access tokens, a revoked refresh token)."""

    def __init__(
        self, pages: dict[str | None, dict], channel: str, key: str, refresh_token: str = "", client_secret: str = ""
    ) -> None:
        self.pages, self.channel, self.key = pages, channel, key
        self.refresh_token, self.client_secret = refresh_token, client_secret
        self.requests: list[tuple[str, str, dict]] = []  # (method, path, query) of every API call
        self.inserts: list[dict] = []  # the snippet of every comments.insert carried out
        self.replies: dict[str, list[dict]] = {}  # parent id -> the replies it has
        self.quota_on_page: str | None = "unset"  # this page token answers quotaExceeded, once
        self.quota_after_inserts: int | None = None  # inserts past this many answer quotaExceeded
        self.deleted: set[str] = set()
        self.revoked = False
        self.access_tokens: list[str] = []  # issued, newest last; only the newest is accepted
        self.expire_after_inserts: int | None = None  # the access token expires once this many inserts are done
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.worker = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/youtube/v3"

    @property
    def token_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/token"

    def __enter__(self) -> FakeYouTube:
        self.worker.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _answer(self, method: str, path: str, query: dict, headers, body: bytes) -> tuple[int, dict]:
        if path == "/token":
            return self._token(dict(urllib.parse.parse_qsl(body.decode())))
        self.requests.append((method, path, query))
        if self.expire_after_inserts is not None and len(self.inserts) >= self.expire_after_inserts:
            self.expire_after_inserts = None
            self.access_tokens.append("expired-by-the-server")
        bearer = headers.get("Authorization", "").removeprefix("Bearer ")
        if "key" in query:
            if query["key"] != self.key:
                return 400, error(400, "API key not valid. Please pass a valid API key.", "badRequest")
        elif not self.access_tokens or bearer != self.access_tokens[-1]:
            return 401, error(401, "Request had invalid authentication credentials.", "authError")
        if (method, path) == ("GET", "/youtube/v3/commentThreads"):
            if query.get("part") != "snippet,replies" or query.get("allThreadsRelatedToChannelId") != self.channel:
                return 404, error(404, "not found", "channelNotFound")
            if query.get("pageToken") == self.quota_on_page:
                self.quota_on_page = "unset"
                return 403, QUOTA_ERROR
            return 200, self.pages[query.get("pageToken")]
        parent = query.get("parentId") or json.loads(body or b"{}").get("snippet", {}).get("parentId", "")
        if parent in self.deleted:
            return 404, error(
                404,
                "The parent comment could not be found.",
                "parentCommentNotFound" if method == "POST" else "commentNotFound",
            )
        if (method, path) == ("GET", "/youtube/v3/comments"):
            return 200, {"kind": "youtube#commentListResponse", "items": self.replies.get(parent, [])}
        if (method, path) == ("POST", "/youtube/v3/comments"):
            if self.quota_after_inserts is not None and len(self.inserts) >= self.quota_after_inserts:
                return 403, QUOTA_ERROR
            snippet = json.loads(body)["snippet"]
            self.inserts.append(snippet)
            reply = {
                "kind": "youtube#comment",
                "id": f"{parent}.reply{len(self.inserts)}",
                "snippet": {**snippet, "authorChannelId": {"value": self.channel}},
            }
            self.replies.setdefault(parent, []).append(reply)
            return 200, reply
        return 404, error(404, f"no such method {method} {path}", "notFound")

    def _token(self, form: dict) -> tuple[int, dict]:
        if form.get("grant_type") != "refresh_token" or form.get("client_secret") != self.client_secret:
            return 400, {"error": "invalid_client", "error_description": "The OAuth client was not found."}
        if self.revoked or form.get("refresh_token") != self.refresh_token:
            return 400, {"error": "invalid_grant", "error_description": "Token has been expired or revoked."}
        self.access_tokens.append(f"ya29.{secrets.token_urlsafe(24)}")  # made up here, so no source file holds it
        return 200, {
            "access_token": self.access_tokens[-1],
            "expires_in": 3599,
            "token_type": "Bearer",
            "scope": form.get("scope", ""),
        }

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def answer(self, method: str) -> None:
                url = urllib.parse.urlsplit(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, payload = fake._answer(
                    method, url.path, dict(urllib.parse.parse_qsl(url.query)), self.headers, body
                )
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self.answer("GET")

            def do_POST(self) -> None:
                self.answer("POST")

            def log_message(self, *args) -> None:  # keep the test output clean
                pass

        return Handler


def error(code: int, message: str, reason: str) -> dict:
    return {"error": {"code": code, "message": message, "errors": [{"reason": reason, "domain": "youtube"}]}}


QUOTA_ERROR = error(403, "The request cannot be completed because you have exceeded your quota.", "quotaExceeded")
