"""Invocation records: one typed record per run, a Redis hash changed only by atomic,
table-checked transitions (Lua), indexed per plugin and, while not terminal, by deadline.

Every module that changes a record goes through `RecordStore`. Each hash field holds the
JSON of its value. The finishing step writes the terminal record and XADDs its events in
one script, so a retry after a partial success (Redis blinked) adds nothing twice.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from typing import Any

import redis

from manager.core import record_scripts as scripts
from manager.core.clients import check_replicated, confirm_replicated
from manager.core.config import Settings
from manager.core.events import Event
from manager.core.keys import Keys
from manager.core.retry import RECORD_POLL
from manager.core.runs import RunRequest


class Status(StrEnum):
    PENDING = "pending"  # recorded, not yet handed to the broker
    QUEUED = "queued"  # handed to the broker
    THROTTLED = "throttled"  # waiting for one of the plugin's concurrency slots
    RUNNING = "running"
    RETRYING = "retrying"  # will run again (engine unusable, or `retries:` in the manifest)
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMEOUT = "timeout"
    OOM = "oom"
    OUTPUT_LIMIT = "output_limit"
    REJECTED = "rejected"
    LOST = "lost"  # its worker or its message vanished and it could not run again

    @property
    def terminal(self) -> bool:
        return self not in ACTIVE


ACTIVE = frozenset({Status.PENDING, Status.QUEUED, Status.THROTTLED, Status.RUNNING,
                    Status.RETRYING})
TERMINAL = frozenset(set(Status) - ACTIVE)
OUTCOMES = TERMINAL - {Status.LOST}  # what a run can end as

# target -> the states it may be entered from. A terminal state is never left.
TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.PENDING: frozenset(),  # only ever created, never entered
    Status.QUEUED: ACTIVE,  # sent (from pending), or re-queued by the sweeper
    Status.THROTTLED: frozenset({Status.PENDING, Status.QUEUED, Status.THROTTLED,
                                 Status.RETRYING}),
    Status.RUNNING: frozenset({Status.PENDING, Status.QUEUED, Status.THROTTLED,
                               Status.RETRYING, Status.RUNNING}),  # running: a takeover
    Status.RETRYING: frozenset({Status.RUNNING}),
    Status.LOST: ACTIVE,
    **{s: frozenset({Status.RUNNING}) for s in OUTCOMES},
}


def allowed(source: Status, target: Status) -> bool:
    return source in TRANSITIONS[target]


@dataclass(frozen=True)
class InvocationRecord:
    """One run. `request` is the run request, kept so a lost message can be sent again."""

    invocation_id: str
    plugin: str
    version: str
    digest: str
    event_id: str
    topic: str
    event_type: str
    origin: str
    status: Status
    created_at: float
    reason: str | None = None
    exit_code: int | None = None
    attempts: int = 0
    waits: int = 0
    requeues: int = 0
    worker: str | None = None
    worker_pid: int | None = None
    started_at: float | None = None
    finished_at: float | None = None
    duration_s: float | None = None
    container_start_s: float | None = None
    stdout: str = ""
    stderr: str = ""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    warm: bool | None = None  # ran in a prewarmed container (None: no container ran)
    container_id: str | None = None  # the container that ran it (removed afterwards)
    result_event_ids: tuple[str, ...] = ()
    # what the run produced, short: event id, topic, event_type, the payload's JSON cut
    # to PREVIEW_CHARS (the events themselves are on the stream)
    results: tuple[dict[str, Any], ...] = ()
    failure_event_id: str | None = None
    published: bool = False
    request: dict[str, Any] | None = field(default=None, repr=False)

    @classmethod
    def from_request(cls, request: RunRequest, status: Status = Status.PENDING,
                     created_at: float | None = None) -> InvocationRecord:
        """The record of a run about to be sent: the request's identity, and the request
        itself (kept so a lost message can be sent again)."""
        event = request.event
        return cls(invocation_id=request.invocation_id, plugin=request.plugin,
                   version=request.version, digest=request.digest, event_id=event.event_id,
                   topic=event.topic, event_type=event.event_type, origin=request.origin,
                   status=status, created_at=time.time() if created_at is None else created_at,
                   request=request.to_dict())

    def public(self) -> dict[str, Any]:
        """The API's and CLI's view (the request stays internal)."""
        data = asdict(self)
        data.pop("request")
        data["status"] = self.status.value
        data["result_event_ids"] = list(self.result_event_ids)
        data["results"] = list(self.results)
        return data

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> InvocationRecord:
        values = {k.decode(): json.loads(v) for k, v in raw.items()}
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in values.items() if k in known}
        values["status"] = Status(values["status"])
        values["result_event_ids"] = tuple(values.get("result_event_ids") or ())
        values["results"] = tuple(values.get("results") or ())
        return cls(**values)


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


class RecordStore:
    """Reads and changes invocation records; takes its Redis connection as a parameter."""

    INDEX_CAP = 10_000

    def __init__(self, conn: redis.Redis, settings: Settings) -> None:
        self.conn = conn
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self._create = conn.register_script(scripts.CREATE)
        self._transition = conn.register_script(scripts.TRANSITION)
        self._finish = conn.register_script(scripts.FINISH)

    def create(self, record: InvocationRecord, deadline: float,
               dedup_key: str | None = None) -> tuple[str, bool, Status | None]:
        """Stores a new record unless `dedup_key` already names one. Returns (id, created,
        status of the existing record)."""
        keys = [self.keys.invocation(record.invocation_id),
                self.keys.plugin_invocations(record.plugin), self.keys.inflight,
                self.keys.waiting]
        if dedup_key:
            keys.append(dedup_key)
        values = {k: v for k, v in asdict(record).items() if v is not None}
        values["status"] = record.status
        created, inv, status = self._create(keys=keys, args=[
            record.invocation_id, self.settings.record_ttl, record.created_at, self.INDEX_CAP,
            self.settings.dedup_ttl, deadline, self.keys.invocation(""),
            *encode_fields(values)])
        found = Status(json.loads(status)) if status else None
        return inv.decode() if isinstance(inv, bytes) else inv, bool(created), found

    def get(self, invocation_id: str) -> InvocationRecord | None:
        raw = self.conn.hgetall(self.keys.invocation(invocation_id))
        return InvocationRecord.from_hash(raw) if raw else None

    def transition(self, invocation_id: str, target: Status,
                   sources: frozenset[Status] | None = None, deadline: float | None = None,
                   increment: str = "", owner: str = "", **changes: Any) -> Outcome:
        """Moves a record to `target` if its current status is one of `sources` (by default
        every source the table allows). `deadline` re-arms the sweeper's clock; `owner`
        makes it a compare-and-set on the record's worker (a takeover)."""
        assert not target.terminal, "a terminal status is set with its events: use finish()"
        sources = TRANSITIONS[target] if sources is None else sources
        assert sources <= TRANSITIONS[target], (sources, target)
        if not owner:  # running -> running is a takeover, only ever a compare-and-set
            sources = sources - {Status.RUNNING} if target is Status.RUNNING else sources
        reply = self._transition(
            keys=[self.keys.invocation(invocation_id), self.keys.inflight, self.keys.waiting],
            args=[_states(sources), invocation_id, "" if deadline is None else deadline,
                  increment, json.dumps(owner) if owner else "",
                  *encode_fields({"status": target, **changes})])
        return Outcome.of(reply)

    def finish(self, invocation_id: str, target: Status, events: list[str],
               **changes: Any) -> Outcome:
        """The terminal transition with its events (already encoded), atomically and at
        most once: a second call finds the record terminal and adds nothing."""
        assert target.terminal, target
        changes.update(status=target, published=True, finished_at=changes.get(
            "finished_at") or time.time())
        reply = self._finish(
            keys=[self.keys.invocation(invocation_id), self.keys.inflight,
                  self.settings.event_stream, self.keys.waiting],
            args=[_states(TRANSITIONS[target]), invocation_id, self.settings.stream_maxlen,
                  len(events), *events, *encode_fields(changes)])
        return Outcome.of(reply)

    def conclude(self, invocation_id: str, status: Status, reason: str | None,
                 events: list[str], failure: Event | None, **changes: Any) -> Outcome:
        """A run's end, the one way it is stored: the terminal record with its result
        events, plus its failure event for any outcome but succeeded (a run's own end,
        and a run the sweeper found lost)."""
        events = list(events)
        if status is not Status.SUCCEEDED and failure is not None:
            events.append(failure.encode())
            changes["failure_event_id"] = failure.event_id
        return self.finish(invocation_id, status, events, reason=reason, **changes)

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
