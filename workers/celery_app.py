"""The worker's Celery app: its configuration (celeryconfig plus what comes from Settings,
evaluated lazily, once), the heartbeat registered as a worker component, and the pool
processes' start and stop. Each pool process builds its own Delivery (one Redis and one
Docker client) on its first run: workers.tasks.RunTask.

Run with: celery -A workers.celery_app worker -Q titan.plugins
"""

from __future__ import annotations

import logging

from celery import Celery, signals

from manager.core.contract import RUN_TASK, celery_settings
from manager.core.errors import SandboxUnavailable
from manager.core.wiring import process_settings
from workers.heartbeat import HeartbeatStep

log = logging.getLogger(__name__)

app = Celery("titan-worker", include=["workers.tasks"])
app.config_from_object("celeryconfig")
app.add_defaults(lambda: celery_settings(process_settings()))
app.steps["worker"].add(HeartbeatStep)


@signals.worker_process_init.connect
def _init_process(**_: object) -> None:
    """A pool process starts: its delivery is built, its engine connected now rather than
    on its first run."""
    try:
        app.tasks[RUN_TASK].delivery.engine.client  # noqa: B018
    except SandboxUnavailable as exc:  # the engine may come back; tasks retry until then
        log.warning("worker process starts without a Docker engine: %s", exc)


@signals.worker_process_shutdown.connect
def _process_shutdown(**_: object) -> None:
    """A stopping pool process removes its prewarmed containers."""
    app.tasks[RUN_TASK].close()
