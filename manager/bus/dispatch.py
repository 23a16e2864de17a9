"""Dispatch: one recorded run per (event, plugin), charged to its correlation's fan-out
budget (one event can never turn into more than `fanout_budget` runs, however its results
fan out) and sent to the workers. A run's task message is sent here, and again only by
the sweeper (a lost message) and by the workers' resenders (a retry's or a throttle's
backoff, on Redis's clock: manager.core.later)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import redis
from celery import Celery

from manager.core.contract import PRIORITY_LEVELS, send_run
from manager.core.events import Event
from manager.core.record_store import Charge
from manager.core.records import InvocationRecord, Status
from manager.core.runs import RunRequest
from manager.core.wiring import Wiring
from manager.plugins.loader import PluginEntry

Owed = Callable[[redis.client.Pipeline], object]  # a write that rides in a later pipeline
PENDING_GRACE_S = 60  # a record still pending this long was never sent: send it again
QUEUED_GRACE_S = 60  # how often the sweeper looks for a queued run's message


def priority_of(ahead: int, weight: int) -> int:
    """Fair queueing: a run's level is how many runs of its plugin are in line before it,
    per unit of weight (weight 2: two runs a level). Workers take level 0 first, so a
    plugin's next run comes before anyone's run after theirs: a quiet plugin's single run
    waits for one run of each busy plugin at most, not for their backlogs."""
    return min(PRIORITY_LEVELS - 1, ahead // max(1, weight))


class Dispatcher:
    """Records the run, then enqueues it; idempotent per (event, plugin) for bus events."""

    def __init__(self, wiring: Wiring, celery: Celery) -> None:
        self.conn = wiring.conn
        self.settings = wiring.settings
        self.celery = celery
        self.records = wiring.records
        self.keys = wiring.keys

    def dispatch(self, event: Event, plugin: PluginEntry, origin: str = "bus",
                 charge: Charge | None = None, owed: list[Owed] | None = None,
                 ) -> tuple[str, bool]:
        """Returns (invocation_id, sent). A bus event already dispatched to this plugin is
        sent again only if its record is still `pending` (a crash between recording and
        sending); API triggers always make a new run. `charge` is counted against the
        fan-out budget with the record (BudgetExceeded when spent); `owed`: see send()."""
        now = time.time()
        request = replace(plugin.request(event, self.settings.plugin, origin), dispatched_at=now)
        record = InvocationRecord.from_request(request, Status.PENDING, now)
        dedup = self.keys.dispatched(event.event_id, plugin.name) if origin == "bus" else None
        made = self.records.create(record, PENDING_GRACE_S, dedup, charge)
        if not made.created:
            existing = self.records.get(made.invocation_id) if made.found is Status.PENDING \
                else None
            if existing is None or existing.request is None:
                return made.invocation_id, False  # already sent, running or done (or expired)
            request = RunRequest.from_dict(existing.request)
        self.send(request, owed, priority=priority_of(made.ahead, request.weight))
        return made.invocation_id, True

    def enqueue(self, request: RunRequest, priority: int = 0) -> None:
        """The task message, at `priority` (0 first: priority_of)."""
        send_run(self.celery, self.settings.broker, request.to_dict(), priority)

    def send(self, request: RunRequest, owed: list[Owed] | None = None,
             priority: int = 0) -> None:
        """Hands the request to the broker, then marks the record queued (sent): at once,
        or added to `owed`, writes the caller sends soon in a pipeline (the listener's next
        read). Until then the record says pending, which a worker claims like queued."""
        self.enqueue(request, priority)
        queued = {"sources": frozenset({Status.PENDING}),
                  "due_in": QUEUED_GRACE_S}
        if owed is None:
            self.records.transition(request.invocation_id, Status.QUEUED, **queued)
        else:
            owed.append(lambda pipe: self.records.queue_transition(
                pipe, request.invocation_id, Status.QUEUED, **queued))
