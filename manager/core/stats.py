"""Runs ended per minute, for the console's chart of the last hour (as Sidekiq keeps its
daily `processed` and `failed`): one small hash per minute, counted by the script that
stores a run's end (store.lua) and expiring two hours later. The minute is the storing
host's (for display only: no deadline is judged by it)."""

from __future__ import annotations

import time

import redis

from manager.core.keys import Keys

FIELDS = ("ended", "failed", "warm", "cold")
KEPT_S = 2 * 3600


def minute_of(at: float) -> int:
    return int(at // 60)


def minute_counts(conn: redis.Redis, keys: Keys, now: float | None = None,
                  minutes: int = 60) -> list[dict[str, int]]:
    """The last `minutes` minutes, oldest first: each minute's start (epoch s) and its
    counts of runs ended, failed (any end but succeeded), warm and cold."""
    last = minute_of(time.time() if now is None else now)
    span = range(last - minutes + 1, last + 1)
    pipe = conn.pipeline(transaction=False)
    for minute in span:
        pipe.hmget(keys.minute_stats(minute), *FIELDS)
    return [{"at": minute * 60, **{f: int(v or 0) for f, v in zip(FIELDS, row, strict=True)}}
            for minute, row in zip(span, pipe.execute(), strict=True)]
