"""The bus side of the API: publishing events, what became of a published entry (for
`publish --wait`), and the dead letters with their replay."""

from __future__ import annotations

import json
from typing import Any

import redis
from flask import Blueprint, g, jsonify, request
from spectree import Response as Resp

from manager.api.context import ApiContext, publish_event
from manager.api.context import api_context as ctx
from manager.api.models import DeadLetters, EntryOutcome, EventIn, LimitQuery, Published
from manager.api.openapi import ERRORS, api
from manager.bus.group import acknowledged
from manager.core.errors import DeadLetterNotFound, EventError
from manager.core.events import Event, from_outside

bus_routes = Blueprint("titan_bus", __name__)


@bus_routes.post("/events")
@api.validate(json=EventIn, skip_validation=True,  # the Event validates it, once
              resp=Resp(HTTP_202=Published, **ERRORS))
def post_event() -> Any:
    """Publishes the event to the bus (answered once Redis has it)."""
    event: Event = g.event
    entry_id = publish_event(ctx().conn, ctx().settings.stream, ctx().settings.redis, event)
    return jsonify({"event_id": event.event_id, "entry_id": entry_id}), 202


@bus_routes.get("/events/dead")
@api.validate(query=LimitQuery, resp=Resp(HTTP_200=DeadLetters, **ERRORS))
def dead_letters() -> Any:
    """The newest dead letters first: reason, detail and the event as it arrived."""
    limit = request.context.query.limit  # type: ignore[attr-defined]
    return jsonify({"dead": newest_dead(ctx(), limit)})


def newest_dead(c: ApiContext, limit: int) -> list[dict[str, Any]]:
    """The newest dead letters first (the API's list and the console's page)."""
    return [dead_entry(entry_id, fields)
            for entry_id, fields in c.conn.xrevrange(c.settings.dead_stream, count=limit)]


@bus_routes.post("/events/dead/<entry_id>/replay")
@api.validate(resp=Resp(HTTP_202=Published, **ERRORS))
def replay_dead_letter(entry_id: str) -> Any:
    """Publishes a dead-lettered event again (after a fix); it must now be valid."""
    event, published = replay(ctx(), entry_id)
    return jsonify({"event_id": event.event_id, "entry_id": published,
                    "replayed": entry_id}), 202


def replay(c: ApiContext, entry_id: str) -> tuple[Event, str]:
    """Publishes a dead letter's event again: the event and its new entry id.
    DeadLetterNotFound, or EventError when the same bytes would be refused again."""
    try:
        found = c.conn.xrange(c.settings.dead_stream, min=entry_id, max=entry_id)
    except redis.ResponseError:  # not a stream id at all
        found = []
    if not found or found[0][0].decode() != entry_id:
        raise DeadLetterNotFound(f"no dead letter {entry_id!r}", entry_id=entry_id)
    try:
        event = from_outside(Event.decode(found[0][1].get(b"event", b""), c.limits))
    except EventError as exc:  # the same bytes would be refused again, whenever replayed
        raise EventError(f"dead letter {entry_id} can never be replayed as it is: "
                         f"{exc.message}. Fix the event and publish it instead "
                         "(titan-plugins.py dead shows it; then publish -e '<the fixed "
                         "event>')", **exc.details) from None
    return event, publish_event(c.conn, c.settings.stream, c.settings.redis, event)


@bus_routes.get("/events/entries/<entry_id>")
@api.validate(resp=Resp(HTTP_200=EntryOutcome, **ERRORS))
def entry_outcome(entry_id: str) -> Any:
    """What the listener did with a published entry: not yet handled, dead-lettered (with
    its reason), or the run each matching plugin got, or the earlier run it duplicates.
    Kept for a few minutes after the entry was handled."""
    # The group first: the listener writes an entry's account before it acknowledges it,
    # so an entry found acknowledged has its account (if any) in place for the read after.
    acked = acknowledged(ctx().conn, ctx().settings.stream, entry_id)
    raw = ctx().conn.hgetall(ctx().keys.entry_outcome(entry_id))
    fields = {k.decode(): v.decode() for k, v in raw.items()}
    runs = [{"plugin": name, **json.loads(value)} for name, value in sorted(fields.items())
            if not name.startswith("_")]
    dead = json.loads(fields["_dead"]) if "_dead" in fields else None
    handled = "_done" in fields or acked
    return jsonify({"entry_id": entry_id, "handled": handled, "dead": dead, "runs": runs})


def dead_entry(entry_id: bytes, fields: dict[bytes, bytes]) -> dict[str, Any]:
    raw = fields.get(b"event", b"").decode("utf-8", "replace")
    try:
        event: Any = json.loads(raw)
    except (ValueError, RecursionError):  # dead letters include malformed and too-deep ones
        event = raw[:10_000]
    return {"id": entry_id.decode(), "reason": fields.get(b"reason", b"").decode(),
            "detail": fields.get(b"detail", b"").decode("utf-8", "replace"),
            "entry_id": fields.get(b"entry_id", b"").decode(),
            "time": float(fields.get(b"time", b"0") or 0), "event": event}
