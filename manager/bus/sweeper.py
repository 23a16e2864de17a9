"""The sweeper: no run stays `pending`, `queued`, `throttled`, `running` or `retrying`
past its deadline (SPEC §4).

A run past its deadline is left alone while a process holds it: the process running it
renews its lease (manager.core.slots). An unheld run is judged by what its status proves:

- `running`: its process died (killed, its container or host gone). Its deadline moves on
  with its lease and passes one lease after the lease lapsed, so it is swept at once,
  not after kombu's visibility timeout: the dead worker's message, when kombu puts it
  back, finds the run finished or held by its new process and runs nothing.
- `pending`: its message was never sent (the record is marked `queued` only after the
  send). Abandoned once it has looked so for `sweep_grace_s`.
- any later status: a message was sent before the status was written. While it is in
  the broker (a queue list, or kombu's `unacked` hash: prefetched by a worker, or a dead
  worker's, which kombu puts back) the run waits its turn and is looked at again
  `QUEUED_GRACE_S` later. A message in neither on two looks `sweep_grace_s` apart is
  gone (a failover lost it): the run is sent again. So a lost message is re-sent at most
  QUEUED_GRACE_S + sweep_grace_s + two sweep intervals after it was last seen (150 s
  with the defaults), whatever else the queue holds.

An abandoned run is re-queued (its plugin did not fail: its process or its message
vanished), at most `max_requeues` times; then it is marked `lost`, with a failure event
(a plugin that takes its worker down every time ends there). Re-queuing a
run whose message was only late is harmless: the second delivery finds it finished or
held. One process sweeps at a time, behind a lock in Redis.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field

from manager.bus.dispatch import QUEUED_GRACE_S, Dispatcher
from manager.core.contract import messages_sent
from manager.core.observer import observer
from manager.core.records import InvocationRecord, Outcome, Status
from manager.core.runs import RunRequest
from manager.core.wiring import Wiring

log = logging.getLogger(__name__)


@dataclass
class SweepReport:
    requeued: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    suspected: list[str] = field(default_factory=list)


class Sweeper:
    def __init__(self, wiring: Wiring, dispatcher: Dispatcher) -> None:
        self.conn = wiring.conn
        self.settings = wiring.settings
        self.dispatcher = dispatcher
        self.records = wiring.records
        self.slots = wiring.slots
        self.keys = wiring.keys
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

    def sweep(self, now: float | None = None) -> SweepReport:
        """One pass as of `now` (a later clock lets a test skip a wait); does nothing when
        another process holds the lock."""
        token = uuid.uuid4().hex
        lease_ms = max(30, self.settings.housekeeping_s * 2) * 1000
        if not self.conn.set(self.keys.sweep_lock, token, nx=True, px=lease_ms):
            return SweepReport()
        try:
            return self._sweep(self.records.now() if now is None else now)
        finally:
            self.records.scripts.unlock(keys=[self.keys.sweep_lock], args=[token])

    def _sweep(self, now: float) -> SweepReport:
        report = SweepReport()
        due = self.records.due(now)
        suspects = {k.decode(): float(v) for k, v in
                    self.conn.hgetall(self.keys.sweep_suspects).items()}
        if not due:
            if suspects:
                self.conn.delete(self.keys.sweep_suspects)
            return report
        held = self.slots.held(due)
        unheld = {i: self.records.get(i) for i in due if i not in held}
        sent = messages_sent(self.conn, self.settings.broker, [
            i for i, r in unheld.items()
            if r is not None and r.status not in (Status.PENDING, Status.RUNNING)])
        waiting = set(held) | sent
        for invocation_id, record in unheld.items():
            if record is None or record.status.terminal:
                self.records.forget(invocation_id)
            elif record.status is Status.RUNNING:
                self._abandoned(record, report)
            elif invocation_id in sent:
                continue  # its message waits in the queue, or at a worker
            elif invocation_id not in suspects:
                self.conn.hset(self.keys.sweep_suspects, invocation_id, now)
                report.suspected.append(invocation_id)
                continue
            elif now - suspects[invocation_id] >= self.settings.sweep_grace_s:
                self._abandoned(record, report)
            else:
                continue
            self.conn.hdel(self.keys.sweep_suspects, invocation_id)
        self.records.recheck_later(sorted(waiting), now + QUEUED_GRACE_S)
        stale = set(suspects) - set(due) | (set(suspects) & waiting)
        if stale:
            self.conn.hdel(self.keys.sweep_suspects, *stale)
        return report

    def _abandoned(self, record: InvocationRecord, report: SweepReport) -> None:
        request = RunRequest.from_dict(record.request) if record.request else None
        # A run whose process died runs again, as kombu's redelivery of its message would:
        # its plugin did not fail. At most max_requeues times (a plugin that kills its
        # worker every time ends `lost`).
        may_run = request is not None and record.requeues < self.settings.max_requeues
        if may_run and request is not None:
            why = f"re-queued by the sweeper: {self._what_vanished(record)}"
            outcome = self.records.transition(
                record.invocation_id, Status.QUEUED, increment="requeues",
                due_in=QUEUED_GRACE_S, reason=why, note=why)
            if outcome.applied:
                self.dispatcher.enqueue(request)
                observer().requeued(record.plugin)
                report.requeued.append(record.invocation_id)
                log.warning("sweeper: re-queued %s (%s, held by %s)", record.invocation_id,
                            record.status, record.worker or "nobody")
            return
        reason = f"lost: {self._what_vanished(record)}"
        failure = request.failure_event(Status.LOST.value, reason) if request else None
        outcome = self.records.store(record.invocation_id, Outcome(Status.LOST, reason), failure)
        if outcome.applied:
            observer().ended(record.plugin, Status.LOST.value)
            report.lost.append(record.invocation_id)
            log.error("sweeper: %s is %s", record.invocation_id, reason)

    @staticmethod
    def _what_vanished(record: InvocationRecord) -> str:
        if record.status is Status.RUNNING:
            return (f"its worker {record.worker} stopped holding it and its task message "
                    f"never came back (attempt {record.attempts})")
        return f"its task message vanished while {record.status.value}"
