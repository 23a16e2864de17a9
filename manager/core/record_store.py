"""Where records live: `RecordStore` reads them and changes them, each change one atomic,
table-checked Lua script (manager/core/lua), indexed per plugin and, while not terminal,
by deadline. Every module that changes a record goes through it.

A run's end is stored in one script (`store`: the terminal record with its events), so a
retry after a partial success (Redis blinked) adds nothing twice. The steps on a run's
way are few round trips on purpose: creating a run charges its fan-out budget in the same
script, claiming it takes its worker slot, storing its end frees the slot, and a
transition can ride in a caller's pipeline (the listener sends its `queued` marks with its
next read).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import redis

from manager.core.clients import check_replicated, confirm_replicated, text
from manager.core.errors import BudgetExceeded
from manager.core.events import Event
from manager.core.groups import RecordSettings
from manager.core.keys import Keys
from manager.core.records import ACTIVE, TRANSITIONS, InvocationRecord, Outcome, Status
from manager.core.retry import RECORD_POLL
from manager.core.scripts import Scripts, named
from manager.core.slots import LEASE_TTL_S, SlotAsk, SlotGrant, grant_of
from manager.core.stats import KEPT_S as STATS_KEPT_S
from manager.core.stats import minute_of

WAITING = ACTIVE - {Status.RUNNING}  # unfinished runs that have not started
STANDING_CAP = 10_000  # unfinished runs looked at to say where one stands


def encode_fields(values: dict[str, Any]) -> dict[str, str]:
    """Field values for the scripts' HSET, each as JSON."""
    out: dict[str, str] = {}
    for name, value in values.items():
        if isinstance(value, Status):
            value = value.value
        out[name] = json.dumps(list(value) if isinstance(value, tuple) else value)
    return out


def _sources(sources: frozenset[Status]) -> list[str]:
    return sorted(s.value for s in sources)


@dataclass(frozen=True)
class Written:
    """What a change of a record found: whether it applied, and the status it found."""

    applied: bool
    found: Status | None

    @classmethod
    def of(cls, reply: list[Any]) -> Written:
        found = text(reply[1]) if reply[1] else None
        return cls(bool(reply[0]), Status(found) if found else None)


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

    grant: SlotGrant | None
    record: InvocationRecord | None


class Created(NamedTuple):
    """What create found: the run's id (the existing one under a dedup key), whether it
    was stored now, the existing record's status, and how many runs of its plugin were in
    line before it (its priority: fair queueing)."""

    invocation_id: str
    created: bool
    found: Status | None
    ahead: int


