"""The Event model (SPEC §2): a frozen dataclass with strict decode and encode, no I/O."""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from manager.core.errors import EventError

# The rules of SPEC §2, stated once: the checks below use them, and the API's schema
# (manager.api.models.EventIn) is written from them.
EVENT_ID_PATTERN = r"[A-Za-z0-9._:-]{1,128}"
NAME_PATTERN = r"[A-Za-z0-9._-]{1,128}"
EVENT_ID_RE = re.compile(EVENT_ID_PATTERN)
NAME_RE = re.compile(NAME_PATTERN)
OPTIONAL_STRINGS = ("source", "time", "correlation_id", "causation_id")
KNOWN_FIELDS = {"event_id", "topic", "event_type", "payload", "hops", *OPTIONAL_STRINGS}
MAX_OPTIONAL_LEN = 1024
PLUGIN_SOURCE = "plugin:"
FAILURE = ("plugins.v1", "invocation_failed")  # published by workers only
RESERVED_TOPICS = frozenset({FAILURE[0]})  # the manager's own events: never from outside


@dataclass(frozen=True)
class Limits:
    """The size and depth limits of SPEC §2 (the operator's, from Settings.event_limits;
    these defaults are the spec's, for an author's local run)."""

    max_bytes: int = 1024 * 1024
    max_depth: int = 64

    @property
    def request_bytes(self) -> int:
        """The largest HTTP body the API takes: an event at its limit and room for the
        request around it (the TCP front refuses a longer one from its Content-Length,
        as waitress does on the API's own socket)."""
        return self.max_bytes + 64 * 1024


