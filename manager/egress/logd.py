#!/usr/bin/python3 -Es
"""Squid's log daemon (`logfile_daemon`): Squid writes its access log through this
program's stdin; each entry of a run's request (its tag: the grant's user) is appended to
that run's log (logs/<user>.log) as JSON, with the bytes moved and how it ended. Entries
of requests no live run's credentials made are kept in the access log itself. Runs as
the proxy's uid, standard library only."""

from __future__ import annotations

import json
import os
import re
import sys
from urllib.parse import unquote

USER_RE = re.compile(r"r[0-9a-f]{16}\Z")
# the logformat `titan` in the proxy's squid.conf, field by field
FIELDS = ("tag", "method", "host", "port", "status", "squid", "err", "from_run",
          "to_run", "ms")


def entry(text: str) -> dict[str, object] | None:
    parts = text.split()
    if len(parts) != len(FIELDS):
        return None
    values = (unquote(p) for p in parts)
    item: dict[str, object] = {"k": "a", **dict(zip(FIELDS, values, strict=True))}
    for name in ("from_run", "to_run", "ms", "status"):
        try:
            item[name] = int(str(item[name]))
        except ValueError:
            item[name] = 0
    return item


def append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def main() -> None:
    base = sys.argv[1]  # the access log's path: the runs' logs lie beside it
    logs = os.path.dirname(base)
    for raw in sys.stdin:
        if not raw.startswith("L"):
            continue  # rotate, truncate, reopen, flush, buffer: nothing to keep open
        item = entry(raw[1:])
        if item and USER_RE.match(str(item["tag"])):
            append(os.path.join(logs, f"{item['tag']}.log"), json.dumps(item) + "\n")
        else:
            append(base, raw[1:] if raw.endswith("\n") else raw[1:] + "\n")


if __name__ == "__main__":
    main()
