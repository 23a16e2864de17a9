"""Where records live: `RecordStore` reads them and changes them, each change one atomic,
table-checked Lua script (record_scripts), indexed per plugin and, while not terminal, by
deadline. Every module that changes a record goes through it.

The finishing step writes the terminal record and XADDs its events in one script, so a
retry after a partial success (Redis blinked) adds nothing twice. The steps on a run's
way are few round trips on purpose: creating a run charges its fan-out budget in the same
script, claiming it takes its worker slot, finishing it frees the slot, and a transition
can ride in a caller's pipeline (the listener sends its `queued` marks with its next read).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, fields
from typing import Any

import redis

from manager.core import record_scripts as scripts
from manager.core.clients import check_replicated, confirm_replicated
from manager.core.config import Settings
from manager.core.errors import BudgetExceeded
from manager.core.events import Event
from manager.core.keys import Keys
from manager.core.records import TRANSITIONS, InvocationRecord, Status
from manager.core.retry import RECORD_POLL
from manager.core.slots import Grant, SlotAsk, grant_of


def encode_fields(values: dict[str, Any]) -> list[str]:
    """Field/value pairs for HSET, each value as JSON."""
    out: list[str] = []
    for name, value in values.items():
        if isinstance(value, Status):
            value = value.value
        out += [name, json.dumps(list(value) if isinstance(value, tuple) else value)]
    return out


def _states(sources: frozenset[Status]) -> str:
    return scripts.STATES.format("|".join(json.dumps(s.value) for s in sorted(sources)))


@dataclass(frozen=True)
class Outcome:
    """What a transition found: whether it applied, and the status it found."""

    applied: bool
    found: Status | None

    @classmethod
    def of(cls, reply: list[Any]) -> Outcome:
        found = Status(json.loads(reply[1])) if reply[1] else None
        return cls(bool(reply[0]), found)


@dataclass(frozen=True)
class Charge:
    """Runs charged to an event's correlation with its records (the fan-out budget); a
    stream entry is charged once, however often it is delivered."""

    correlation: str
    runs: int
    entry_id: str = ""


@dataclass(frozen=True)
class Claimed:
    """What a delivery's claim found: the grant (None: the run was not claimable: final,
    already running, or without a record) and the record as it was before the claim."""

    grant: Grant | None
    record: InvocationRecord | None


class RecordStore:
    """Reads and changes invocation records; takes its Redis connection as a parameter."""

    INDEX_CAP = 10_000

    def __init__(self, conn: redis.Redis, settings: Settings) -> None:
        self.conn = conn
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self._create = conn.register_script(scripts.CREATE)
        self._transition = conn.register_script(scripts.TRANSITION)
        self._claim = conn.register_script(scripts.CLAIM)
        self._finish = conn.register_script(scripts.FINISH)

    def create(self, record: InvocationRecord, deadline: float, dedup_key: str | None = None,
               charge: Charge | None = None) -> tuple[str, bool, Status | None]:
        """Stores a new record unless `dedup_key` already names one, charging `charge` to
        the budget first (BudgetExceeded, and nothing stored, when it is spent). Returns
        (id, created, status of the existing record)."""
        s = self.settings
        keys = [self.keys.invocation(record.invocation_id),
                self.keys.plugin_invocations(record.plugin), self.keys.inflight,
                self.keys.waiting, dedup_key or "",
                self.keys.budget(charge.correlation) if charge else "",
                self.keys.budget_charged(charge.entry_id) if charge and charge.entry_id else ""]
        values = {f.name: v for f in fields(record) if (v := getattr(record, f.name)) is not None}
        values["status"] = record.status
        created, inv, status = self._create(keys=keys, args=[
            record.invocation_id, s.record_ttl, record.created_at, self.INDEX_CAP,
            s.dedup_ttl, deadline, self.keys.invocation(""), charge.runs if charge else 0,
            s.fanout_budget, s.fanout_ttl, *encode_fields(values)])
        if int(created) < 0:
            raise BudgetExceeded(
                f"correlation {charge.correlation!r} used its budget of {s.fanout_budget} "
                f"runs (TITAN_FANOUT_BUDGET, counted for {s.fanout_ttl}s); send the event "
                "with a new event_id or correlation_id",
                correlation_id=charge.correlation if charge else None)
        found = Status(json.loads(status)) if status else None
        return inv.decode() if isinstance(inv, bytes) else inv, bool(created), found

    def get(self, invocation_id: str) -> InvocationRecord | None:
        raw = self.conn.hgetall(self.keys.invocation(invocation_id))
        return InvocationRecord.from_hash(raw) if raw else None

    def _transition_call(self, invocation_id: str, target: Status,
                         sources: frozenset[Status] | None, deadline: float | None,
                         increment: str, owner: str, changes: dict[str, Any],
                         ) -> tuple[list[str], list[Any]]:
        assert not target.terminal, "a terminal status is set with its events: use finish()"
        sources = TRANSITIONS[target] if sources is None else sources
        assert sources <= TRANSITIONS[target], (sources, target)
        if not owner:  # running -> running is a takeover, only ever a compare-and-set
            sources = sources - {Status.RUNNING} if target is Status.RUNNING else sources
        return ([self.keys.invocation(invocation_id), self.keys.inflight, self.keys.waiting],
                [_states(sources), invocation_id, "" if deadline is None else deadline,
                 increment, json.dumps(owner) if owner else "",
                 *encode_fields({"status": target, **changes})])

    def transition(self, invocation_id: str, target: Status,
                   sources: frozenset[Status] | None = None, deadline: float | None = None,
                   increment: str = "", owner: str = "", **changes: Any) -> Outcome:
        """Moves a record to `target` if its current status is one of `sources` (by default
        every source the table allows). `deadline` re-arms the sweeper's clock; `owner`
        makes it a compare-and-set on the record's worker (a takeover)."""
        keys, args = self._transition_call(invocation_id, target, sources, deadline,
                                           increment, owner, changes)
        return Outcome.of(self._transition(keys=keys, args=args))

    def queue_transition(self, pipe: redis.client.Pipeline, invocation_id: str,
                         target: Status, sources: frozenset[Status] | None = None,
                         deadline: float | None = None, **changes: Any) -> None:
        """The same transition, sent with the caller's pipeline: no round trip of its own
        (EVAL with the script's text: a pipelined EVALSHA would first ask Redis whether it
        has the script, a round trip). Its reply is the pipeline's to read (Outcome.of)."""
        keys, args = self._transition_call(invocation_id, target, sources, deadline, "", "",
                                           changes)
        pipe.eval(scripts.TRANSITION, len(keys), *keys, *args)

    def claim(self, ask: SlotAsk, sources: frozenset[Status], deadline: float,
              **changes: Any) -> Claimed:
        """One step for a delivery: the record as it was and, if its status is one of
        `sources` and the plugin has a slot for it, the run marked running (the attempt
        counted, the slot leased, the sweeper's deadline set)."""
        assert sources <= TRANSITIONS[Status.RUNNING] - {Status.RUNNING}, sources
        slots, waiting, workers = ask.keys(self.keys)
        grant, raw = self._claim(
            keys=[self.keys.invocation(ask.invocation_id), self.keys.inflight, waiting,
                  slots, workers],
            args=[_states(sources), deadline, *ask.args(time.time()),
                  *encode_fields({"status": Status.RUNNING, **changes})])
        fields = dict(zip(raw[::2], raw[1::2], strict=True))
        return Claimed(grant_of(grant) if grant else None,
                       InvocationRecord.from_hash(fields) if fields else None)

    def finish(self, invocation_id: str, target: Status, events: list[str],
               slot_of: str | None = None, **changes: Any) -> Outcome:
        """The terminal transition with its events (already encoded), atomically and at
        most once: a second call finds the record terminal and adds nothing. `slot_of`: the
        plugin whose worker slot this delivery holds, freed in the same step."""
        assert target.terminal, target
        changes.update(status=target, published=True, finished_at=changes.get(
            "finished_at") or time.time())
        reply = self._finish(
            keys=[self.keys.invocation(invocation_id), self.keys.inflight,
                  self.settings.event_stream, self.keys.waiting,
                  self.keys.plugin_slots(slot_of) if slot_of else ""],
            args=[_states(TRANSITIONS[target]), invocation_id, self.settings.stream_maxlen,
                  len(events), *events, *encode_fields(changes)])
        return Outcome.of(reply)

    def conclude(self, invocation_id: str, status: Status, reason: str | None,
                 events: list[str], failure: Event | None, slot_of: str | None = None,
                 **changes: Any) -> Outcome:
        """A run's end, the one way it is stored: the terminal record with its result
        events, plus its failure event for any outcome but succeeded (a run's own end,
        and a run the sweeper found lost)."""
        events = list(events)
        if status is not Status.SUCCEEDED and failure is not None:
            events.append(failure.encode())
            changes["failure_event_id"] = failure.event_id
        return self.finish(invocation_id, status, events, slot_of, reason=reason, **changes)

    def confirm_replicated(self, invocation_id: str) -> None:
        """With TITAN_REDIS_MIN_REPLICAS: a write of this connection's own, after
        everything the run stored, then WAIT for the replicas: a replica that confirms it
        has the run's final record and events too (replication keeps order). Raises
        NotReplicated when too few confirm in time."""
        if not self.settings.redis_min_replicas:
            return
        pipe = self.conn.pipeline(transaction=False)
        pipe.set(self.keys.replication_probe, invocation_id)
        confirm_replicated(pipe, self.settings)
        check_replicated(pipe.execute(), self.settings, f"the outcome of {invocation_id}")

    def recheck_later(self, invocation_ids: list[str], when: float) -> None:
        """Moves live runs' sweeper deadline on (they are still held or queued)."""
        if invocation_ids:
            self.conn.zadd(self.keys.inflight, dict.fromkeys(invocation_ids, when), xx=True)

    def forget(self, invocation_id: str) -> None:
        """Drops a run the sweeper need not look at (its record expired or is final)."""
        self.conn.zrem(self.keys.inflight, invocation_id)

    def for_plugin(self, plugin: str, limit: int = 20) -> list[InvocationRecord]:
        """Newest first; ids whose record expired are skipped."""
        ids = self.conn.zrevrange(self.keys.plugin_invocations(plugin), 0, max(limit, 1) - 1)
        pipe = self.conn.pipeline(transaction=False)
        for i in ids:
            pipe.hgetall(self.keys.invocation(i.decode()))
        return [InvocationRecord.from_hash(raw) for raw in pipe.execute() if raw]

    def due(self, now: float, limit: int = 500) -> list[str]:
        """Non-terminal runs whose deadline has passed (the sweeper's candidates)."""
        return [i.decode() for i in self.conn.zrangebyscore(self.keys.inflight, "-inf", now,
                                                            start=0, num=limit)]

    def extend(self, invocation_id: str, deadline: float) -> None:
        self.conn.zadd(self.keys.inflight, {invocation_id: deadline}, xx=True)

    def wait(self, invocation_id: str, seconds: float) -> InvocationRecord | None:
        """Polls the record until it is terminal or time is up (for `?wait`)."""
        deadline = time.monotonic() + seconds
        for delay in RECORD_POLL.delays():
            record = self.get(invocation_id)
            if (record and record.status.terminal) or time.monotonic() >= deadline:
                return record
            time.sleep(delay)
        return None
