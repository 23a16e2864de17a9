"""Classify: how a run ended (RunEnd) to what is stored (Outcome), without Redis or Docker.

`verdict` says what an end means: a status and a reason a person understands. Its status
is terminal, or `retrying` when the end was not the plugin's (the engine stopped the
container: the delivery tries again). `conclude` turns a terminal verdict and what the
plugin wrote into the Outcome the record store takes: a succeeded run's output parsed into
result events (output that breaks the I/O contract fails the run), carrying the end.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from manager.core.errors import EventError, TitanError
from manager.core.events import FAILURE, Limits, check_limits, reserved_topic
from manager.core.records import Outcome, Status
from manager.core.run_end import End, RunEnd
from manager.core.run_groups import OutputSettings
from manager.core.runs import RunRequest, result_event_id
from workers.run_spec import RunSpec

# Each result's payload is kept whole in the record (for `logs`, `show` and the API) up to
# this size, as JSON; a larger one is named there by its size (the event is on the bus).
RECORD_PAYLOAD_BYTES = 16 * 1024
STOPPED_REASON = ("the container was stopped from outside this worker (an engine shutdown or "
                  "a docker stop)")


@dataclass(frozen=True)
class Verdict:
    status: Status
    reason: str | None = None


def verdict(end: RunEnd, spec: RunSpec, output_cap: int) -> Verdict:
    """What an end means (the order settles overlaps: a timeout's stop is not the OOM it
    may have caused, nor a kill from outside)."""
    if end.cause is End.TIMED_OUT:
        return Verdict(Status.TIMEOUT, f"timed out after {spec.timeout}s")
    if end.cause is End.OUTPUT_CAP:
        which = "stdout" if end.stdout_truncated else "stderr"
        return Verdict(Status.OUTPUT_LIMIT, f"{which} exceeded {output_cap} bytes")
    if end.cause is End.OOM:
        return Verdict(Status.OOM, f"killed: out of memory (limit {spec.memory_bytes} bytes)")
    if end.cause is End.STOPPED:
        return Verdict(Status.RETRYING, STOPPED_REASON)
    code = end.exit_code
    if code == 0:
        return Verdict(Status.SUCCEEDED)
    signal_note = f" (killed by signal {end.signal})" if end.signal else ""
    last = last_line(end.stderr)
    return Verdict(Status.FAILED,
                   f"exited with code {code}{signal_note}" + (f": {last}" if last else ""))


def last_line(data: bytes, limit: int = 300) -> str:
    """The last non-empty stderr line: usually the error a person wants to see."""
    for line in reversed(data[-8192:].decode("utf-8", "replace").splitlines()):
        if line.strip():
            return line.strip()[:limit]
    return ""


def conclude(req: RunRequest, end: RunEnd, judged: Verdict,
             output: OutputSettings) -> Outcome:
    """A terminal verdict of a container's run -> its Outcome (bad output fails the run)."""
    status, reason, events = judged.status, judged.reason, []
    objects: list[dict[str, Any]] = []
    if status is Status.SUCCEEDED:
        try:
            objects = parse_output(end.stdout, output.max_results)
            events = result_events(req, objects, output.event_limits)
        except OutputError as exc:
            status, reason, objects = Status.FAILED, f"invalid output: {exc}", []
    ids = tuple(result_event_id(req.invocation_id, n) for n in range(1, len(events) + 1))
    return Outcome(status, reason, tuple(events), end, ids,
                   tuple(preview(i, obj) for i, obj in zip(ids, objects, strict=True)))


class OutputError(TitanError):
    """The plugin's stdout broke the I/O contract (SPEC §3)."""

    code = "invalid_output"


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
        if reserved_topic(obj["topic"]):
            raise OutputError(f"result {n} is on topic {str(obj['topic'])[:80]!r}, which is "
                              f"reserved for the manager's own events ({FAILURE[0]}, in any "
                              "case): publish on a topic of your own")
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


def preview(event_id: str, obj: dict[str, Any]) -> dict[str, Any]:
    """One result as the record keeps it: ids and types, and the payload whole (as the
    object it is), or, past RECORD_PAYLOAD_BYTES, no payload and a note saying so."""
    kept = {"event_id": event_id, "topic": obj["topic"], "event_type": obj["event_type"]}
    size = len(json.dumps(obj["payload"], ensure_ascii=False).encode())
    if size <= RECORD_PAYLOAD_BYTES:
        return {**kept, "payload": obj["payload"]}
    return {**kept, "payload": None,
            "payload_omitted": f"{size} bytes, over the {RECORD_PAYLOAD_BYTES} a record keeps: "
                               f"the whole event is {event_id} on the bus"}
