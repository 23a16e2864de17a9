"""The CLI's client of the REST API: where it talks (the API's root-only socket by default),
whether its key may go there, the errors it maps to exit codes, and reading an event
argument (http.client: no HTTP library to import, so the CLI starts fast).

The key goes only to a server the CLI has verified: the socket in the run directory (a
socket owned by root or by the CLI's own user, in directories no other account may
write: nobody else can have put it there), or an https:// URL whose certificate checks
out. Over plain http:// it is never sent: while the manager is down, any local account
can listen on its port."""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import stat
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import click

from manager.core.client_config import ClientSettings
from manager.core.errors import API_HEADER
from manager.core.paths import ROOT
from manager.core.records import TERMINAL
from manager.core.retry import CLI_RECORD_POLL

EXIT_FAILED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_UNREACHABLE, EXIT_WAIT = 1, 2, 3, 4, 5
EXIT_NO_MATCH = 6  # `publish --wait`: the event matched no plugin's trigger
NOT_FOUND = {"plugin_not_found", "invocation_not_found", "secret_not_found"}
TIMEOUT_S = 660  # longer than the longest ?wait


class CliError(click.ClickException):
    def __init__(self, code: str, message: str, exit_code: int = EXIT_FAILED,
                 details: Any = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.detail_message, self.exit_code, self.details = (
            code, message, exit_code, details)


def default_api() -> str:
    """TITAN_API_URL, else the socket `make up`'s manager listens on."""
    return ClientSettings.from_env().api


def api_tls_context() -> ssl.SSLContext:
    """What an https:// API must prove: a certificate of TITAN_API_CA, else of the
    project's CA (run/tls/trust.crt, which TITAN_API_TLS=1 make up serves with), else of
    the system's CAs; always for the host name in the URL."""
    given = ClientSettings.from_env()
    default = given.run_dir / "tls" / "trust.crt"
    cafile = given.api_ca or (str(default) if default.exists() else None)
    return ssl.create_default_context(cafile=cafile)


def socket_problem(path: str) -> str | None:
    """Why a socket cannot be trusted with the key: it must be a socket owned by root or
    by this user, in directories that no other account may write (as ssh judges its
    files). None when it can."""
    mine = {0, os.getuid()}
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid not in mine:
        return f"{path} is not a socket of root's"
    for parent in Path(path).parents:
        st = os.lstat(parent)
        sticky_and_ours = st.st_mode & stat.S_ISVTX and st.st_uid in mine
        if st.st_uid not in mine or (st.st_mode & 0o022 and not sticky_and_ours):
            return f"{parent} may be written by another account"
    return None


class UnixConnection(http.client.HTTPConnection):
    """HTTP over a unix socket (the API's root-only channel)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("titan", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class Api:
    def __init__(self, url: str, token: str | None) -> None:
        url = url.strip().rstrip("/")
        self.url = url if "://" in url else f"http://{url}"
        self.parts = urlparse(self.url)
        if self.parts.scheme not in ("unix", "http", "https"):
            raise CliError("bad_url", f"TITAN_API_URL {self.url!r}: use unix:///path/to/"
                           "api.sock, https://host:port or http://host:port", EXIT_USAGE)
        self.token = token

    @property
    def where(self) -> str:
        return self.parts.path if self.parts.scheme == "unix" else self.url

    def connection(self) -> http.client.HTTPConnection:
        if self.parts.scheme == "unix":
            return UnixConnection(self.parts.path, TIMEOUT_S)
        if self.parts.scheme == "https":
            return http.client.HTTPSConnection(self.parts.hostname or "", self.parts.port,
                                               timeout=TIMEOUT_S, context=api_tls_context())
        return http.client.HTTPConnection(self.parts.hostname or "", self.parts.port,
                                          timeout=TIMEOUT_S)

    def may_send_key(self) -> str | None:
        """None when the key may go to this server; else why not."""
        if self.parts.scheme == "https":
            return None
        if self.parts.scheme == "unix":
            return socket_problem(self.parts.path)
        return (f"{self.url} is plain HTTP: any local account can listen there while the "
                "manager is down; use the socket (the default) or https://")

    def call(self, method: str, path: str, body: bytes | None = None,
             ok: tuple[int, ...] = (200, 202)) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"}
        withheld = self.may_send_key() if self.token else None
        if self.token and withheld is None:
            headers["Authorization"] = f"Bearer {self.token}"
        conn = self.connection()
        try:
            conn.request(method, (self.parts.path if self.parts.scheme != "unix" else "")
                         + path, body=body, headers=headers)
            resp = conn.getresponse()
            raw, status = resp.read(), resp.status
            is_api = resp.getheader(API_HEADER) is not None
        except (OSError, http.client.HTTPException) as exc:
            raise CliError("unreachable", f"cannot reach the API at {self.where}: {exc} (is "
                           "it up? try: make up)", EXIT_UNREACHABLE) from None
        finally:
            conn.close()
        if not is_api:
            raise CliError("not_an_api", f"not a Titan API at {self.where} (HTTP {status}; "
                           "wrong TITAN_API_URL?)", EXIT_FAILED)
        data = self._json(status, raw)
        if status < 400 or status in ok:
            return status, data
        err = data.get("error", {}) if isinstance(data, dict) else {}
        message = err.get("message", http.client.responses.get(status, str(status)))
        if status == 401:
            message += (f" (the key was withheld: {withheld})" if withheld else
                        " (the CLI sends TITAN_API_TOKEN, or the token in run/api.token, "
                        "which only root can read)")
        code = str(err.get("code", status))
        raise CliError(code, message, EXIT_NOT_FOUND if code in NOT_FOUND else EXIT_FAILED,
                       details=err.get("details"))

    def _json(self, status: int, raw: bytes) -> Any:
        try:
            return json.loads(raw or b"null")
        except ValueError:
            raise CliError("not_an_api", f"not a Titan API at {self.where}: HTTP {status} "
                           "with something that is not its JSON", EXIT_FAILED) from None


def api_token() -> str | None:
    """TITAN_API_TOKEN, else the token `make up` generated (run/api.token, root's alone),
    else the one `make compose-up` put in .env."""
    given = ClientSettings.from_env()
    if given.api_token:
        return given.api_token
    root = ROOT
    try:
        token = (given.run_dir / "api.token").read_text().strip()
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
                progress: Callable[[dict[str, Any]], None] | None = None) -> tuple[int, Any]:
    """Reads the run's record until it is final or the deadline passes (the API answered
    at once because its waiting slots were all taken, the run came from the bus, or a
    terminal shows the run's progress: `progress` is given each record read meanwhile)."""
    for delay in CLI_RECORD_POLL.delays():
        if time.monotonic() >= deadline:
            return 202, queued
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        _, record = api.call("GET", queued["record"])
        if record.get("status") in TERMINAL:
            return 200, record
        if progress is not None:
            progress(record)
    raise AssertionError("unreachable: the delays never end")
