"""What one process works with, built once when it starts: its settings, a Redis
connection, the keys of its instance, the record store and the worker slots. Every part
of the process takes them from here; nothing else constructs them. (A process that needs
a second connection, as the manager's listener does for its blocking reads, builds a
second Wiring.)"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import redis

from manager.core.clients import redis_client
from manager.core.config import Settings
from manager.core.keys import Keys
from manager.core.record_store import RecordStore
from manager.core.slots import Slots


@dataclass(frozen=True)
class Wiring:
    settings: Settings
    conn: redis.Redis
    keys: Keys
    records: RecordStore
    slots: Slots

    @classmethod
    def connect(cls, settings: Settings, conn: redis.Redis | None = None) -> Wiring:
        """The process's wiring over a new connection (or `conn`, which tests bring)."""
        conn = conn if conn is not None else redis_client(settings.redis)
        keys = settings.keys
        return cls(settings, conn, keys, RecordStore(conn, settings.records, keys),
                   Slots(conn, keys, settings.plugin_share))


@functools.cache
def process_settings() -> Settings:
    """This process's settings, read from the environment once: the worker's parts (its
    Celery app, its heartbeat, each pool process's delivery: forked, they share what
    their parent read) take them from here rather than each reading the environment."""
    return Settings.from_env()
