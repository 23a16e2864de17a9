"""A run's grant (SPEC §4, Egress): what the proxy lets one run reach, written by the
worker for that run alone and removed when the run ends, and the run's connections as
the proxy saw them.

The grant is a file in the proxy's grants/ (root's, readable by the proxy's group): a
random user name, the SHA-256 of a random password, the patterns the run may reach (the
plugin's, within this worker's ceiling), an expiry (the run's timeout and a grace: a
grant a dead worker left behind lapses by itself) and the run's caps. The run gets the
credentials in HTTP_PROXY/HTTPS_PROXY; another run's, a finished run's or none are
refused. The proxy's helper writes each decision into the run's log before it answers,
and its log daemon each request's end (status, bytes) when the connection closes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from manager.core import netrules
from manager.core.groups import EgressSettings
from manager.egress.proxy import Where

GRACE_S = 30
SETTLE_S = 1.0  # how long a finished run waits for the proxy's last log lines


@dataclass(frozen=True)
class Grant:
    user: str
    password: str
    allow: tuple[str, ...]
    grant_file: Path
    log_file: Path
    proxy: Where

    @property
    def env(self) -> dict[str, str]:
        """The run's proxy variables (both spellings: tools read one or the other)."""
        url = self.proxy.url(self.user, self.password)
        return {"HTTP_PROXY": url, "HTTPS_PROXY": url, "http_proxy": url,
                "https_proxy": url, "NO_PROXY": "", "no_proxy": ""}


def granted(asked: tuple[str, ...], settings: EgressSettings) -> tuple[str, ...]:
    """The patterns a run may have: those it asked that this worker's ceiling covers."""
    beyond = set(netrules.beyond(settings.allow, asked))
    return tuple(p for p in asked if p not in beyond)


def issue(settings: EgressSettings, proxy: Where, invocation_id: str, plugin: str,
          asked: tuple[str, ...], timeout: int) -> Grant:
    d = settings.dir
    user, password = "r" + secrets.token_hex(8), secrets.token_urlsafe(24)
    allow = granted(asked, settings)
    record = {"user": user, "secret_sha256": hashlib.sha256(password.encode()).hexdigest(),
              "invocation": invocation_id, "plugin": plugin, "allow": list(allow),
              "expires": time.time() + timeout + GRACE_S,
              "max_connections": settings.max_connections,
              "max_bytes": settings.max_bytes}
    path = d / "grants" / f"{user}.json"
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
    with os.fdopen(fd, "w") as fh:
        os.fchown(fd, 0, path.parent.stat().st_gid)  # the proxy's group (a container's too)
        os.fchmod(fd, 0o640)  # whatever the umask: the proxy's group reads it
        json.dump(record, fh)
    os.replace(tmp, path)
    return Grant(user, password, allow, path, d / "logs" / f"{user}.log", proxy)


def pin(grant_file: str, address: str) -> None:
    """Binds the grant to the run's container address: the proxy refuses its credentials
    from any other (a run that leaked them cannot lend them to another)."""
    path = Path(grant_file)
    record = json.loads(path.read_text())
    record["address"] = address
    tmp = path.with_suffix(".pin")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o640)
    with os.fdopen(fd, "w") as fh:
        os.fchown(fd, 0, path.stat().st_gid)
        os.fchmod(fd, 0o640)
        json.dump(record, fh)
    os.replace(tmp, path)


def revoke(grant: Grant) -> None:
    """The credentials stop working (the grant is gone); the log stays until read."""
    with contextlib.suppress(FileNotFoundError):
        grant.grant_file.unlink()


def connections(grant: Grant, settle_s: float = SETTLE_S) -> list[dict[str, Any]]:
    """The run's connections, one per request the proxy decided: method, host, port,
    decision, why, status, bytes in and out. Waits up to `settle_s` for the proxy's
    end-of-request lines of requests still closing; the log is then removed."""
    deadline = time.monotonic() + settle_s
    while True:
        decided, ended = _read(grant.log_file)
        if len(ended) >= len(decided) or time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    with contextlib.suppress(FileNotFoundError):
        grant.log_file.unlink()
    return merge(decided, ended)


def _read(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    decided, ended = [], []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return [], []
    for line in lines:
        try:
            item = json.loads(line)
        except ValueError:
            continue
        (decided if item.get("k") == "d" else ended).append(item)
    return decided, ended


def merge(decided: list[dict[str, Any]], ended: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each decision with its request's end (the first unmatched end of the same method,
    host and port): the proxy's own refusal of an internal address shows there."""
    left = list(ended)
    out = []
    for d in decided:
        key = (d.get("method"), d.get("host"), str(d.get("port")))
        end = next((e for e in left if (e.get("method"), e.get("host"), str(e.get("port")))
                    == key), None)
        if end is not None:
            left.remove(end)
        item = {"method": d.get("method"), "host": d.get("host"), "port": d.get("port"),
                "decision": d.get("decision"), "why": d.get("why"),
                "status": end.get("status") if end else None,
                "bytes_sent": end.get("from_run", 0) if end else 0,
                "bytes_received": end.get("to_run", 0) if end else 0}
        if end and end.get("err") == "ERR_TITAN_INNER":
            item.update(decision="refused", why=f"{d.get('method')} {d.get('host')}:"
                        f"{d.get('port')} resolves to an internal address (loopback, "
                        "link-local, private or this host's); only a host named exactly in "
                        "TITAN_EGRESS_ALLOW may")
        elif end and end.get("err") not in (None, "-", "ERR_TITAN_REFUSED"):
            item["why"] = item["why"] or f"the proxy could not complete it: {end['err']}"
        out.append(item)
    return out
