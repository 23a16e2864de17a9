"""The CLI's client of the REST API: the token it sends, the errors it maps to exit codes,
and reading an event argument (urllib: no HTTP library to import, so the CLI starts fast)."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import click

TERMINAL = {"succeeded", "failed", "timeout", "oom", "output_limit", "rejected", "lost"}
EXIT_FAILED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_UNREACHABLE, EXIT_WAIT = 1, 2, 3, 4, 5
NOT_FOUND = {"plugin_not_found", "invocation_not_found"}


class CliError(click.ClickException):
    def __init__(self, code: str, message: str, exit_code: int = EXIT_FAILED,
                 details: Any = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.detail_message, self.exit_code, self.details = (
            code, message, exit_code, details)


class Api:
    def __init__(self, url: str, token: str | None) -> None:
        url = url.strip().rstrip("/")
        self.url = url if "://" in url else f"http://{url}"
        self.token = token

    def call(self, method: str, path: str, body: bytes | None = None,
             ok: tuple[int, ...] = (200, 202)) -> tuple[int, Any]:
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={"Content-Type": "application/json"})
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=660) as resp:
                return resp.status, self._json(resp.status, resp.read())
        except urllib.error.HTTPError as exc:
            data = self._json(exc.code, exc.read())
            if exc.code in ok:
                return exc.code, data
            err = data.get("error", {}) if isinstance(data, dict) else {}
            message = err.get("message", exc.reason)
            if exc.code == 401:
                message += (" (the CLI sends TITAN_API_TOKEN, or the token in run/api.token, "
                            "which only root can read)")
            code = str(err.get("code", exc.code))
            raise CliError(code, message, EXIT_NOT_FOUND if code in NOT_FOUND else EXIT_FAILED,
                           details=err.get("details")) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise CliError("unreachable", f"cannot reach the API at {self.url}: {reason} "
                           "(is it up? try: make up)", EXIT_UNREACHABLE) from None

    def _json(self, status: int, raw: bytes) -> Any:
        try:
            return json.loads(raw or b"null")
        except ValueError:
            raise CliError("not_an_api", f"{self.url} answered HTTP {status} with something "
                           "that is not the Titan API's JSON (wrong TITAN_API_URL?)",
                           EXIT_UNREACHABLE) from None


def api_token() -> str | None:
    """TITAN_API_TOKEN, else the token `make up` generated (run/api.token, root's alone),
    else the one `make compose-up` put in .env."""
    if os.environ.get("TITAN_API_TOKEN"):
        return os.environ["TITAN_API_TOKEN"]
    root = Path(__file__).resolve().parents[2]
    run_dir = Path(os.environ.get("TITAN_RUN_DIR") or root / "run")
    try:
        token = (run_dir / "api.token").read_text().strip()
        if token:
            return token
    except OSError:
        pass
    try:
        for line in (root / ".env").read_text().splitlines():
            if line.startswith("TITAN_API_TOKEN="):
                return line.split("=", 1)[1].strip() or None
    except OSError:
        pass
    return None


def read_event(value: str) -> bytes:
    """-e takes JSON text, @file, or @- (standard input). An event without an event_id
    gets a fresh one, so publishing the same sample again runs again (a repeated id is a
    duplicate, run once per plugin)."""
    if value == "@-":
        raw = sys.stdin.buffer.read()
    elif value.startswith("@"):
        try:
            raw = Path(value[1:]).read_bytes()
        except OSError as exc:
            raise click.BadParameter(f"cannot read {value[1:]}: {exc.strerror}") from None
    else:
        raw = value.encode()
    try:
        event = json.loads(raw)
    except ValueError:
        return raw  # the API names what is wrong with it
    if isinstance(event, dict) and "event_id" not in event:
        event["event_id"] = f"cli-{uuid.uuid4().hex[:16]}"
        return json.dumps(event).encode()
    return raw


def poll_record(api: Api, queued: dict[str, Any], deadline: float,
                first: float = 0.1) -> tuple[int, Any]:
    """Reads the run's record until it is final or the deadline passes (the API answered
    at once because its waiting slots were all taken, or the run came from the bus)."""
    delay = first
    while time.monotonic() < deadline:
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        _, record = api.call("GET", queued["record"])
        if record.get("status") in TERMINAL:
            return 200, record
        delay = min(delay * 1.5, 1.0)
    return 202, queued
