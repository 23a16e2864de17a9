"""The listeners' consumer group on the events stream: created once, and what it alone
knows of an entry (an entry that matched nothing leaves no other account)."""

from __future__ import annotations

import redis

from manager.core.clients import text
from manager.core.groups import StreamSettings


def ensure_group(conn: redis.Redis, stream: StreamSettings) -> None:
    """Creates the consumer group (and the stream) if missing."""
    try:
        conn.xgroup_create(stream.events, stream.group, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def acknowledged(conn: redis.Redis, stream: StreamSettings, entry_id: str) -> bool:
    """Whether the group has handled an entry that left no account of its own (it matched
    nothing): still in the stream, delivered (at or before the group's last delivered id)
    and no longer pending. An id never published, or trimmed away since, is not known."""
    pipe = conn.pipeline(transaction=False)
    pipe.xrange(stream.events, min=entry_id, max=entry_id, count=1)
    pipe.xpending_range(stream.events, stream.group, min=entry_id, max=entry_id, count=1)
    pipe.xinfo_groups(stream.events)
    try:
        present, pending, groups = pipe.execute()
    except redis.ResponseError:  # not a stream id, or no stream yet
        return False
    last = next((g["last-delivered-id"] for g in groups
                 if text(g["name"]) == stream.group), None)
    return (bool(present) and text(present[0][0]) == entry_id and not pending
            and last is not None and _order(text(last)) >= _order(entry_id))


def _order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
