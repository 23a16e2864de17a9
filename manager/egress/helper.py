#!/usr/bin/python3 -Es
"""Squid's external ACL helper: one decision per request a plugin sends the proxy.

Run by Squid as the proxy's own uid with the system's Python (standard library only,
and manager/core/netrules.py). Each line Squid sends is `AUTH HOST PORT METHOD SOURCE`
(URL-encoded, `-` for none): the request's Proxy-Authorization header, its target and
the address it came from. The credentials name a grant the worker wrote for one run
(grants/<user>.json: the hash of its password, its allow-list, its expiry, its caps and
its container's address); the request passes only if that grant exists, has not
expired, the password matches, it comes from that address, host:port is in its
allow-list and its caps are not spent. Every decision is appended to the run's log
(logs/<user>.log) before the answer, so the worker finds it when the run ends; the
answer carries the reason Squid shows the plugin (message=) and the grant's user as the
request's tag (the access log's %et)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import sys
import time
from urllib.parse import unquote

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "core"))
import netrules as rules  # manager/core/netrules.py: the one rule, stdlib only

USER_RE = re.compile(r"r[0-9a-f]{16}\Z")


def credentials(header: str) -> tuple[str, str] | None:
    """(user, password) of a `Basic` Proxy-Authorization header."""
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return (user, password) if sep and USER_RE.match(user) else None


def load_grant(grants: str, user: str, password: str) -> dict | None:
    try:
        with open(os.path.join(grants, user + ".json"), encoding="utf-8") as fh:
            grant = json.load(fh)
    except (OSError, ValueError):
        return None
    digest = hashlib.sha256(password.encode()).hexdigest()
    if not hmac.compare_digest(digest, str(grant.get("secret_sha256", ""))):
        return None
    return grant if float(grant.get("expires", 0)) > time.time() else None


def spent(logs: str, user: str) -> tuple[int, int]:
    """(connections allowed so far, bytes moved by finished ones) of this grant."""
    allowed = moved = 0
    try:
        with open(os.path.join(logs, user + ".log"), encoding="utf-8") as fh:
            for line in fh:
                try:
                    item = json.loads(line)
                except ValueError:
                    continue
                if item.get("k") == "d" and item.get("decision") == "allowed":
                    allowed += 1
                elif item.get("k") == "a":
                    moved += int(item.get("from_run", 0)) + int(item.get("to_run", 0))
    except OSError:
        pass
    return allowed, moved


def decide(grants: str, logs: str, fields: list[str]) -> tuple[str | None, str | None]:
    """(the grant's user or None, None when allowed or else why not)."""
    auth, host, port, method, source = (unquote(f) if f != "-" else ""
                                        for f in (fields + [""] * 5)[:5])
    target = f"{method} {host}:{port}"
    creds = credentials(auth)
    if creds is None:
        return None, f"{target}: no proxy credentials of a live run (see HTTP_PROXY)"
    user, password = creds
    grant = load_grant(grants, user, password)
    if grant is None:
        return None, f"{target}: these proxy credentials belong to no live run"
    if grant.get("address") and grant["address"] != source:
        return None, f"{target}: these proxy credentials belong to another run"
    if rules.allowing(grant.get("allow", []), host, port) is None:
        return user, f"{target} is not in permissions.net.allow"
    connections, moved = spent(logs, user)
    if connections >= int(grant.get("max_connections", 0)):
        return user, f"{target}: the run has made {connections} connections, its limit"
    if moved >= int(grant.get("max_bytes", 0)):
        return user, f"{target}: the run moved {moved} bytes, its limit"
    return user, None


def quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def record(logs: str, user: str, fields: list[str], why: str | None) -> None:
    _, host, port, method = (unquote(f) if f != "-" else "" for f in (fields + [""] * 4)[:4])
    line = json.dumps({"k": "d", "at": round(time.time(), 3), "method": method,
                       "host": host, "port": port,
                       "decision": "refused" if why else "allowed", "why": why})
    fd = os.open(os.path.join(logs, user + ".log"),
                 os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def main() -> None:
    grants, logs = sys.argv[1], sys.argv[2]
    for line in sys.stdin:
        fields = line.split()
        try:
            user, why = decide(grants, logs, fields)
            if user:
                record(logs, user, fields, why)
        except Exception as exc:
            user, why = None, f"the proxy helper failed: {type(exc).__name__}"
        tag = f" tag={user}" if user else ""
        answer = f"OK{tag}" if why is None else f"ERR{tag} message={quoted('refused: ' + why)}"
        sys.stdout.write(answer + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
