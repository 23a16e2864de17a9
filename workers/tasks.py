"""Celery tasks: thin wrappers around Runner."""

from __future__ import annotations

import logging
import random
from typing import Any

from celery import Task

from manager.config import Settings
from manager.dispatch import RUN_TASK
from manager.errors import RetryRun, SandboxUnavailable, Throttled
from manager.records import Status
from workers.celery_app import app, runner
from workers.runner import invocation_from_task

log = logging.getLogger(__name__)


def backoff(retries: int, cap: float) -> float:
    """Exponential backoff with jitter: about 1, 2, 4 ... `cap` seconds at most."""
    return random.uniform(0.5, 1.0) * min(cap, 2.0**retries)


@app.task(name=RUN_TASK, bind=True, max_retries=None)
def run_plugin(self: Task, invocation_id: str, plugin: str, version: str, digest: str,
               event: dict[str, Any]) -> str:
    """Runs one plugin on one event; returns the final status. An unusable Docker engine is
    retried up to TITAN_SANDBOX_RETRIES times; a plugin's own failure only when its
    manifest says `retries: N`; a plugin at its `concurrency` waits for a slot."""
    inv = invocation_from_task({"invocation_id": invocation_id, "plugin": plugin,
                                "version": version, "event": event})
    run = runner()
    settings: Settings = run.settings
    started = run.start(invocation_id, self.request.hostname)
    if started is None:
        return "duplicate"
    attempt = started["attempts"]
    try:
        return run.run(inv, digest, attempt)["status"]
    except Throttled:
        run.records.update(invocation_id, status=Status.QUEUED.value,
                           attempts=attempt - 1, reason="waiting for a concurrency slot")
        raise self.retry(countdown=random.uniform(0.2, 1.0)) from None
    except RetryRun as exc:
        raise self.retry(countdown=backoff(attempt - 1, settings.retry_backoff_max)) from exc
    except SandboxUnavailable as exc:
        reason = f"sandbox_unavailable: {exc.message}"
        if attempt > settings.sandbox_retries:
            return run.fail(inv, Status.FAILED, reason)["status"]
        run.records.update(invocation_id, status=Status.RETRYING.value, reason=reason)
        raise self.retry(countdown=backoff(attempt - 1, settings.retry_backoff_max)) from exc
    except Exception as exc:
        # A fault of ours, not the plugin's: still a record and a failure event.
        log.exception("invocation %s failed inside the worker", invocation_id)
        return run.fail(inv, Status.FAILED, f"internal error: {type(exc).__name__}: {exc}")[
            "status"]
