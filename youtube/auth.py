"""Signing in as the channel: OAuth 2.0's installed-app flow with Google's own libraries.

``python -m youtube.inbox login --client-secrets client_secret.json`` opens the consent page once
(scope ``youtube.force-ssl``, what ``comments.insert`` needs) and stores the refresh token, with the
OAuth client it belongs to, in a file of mode 0600 outside the repository
(``~/.config/replytune/youtube-token.json`` unless ``--token-file`` / ``YOUTUBE_TOKEN_FILE`` say
otherwise). Access tokens live in memory only: each run refreshes one at the token endpoint
(``--token-url`` / ``YOUTUBE_TOKEN_URL``). No token is ever printed or logged.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from youtube.api import YouTubeError

if TYPE_CHECKING:
    from google.oauth2.credentials import Credentials

SCOPES = ["https://www.googleapis.com/auth/youtube.force-ssl"]
TOKEN_URL = "https://oauth2.googleapis.com/token"
TOKEN_URL_ENV = "YOUTUBE_TOKEN_URL"
TOKEN_FILE_ENV = "YOUTUBE_TOKEN_FILE"
REPO_ROOT = Path(__file__).resolve().parents[1]
LOGIN_COMMAND = "python -m youtube.inbox login --client-secrets client_secret.json"


class AuthError(YouTubeError):
    """Not signed in, or the sign-in was refused."""


def default_token_file() -> Path:
    return Path(os.environ.get(TOKEN_FILE_ENV) or Path.home() / ".config" / "replytune" / "youtube-token.json")


def default_token_url() -> str:
    return os.environ.get(TOKEN_URL_ENV) or TOKEN_URL


def check_outside_repository(token_file: Path) -> None:
    """A token inside the checkout is one `git add .` away from being published."""
    if token_file.resolve().is_relative_to(REPO_ROOT):
        raise AuthError(
            f"{token_file} is inside the repository {REPO_ROOT}: keep "
            "the sign-in outside it (the default is ~/.config/replytune/)"
        )


def login(client_secrets: Path, token_file: Path) -> Path:
    """The first consent, in the browser; the refresh token is saved to ``token_file``."""
    from google_auth_oauthlib.flow import InstalledAppFlow

    check_outside_repository(token_file)
    if not client_secrets.is_file():
        raise AuthError(
            f"{client_secrets}: no such file; download the OAuth client (type Desktop "
            "app) from APIs & Services > Credentials in the Google Cloud console"
        )
    flow = InstalledAppFlow.from_client_secrets_file(str(client_secrets), scopes=SCOPES)
    credentials = flow.run_local_server(port=0)
    save(credentials, token_file)
    return token_file


def save(credentials: Credentials, token_file: Path) -> None:
    """The refresh token and its OAuth client, never the access token, written 0600 in one rename."""
    check_outside_repository(token_file)
    token_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    record = {
        "refresh_token": credentials.refresh_token,
        "client_id": credentials.client_id,
        "client_secret": credentials.client_secret,
        "scopes": SCOPES,
    }
    tmp = token_file.with_name(token_file.name + ".tmp")
    # Created with mode 0600 from the start: a chmod after writing would leave a moment where others can read it.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        os.fchmod(f.fileno(), 0o600)  # O_CREAT's mode does not apply to a leftover .tmp
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, token_file)


@dataclass
class SignIn:
    """The channel's saved sign-in: credentials with a refresh token, and the file they came from."""

    credentials: Credentials
    token_file: Path

    def access_token(self, force: bool = False) -> str:
        """A valid access token, refreshed when missing or expired (or ``force``); one line on failure."""
        from google.auth.exceptions import RefreshError, TransportError
        from google.auth.transport.requests import Request

        credentials = self.credentials
        if credentials.valid and not force:
            return credentials.token
        before = credentials.refresh_token
        try:
            credentials.refresh(Request())
        except RefreshError as exc:
            # args[1], where present, is the token endpoint's JSON answer: only its error code is
            # shown, never the request or the response body.
            answer = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], dict) else {}
            code = answer.get("error") or "refused"
            raise AuthError(
                f"the YouTube sign-in was refused ({code}: revoked or expired): run `{LOGIN_COMMAND}` again"
            ) from None
        except TransportError as exc:
            raise AuthError(
                f"could not reach the sign-in server {credentials.token_uri} "
                f"({type(exc).__name__}): check the connection and run the same command again"
            ) from None
        if credentials.refresh_token != before:
            save(credentials, self.token_file)  # the endpoint rotated the refresh token: keep the new one
        return credentials.token


def load(token_file: Path, token_url: str) -> SignIn:
    """The saved sign-in, with its token endpoint; the first call refreshes an access token."""
    from google.oauth2.credentials import Credentials

    check_outside_repository(token_file)
    if not token_file.is_file():
        raise AuthError(f"not signed in to YouTube ({token_file} does not exist): run `{LOGIN_COMMAND}` once")
    try:
        record = json.loads(token_file.read_text(encoding="utf-8"))
        credentials = Credentials(
            token=None,
            refresh_token=record["refresh_token"],
            token_uri=token_url,
            client_id=record["client_id"],
            client_secret=record["client_secret"],
            scopes=record["scopes"],
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise AuthError(
            f"{token_file}: not a saved sign-in (field {exc} missing "
            f"or unreadable): delete it and run `{LOGIN_COMMAND}`"
        ) from None
    return SignIn(credentials, token_file)
