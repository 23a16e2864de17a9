"""What the API's routes work with: the context `create_app` builds, the JSON error shape,
and publishing to the bus (no Flask app here, so the routes and the factory import it
without importing each other)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from flask import Response, current_app, jsonify

from manager.bus.dispatch import Dispatcher
from manager.core.clients import check_replicated, confirm_replicated, text
from manager.core.config import Settings
from manager.core.events import Event, Limits
from manager.core.groups import RedisSettings, StreamSettings
from manager.core.keys import Keys
from manager.core.observer import observer
from manager.core.record_store import RecordStore
from manager.plugins.registry import Registry


@dataclass(frozen=True)
class ApiContext:
    """What the routes use; passed in, so tests bring their own."""

    settings: Settings
    conn: redis.Redis
    registry: Registry
    dispatcher: Dispatcher
    records: RecordStore
    keys: Keys
    limits: Limits
    # `?wait` holds a request thread: at most this many at once, the rest answer at once.
    waiters: threading.BoundedSemaphore
    # Told what every reload through the API changed (the manager logs it, counts it and
    # retries directories that were still being written).
    on_reload: Callable[[dict[str, Any]], object] | None = None


def api_context() -> ApiContext:
    """The context of the app handling this request (built by `create_app`)."""
    context: ApiContext = current_app.extensions["titan"]
    return context


def error(code: str, message: str, status: int, **details: Any) -> tuple[Response, int]:
    return jsonify({"error": {"code": code, "message": message, "details": details}}), status


def publish_event(conn: redis.Redis, stream: StreamSettings, redis_settings: RedisSettings,
                  event: Event) -> str:
    """XADDs an event to the bus; returns the stream entry id once Redis has it (Redis
    writes its AOF before it answers) and, with TITAN_REDIS_MIN_REPLICAS, once that many
    replicas confirm it (else NotReplicated: 503, naming the replicas)."""
    pipe = conn.pipeline(transaction=False)
    pipe.xadd(stream.events, {"event": event.encode()}, maxlen=stream.maxlen,
              approximate=True)
    confirm_replicated(pipe, redis_settings)
    (entry,) = check_replicated(pipe.execute(), redis_settings, f"event {event.event_id}")
    return text(entry)


def reload_registry(c: ApiContext) -> dict[str, Any]:
    """Rediscovers the plugins directory (the API's reload and the console's): what was
    added, updated, removed, rejected; told to the manager, which logs it, counts it and
    retries directories that were still being written."""
    try:
        changes = c.registry.reload()
    except Exception:
        observer().reloaded(None)
        raise
    if c.on_reload is not None:
        c.on_reload(changes)
    else:
        observer().reloaded(changes)
    return changes
