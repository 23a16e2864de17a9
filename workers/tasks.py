"""Celery tasks: thin wrappers around Runner."""

from __future__ import annotations

import logging
import random
from typing import Any

from celery import Task

from manager.dispatch import RUN_TASK
from manager.errors import SandboxUnavailable
from manager.records import Status
from workers.celery_app import app, runner
from workers.runner import invocation_from_task

SANDBOX_RETRIES = 5
log = logging.getLogger(__name__)


def backoff(retries: int) -> float:
    """Exponential backoff with jitter: about 1, 2, 4 ... 60 seconds at most."""
    return random.uniform(0.5, 1.0) * min(60.0, 2.0**retries)


@app.task(name=RUN_TASK, bind=True, max_retries=SANDBOX_RETRIES)
def run_plugin(self: Task, invocation_id: str, plugin: str, version: str, digest: str,
               event: dict[str, Any]) -> str:
    """Runs one plugin on one event; returns the final status. Only an unusable Docker
    engine is retried; a plugin's own failure is final."""
    inv = invocation_from_task({"invocation_id": invocation_id, "plugin": plugin,
                                "version": version, "event": event})
    run = runner()
    if run.start(invocation_id, self.request.retries + 1, self.request.hostname) is None:
        return "duplicate"
    try:
        return run.run(inv, digest)["status"]
    except SandboxUnavailable as exc:
        reason = f"sandbox_unavailable: {exc.message}"
        if self.request.retries >= SANDBOX_RETRIES:
            return run.fail(inv, Status.FAILED, reason)["status"]
        run.records.update(invocation_id, status=Status.RETRYING.value, reason=reason)
        raise self.retry(exc=exc, countdown=backoff(self.request.retries)) from exc
    except Exception as exc:
        # A fault of ours, not the plugin's: still a record and a failure event.
        log.exception("invocation %s failed inside the worker", invocation_id)
        return run.fail(inv, Status.FAILED, f"internal error: {type(exc).__name__}: {exc}")[
            "status"]
