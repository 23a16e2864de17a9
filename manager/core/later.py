"""Runs sent again later: a retry's or a throttle's backoff, timed on Redis's clock.

Celery's `retry(countdown=...)` writes an absolute ETA into the message, computed by the
sending worker's clock and judged by the receiving worker's: with clocks five minutes
apart, a run waited ten minutes in a worker's memory, or ran at once. Here the run waits
in Redis instead (a sorted set scored by Redis's TIME, `later.lua`), and every worker's
resender (workers.resend) takes the runs whose time has come (`due.lua`: each to one
taker) and sends them as new task messages. A run taken and not sent (its resender
killed in between) has neither message nor entry: the sweeper finds it so and sends it
again (manager.bus.sweeper)."""

from __future__ import annotations

import json
from typing import Any

import redis

from manager.core.keys import Keys
from manager.core.scripts import Scripts, named


class Later:
    def __init__(self, conn: redis.Redis, keys: Keys) -> None:
        self.conn, self.keys, self.scripts = conn, keys, Scripts(conn)

    def put(self, invocation_id: str, request: dict[str, Any], after: float, queue: str,
            priority: int = 0) -> None:
        """Keeps the run's request to be sent to `queue` (the one it came from: workers on
        other queues resend it too) `after` seconds from now, at `priority` (a throttled
        run keeps its place in the fair queue's levels)."""
        entry = json.dumps({"request": request, "priority": priority, "queue": queue})
        self.scripts.later(keys=[self.keys.later, self.keys.later_requests],
                           args=[named(id=invocation_id, request=entry,
                                       after=max(0.0, after))])

    def due(self, limit: int = 100) -> list[tuple[dict[str, Any], int, str]]:
        """(request, priority, queue) of the runs whose time has come, taken (no other
        caller gets them)."""
        taken = [json.loads(raw) for raw in self.scripts.due(
            keys=[self.keys.later, self.keys.later_requests], args=[named(limit=limit)])]
        return [(t["request"], int(t.get("priority") or 0), t["queue"]) for t in taken]
