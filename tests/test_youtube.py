"""`python -m youtube.fetch` through a real HTTP client against a local server on 127.0.0.1 that
serves recorded commentThreads pages (the fake is only the network edge): paging, a quota error
mid-fetch and its resume, a bad key; the key is never written; the export trains."""

from __future__ import annotations

import json

import pytest

from tests.helpers import FakeYouTube, comment_thread, thread_page
from training.data import load_pairs
from youtube.fetch import main

KEY = "AIzaSy-test-key-never-written"
CHANNEL = "UCmaya0000000000000000"
PAGES = {
    None: thread_page([comment_thread(i, CHANNEL, True, others=i % 2) for i in range(12)], next_page="PAGE2"),
    "PAGE2": thread_page(
        [
            comment_thread(12, CHANNEL, True),
            comment_thread(13, CHANNEL, False, others=2),
            comment_thread(14, CHANNEL, False),
        ]
    ),
}


@pytest.fixture
def api():
    with FakeYouTube(PAGES, CHANNEL, KEY) as server:
        yield server


def fetch(api: FakeYouTube, out, *extra: str) -> int:
    return main(["--channel", CHANNEL, "--out", str(out), "--api-url", api.api_url, *extra])


def page_tokens(api: FakeYouTube) -> list[str | None]:
    return [query.get("pageToken") for _, _, query in api.requests]


def test_fetches_every_page_and_writes_an_export_the_loader_reads(api, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("YOUTUBE_API_KEY", KEY)
    out = tmp_path / "comments.json"
    assert fetch(api, out) == 0
    assert page_tokens(api) == [None, "PAGE2"]
    assert all(query["maxResults"] == "100" for _, _, query in api.requests)
    pairs = load_pairs(out)
    assert len(pairs) == 13  # 12 + 1 threads with the channel's reply; viewers' replies are not the creator's
    assert (
        pairs[0].comment == "How do I start with topic 0, @user?"
        and pairs[0].response == "Great question 0: start with part 0. –Maya"
    )
    printed = capsys.readouterr()
    assert "15 threads in 2 page(s)" in printed.out and "13 with your reply" in printed.out
    assert KEY not in out.read_text() + printed.out + printed.err and not (tmp_path / "comments.json.partial").exists()


def test_a_quota_error_says_so_in_one_line_and_the_next_run_resumes(api, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("YOUTUBE_API_KEY", KEY)
    out = tmp_path / "comments.json"
    api.quota_on_page = "PAGE2"
    assert fetch(api, out) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        err.startswith("error: the daily YouTube quota of your Google Cloud project is used up")
        and "1 page(s) are saved" in err
    )
    partial = tmp_path / "comments.json.partial"
    assert partial.is_file() and not out.exists() and KEY not in partial.read_text()
    assert fetch(api, out) == 0  # the quota is back: only the missing page is fetched
    assert page_tokens(api) == [None, "PAGE2", "PAGE2"]
    assert len(load_pairs(out)) == 13 and not partial.exists()


def test_a_bad_or_missing_key_is_one_clear_line(api, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("YOUTUBE_API_KEY", raising=False)
    assert fetch(api, tmp_path / "c.json") == 2
    assert "no API key: set YOUTUBE_API_KEY" in capsys.readouterr().err
    assert fetch(api, tmp_path / "c.json", "--api-key", "wrong-key") == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]  # the rest is the progress bar
    assert "YouTube refused the API key" in line and "YOUTUBE_API_KEY" in line and "wrong-key" not in err


def test_the_api_root_comes_from_the_environment(api, tmp_path, monkeypatch):
    monkeypatch.setenv("YOUTUBE_API_KEY", KEY)
    monkeypatch.setenv("YOUTUBE_API_URL", api.api_url)
    assert main(["--channel", CHANNEL, "--out", str(tmp_path / "c.json")]) == 0
    assert page_tokens(api) == [None, "PAGE2"]


def test_the_export_trains(api, tmp_path, monkeypatch, tiny_model_dir):
    from training.config import TrainConfig
    from training.run import train

    monkeypatch.setenv("YOUTUBE_API_KEY", KEY)
    out = tmp_path / "comments.json"
    assert fetch(api, out) == 0
    config = TrainConfig(
        base_model=str(tiny_model_dir),
        data=str(out),
        eval_data="none",
        eval_fraction=0.2,
        output_dir=str(tmp_path / "adapter"),
        epochs=1,
        batch_size=4,
        learning_rate=1e-2,
    )
    assert train(config) == 0
    summary = json.loads((tmp_path / "adapter" / "training_summary.json").read_text())
    assert summary["data"]["train_rows"] + summary["data"]["eval_rows"] == 13
