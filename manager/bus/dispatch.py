"""Dispatch: one recorded run per (event, plugin), sent to the workers. A run's task
message is sent here, and again only by the sweeper (a lost message) and by the worker's
own retries (Celery's `retry`)."""

from __future__ import annotations

import time

import redis
from celery import Celery

from manager.core.config import Settings
from manager.core.contract import RUN_TASK
from manager.core.events import Event
from manager.core.keys import Keys
from manager.core.records import InvocationRecord, RecordStore, Status
from manager.core.runs import RunRequest
from manager.plugins.loader import PluginEntry

PENDING_GRACE_S = 60  # a record still pending this long was never sent: send it again
QUEUED_GRACE_S = 120  # how often the sweeper looks at a queued run's message


# KEYS: budget counter, [the entry's charge]. ARGV: runs, ttl. Returns the runs counted.
_CHARGE = """
if #KEYS == 2 then
  local before = redis.call('GET', KEYS[2])
  if before then return tonumber(before) end
end
local used = redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2], 'NX')
if #KEYS == 2 then redis.call('SET', KEYS[2], used, 'EX', ARGV[2]) end
return used
"""


class FanoutBudget:
    """Runs per correlation id, counted atomically with a TTL: one event can never turn
    into more than `fanout_budget` runs, however its results fan out."""

    def __init__(self, conn: redis.Redis, settings: Settings) -> None:
        self.conn = conn
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self._charge = conn.register_script(_CHARGE)

    def charge(self, event: Event, runs: int, entry_id: str = "") -> bool:
        """Counts `runs` more for the event's correlation; False when over the budget.
        A stream entry is charged once, however often it is delivered: a second charge
        finds what the first one counted."""
        keys = [self.keys.budget(event.correlation)]
        if entry_id:
            keys.append(self.keys.budget_charged(entry_id))
        used = self._charge(keys=keys, args=[runs, self.settings.fanout_ttl])
        return int(used) <= self.settings.fanout_budget


class Dispatcher:
    """Records the run, then enqueues it; idempotent per (event, plugin) for bus events."""

    def __init__(self, conn: redis.Redis, settings: Settings, celery: Celery) -> None:
        self.conn = conn
        self.settings = settings
        self.celery = celery
        self.records = RecordStore(conn, settings)
        self.keys = Keys(settings.key_prefix)

    def dispatch(self, event: Event, plugin: PluginEntry, origin: str = "bus") -> tuple[str, bool]:
        """Returns (invocation_id, sent). A bus event already dispatched to this plugin is
        sent again only if its record is still `pending` (a crash between recording and
        sending); API triggers always make a new run."""
        now = time.time()
        request = plugin.request(event, self.settings, origin)
        record = InvocationRecord.from_request(request, Status.PENDING, now)
        dedup = self.keys.dispatched(event.event_id, plugin.name) if origin == "bus" else None
        invocation_id, created, found = self.records.create(record, now + PENDING_GRACE_S, dedup)
        if not created:
            existing = self.records.get(invocation_id) if found is Status.PENDING else None
            if existing is None or existing.request is None:
                return invocation_id, False  # already sent, running or done (or expired)
            request = RunRequest.from_dict(existing.request)
        self.send(request)
        return invocation_id, True

    def enqueue(self, request: RunRequest) -> None:
        self.celery.send_task(RUN_TASK, kwargs={"request": request.to_dict()},
                              queue=self.settings.task_queue, task_id=request.invocation_id,
                              shadow=f"plugin:{request.plugin}")

    def send(self, request: RunRequest) -> None:
        """Hands the request to the broker, then marks the record queued (sent)."""
        self.enqueue(request)
        self.records.transition(request.invocation_id, Status.QUEUED,
                                sources=frozenset({Status.PENDING}),
                                deadline=time.time() + QUEUED_GRACE_S)
