"""Each plugin's line: its runs sent and not yet running, kept by the record scripts (a
sorted set by creation time per plugin, lib.lua's line_up). Read here for operators: the
queue depth and how long the oldest run has waited, per plugin (metrics, `list`,
`GET /plugins/NAME`)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis

from manager.core.keys import Keys


@dataclass(frozen=True)
class Line:
    depth: int
    oldest_wait_s: float | None  # how long the run longest in line has waited

    def public(self) -> dict[str, Any]:
        return {"depth": self.depth, "oldest_wait_s": None if self.oldest_wait_s is None
                else round(self.oldest_wait_s, 3)}


def lines(conn: redis.Redis, keys: Keys, plugins: Iterable[str], now: float) -> dict[str, Line]:
    """Every named plugin's line, read in one round trip."""
    names = list(plugins)
    pipe = conn.pipeline(transaction=False)
    for name in names:
        pipe.zcard(keys.plugin_line(name))
        pipe.zrange(keys.plugin_line(name), 0, 0, withscores=True)
    replies = pipe.execute()
    found = {}
    for name, depth, first in zip(names, replies[::2], replies[1::2], strict=True):
        found[name] = Line(int(depth), max(0.0, now - first[0][1]) if first else None)
    return found
