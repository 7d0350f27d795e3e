"""The comment inbox end to end with real parts: `python -m youtube.inbox` and the app's Inbox tab
(through a real server with gradio_client, and once in a real Chromium), a tiny real model for the
drafts, Google's own OAuth library refreshing tokens over HTTP. The fake is only the network edge:
a local server on 127.0.0.1 with recorded commentThreads pages, a token endpoint, and the
comments.insert calls it records. A post killed between the call and its record, an expired
access token, a revoked sign-in, the quota running out mid-batch and a comment deleted before
posting: no reply is posted twice and no approval is lost."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
import subprocess
import sys
from collections import Counter

import pytest

from inference.default_model import ROOT
from inference.generate import GenerationSettings
from tests.helpers import FakeYouTube, comment_thread, free_port, thread_page
from youtube import auth
from youtube.inbox import cli, review
from youtube.inbox import state as inbox_state

# Made up at each run, so that no file of the repository can hold them unless this code wrote them there.
KEY = f"AIzaSy{secrets.token_urlsafe(24)}"
REFRESH_TOKEN = f"1//{secrets.token_urlsafe(32)}"
CLIENT_SECRET = f"GOCSPX-{secrets.token_urlsafe(20)}"
CHANNEL = "UCmaya0000000000000000"


def day(d: int, hour: int = 12) -> str:
    return f"2026-11-{d:02d}T{hour:02d}:00:00Z"


# Newest first, as the API pages them: page 1 on Nov 30, page 2 on Nov 20, page 3 crosses the
# --since bound (Nov 1) after thread 15, so page 4 is never read. Every third thread has the
# channel's answer already.
PAGES = {
    None: thread_page(
        [comment_thread(i, CHANNEL, i % 3 == 0, others=i % 2, published=day(30, 20 - i)) for i in range(10)],
        next_page="P2",
    ),
    "P2": thread_page(
        [comment_thread(i, CHANNEL, i == 10, published=day(20, 30 - i)) for i in range(10, 15)], next_page="P3"
    ),
    "P3": thread_page(
        [
            comment_thread(15, CHANNEL, False, published=day(5)),
            comment_thread(16, CHANNEL, False, published="2026-10-01T12:00:00Z"),
        ],
        next_page="P4",
    ),
    "P4": thread_page([comment_thread(17, CHANNEL, False, published="2026-09-01T12:00:00Z")]),
}
UNANSWERED = [f"thread{i}" for i in (1, 2, 4, 5, 7, 8, 11, 12, 13, 14, 15)]
DRAFT_SETTINGS = GenerationSettings(max_new_tokens=12)


@pytest.fixture
def api(tmp_path, monkeypatch):
    """The local API, and the environment every command and the app read: key, roots, sign-in."""
    from google.oauth2.credentials import Credentials

    token_file = tmp_path / "home" / ".config" / "replytune" / "youtube-token.json"
    with FakeYouTube(PAGES, CHANNEL, KEY, REFRESH_TOKEN, CLIENT_SECRET) as server:
        credentials = Credentials(
            token=None,
            refresh_token=REFRESH_TOKEN,
            token_uri=server.token_url,
            client_id="replytune.apps.googleusercontent.com",
            client_secret=CLIENT_SECRET,
        )
        auth.save(credentials, token_file)  # what `login` leaves after the consent in the browser
        for name, value in {
            "YOUTUBE_API_KEY": KEY,
            "YOUTUBE_API_URL": server.api_url,
            "YOUTUBE_TOKEN_URL": server.token_url,
            "YOUTUBE_TOKEN_FILE": str(token_file),
        }.items():
            monkeypatch.setenv(name, value)
        yield server


@pytest.fixture(scope="module")
def replier(tiny_model_dir, tiny_adapter_dir):
    from inference.engines import load_replier

    return load_replier(str(tiny_model_dir), str(tiny_adapter_dir), quantization="none")


@pytest.fixture
def state(tmp_path):
    return tmp_path / "inbox"


def run(state, command: str, *flags: str) -> int:
    return cli.main([command, "--state", str(state), *flags])


def pull(state) -> int:
    return run(state, "pull", "--channel", CHANNEL, "--since", "2026-11-01")


@pytest.fixture
def drafted(api, state, replier):
    assert pull(state) == 0
    review.draft(state, replier, DRAFT_SETTINGS)
    return state


def approve_all(state, ids: list[str]) -> None:
    for comment_id in ids:
        review.approve(state, comment_id, inbox_state.load(state)[comment_id].final)


def statuses(state) -> Counter:
    return Counter(item.status for item in inbox_state.load(state).values())


def inserted(api: FakeYouTube) -> Counter:
    return Counter(snippet["parentId"] for snippet in api.inserts)


def test_pull_keeps_the_unanswered_threads_back_to_since_and_adds_only_what_is_new(api, state, capsys):
    assert pull(state) == 0
    assert [query.get("pageToken") for _, _, query in api.requests] == [None, "P2", "P3"]  # P4 is older than --since
    assert "11 new comment(s) from 3 page(s)" in capsys.readouterr().out
    lines = [json.loads(line) for line in (state / "inbox.jsonl").read_text().splitlines()]
    assert [line["id"] for line in lines] == UNANSWERED
    first = lines[0]
    assert (
        first["text"] == "How do I start with topic 1, @viewer1?" and first["author"] == "@viewer1"
    )  # shown to the creator as written
    assert first["status"] == "waiting" and first["draft"] == "" and first["channel"] == CHANNEL
    api.pages = {
        **PAGES,
        None: thread_page(
            [comment_thread(99, CHANNEL, False, published=day(30, 23)), *PAGES[None]["items"]], next_page="P2"
        ),
    }
    assert pull(state) == 0
    assert "1 new comment(s)" in capsys.readouterr().out
    assert [item.id for item in inbox_state.to_answer(state)][:2] == ["thread99", "thread1"]  # newest first
    assert len(inbox_state.load(state)) == 12


def test_drafts_fill_every_waiting_comment_and_report_the_rate(drafted, replier):
    items = inbox_state.load(drafted).values()
    assert all(item.status == "drafted" and item.draft for item in items)
    assert str(review.draft(drafted, replier, DRAFT_SETTINGS)).startswith("0 drafts in 0.0 s (nothing to draft)")


def test_edits_and_approvals_feed_the_flywheel_with_handles_anonymised(drafted):
    first, second, third = UNANSWERED[:3]
    draft = inbox_state.load(drafted)[first].draft
    review.edit(drafted, first, "Start with part 1, @viewer1! –Maya")
    review.approve(drafted, first, "Start with part 1, @viewer1! –Maya")  # the same text: no second preference
    review.approve(drafted, first, "Start with part 1, @viewer1! –Maya")  # approved twice: one pair
    review.approve(drafted, second, inbox_state.load(drafted)[second].draft)
    review.skip(drafted, third)
    preferences = [json.loads(line) for line in (drafted / "preferences.jsonl").read_text().splitlines()]
    assert preferences == [
        {
            "comment": "How do I start with topic 1, @user?",
            "chosen": "Start with part 1, @user! –Maya",
            "rejected": draft,
        }
    ]
    pairs = [json.loads(line) for line in (drafted / "pairs.jsonl").read_text().splitlines()]
    assert [p["response"] for p in pairs] == [
        "Start with part 1, @user! –Maya",
        inbox_state.load(drafted)[second].draft,
    ]
    assert inbox_state.load(drafted)[first].author == "@viewer1"  # only training data is anonymised
    assert statuses(drafted) == Counter(drafted=8, approved=2, skipped=1)
    from training.data import load_pairs

    assert len(load_pairs(drafted / "pairs.jsonl")) == 2  # training reads the file as it is
    with pytest.raises(inbox_state.InboxError, match="empty"):
        review.approve(drafted, second, "   ")


def test_post_sends_each_approved_reply_once_and_a_dry_run_sends_nothing(api, drafted, capsys):
    approve_all(drafted, UNANSWERED[:4])
    assert run(drafted, "post", "--dry-run") == 0
    out = capsys.readouterr().out
    assert out.count("would reply to @viewer") == 4 and api.inserts == []
    assert run(drafted, "post") == 0
    assert "4 posted" in capsys.readouterr().out
    assert inserted(api) == Counter(UNANSWERED[:4])
    assert [s["textOriginal"] for s in api.inserts] == [inbox_state.load(drafted)[i].final for i in UNANSWERED[:4]]
    posted = [inbox_state.load(drafted)[i] for i in UNANSWERED[:4]]
    assert all(item.status == "posted" and item.reply_id.startswith(item.id + ".reply") for item in posted)
    assert run(drafted, "post") == 0  # nothing left to post
    assert len(api.inserts) == 4 and inbox_state.counts(inbox_state.load(drafted)) == {
        "waiting": 7,
        "approved": 0,
        "posted": 4,
    }


@pytest.mark.parametrize("point", ["before", "after"])
def test_a_post_killed_around_the_insert_call_is_resolved_without_a_double_post(api, drafted, point):
    approve_all(drafted, UNANSWERED[:3])
    command = [sys.executable, "-m", "tests.crash_post", point, "--", "post", "--state", str(drafted)]
    killed = subprocess.run(command, cwd=ROOT, env={**os.environ}, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert len(api.inserts) == (1 if point == "after" else 0)
    assert statuses(drafted)["posting"] == 1 and statuses(drafted)["approved"] == 2  # recorded before the call
    assert run(drafted, "post") == 0
    assert inserted(api) == Counter(UNANSWERED[:3])  # exactly one reply per comment
    assert statuses(drafted)["posted"] == 3 and all(inbox_state.load(drafted)[i].reply_id for i in UNANSWERED[:3])


def test_an_expired_access_token_is_refreshed_mid_batch(api, drafted):
    approve_all(drafted, UNANSWERED[:4])
    api.expire_after_inserts = 2
    assert run(drafted, "post") == 0
    assert inserted(api) == Counter(UNANSWERED[:4])
    assert len([t for t in api.access_tokens if t.startswith("ya29.")]) == 2  # one at the start, one after the 401


def test_a_revoked_sign_in_is_one_line_and_keeps_every_approval(api, drafted, capsys):
    approve_all(drafted, UNANSWERED[:2])
    api.revoked = True
    assert run(drafted, "post") == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert (
        line.startswith("error: the YouTube sign-in was refused (invalid_grant")
        and "python -m youtube.inbox login" in line
    )
    assert statuses(drafted)["approved"] == 2 and api.inserts == []


def test_posting_before_signing_in_says_how_to_sign_in(api, drafted, capsys):
    approve_all(drafted, UNANSWERED[:1])
    auth.default_token_file().unlink()
    assert run(drafted, "post") == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert (
        line.startswith("error: not signed in to YouTube") and "python -m youtube.inbox login --client-secrets" in line
    )
    assert statuses(drafted)["approved"] == 1


def test_the_quota_running_out_mid_batch_keeps_the_rest_approved_for_later(api, drafted, capsys):
    approve_all(drafted, UNANSWERED[:5])
    api.quota_after_inserts = 2
    assert run(drafted, "post") == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert (
        line.startswith("error: the daily YouTube quota")
        and "2 posted" in line
        and "3 approved replies are kept" in line
    )
    assert statuses(drafted)["posted"] == 2 and statuses(drafted)["approved"] == 3
    api.quota_after_inserts = None  # the next day
    assert run(drafted, "post") == 0
    assert inserted(api) == Counter(UNANSWERED[:5])


def test_a_comment_deleted_before_posting_is_reported_gone_and_the_rest_are_posted(api, drafted, capsys):
    approve_all(drafted, UNANSWERED[:3])
    api.deleted = {UNANSWERED[1]}
    assert run(drafted, "post") == 0
    assert "2 posted, 1 gone (deleted before posting)" in capsys.readouterr().out
    assert inbox_state.load(drafted)[UNANSWERED[1]].status == "gone" and inserted(api) == Counter(
        [UNANSWERED[0], UNANSWERED[2]]
    )


def test_an_unreachable_api_is_one_line_and_the_next_run_posts_once(api, drafted, capsys):
    approve_all(drafted, UNANSWERED[:2])
    assert run(drafted, "post", "--api-url", f"http://127.0.0.1:{free_port()}/youtube/v3") == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: could not reach 127.0.0.1:") and "2 approved replies are kept" in line
    assert run(drafted, "post") == 0  # the one left "posting" is looked up first, then posted
    assert inserted(api) == Counter(UNANSWERED[:2])


def test_no_token_in_the_inbox_state_the_output_or_the_repository(api, drafted, capsys, tmp_path):
    approve_all(drafted, UNANSWERED[:2])
    assert run(drafted, "post") == 0
    printed = capsys.readouterr()
    secrets = [KEY, REFRESH_TOKEN, CLIENT_SECRET, *api.access_tokens]
    assert api.access_tokens  # a real refresh happened
    state_files = [p for p in drafted.rglob("*") if p.is_file()]
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    repo_files = [ROOT / name for name in listed if (ROOT / name).is_file()]
    for path in state_files + repo_files:
        data = path.read_bytes()
        assert not any(secret.encode() in data for secret in secrets), path
    assert not any(secret in printed.out + printed.err for secret in secrets)
    token_file = auth.default_token_file()
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600 and REFRESH_TOKEN in token_file.read_text()
    assert not any(token in token_file.read_text() for token in api.access_tokens)  # access tokens live in memory only
    with pytest.raises(auth.AuthError, match="inside the repository"):
        auth.load(ROOT / "youtube-token.json", api.token_url)


def test_the_app_shows_the_inbox_only_when_given_a_state_folder(monkeypatch, tmp_path):
    import app as app_module

    monkeypatch.delenv("INBOX_DIR", raising=False)
    assert app_module.parse_app_settings([]).inbox_dir is None
    monkeypatch.setenv("INBOX_DIR", str(tmp_path))
    assert app_module.parse_app_settings([]).inbox_dir == tmp_path
    assert app_module.parse_app_settings(["--inbox", str(tmp_path / "other")]).inbox_dir == tmp_path / "other"


@pytest.fixture
def inbox_app(api, drafted, replier, tiny_model_dir, tiny_adapter_dir):
    import app as app_module
    from inference.compare import pane_labels

    demo = app_module.build_demo(
        replier,
        pane_labels(str(tiny_model_dir), str(tiny_adapter_dir), replier),
        None,
        [],
        inbox_dir=drafted,
    )
    app_module.launch(demo, "127.0.0.1", free_port(), block=False)
    yield demo
    demo.close()


def test_the_app_inbox_tab_edits_approves_skips_regenerates_and_posts(api, drafted, inbox_app):
    from gradio_client import Client

    client = Client(inbox_app.local_url, verbose=False)
    counts, table, picked = client.predict(None, api_name="/inbox")
    assert counts == "11 waiting · 0 approved · 0 posted" and len(table["data"]) == 11
    assert picked["value"] == UNANSWERED[0] and [value for _, value in picked["choices"]] == UNANSWERED  # newest first
    comment, reply = client.predict(UNANSWERED[0], api_name="/inbox_pick")
    assert (
        comment == "@viewer1: How do I start with topic 1, @viewer1?"
        and reply == inbox_state.load(drafted)[UNANSWERED[0]].draft
    )
    client.predict(UNANSWERED[0], "My own answer, @viewer1. –Maya", api_name="/inbox_approve")
    client.predict(UNANSWERED[1], inbox_state.load(drafted)[UNANSWERED[1]].draft, api_name="/inbox_approve")
    client.predict(UNANSWERED[2], "", api_name="/inbox_skip")
    *_, regenerated, done = client.predict(UNANSWERED[3], "", api_name="/inbox_regenerate")
    assert regenerated and done.endswith("drafted.")
    counts, *_ = client.predict(None, api_name="/inbox")
    assert counts == "8 waiting · 2 approved · 0 posted"
    *_, shown = client.predict(True, api_name="/inbox_post")
    assert shown.count("would reply to") == 2 and api.inserts == []
    counts, _, _, posted = client.predict(False, api_name="/inbox_post")
    assert counts == "8 waiting · 0 approved · 2 posted" and "2 posted" in posted
    assert api.inserts[0]["textOriginal"] == "My own answer, @viewer1. –Maya"
    with pytest.raises(Exception, match="can no longer be changed"):
        client.predict(UNANSWERED[0], "again", api_name="/inbox_approve")
    assert (drafted / "preferences.jsonl").read_text().count("\n") == 1 and (drafted / "pairs.jsonl").read_text().count(
        "\n"
    ) == 2


@pytest.mark.browser
def test_approving_in_the_inbox_tab_of_a_real_browser(api, drafted, inbox_app):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("chromium is not installed: apt-get install chromium (.ci/run does this)")
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
            ],
        )
        page = browser.new_page()
        page.goto(inbox_app.local_url)
        page.get_by_role("tab", name="Inbox").click()
        expect(page.locator("#inbox-counts")).to_contain_text("11 waiting · 0 approved · 0 posted", timeout=30_000)
        expect(page.locator("#inbox-reply textarea")).not_to_have_value(
            "", timeout=30_000
        )  # the newest comment's draft
        page.locator("#inbox-reply textarea").fill("Thanks, @viewer1! Part 1 is the place to start. –Maya")
        page.locator("#inbox-approve").click()
        expect(page.locator("#inbox-counts")).to_contain_text("10 waiting · 1 approved · 0 posted", timeout=30_000)
        browser.close()
    item = inbox_state.load(drafted)[UNANSWERED[0]]
    assert item.status == "approved" and item.final == "Thanks, @viewer1! Part 1 is the place to start. –Maya"
