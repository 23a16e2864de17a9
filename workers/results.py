"""RunResult -> result events on the bus, a failure event when it failed, and the record."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis

from manager.config import Settings
from manager.errors import EventError
from manager.events import Event, new_event_id
from manager.records import RecordStore, Status
from workers.sandbox import RunResult


class OutputError(ValueError):
    """The plugin's stdout broke the I/O contract (SPEC §3)."""


@dataclass(frozen=True)
class Invocation:
    invocation_id: str
    plugin: str
    version: str
    event: Event


def _reject_constant(name: str) -> Any:
    raise OutputError(f"{name} is not valid JSON")


def parse_output(stdout: bytes, max_results: int) -> list[dict[str, Any]]:
    """Empty -> [], one JSON object, or JSON Lines of objects; anything else raises."""
    try:
        text = stdout.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise OutputError(f"stdout is not UTF-8 text (byte {exc.start})") from exc
    text = text.strip()
    if not text:
        return []
    try:
        objects = [json.loads(text, parse_constant=_reject_constant)]
    except json.JSONDecodeError:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if len(lines) > max_results:
            raise OutputError(f"{len(lines)} result lines, more than the limit of "
                              f"{max_results}") from None
        objects = []
        for n, line in enumerate(lines, 1):
            try:
                objects.append(json.loads(line, parse_constant=_reject_constant))
            except json.JSONDecodeError as exc:
                raise OutputError(f"stdout line {n} is not JSON: {exc.msg} "
                                  f"(starts {line[:60]!r})") from None
    for n, obj in enumerate(objects, 1):
        if not isinstance(obj, dict):
            raise OutputError(f"result {n} is not a JSON object")
        missing = [k for k in ("topic", "event_type", "payload") if k not in obj]
        if missing:
            raise OutputError(f"result {n} lacks {', '.join(missing)}")
    return objects


def result_events(inv: Invocation, objects: list[dict[str, Any]],
                  settings: Settings) -> list[Event]:
    """Result events carry causation, correlation, source and hops (SPEC §3)."""
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    trigger = inv.event
    events = []
    for n, obj in enumerate(objects, 1):
        try:
            event = Event.from_dict({
                "event_id": new_event_id(), "topic": obj["topic"],
                "event_type": obj["event_type"], "payload": obj["payload"],
                "source": f"plugin:{inv.plugin}@{inv.version}", "time": now,
                "correlation_id": trigger.correlation_id or trigger.event_id,
                "causation_id": trigger.event_id, "hops": trigger.hops + 1,
            })
            encoded = event.encode().encode("utf-8")
        except EventError as exc:
            raise OutputError(f"result {n}: {exc.message}") from None
        except UnicodeEncodeError:
            raise OutputError(f"result {n} holds a lone surrogate (not valid Unicode)") from None
        if len(encoded) > settings.max_event_bytes:
            raise OutputError(f"result {n} is {len(encoded)} bytes, over the event limit")
        events.append(event)
    return events


class Publisher:
    """Writes outcomes to the bus and the record store; takes its Redis connection."""

    def __init__(self, conn: redis.Redis, settings: Settings) -> None:
        self.conn = conn
        self.settings = settings
        self.records = RecordStore(conn, settings)

    def publish(self, events: list[Event]) -> list[str]:
        pipe = self.conn.pipeline()
        for event in events:
            pipe.xadd(self.settings.event_stream, {"event": event.encode()},
                      maxlen=self.settings.stream_maxlen, approximate=True)
        pipe.execute()
        return [e.event_id for e in events]

    def finish(self, inv: Invocation, result: RunResult) -> dict[str, Any]:
        """Turns a finished container run into events and the final record."""
        status, reason, events = result.status, result.reason, []
        if status is Status.SUCCEEDED:
            try:
                events = result_events(
                    inv, parse_output(result.stdout, self.settings.max_results), self.settings)
            except OutputError as exc:
                status, reason = Status.FAILED, f"invalid output: {exc}"
        return self.complete(inv, status, reason, result=result, events=events)

    def complete(self, inv: Invocation, status: Status, reason: str | None,
                 result: RunResult | None = None, events: list[Event] | None = None,
                 **extra: Any) -> dict[str, Any]:
        """Stores the terminal record, then publishes its result events (or a failure
        event), so whoever reads an event can already read the finished record."""
        events = list(events or [])
        fields: dict[str, Any] = {"status": status.value, "reason": reason,
                                  "result_event_ids": [e.event_id for e in events], **extra}
        if result is not None:
            fields.update(
                exit_code=result.exit_code, started_at=result.started_at,
                finished_at=result.finished_at, duration_s=round(result.duration_s, 4),
                container_start_s=round(result.container_start_s, 4),
                stdout=result.stdout.decode("utf-8", "replace"),
                stderr=result.stderr.decode("utf-8", "replace"),
                stdout_truncated=result.stdout_truncated,
                stderr_truncated=result.stderr_truncated)
        else:
            fields.setdefault("finished_at", datetime.now(UTC).timestamp())
        if status is not Status.SUCCEEDED and status.terminal:
            failure = self.failure_event(inv, status, reason)
            fields["failure_event_id"] = failure.event_id
            events.append(failure)
        record = self.records.update(inv.invocation_id, **fields)
        if events:
            self.publish(events)
        return record

    def failure_event(self, inv: Invocation, status: Status, reason: str | None) -> Event:
        return Event(
            event_id=new_event_id(), topic="plugins.v1", event_type="invocation_failed",
            payload={"plugin": inv.plugin, "invocation_id": inv.invocation_id,
                     "event_id": inv.event.event_id, "status": status.value,
                     "reason": reason or status.value},
            source=f"plugin:{inv.plugin}@{inv.version}",
            correlation_id=inv.event.correlation_id or inv.event.event_id,
            causation_id=inv.event.event_id, hops=inv.event.hops + 1,
        )
