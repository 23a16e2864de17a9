"""Invocation records: one JSON document per run in Redis, indexed per plugin."""

from __future__ import annotations

import json
import time
from enum import StrEnum
from typing import Any

import redis

from manager.config import Settings
from manager.keys import Keys


class Status(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMEOUT = "timeout"
    OOM = "oom"
    OUTPUT_LIMIT = "output_limit"
    REJECTED = "rejected"
    RETRYING = "retrying"
    LOST = "lost"

    @property
    def terminal(self) -> bool:
        return self not in (Status.QUEUED, Status.RUNNING, Status.RETRYING)


PER_PLUGIN_INDEX = 10_000


class RecordStore:
    """Reads and writes invocation records; takes its Redis connection as a parameter."""

    def __init__(self, conn: redis.Redis, settings: Settings) -> None:
        self.conn = conn
        self.ttl = settings.record_ttl
        self.keys = Keys(settings.key_prefix)

    def create(self, record: dict[str, Any]) -> None:
        """Stores a new record and indexes it under its plugin."""
        key = self.keys.invocation(record["invocation_id"])
        index = self.keys.plugin_invocations(record["plugin"])
        now = record.setdefault("created_at", time.time())
        pipe = self.conn.pipeline()
        pipe.set(key, json.dumps(record), ex=self.ttl)
        pipe.zadd(index, {record["invocation_id"]: now})
        pipe.zremrangebyscore(index, "-inf", now - self.ttl)
        pipe.zremrangebyrank(index, 0, -PER_PLUGIN_INDEX - 1)
        pipe.expire(index, self.ttl)
        pipe.execute()

    def get(self, invocation_id: str) -> dict[str, Any] | None:
        raw = self.conn.get(self.keys.invocation(invocation_id))
        return json.loads(raw) if raw else None

    def update(self, invocation_id: str, **changes: Any) -> dict[str, Any]:
        """Merges changes into a record (one writer at a time per invocation)."""
        record = self.get(invocation_id) or {"invocation_id": invocation_id}
        record.update(changes)
        self.conn.set(self.keys.invocation(invocation_id), json.dumps(record), ex=self.ttl)
        return record

    def for_plugin(self, plugin: str, limit: int = 20) -> list[dict[str, Any]]:
        """Newest first; ids whose record expired are skipped."""
        ids = self.conn.zrevrange(self.keys.plugin_invocations(plugin), 0, max(limit, 1) - 1)
        if not ids:
            return []
        raws = self.conn.mget([self.keys.invocation(i.decode()) for i in ids])
        return [json.loads(r) for r in raws if r]
