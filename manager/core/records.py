"""Invocation records: one typed record per run and the table of the transitions between
its statuses. They are stored (a Redis hash each, each field the JSON of its value) and
changed only by `manager.core.record_store.RecordStore`, whose Lua scripts check this
table."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from typing import Any

from manager.core.run_end import RunEnd
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
class Outcome:
    """A run's end as the record store takes it, whatever ended it (its container, a
    refusal before any, its retries spent, the sweeper): the terminal status and the
    reason; when a container ran, how it ended (`ran`); the result events (encoded; none
    unless it succeeded) with their ids and what the record keeps of each; the run's egress
    connections. A run that did not succeed also gets its failure event when stored."""

    status: Status
    reason: str | None = None
    events: tuple[str, ...] = ()
    ran: RunEnd | None = None
    result_event_ids: tuple[str, ...] = ()
    results: tuple[dict[str, Any], ...] = ()
    egress: tuple[dict[str, Any], ...] = ()

    def __post_init__(self) -> None:
        assert self.status.terminal, f"an outcome is terminal, not {self.status}"

    def record_fields(self) -> dict[str, Any]:
        """The record's fields it sets, beside status and reason."""
        fields: dict[str, Any] = self.ran.record_fields() if self.ran else {}
        fields.update(result_event_ids=list(self.result_event_ids), results=list(self.results))
        if self.egress:
            fields["egress"] = list(self.egress)
        return fields


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
    # what the run produced: event id, topic, event_type and the payload (whole up to
    # workers.classify.RECORD_PAYLOAD_BYTES; past it `payload_omitted` says so: the
    # events themselves are on the stream)
    results: tuple[dict[str, Any], ...] = ()
    failure_event_id: str | None = None
    # each request the run sent the egress proxy: method, host, port, decision, why,
    # status, bytes sent and received
    egress: tuple[dict[str, Any], ...] = ()
    # each time the run was sent again, newest last (at most 20): when (Redis's clock),
    # the status it went to (retrying, or queued by the sweeper) and why
    history: tuple[dict[str, Any], ...] = ()
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
        data["egress"] = list(self.egress)
        data["history"] = list(self.history)
        return data

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> InvocationRecord:
        values = {k.decode(): json.loads(v) for k, v in raw.items()}
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in values.items() if k in known}
        values["status"] = Status(values["status"])
        values["result_event_ids"] = tuple(values.get("result_event_ids") or ())
        values["results"] = tuple(values.get("results") or ())
        values["egress"] = tuple(values.get("egress") or ())
        values["history"] = tuple(values.get("history") or ())
        return cls(**values)


def shown_payload(result: dict[str, Any]) -> str:
    """A result's payload as a person reads it (`show`, `logs`, `publish --wait`, Flower):
    its JSON whole, never cut, or why the record does not hold it. (A record written
    before payloads were kept whole holds a string: shown as it is.)"""
    if result.get("payload_omitted"):
        return f"(payload not kept: {result['payload_omitted']})"
    payload = result.get("payload")
    return payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
