"""The sweeper: no run stays `pending`, `queued`, `throttled`, `running` or `retrying`
past its deadline (SPEC §4).

A run past its deadline is left alone while a live worker holds it (its heartbeat lists
the run as active or reserved) or a task message for it still exists (in the queue, or
unacknowledged and due to come back). Otherwise it is abandoned. Once it has looked
abandoned for `sweep_grace_s`, it is re-queued when it never started, or when its
manifest's retries still allow another attempt. Otherwise it is marked `lost`, with a
failure event. One process sweeps at a time, behind a lock in Redis.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field

import redis

from manager.bus.dispatch import QUEUED_GRACE_S, Dispatcher
from manager.core import metrics
from manager.core.beats import WorkerBeat
from manager.core.config import Settings
from manager.core.keys import Keys
from manager.core.records import InvocationRecord, RecordStore, Status
from manager.core.runs import RunRequest

log = logging.getLogger(__name__)
ALIVE_RECHECK_S = 300  # a run still held or queued is looked at again after this long

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass
class SweepReport:
    requeued: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    suspected: list[str] = field(default_factory=list)


class Sweeper:
    def __init__(self, conn: redis.Redis, settings: Settings, dispatcher: Dispatcher) -> None:
        self.conn = conn
        self.settings = settings
        self.dispatcher = dispatcher
        self.records = RecordStore(conn, settings)
        self.keys = Keys(settings.key_prefix)
        self._release = conn.register_script(_RELEASE)
        self._last = 0.0

    def maybe_sweep(self) -> None:
        """For housekeeping loops that tick often: sweeps every `sweep_interval_s`."""
        if time.monotonic() - self._last < self.settings.sweep_interval_s:
            return
        self._last = time.monotonic()
        report = self.sweep()
        if report.requeued or report.lost:
            log.warning("sweeper: re-queued %d, lost %d", len(report.requeued),
                        len(report.lost))

    def sweep(self) -> SweepReport:
        """One pass; does nothing when another process holds the lock."""
        token = uuid.uuid4().hex
        lease_ms = max(30, self.settings.housekeeping_s * 2) * 1000
        if not self.conn.set(self.keys.sweep_lock, token, nx=True, px=lease_ms):
            return SweepReport()
        try:
            return self._sweep(time.time())
        finally:
            self._release(keys=[self.keys.sweep_lock], args=[token])

    def _sweep(self, now: float) -> SweepReport:
        report = SweepReport()
        due = self.records.due(now)
        suspects = {k.decode(): float(v) for k, v in
                    self.conn.hgetall(self.keys.sweep_suspects).items()}
        if not due:
            if suspects:
                self.conn.delete(self.keys.sweep_suspects)
            return report
        alive = self.held_by_live_workers() | self.task_messages()
        # still held or still has a message: look again later
        self.records.recheck_later(sorted(alive.intersection(due)), now + ALIVE_RECHECK_S)
        for invocation_id in (i for i in due if i not in alive):
            record = self.records.get(invocation_id)
            if record is None or record.status.terminal:
                self.records.forget(invocation_id)
            elif invocation_id not in suspects:
                self.conn.hset(self.keys.sweep_suspects, invocation_id, now)
                report.suspected.append(invocation_id)
                continue
            elif now - suspects[invocation_id] >= self.settings.sweep_grace_s:
                self._abandoned(record, report)
            else:
                continue
            self.conn.hdel(self.keys.sweep_suspects, invocation_id)
        stale = set(suspects) - set(due) | (set(suspects) & alive)
        if stale:
            self.conn.hdel(self.keys.sweep_suspects, *stale)
        return report

    def _abandoned(self, record: InvocationRecord, report: SweepReport) -> None:
        request = RunRequest.from_dict(record.request) if record.request else None
        started = record.status is Status.RUNNING
        may_run = request is not None and record.requeues < self.settings.max_requeues and (
            not started or record.attempts <= request.retries)
        if may_run and request is not None:
            outcome = self.records.transition(
                record.invocation_id, Status.QUEUED, increment="requeues",
                deadline=time.time() + QUEUED_GRACE_S,
                reason=f"re-queued by the sweeper: {self._what_vanished(record)}")
            if outcome.applied:
                self.dispatcher.enqueue(request)
                metrics.REQUEUED.labels(plugin=record.plugin).inc()
                metrics.RETRIES.labels(plugin=record.plugin, reason="abandoned").inc()
                report.requeued.append(record.invocation_id)
                log.warning("sweeper: re-queued %s (%s)", record.invocation_id, record.status)
            return
        reason = f"lost: {self._what_vanished(record)}"
        failure = request.failure_event(Status.LOST.value, reason) if request else None
        outcome = self.records.conclude(record.invocation_id, Status.LOST, reason, [], failure)
        if outcome.applied:
            metrics.INVOCATIONS.labels(plugin=record.plugin, status=Status.LOST.value).inc()
            report.lost.append(record.invocation_id)
            log.error("sweeper: %s is %s", record.invocation_id, reason)

    @staticmethod
    def _what_vanished(record: InvocationRecord) -> str:
        if record.status is Status.RUNNING:
            return (f"its worker {record.worker} stopped reporting it and no task message "
                    f"is left (attempt {record.attempts})")
        return f"its task message vanished while {record.status.value}"

    def held_by_live_workers(self) -> set[str]:
        """Runs that a live worker reports as active or reserved."""
        return {i for beat in WorkerBeat.all(self.conn, self.keys) for i in beat.held}

    def task_messages(self) -> set[str]:
        """Task ids with a message in the queue or unacknowledged (kombu restores those)."""
        ids: set[str] = set()
        queued = self.conn.lrange(self.settings.task_queue, 0, -1)
        unacked = self.conn.hvals(self.keys.unacked)
        for raw, wrapped in [(r, False) for r in queued] + [(r, True) for r in unacked]:
            try:
                message = json.loads(raw)
                ids.add((message[0] if wrapped else message)["headers"]["id"])
            except (ValueError, KeyError, TypeError, IndexError):
                continue
        return ids
