"""The YouTube Data API v3 over HTTP: GET and POST with an API key or an OAuth access token, and
every refusal turned into one line that says what to do.

The root is configurable (``--api-url`` / ``YOUTUBE_API_URL``) so that everything runs against a
local server. Neither the key nor a token is ever put into a message: a URL that carries the key is
reported by its host only.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING, Any

from errors import ReplytuneError

if TYPE_CHECKING:
    from youtube.auth import SignIn

API_URL = "https://www.googleapis.com/youtube/v3"
API_URL_ENV = "YOUTUBE_API_URL"
KEY_ENV = "YOUTUBE_API_KEY"
TIMEOUT_S = 30
QUOTA_REASONS = ("quotaExceeded", "dailyLimitExceeded", "rateLimitExceeded")


class YouTubeError(ReplytuneError, RuntimeError):
    """Every error the youtube package raises on purpose: one line that says what to do."""


class ApiError(YouTubeError):
    """The API answered with an error; ``reason`` is its ``error.errors[0].reason``."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        self.status, self.reason, self.message = status, reason, message
        super().__init__(explain(status, reason, message))

    @property
    def is_quota(self) -> bool:
        return self.reason in QUOTA_REASONS


class NetworkError(YouTubeError):
    """The API could not be reached, or the connection broke before an answer."""


def default_api_url() -> str:
    return os.environ.get(API_URL_ENV) or API_URL


def explain(status: int, reason: str, message: str) -> str:
    """One line for an API error, from its reason."""
    if reason in QUOTA_REASONS:
        return (
            "the daily YouTube quota of your Google Cloud project is used up "
            "(10,000 units: 1 per page read, 50 per reply posted): run the same command tomorrow"
        )
    if reason in ("keyInvalid", "keyExpired") or "API key not valid" in message:
        return (
            f"YouTube refused the API key ({reason or message}): create one under APIs & Services > Credentials "
            f"in the Google Cloud console, enable the YouTube Data API v3 for its project, and set {KEY_ENV}"
        )
    if reason in ("accessNotConfigured", "SERVICE_DISABLED"):
        return "the YouTube Data API v3 is not enabled for the project: enable it in the Google Cloud console"
    if status == 401 or reason in ("authError", "insufficientPermissions"):
        return f"YouTube refused the sign-in ({reason or status}): sign in again with `python -m youtube.inbox login`"
    if reason == "commentsDisabled":
        return "comments are turned off for this channel's videos, so there is nothing to fetch"
    if reason == "channelNotFound":
        return "no channel with that id: pass the channel id (it starts with UC), not its @handle or name"
    return f"the YouTube API answered {status}{' ' + reason if reason else ''}: {message or 'no message'}"


def _error(status: int, body: bytes) -> ApiError:
    try:
        error = json.loads(body)["error"]
        reason = (error.get("errors") or [{}])[0].get("reason", "")
        message = error.get("message", "")
    except (ValueError, KeyError, TypeError, AttributeError):
        reason, message = "", body[:200].decode("utf-8", "replace")
    return ApiError(status, reason, message)


class Client:
    """Calls under one API root, signed with a key (reading public comments) or the channel's
    sign-in (posting as the channel; the access token is refreshed when it expires, and once more
    if the API says 401)."""

    def __init__(self, api_url: str, key: str | None = None, sign_in: SignIn | None = None) -> None:
        if (key is None) == (sign_in is None):
            raise ValueError("pass an API key or a sign-in, one of the two")
        self.api_url = api_url.rstrip("/")
        self.key = key
        self.sign_in = sign_in

    def get(self, resource: str, params: dict[str, Any]) -> dict[str, Any]:
        return self._call("GET", resource, params, None)

    def post(self, resource: str, params: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", resource, params, body)

    def _call(self, method: str, resource: str, params: dict[str, Any], body: dict[str, Any] | None) -> dict[str, Any]:
        try:
            return self._send(method, resource, params, body)
        except ApiError as exc:
            # An access token can expire (or be revoked) before its expiry time; a 401 means the
            # call was not carried out, so one retry with a new token is safe.
            if exc.status != 401 or self.sign_in is None:
                raise
            self.sign_in.access_token(force=True)
            return self._send(method, resource, params, body)

    def _send(self, method: str, resource: str, params: dict[str, Any], body: dict[str, Any] | None) -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        if self.key is not None:
            params = {**params, "key": self.key}
        else:
            headers["Authorization"] = f"Bearer {self.sign_in.access_token()}"
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        url = f"{self.api_url}/{resource}?{urllib.parse.urlencode(params)}"
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise _error(exc.code, exc.read()) from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            # The URL carries the key: name only the host.
            host = urllib.parse.urlsplit(self.api_url).netloc
            raise NetworkError(f"could not reach {host} ({getattr(exc, 'reason', exc)})") from None