@dataclass(frozen=True)
class Event:
    event_id: str
    topic: str
    event_type: str
    payload: dict[str, Any] = field(default_factory=dict)
    source: str | None = None
    time: str | None = None
    correlation_id: str | None = None
    causation_id: str | None = None
    hops: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The wire form: optional fields left out when unset. Shallow (the payload is
        shared, not copied): it is serialized next, on every run's hot path."""
        return {f.name: v for f in fields(self) if (v := getattr(self, f.name)) is not None}

    def encode(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def decode(cls, raw: bytes | str, limits: Limits | None = None) -> Event:
        """Parses and validates raw JSON; raises EventError naming the field at fault."""
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogatepass")
        text = check_limits(raw, limits or Limits())
        try:
            data = json.loads(text, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            raise EventError(f"event is not valid JSON: {exc}", field="event",
                             reason="invalid_json") from exc
        event = cls.from_dict(data)
        try:
            event.encode().encode("utf-8")
        except UnicodeEncodeError as exc:
            raise EventError("event holds a lone surrogate (\\ud800-\\udfff escape); not valid "
                             "Unicode", field="event", reason="invalid_unicode") from exc
        return event

    @classmethod
    def from_dict(cls, data: Any) -> Event:
        """Validates an already parsed event (SPEC §2)."""
        if not isinstance(data, dict):
            raise EventError(f"event must be a JSON object, not {_kind(data)}", field="event",
                             reason="not_an_object")
        unknown = sorted(set(data) - KNOWN_FIELDS)
        if unknown:
            raise EventError(f"unknown event field(s): {', '.join(unknown)}",
                             field=unknown[0], reason="unknown_field")
        _check_str(data, "event_id", EVENT_ID_RE, "[A-Za-z0-9._:-]")
        _check_str(data, "topic", NAME_RE, "[A-Za-z0-9._-]")
        _check_str(data, "event_type", NAME_RE, "[A-Za-z0-9._-]")
        payload = data.get("payload", {})
        if not isinstance(payload, dict):
            raise EventError(f"payload must be a JSON object, not {_kind(payload)}",
                             field="payload", reason="invalid_field")
        for name in OPTIONAL_STRINGS:
            value = data.get(name)
            if value is not None and (not isinstance(value, str) or len(value) > MAX_OPTIONAL_LEN):
                raise EventError(f"{name} must be a string of at most {MAX_OPTIONAL_LEN} chars",
                                 field=name, reason="invalid_field")
        if data.get("time") is not None:
            check_time(data["time"])
        hops = data.get("hops", 0)
        if isinstance(hops, float) and hops.is_integer():  # JSON has no int/float divide
            hops = int(hops)
        if isinstance(hops, bool) or not isinstance(hops, int) or hops < 0:
            raise EventError("hops must be an integer >= 0", field="hops", reason="invalid_field")
        return cls(
            event_id=data["event_id"], topic=data["topic"], event_type=data["event_type"],
            payload=payload, hops=hops, **{n: data.get(n) for n in OPTIONAL_STRINGS},
        )


    @classmethod
    def trusted(cls, data: dict[str, Any]) -> Event:
        """Rebuilds an event this system validated before (a run request), without
        validating it a second time."""
        return cls(**{k: v for k, v in data.items() if k in KNOWN_FIELDS})

    def caused(self, event_id: str, topic: str, event_type: str, payload: Any,
               source: str) -> Event:
        """An event caused by this one (a result or a failure event), validated, with the
        metadata of SPEC §3: causation, correlation, source, time and hops."""
        return Event.from_dict({
            "event_id": event_id, "topic": topic, "event_type": event_type,
            "payload": payload, "source": source, "time": now_rfc3339(),
            "correlation_id": self.correlation_id or self.event_id,
            "causation_id": self.event_id, "hops": self.hops + 1,
        })

    @property
    def correlation(self) -> str:
        return self.correlation_id or self.event_id


def reserved_topic(topic: object) -> bool:
    """Whether `topic` is the manager's own, however it is spelled: compared after NFKC
    normalisation and Unicode case folding, with invisible format characters dropped, so
    `PLUGINS.V1` or a full-width `\uff50lugins.v1` reads as `plugins.v1` to every reader
    that folds. The one rule for results, the API, the CLI and the bus."""
    if not isinstance(topic, str):
        return False
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", topic).casefold())
    return "".join(c for c in folded if unicodedata.category(c) != "Cf") in RESERVED_TOPICS


def from_outside(event: Event) -> Event:
    """Provenance for events from external producers (the API's event and trigger bodies,
    and dead letters replayed through it): `source` defaults to `api`, a producer may not
    pose as a plugin, and the manager's own topics are not theirs to publish."""
    if reserved_topic(event.topic):
        raise EventError(f"topic {event.topic!r} is reserved for the manager's own events "
                         "(a run's invocation_failed); publish on a topic of your own",
                         field="topic", reason="reserved_topic")
    if event.source is None:
        return Event(**{**asdict(event), "source": "api"})
    if event.source.casefold().startswith(PLUGIN_SOURCE):
        raise EventError(f"source {event.source!r:.80} is reserved for plugin results",
                         field="source", reason="forged_source")
    return event


def check_limits(raw: bytes, limits: Limits) -> str:
    """The size, UTF-8 and depth checks shared by the listener (incoming events) and the
    worker (result events before they are published). Returns the text."""
    if len(raw) > limits.max_bytes:
        raise EventError(f"event is {len(raw)} bytes, over the limit of {limits.max_bytes}",
                         field="event", reason="too_large")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EventError(f"event is not valid UTF-8: {exc}", field="event",
                         reason="invalid_utf8") from exc
    _check_depth(text, limits.max_depth)
    return text


def now_rfc3339() -> str:
    return rfc3339(datetime.now(UTC).timestamp())


def rfc3339(ts: float) -> str:
    """An epoch time as events carry times: RFC 3339, UTC, to the millisecond."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def _check_str(data: dict[str, Any], name: str, pattern: re.Pattern[str], chars: str) -> None:
    value = data.get(name)
    if value is None:
        raise EventError(f"{name} is required", field=name, reason="missing_field")
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise EventError(f"{name} must be a string of 1-128 chars from {chars}, got {value!r:.80}",
                         field=name, reason="invalid_field")


def check_time(value: str) -> None:
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise EventError(f"time must be RFC 3339, got {value!r:.60}", field="time",
                         reason="invalid_field") from exc


def _check_depth(text: str, max_depth: int) -> None:
    """Rejects deep nesting before json.loads recurses into it."""
    depth = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > max_depth:
                raise EventError(f"event nests deeper than {max_depth} levels", field="event",
                                 reason="too_deep")
        elif ch in "]}":
            depth -= 1


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _kind(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)
