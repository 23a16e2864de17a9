"""The Celery contract between the manager and the workers, in one place: the task's name
and the part of Celery's configuration that comes from Settings (celeryconfig.py holds the
rest). Both sides import it; neither builds a Celery app any other way."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlparse

from celery import Celery

from manager.core.clients import is_socket, password_and_db, tls_options
from manager.core.groups import BrokerSettings, RedisSettings

RUN_TASK = "titan.run_plugin"
# Fair queueing: a run's priority is its place in its plugin's line (divided by the
# plugin's weight), 0 first, one Redis list per level (kombu's `priority_steps`, named
# QUEUE, QUEUE:1, ... QUEUE:9 by its `sep`), so every plugin's next run comes before any
# plugin's run after it (manager.bus.dispatch).
PRIORITY_LEVELS = 10


def celery_settings(settings: BrokerSettings) -> dict[str, Any]:
    """The part of Celery's configuration that comes from Settings (celeryconfig.py holds
    the rest)."""
    restore_every = max(1, min(10, settings.restore_interval))
    keys = settings.keys
    tls = tls_options(settings.redis)
    return {
        "broker_url": broker_url(settings.redis),
        # rediss://: kombu hands these to redis-py (the CA, our certificate, name check).
        # Only then: Celery's own default (False) otherwise; a None here once cost one
        # warm run in forty ~250 ms (make bench's warm p99).
        **({"broker_use_ssl": tls} if tls else {}),
        "task_default_queue": settings.task_queue,
        "broker_transport_options": {
            **sentinel_options(settings.redis),
            # Unacknowledged tasks come back after this long: longer than any run.
            "visibility_timeout": settings.visibility_timeout,
            # kombu scans for unacknowledged tasks about every interval * throttle seconds.
            "unacked_restore_interval": restore_every,
            "unacked_restore_throttle": max(1, settings.restore_interval // restore_every),
            "socket_keepalive": True,
            "priority_steps": list(range(PRIORITY_LEVELS)),
            "sep": ":",
            # kombu's bookkeeping of delivered messages, under this instance's prefix.
            "unacked_key": keys.unacked,
            "unacked_index_key": keys.unacked_index,
            "unacked_mutex_key": keys.unacked_mutex,
            # No `retry_on_timeout`: it makes redis-py retry a read in place after
            # reconnecting, and kombu's pubsub read then blocks the worker's event loop
            # forever (no shutdown, no consuming) after a Redis blink. Errors must reach
            # kombu, which reconnects everything itself.
        },
    }


def queue_keys(settings: BrokerSettings) -> list[str]:
    """The Redis lists the task queue is made of, one per priority level."""
    return [settings.task_queue,
            *(f"{settings.task_queue}:{n}" for n in range(1, PRIORITY_LEVELS))]


def queued_tasks(conn: Any, settings: BrokerSettings) -> int:
    """Task messages in the queue, every level."""
    pipe = conn.pipeline(transaction=False)
    for key in queue_keys(settings):
        pipe.llen(key)
    return sum(pipe.execute())


def send_run(celery: Celery, settings: BrokerSettings, request: dict[str, Any],
             priority: int = 0, queue: str | None = None) -> None:
    """A run's task message (the request in its wire form), at `priority` (0 first). Its
    `kwargsrepr` (what Flower shows as the arguments) names the run instead of Celery's
    repr of the whole request: shorter to read, and not computed on the hot path."""
    shown = {"plugin": request["plugin"], "version": request["version"],
             "event_id": request["event"]["event_id"], "attempt": request.get("attempt", 1)}
    celery.send_task(RUN_TASK, kwargs={"request": request},
                     queue=queue or settings.task_queue,
                     task_id=request["invocation_id"], shadow=f"plugin:{request['plugin']}",
                     argsrepr="()", priority=priority, kwargsrepr=repr(shown))


TASK_ID = b'"id": "'  # a message's task id (the run's), in kombu's JSON of its headers
SCAN_CHUNK = 200  # messages read at a time: Redis is never held long by one read


def task_id(raw: bytes) -> str | None:
    """The task id of a message as kombu stores it (its body is base64 and comes first;
    its headers' `id` is the only key of that name), or None."""
    at = raw.rfind(TASK_ID)
    if at < 0:
        return None
    start = at + len(TASK_ID)
    return raw[start:raw.find(b'"', start)].decode("ascii", "replace")


def messages_sent(conn: Any, settings: BrokerSettings, ids: list[str]) -> set[str]:
    """The runs among `ids` whose task message is in the broker, or is to be sent again
    (manager.core.later): delivered to a worker and not yet acknowledged (kombu's
    `unacked` hash, from where kombu puts a dead worker's back), or in a queue list. A run
    in none has lost its message (a failover took it) and nothing will ever send it again
    but the sweeper. Read in chunks of SCAN_CHUNK (10,000 waiting messages of 3 KB: about
    0.2 s here, Redis held 25 ms at most), unacknowledged first: a message kombu delivers
    while this reads moves from a list to the hash, where the second look
    (manager.bus.sweeper) finds it."""
    wanted = set(ids)
    if not wanted:
        return set()
    later = conn.zmscore(settings.keys.later, ids)  # to be sent again (manager.core.later)
    found = {i for i, when in zip(ids, later, strict=True) if when is not None}
    found |= {i for _, raw in conn.hscan_iter(settings.keys.unacked, count=SCAN_CHUNK)
              if (i := task_id(raw)) in wanted}
    for key in queue_keys(settings):
        for first in range(0, conn.llen(key), SCAN_CHUNK):
            found.update(i for raw in conn.lrange(key, first, first + SCAN_CHUNK - 1)
                         if (i := task_id(raw)) in wanted)
    return found


def broker_url(settings: RedisSettings) -> str:
    """redis_url as kombu spells it: a unix socket as `redis+socket://`, or the list of
    Sentinels (`sentinel://...;sentinel://...`) carrying the primary's password and db."""
    if is_socket(settings):
        url = urlparse(settings.url)
        _, db = password_and_db(settings)
        return f"redis+socket://{url.netloc}{url.path}?virtual_host={db}"
    if not settings.sentinels:
        return settings.url
    password, db = password_and_db(settings)
    auth = f":{quote(password, safe='')}@" if password else ""
    return ";".join(f"sentinel://{auth}{host}:{port}/{db}"
                    for host, port in settings.sentinels)


def sentinel_options(settings: RedisSettings) -> dict[str, Any]:
    if not settings.sentinels:
        return {}
    password, _ = password_and_db(settings)
    tls = tls_options(settings)
    return {"master_name": settings.master,
            "sentinel_kwargs": {"password": password, "socket_timeout": 2,
                                **({"ssl": True, **tls} if tls else {})}}


def make_celery(settings: BrokerSettings, name: str = "titan") -> Celery:
    """A Celery app configured from celeryconfig plus these settings."""
    app = Celery(name)
    app.config_from_object("celeryconfig")
    app.conf.update(celery_settings(settings))
    return app
