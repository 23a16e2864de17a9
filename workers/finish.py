"""Finish: a run's Outcome stored, with its result events or its failure event, exactly
once, and the delivery's worker slot freed in the same step. Never thrown away because Redis
blinked: retried with backoff until Redis answers (within `finish_budget_s`); and, when
the operator asks for it, acknowledged only once a replica confirms it."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis

from manager.core.errors import OutcomeNotStored
from manager.core.observer import observer
from manager.core.record_store import Written
from manager.core.records import Outcome
from manager.core.retry import STORE_OUTCOME
from manager.core.runs import RunRequest
from manager.core.wiring import Wiring

log = logging.getLogger(__name__)
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)
T = TypeVar("T")


def finish(wiring: Wiring, req: RunRequest, outcome: Outcome) -> Written:
    """Stores the outcome; raises OutcomeNotStored past the budget, NotReplicated when too
    few replicas confirm it (the run is sent again to confirm it later)."""
    failure = req.failure_event(outcome.status.value, outcome.reason)
    budget = wiring.settings.finish_budget_s
    written = persist(lambda: wiring.records.store(req.invocation_id, outcome, failure,
                                                   slot_of=req.plugin),
                      budget, req.invocation_id)
    persist(lambda: wiring.records.confirm_replicated(req.invocation_id), budget,
            req.invocation_id)
    if written.applied:
        observer().ended(req.plugin, outcome.status.value)
    else:
        log.warning("invocation %s was already %s; outcome %s not stored again",
                    req.invocation_id, written.found, outcome.status)
    return written


def persist(write: Callable[[], T], budget_s: float, what: str) -> T:
    """Runs `write` until Redis answers, with capped exponential backoff, for at most
    `budget_s` seconds; a finished run's outcome is kept in memory meanwhile."""
    deadline = time.monotonic() + budget_s
    for delay in STORE_OUTCOME.delays():
        try:
            return write()
        except REDIS_DOWN as exc:
            if time.monotonic() + delay > deadline:
                raise OutcomeNotStored(f"Redis unreachable for {budget_s}s while storing the "
                                       f"outcome of {what}: {exc}", invocation_id=what) from exc
            log.warning("storing the outcome of %s: Redis unreachable (%s); retrying in "
                        "%.1fs", what, exc, delay)
            time.sleep(delay)
    raise AssertionError("unreachable: the delays never end")
