"""The Celery contract between the manager and the workers, in one place: the task's name
and the part of Celery's configuration that comes from Settings (celeryconfig.py holds the
rest). Both sides import it; neither builds a Celery app any other way."""

from __future__ import annotations

from typing import Any

from celery import Celery

from manager.core.config import Settings
from manager.core.keys import Keys

RUN_TASK = "titan.run_plugin"


def celery_settings(settings: Settings) -> dict[str, Any]:
    """The part of Celery's configuration that comes from Settings (celeryconfig.py holds
    the rest)."""
    restore_every = max(1, min(10, settings.restore_interval))
    keys = Keys(settings.key_prefix)
    return {
        "broker_url": settings.redis_url,
        "task_default_queue": settings.task_queue,
        "broker_transport_options": {
            # Unacknowledged tasks come back after this long: longer than any run.
            "visibility_timeout": settings.effective_visibility_timeout,
            # kombu scans for unacknowledged tasks about every interval * throttle seconds.
            "unacked_restore_interval": restore_every,
            "unacked_restore_throttle": max(1, settings.restore_interval // restore_every),
            "socket_keepalive": True,
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


def make_celery(settings: Settings, name: str = "titan") -> Celery:
    """A Celery app configured from celeryconfig plus these settings."""
    app = Celery(name)
    app.config_from_object("celeryconfig")
    app.conf.update(celery_settings(settings))
    return app
