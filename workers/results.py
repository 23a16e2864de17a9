"""RunResult -> result events, a failure event when it failed, and the terminal record.

The outcome of a finished run is never thrown away because Redis blinked: storing it is
retried with backoff until Redis answers (within `finish_budget_s`), and it is stored
with its events in one atomic step, at most once (event ids derive from the invocation).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import redis

from manager.core import metrics
from manager.core.config import Settings
from manager.core.errors import EventError, OutcomeNotStored
from manager.core.events import FAILURE, Limits, check_limits
from manager.core.record_store import Outcome, RecordStore
from manager.core.records import Status
from manager.core.retry import STORE_OUTCOME
from manager.core.runs import RunRequest, result_event_id
from workers.spec import RunResult

log = logging.getLogger(__name__)
PREVIEW_CHARS = 200  # of each result's payload, kept in the record for `logs` and `show`
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)


class OutputError(ValueError):
    """The plugin's stdout broke the I/O contract (SPEC §3)."""


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
            except RecursionError:
                raise OutputError(f"stdout line {n} nests too deeply") from None
    except RecursionError:
        raise OutputError("stdout nests too deeply") from None
    for n, obj in enumerate(objects, 1):
        if not isinstance(obj, dict):
            raise OutputError(f"result {n} is not a JSON object")
        missing = [k for k in ("topic", "event_type", "payload") if k not in obj]
        if missing:
            raise OutputError(f"result {n} lacks {', '.join(missing)}")
        if (obj["topic"], obj["event_type"]) == FAILURE:
            raise OutputError(f"result {n} is {FAILURE[0]}/{FAILURE[1]}, which only the "
                              "worker publishes")
    return objects


def result_events(req: RunRequest, objects: list[dict[str, Any]], limits: Limits) -> list[str]:
    """Encoded result events, each checked by the listener's own limits (size, depth), so
    what is published is never dead-lettered for its shape."""
    encoded = []
    for n, obj in enumerate(objects, 1):
        try:
            text = req.result_event(n, obj).encode()
            check_limits(text.encode("utf-8"), limits)
        except EventError as exc:
            raise OutputError(f"result {n}: {exc.message}") from None
        except UnicodeEncodeError:
            raise OutputError(f"result {n} holds a lone surrogate (not valid Unicode)") from None
        encoded.append(text)
    return encoded


@dataclass(frozen=True)
class Decided:
    """An outcome ready to store: status, reason, record fields and encoded events."""

    status: Status
    reason: str | None
    events: list[str]
    fields: dict[str, Any]


def decide(req: RunRequest, result: RunResult, settings: Settings) -> Decided:
    """A finished container run -> its outcome (bad output fails the run)."""
    status, reason, events = result.status, result.reason, []
    objects: list[dict[str, Any]] = []
    if status is Status.SUCCEEDED:
        try:
            objects = parse_output(result.stdout, settings.max_results)
            events = result_events(req, objects, settings.event_limits)
        except OutputError as exc:
            status, reason, objects = Status.FAILED, f"invalid output: {exc}", []
    fields = {
        "exit_code": result.exit_code, "started_at": result.started_at,
        "finished_at": result.finished_at, "duration_s": round(result.duration_s, 4),
        "container_start_s": round(result.container_start_s, 4),
        "stdout": result.stdout.decode("utf-8", "replace"),
        "stderr": result.stderr.decode("utf-8", "replace"),
        "stdout_truncated": result.stdout_truncated,
        "stderr_truncated": result.stderr_truncated,
        "warm": bool(result.extra.get("warm")),
        "container_id": result.container_id,
        "result_event_ids": [result_event_id(req.invocation_id, n)
                             for n in range(1, len(events) + 1)],
        "results": [preview(result_event_id(req.invocation_id, n), obj)
                    for n, obj in enumerate(objects, 1)],
    }
    return Decided(status, reason, events, fields)


def preview(event_id: str, obj: dict[str, Any]) -> dict[str, Any]:
    """One result as the record keeps it: ids and types, and the payload's JSON, cut."""
    payload = json.dumps(obj["payload"], ensure_ascii=False)
    if len(payload) > PREVIEW_CHARS:
        payload = payload[:PREVIEW_CHARS - 1] + "…"
    return {"event_id": event_id, "topic": obj["topic"], "event_type": obj["event_type"],
            "payload": payload}


def without_run(status: Status, reason: str) -> Decided:
    """An outcome decided without a container run (rejected, unusable, retries spent)."""
    return Decided(status, reason, [], {"result_event_ids": []})


class Outcomes:
    """Stores outcomes; takes its Redis connection as a parameter."""

    def __init__(self, conn: redis.Redis, settings: Settings) -> None:
        self.settings = settings
        self.records = RecordStore(conn, settings)

    def store(self, req: RunRequest, decided: Decided) -> Outcome:
        """Stores the terminal record with its events (or its failure event), and frees
        the delivery's worker slot in the same step, retrying while Redis is unreachable;
        raises OutcomeNotStored past the budget."""
        failure = req.failure_event(decided.status.value, decided.reason)
        outcome = persist(lambda: self.records.conclude(
            req.invocation_id, decided.status, decided.reason, decided.events, failure,
            slot_of=req.plugin, **decided.fields), self.settings.finish_budget_s,
            req.invocation_id)
        # acknowledged (the task) means replicated, when the operator asks for it: raises
        # NotReplicated, and the runner sends the run again to confirm it later
        persist(lambda: self.records.confirm_replicated(req.invocation_id),
                self.settings.finish_budget_s, req.invocation_id)
        if outcome.applied:
            metrics.INVOCATIONS.labels(plugin=req.plugin, status=decided.status.value).inc()
        else:
            log.warning("invocation %s was already %s; outcome %s not stored again",
                        req.invocation_id, outcome.found, decided.status)
        return outcome


def persist(write: Any, budget_s: float, what: str) -> Any:
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
