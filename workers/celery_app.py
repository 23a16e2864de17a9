"""The worker's Celery app: its configuration (celeryconfig plus what comes from Settings,
evaluated lazily, once), and the worker's life in one place: the heartbeat registered as
a worker component (started and stopped with the worker), and each pool process's start
and stop, where it builds its own Delivery (one Redis and one Docker client, and the
threads it runs beside the runs) and closes it: workers.tasks.RunTask.

Run with: celery -A workers.celery_app worker -Q titan.plugins
"""

from __future__ import annotations

import logging

from celery import Celery, signals

from manager.core.contract import RUN_TASK, celery_settings
from manager.core.wiring import process_settings
from workers.heartbeat import HeartbeatStep

log = logging.getLogger(__name__)

app = Celery("titan-worker", include=["workers.tasks"])
app.config_from_object("celeryconfig")
app.add_defaults(lambda: celery_settings(process_settings().broker))
app.steps["worker"].add(HeartbeatStep)


@signals.worker_process_init.connect
def _init_process(**_: object) -> None:
    """A pool process starts: its delivery is built and started now rather than on its
    first run."""
    app.tasks[RUN_TASK].start()


@signals.worker_process_shutdown.connect
def _process_shutdown(**_: object) -> None:
    """A stopping pool process closes its delivery (its prewarmed containers go)."""
    app.tasks[RUN_TASK].close()
