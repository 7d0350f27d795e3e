"""`python -m training.youtube` through a real HTTP client against a local server on 127.0.0.1 that
serves recorded commentThreads pages (the fake is only the network edge): paging, a quota error
mid-fetch and its resume, a bad key; the key is never written; the export trains."""

from __future__ import annotations

import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from training.data import load_pairs
from training.youtube import main

KEY = "AIzaSy-test-key-never-written"
CHANNEL = "UCmaya0000000000000000"


def thread(i: int, owner_reply: bool, others: int = 0) -> dict:
    replies = [{"kind": "youtube#comment", "snippet": {"textOriginal": f"Same question here {j}", "authorChannelId": {"value": f"UCviewer{j}"}}} for j in range(others)]
    if owner_reply:
        replies.append({"kind": "youtube#comment", "snippet": {"textOriginal": f"Great question {i}: start with part {i}. –Maya", "authorChannelId": {"value": CHANNEL}}})
    return {
        "kind": "youtube#commentThread",
        "id": f"thread{i}",
        "snippet": {
            "channelId": CHANNEL,
            "videoId": "vid1",
            "topLevelComment": {"kind": "youtube#comment", "snippet": {"textOriginal": f"How do I start with topic {i}, @viewer{i}?", "authorDisplayName": f"viewer{i}"}},
            "totalReplyCount": len(replies),
        },
        **({"replies": {"comments": replies}} if replies else {}),
    }


PAGES = {
    None: {"kind": "youtube#commentThreadListResponse", "nextPageToken": "PAGE2", "pageInfo": {"resultsPerPage": 12}, "items": [thread(i, True, others=i % 2) for i in range(12)]},
    "PAGE2": {"kind": "youtube#commentThreadListResponse", "pageInfo": {"resultsPerPage": 3}, "items": [thread(12, True), thread(13, False, others=2), thread(14, False)]},
}
QUOTA = {"error": {"code": 403, "message": "The request cannot be completed because you have exceeded your quota.", "errors": [{"reason": "quotaExceeded", "domain": "youtube.quota"}]}}
BAD_KEY = {"error": {"code": 400, "message": "API key not valid. Please pass a valid API key.", "errors": [{"reason": "badRequest", "domain": "global"}]}}


@pytest.fixture
def api():
    """The recorded API: ``state["quota_on"]`` makes that page token answer quotaExceeded once."""
    state = {"requests": [], "quota_on": "unset"}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            url = urllib.parse.urlsplit(self.path)
            query = dict(urllib.parse.parse_qsl(url.query))
            state["requests"].append(query)
            token = query.get("pageToken")
            if url.path != "/youtube/v3/commentThreads" or query.get("part") != "snippet,replies" or query.get("allThreadsRelatedToChannelId") != CHANNEL:
                status, body = 404, {"error": {"code": 404, "message": "not found", "errors": [{"reason": "channelNotFound"}]}}
            elif query.get("key") != KEY:
                status, body = 400, BAD_KEY
            elif token == state["quota_on"]:
                state["quota_on"] = "unset"
                status, body = 403, QUOTA
            else:
                status, body = 200, PAGES[token]
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):  # keep the test output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    worker = threading.Thread(target=server.serve_forever, daemon=True)
    worker.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/youtube/v3", state
    server.shutdown()
    server.server_close()


def fetch(url: str, out, *extra: str) -> int:
    return main(["--channel", CHANNEL, "--out", str(out), "--api-url", url, *extra])


def test_fetches_every_page_and_writes_an_export_the_loader_reads(api, tmp_path, monkeypatch, capsys):
    url, state = api
    monkeypatch.setenv("YOUTUBE_API_KEY", KEY)
    out = tmp_path / "comments.json"
    assert fetch(url, out) == 0
    assert [r.get("pageToken") for r in state["requests"]] == [None, "PAGE2"]
    assert all(r["maxResults"] == "100" for r in state["requests"])
    pairs = load_pairs(out)
    assert len(pairs) == 13  # 12 + 1 threads with the channel's reply; viewers' replies are not the creator's
    assert pairs[0].comment == "How do I start with topic 0, @user?" and pairs[0].response == "Great question 0: start with part 0. –Maya"
    printed = capsys.readouterr()
    assert "15 threads in 2 page(s)" in printed.out and "13 with your reply" in printed.out
    assert KEY not in out.read_text() + printed.out + printed.err and not (tmp_path / "comments.json.partial").exists()


def test_a_quota_error_says_so_in_one_line_and_the_next_run_resumes(api, tmp_path, monkeypatch, capsys):
    url, state = api
    monkeypatch.setenv("YOUTUBE_API_KEY", KEY)
    out = tmp_path / "comments.json"
    state["quota_on"] = "PAGE2"
    assert fetch(url, out) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: the API key's daily YouTube quota is used up") and "1 page(s) are saved" in err
    partial = tmp_path / "comments.json.partial"
    assert partial.is_file() and not out.exists() and KEY not in partial.read_text()
    assert fetch(url, out) == 0  # the quota is back: only the missing page is fetched
    assert [r.get("pageToken") for r in state["requests"]] == [None, "PAGE2", "PAGE2"]
    assert len(load_pairs(out)) == 13 and not partial.exists()


def test_a_bad_or_missing_key_is_one_clear_line(api, tmp_path, monkeypatch, capsys):
    url, _ = api
    monkeypatch.delenv("YOUTUBE_API_KEY", raising=False)
    assert fetch(url, tmp_path / "c.json") == 2
    assert "no API key: set YOUTUBE_API_KEY" in capsys.readouterr().err
    assert fetch(url, tmp_path / "c.json", "--api-key", "wrong-key") == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]  # the rest is the progress bar
    assert "YouTube refused the API key" in line and "YOUTUBE_API_KEY" in line and "wrong-key" not in err


def test_the_export_trains(api, tmp_path, monkeypatch, tiny_model_dir):
    from training.config import TrainConfig
    from training.run import train

    url, _ = api
    monkeypatch.setenv("YOUTUBE_API_KEY", KEY)
    out = tmp_path / "comments.json"
    assert fetch(url, out) == 0
    config = TrainConfig(base_model=str(tiny_model_dir), data=str(out), eval_data="none", eval_fraction=0.2, output_dir=str(tmp_path / "adapter"),
                         epochs=1, batch_size=4, learning_rate=1e-2)
    assert train(config) == 0
    summary = json.loads((tmp_path / "adapter" / "training_summary.json").read_text())
    assert summary["data"]["train_rows"] + summary["data"]["eval_rows"] == 13