class RecordStore:
    """Reads and changes invocation records; takes its Redis connection as a parameter."""

    INDEX_CAP = 10_000

    def __init__(self, conn: redis.Redis, settings: RecordSettings, keys: Keys) -> None:
        self.conn = conn
        self.settings = settings
        self.keys = keys
        self.scripts = Scripts(conn)

    def create(self, record: InvocationRecord, due_in: float, dedup_key: str | None = None,
               charge: Charge | None = None) -> Created:
        """Stores a new record unless `dedup_key` already names one, charging `charge` to
        the budget first (BudgetExceeded, and nothing stored, when it is spent). The
        sweeper looks at it `due_in` seconds from now, on Redis's clock (every deadline
        is: one clock for hosts whose clocks differ)."""
        s = self.settings
        keys = [self.keys.invocation(record.invocation_id),
                self.keys.plugin_invocations(record.plugin), self.keys.inflight,
                self.keys.waiting, dedup_key or "",
                self.keys.budget(charge.correlation) if charge else "",
                self.keys.budget_charged(charge.entry_id) if charge and charge.entry_id else "",
                self.keys.invocations]
        values = {f.name: v for f in fields(record) if (v := getattr(record, f.name)) is not None}
        values["status"] = record.status
        budget = {"runs": charge.runs, "budget": s.fanout_budget,
                  "ttl": s.fanout_ttl} if charge else None
        created, inv, status, *ahead = self.scripts.create(keys=keys, args=[named(
            id=record.invocation_id, ttl=s.record_ttl, created_at=record.created_at,
            index_cap=self.INDEX_CAP, dedup_ttl=s.dedup_ttl, due_in=due_in,
            record_prefix=self.keys.invocation(""), charge=budget,
            fields=encode_fields(values))])
        if int(created) < 0:
            raise BudgetExceeded(
                f"correlation {charge.correlation!r} used its budget of {s.fanout_budget} "
                f"runs (TITAN_FANOUT_BUDGET, counted for {s.fanout_ttl}s); send the event "
                "with a new event_id or correlation_id",
                correlation_id=charge.correlation if charge else None)
        found = Status(text(status)) if status else None
        return Created(text(inv), bool(created), found,
                       int(ahead[0]) if ahead else 0)

    def get(self, invocation_id: str) -> InvocationRecord | None:
        raw = self.conn.hgetall(self.keys.invocation(invocation_id))
        return InvocationRecord.from_hash(raw) if raw else None

    def _change(self, invocation_id: str, target: Status, sources: frozenset[Status] | None,
                due_in: float | None, increment: str, owner: str,
                changes: dict[str, Any], note: str = "") -> tuple[list[str], str]:
        assert not target.terminal, "a terminal status is stored with its outcome: store()"
        sources = TRANSITIONS[target] if sources is None else sources
        assert sources <= TRANSITIONS[target], (sources, target)
        if not owner:  # running -> running is a takeover, only ever a compare-and-set
            sources = sources - {Status.RUNNING} if target is Status.RUNNING else sources
        return ([self.keys.invocation(invocation_id), self.keys.inflight, self.keys.waiting],
                named(id=invocation_id, sources=_sources(sources), due_in=due_in,
                      increment=increment or None, owner=owner or None, note=note or None,
                      fields=encode_fields({"status": target, **changes})))

    def transition(self, invocation_id: str, target: Status,
                   sources: frozenset[Status] | None = None, due_in: float | None = None,
                   increment: str = "", owner: str = "", note: str = "",
                   **changes: Any) -> Written:
        """Moves a record to `target` if its current status is one of `sources` (by default
        every source the table allows). `due_in` re-arms the sweeper's clock (seconds from
        now, Redis's); `owner` makes it a compare-and-set on the record's worker (a
        takeover); `note`: the run is sent again, and why (kept in its history)."""
        keys, args = self._change(invocation_id, target, sources, due_in, increment, owner,
                                  changes, note)
        return Written.of(self.scripts.transition(keys=keys, args=[args]))

    def queue_transition(self, pipe: redis.client.Pipeline, invocation_id: str,
                         target: Status, sources: frozenset[Status] | None = None,
                         due_in: float | None = None, **changes: Any) -> None:
        """The same transition, sent with the caller's pipeline: no round trip of its own
        (EVAL with the script's text: a pipelined EVALSHA would first ask Redis whether it
        has the script, a round trip). Its reply is the pipeline's to read (Written.of)."""
        keys, args = self._change(invocation_id, target, sources, due_in, "", "", changes)
        pipe.eval(self.scripts.transition.script, len(keys), *keys, args)

    def claim(self, ask: SlotAsk, sources: frozenset[Status], due_in: float, holder: str,
              **changes: Any) -> Claimed:
        """One step for a delivery: the record as it was and, if its status is one of
        `sources` and the plugin has a slot for it, the run marked running (the attempt
        counted, the slot leased, the sweeper's deadline set) and held by `holder` (its
        lease, renewed while it runs: manager.core.slots.Slots.hold)."""
        assert sources <= TRANSITIONS[Status.RUNNING] - {Status.RUNNING}, sources
        slots, waiting, workers = ask.keys(self.keys)
        grant, raw = self.scripts.claim(
            keys=[self.keys.invocation(ask.invocation_id), self.keys.inflight, waiting,
                  slots, workers, self.keys.lease(ask.invocation_id)],
            args=[named(id=ask.invocation_id, sources=_sources(sources), due_in=due_in,
                        ask=ask.named(), holder=holder, lease_ttl=LEASE_TTL_S,
                        fields=encode_fields({"status": Status.RUNNING, **changes}))])
        fields = dict(zip(raw[::2], raw[1::2], strict=True))
        return Claimed(grant_of(grant) if grant else None,
                       InvocationRecord.from_hash(fields) if fields else None)

    def store(self, invocation_id: str, outcome: Outcome, failure: Event | None = None,
              slot_of: str | None = None) -> Written:
        """A run's end, the one way it is stored, atomically and at most once (a second
        call finds the record terminal and adds nothing): the terminal record with its
        result events, plus its failure event for any outcome but succeeded. `slot_of`:
        the plugin whose worker slot this delivery holds, freed in the same step."""
        events = list(outcome.events)
        changes = outcome.record_fields()
        if outcome.status is not Status.SUCCEEDED and failure is not None:
            events.append(failure.encode())
            changes["failure_event_id"] = failure.event_id
        changes.update(status=outcome.status, reason=outcome.reason, published=True,
                       finished_at=changes.get("finished_at") or time.time())
        reply = self.scripts.store(
            keys=[self.keys.invocation(invocation_id), self.keys.inflight,
                  self.settings.stream.events, self.keys.waiting,
                  self.keys.plugin_slots(slot_of) if slot_of else "",
                  self.keys.lease(invocation_id),
                  self.keys.minute_stats(minute_of(changes["finished_at"]))],
            args=[named(id=invocation_id, sources=_sources(TRANSITIONS[outcome.status]),
                        maxlen=self.settings.stream.maxlen, events=events,
                        stats_ttl=STATS_KEPT_S, fields=encode_fields(changes))])
        return Written.of(reply)

    def confirm_replicated(self, invocation_id: str) -> None:
        """With TITAN_REDIS_MIN_REPLICAS: a write of this connection's own, after
        everything the run stored, then WAIT for the replicas: a replica that confirms it
        has the run's final record and events too (replication keeps order). Raises
        NotReplicated when too few confirm in time."""
        if not self.settings.redis.min_replicas:
            return
        pipe = self.conn.pipeline(transaction=False)
        pipe.set(self.keys.replication_probe, invocation_id)
        confirm_replicated(pipe, self.settings.redis)
        check_replicated(pipe.execute(), self.settings.redis, f"the outcome of {invocation_id}")

    def now(self) -> float:
        """Redis's clock: what every deadline is written and judged by."""
        seconds, micro = self.conn.time()
        return seconds + micro / 1e6

    def recheck_later(self, invocation_ids: list[str], when: float) -> None:
        """Moves live runs' sweeper deadline on to `when` (on Redis's clock: now())."""
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

    def standing(self, record: InvocationRecord, cap: int = STANDING_CAP) -> tuple[int, int]:
        """Where an unfinished run stands: (runs recorded before it that have not
        started, runs running now), among the unfinished runs (at most `cap` looked at)."""
        ids = self.conn.zrange(self.keys.inflight, 0, cap - 1)
        pipe = self.conn.pipeline(transaction=False)
        for i in ids:
            pipe.hmget(self.keys.invocation(i.decode()), "status", "created_at")
        ahead = running = 0
        for status, created in pipe.execute():
            if status is None or created is None:
                continue  # expired meanwhile
            status = Status(json.loads(status))
            if status is Status.RUNNING:
                running += 1
            elif status in WAITING and json.loads(created) < record.created_at:
                ahead += 1
        return ahead, running

    def due(self, now: float, limit: int = 500) -> list[str]:
        """Non-terminal runs whose deadline has passed (the sweeper's candidates)."""
        return [i.decode() for i in self.conn.zrangebyscore(self.keys.inflight, "-inf", now,
                                                            start=0, num=limit)]

    def wait(self, invocation_id: str, seconds: float) -> InvocationRecord | None:
        """Polls the record until it is terminal or time is up (for `?wait`)."""
        deadline = time.monotonic() + seconds
        for delay in RECORD_POLL.delays():
            record = self.get(invocation_id)
            if (record and record.status.terminal) or time.monotonic() >= deadline:
                return record
            time.sleep(delay)
        return None
