"""The only place that sends Celery tasks: one task per (event, plugin)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import redis
from celery import Celery

from manager.config import Settings
from manager.events import Event
from manager.keys import Keys
from manager.records import RecordStore, Status
from manager.registry import PluginEntry

RUN_TASK = "titan.run_plugin"


def make_celery(settings: Settings, name: str = "titan") -> Celery:
    """A Celery app configured from celeryconfig, pointed at the settings' Redis."""
    app = Celery(name)
    app.config_from_object("celeryconfig")
    app.conf.broker_url = settings.redis_url
    app.conf.task_default_queue = settings.task_queue
    return app


class Dispatcher:
    """Creates the invocation record, then enqueues the run; idempotent per (event, plugin)."""

    def __init__(self, conn: redis.Redis, settings: Settings, celery: Celery) -> None:
        self.conn = conn
        self.settings = settings
        self.celery = celery
        self.records = RecordStore(conn, settings)
        self.keys = Keys(settings.key_prefix)

    def dispatch(self, event: Event, plugin: PluginEntry, origin: str = "bus") -> tuple[str, bool]:
        """Returns (invocation_id, sent). A bus event already dispatched to this plugin is
        not sent again unless its record never reached a terminal state (a crash between
        recording and sending); API triggers always make a new run."""
        invocation_id = uuid.uuid4().hex
        if origin == "bus":
            key = self.keys.dispatched(event.event_id, plugin.name)
            if not self.conn.set(key, invocation_id, nx=True, ex=self.settings.dedup_ttl):
                existing = (self.conn.get(key) or b"").decode() or invocation_id
                record = self.records.get(existing)
                if record and record["status"] != Status.QUEUED:
                    return existing, False  # already running or done
                invocation_id = existing  # recorded but maybe never sent: send it again
        self.records.create(self._record(invocation_id, event, plugin, origin))
        self.send(invocation_id, event, plugin)
        return invocation_id, True

    def send(self, invocation_id: str, event: Event, plugin: PluginEntry) -> None:
        self.celery.send_task(
            RUN_TASK,
            kwargs={"invocation_id": invocation_id, "plugin": plugin.name,
                    "version": plugin.version, "digest": plugin.digest,
                    "event": event.to_dict()},
            queue=self.settings.task_queue,
            task_id=invocation_id,
            shadow=f"plugin:{plugin.name}",
        )

    @staticmethod
    def _record(invocation_id: str, event: Event, plugin: PluginEntry,
                origin: str) -> dict[str, Any]:
        return {
            "invocation_id": invocation_id, "plugin": plugin.name, "version": plugin.version,
            "digest": plugin.digest, "event_id": event.event_id, "topic": event.topic,
            "event_type": event.event_type, "origin": origin, "status": Status.QUEUED.value,
            "reason": None, "exit_code": None, "attempts": 0, "worker": None,
            "created_at": time.time(), "started_at": None, "finished_at": None,
            "duration_s": None, "stdout": "", "stderr": "", "result_event_ids": [],
        }
