"""Celery tasks: thin wrappers around Runner.

A Redis error never counts as "task finished": the message is rejected with requeue (or,
when Redis is down, stays unacknowledged and comes back after the visibility timeout).
A run that ended other than `succeeded` raises RunFailed once its outcome is stored, so
Flower shows it as a failure; the message is acknowledged all the same.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery import Task
from celery.exceptions import Reject, Retry
from kombu.exceptions import OperationalError

from manager.core.contract import RUN_TASK
from manager.core.errors import NotReplicated, OutcomeNotStored
from manager.core.records import Status
from manager.core.runs import RunRequest
from workers.celery_app import app, runner
from workers.runner import Finished, Later

log = logging.getLogger(__name__)
BROKER_DOWN = (redis.ConnectionError, redis.TimeoutError, OperationalError, OutcomeNotStored,
               NotReplicated)


class RunFailed(Exception):
    """The plugin's run ended as failed, timeout, oom, output_limit, rejected or lost
    (already recorded, with its failure event)."""


@app.task(name=RUN_TASK, bind=True, max_retries=None, throws=(RunFailed,))
def run_plugin(self: Task, request: dict[str, Any]) -> str:
    """Runs one plugin on one event; returns the final status."""
    req = RunRequest.from_dict(request)
    run = runner()
    try:
        decision = run.execute(req, self.request.hostname or run.settings.worker_name)
    except BROKER_DOWN as exc:
        log.warning("invocation %s: Redis unavailable (%s); the message goes back",
                    req.invocation_id, exc)
        raise Reject(exc, requeue=True) from None
    except Exception as exc:
        # A fault of ours, not the plugin's: still a record and a failure event.
        log.exception("invocation %s failed inside the worker", req.invocation_id)
        try:
            decision = run.conclude(req, Status.FAILED,
                                    f"internal error: {type(exc).__name__}: {exc}")
        except BROKER_DOWN:
            raise Reject(exc, requeue=True) from None
    if isinstance(decision, Later):
        try:
            raise self.retry(kwargs={"request": decision.request.to_dict()},
                             countdown=decision.countdown)
        except Retry:
            raise
        except BROKER_DOWN as exc:
            raise Reject(exc, requeue=True) from None
    return finished(decision)


def finished(decision: Finished) -> str:
    if decision.failed:
        raise RunFailed(f"{decision.status}: {decision.reason or decision.status}")
    return decision.status
