"""The Celery task: a thin wrapper around its process's Delivery.

A Redis error never counts as "task finished": the message is rejected with requeue (or,
when Redis is down, stays unacknowledged and comes back after the visibility timeout).
A run that ended other than `succeeded` is told to Flower as a failure once its outcome is
stored: the task sends the `task-failed` event itself, with the run's summary as its
exception and no traceback (the run's failure is the plugin's, not a fault of this code, so
Celery's traceback of this module would only hide it), then ends with Ignore, which
acknowledges the message and sends nothing more.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery import Task
from celery.exceptions import Ignore, Reject
from kombu.exceptions import OperationalError

from manager.core.contract import RUN_TASK
from manager.core.errors import NotReplicated, OutcomeNotStored
from manager.core.records import Outcome, Status
from manager.core.runs import RunRequest
from manager.core.wiring import Wiring, process_settings
from workers.celery_app import app
from workers.delivery import Delivery
from workers.engine import Engine
from workers.next import Again, Done

log = logging.getLogger(__name__)
BROKER_DOWN = (redis.ConnectionError, redis.TimeoutError, OperationalError, OutcomeNotStored,
               NotReplicated)


class RunTask(Task):
    """The run task, with its pool process's Delivery (Celery's documented way to keep
    per-process resources on a task). A pool process's life is visible in two steps,
    both driven by workers.celery_app's signals: `start` when the process starts (after
    the fork: the delivery holds connections and threads), `close` when it stops."""

    _delivery: Delivery | None = None

    def start(self) -> None:
        """Builds this process's delivery and starts what it runs beside the runs."""
        settings = process_settings()
        self._delivery = Delivery(Wiring.connect(settings), Engine(settings.engine))
        self._delivery.start()

    @property
    def delivery(self) -> Delivery:
        if self._delivery is None:  # its start failed (it logged why): tried again now
            self.start()
        assert self._delivery is not None
        return self._delivery

    def close(self) -> None:
        """The pool process stops: what its delivery started goes (prewarmed containers,
        its threads)."""
        if self._delivery is not None:
            self._delivery.close()


@app.task(name=RUN_TASK, base=RunTask, bind=True, max_retries=None)
def run_plugin(self: RunTask, request: dict[str, Any]) -> str:
    """Runs one plugin on one event; returns its summary (workers.next.summarize)."""
    req = RunRequest.from_dict(request)
    delivery = self.delivery
    try:
        done = delivery.deliver(req, self.request.hostname or delivery.settings.worker_name)
    except BROKER_DOWN as exc:
        log.warning("invocation %s: Redis unavailable (%s); the message goes back",
                    req.invocation_id, exc)
        raise Reject(exc, requeue=True) from None
    except Exception as exc:
        # A fault of ours, not the plugin's: still a record and a failure event.
        log.exception("invocation %s failed inside the worker", req.invocation_id)
        try:
            done = delivery.finish(req, Outcome(Status.FAILED, f"internal error: "
                                                               f"{type(exc).__name__}: {exc}"))
        except BROKER_DOWN:
            raise Reject(exc, requeue=True) from None
    if isinstance(done, Again):
        # Sent again by a resender once `countdown` has passed on Redis's clock (not by
        # Celery's ETA, which each worker judges by its own clock): manager.core.later.
        try:
            delivery.later.put(req.invocation_id, done.request.to_dict(), done.countdown,
                               delivery.settings.task_queue,
                               (self.request.delivery_info or {}).get("priority") or 0)
        except BROKER_DOWN as exc:
            raise Reject(exc, requeue=True) from None
        return f"again in {done.countdown:.1f} s"
    return finished(self, done)


def finished(task: Task, done: Done) -> str:
    """What Flower shows: a run's summary as the task's result, or as its failure (the
    plugin's run ended failed, timeout, oom, output_limit, rejected or lost: already
    recorded, with its failure event)."""
    if not done.failed:
        return done.summary or done.status.value
    try:
        task.send_event("task-failed", exception=done.summary or f"{done.status}: "
                        f"{done.reason or done.status}", traceback="")
    except BROKER_DOWN as exc:  # only Flower's view is missing: the run is stored
        log.warning("the failure of %s was not told to Flower: %s", task.request.id, exc)
    raise Ignore()
