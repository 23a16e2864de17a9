"""The API's endpoints (SPEC §6), as a blueprint over the context `create_app` built."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import redis
from flask import Blueprint, Response, current_app, jsonify, request, send_from_directory

from manager import metrics
from manager.api import ApiContext, publish_event
from manager.errors import (
    BadQuery,
    DeadLetterNotFound,
    InvocationNotFound,
    PluginNotFound,
    PluginUnavailable,
)
from manager.events import Event, from_outside
from manager.keys import Keys
from manager.openapi import SPEC
from manager.records import InvocationRecord, RecordStore, Status
from manager.registry import PluginEntry

MAX_WAIT_S = 600.0
DOCS_HTML = """<!doctype html><html><head><meta charset="utf-8">
<title>Titan Plugin Manager API</title>
<link rel="stylesheet" href="/docs/static/swagger-ui.css"></head><body><div id="ui"></div>
<script src="/docs/static/swagger-ui-bundle.js"></script><script>
SwaggerUIBundle({url: "/openapi.json", dom_id: "#ui"});</script></body></html>"""

routes = Blueprint("titan", __name__)


def ctx() -> ApiContext:
    return current_app.extensions["titan"]


def read_event() -> Event:
    """The request body as an event from outside: validated, with its provenance marked."""
    return from_outside(Event.decode(request.get_data(cache=False), ctx().limits))


def plugin_or_404(name: str) -> PluginEntry:
    entry = ctx().registry.get(name)
    if entry is None:
        raise PluginNotFound(f"no plugin named {name!r}", plugin=name)
    return entry


def worker_health(conn: redis.Redis, keys: Keys) -> dict[str, Any]:
    """Workers write a heartbeat (with their Docker engine's state) every few seconds."""
    workers = {}
    for key in conn.scan_iter(match=keys.worker_pattern, count=100):
        raw = conn.get(key)
        if raw:
            beat = json.loads(raw)
            workers[beat["name"]] = beat
    return workers


@routes.get("/health")
def health() -> Any:
    c = ctx()
    state: dict[str, Any] = {}
    try:
        c.conn.ping()
        state["redis"] = {"ok": True}
        workers = worker_health(c.conn, Keys(c.settings.key_prefix))
    except redis.RedisError as exc:
        state["redis"] = {"ok": False, "error": str(exc)}
        workers = {}
    engines = [w for w in workers.values() if w.get("docker", {}).get("ok")]
    state["docker"] = {"ok": bool(engines), "workers_reporting": len(engines),
                       "errors": sorted({w["docker"]["error"] for w in workers.values()
                                         if w.get("docker", {}).get("error")})}
    state["workers"] = {"ok": bool(workers), "count": len(workers), "names": sorted(workers)}
    ok = all(state[p]["ok"] for p in ("redis", "docker", "workers"))
    return jsonify({"status": "ok" if ok else "unavailable", **state}), 200 if ok else 503


@routes.get("/plugins")
def list_plugins() -> Any:
    return jsonify({"plugins": [e.public() for e in ctx().registry.entries().values()]})


@routes.get("/plugins/<name>")
def get_plugin(name: str) -> Any:
    data = plugin_or_404(name).public()
    data["versions"] = [{**e.ref(), "loaded_at": e.loaded_at,
                         "serving": e.digest == data["digest"]}
                        for e in ctx().registry.versions(name)]
    return jsonify(data)


@routes.post("/plugins/<name>/rollback")
def rollback(name: str) -> Any:
    return jsonify(ctx().registry.rollback(name, rollback_version()))


@routes.post("/plugins/reload")
def reload_plugins() -> Any:
    try:
        changes = ctx().registry.reload()
    except Exception:
        metrics.count_reload(None)
        raise
    metrics.count_reload(changes)
    return jsonify(changes)


@routes.post("/plugins/<name>/trigger")
def trigger(name: str) -> Any:
    entry = plugin_or_404(name)
    if not entry.runnable:
        raise PluginUnavailable(f"plugin {name!r} is {entry.status.value}", plugin=name,
                                errors=list(entry.errors))
    event = read_event()
    wait = bounded_float("wait", 0.0, 0.0, MAX_WAIT_S)
    invocation_id, _ = ctx().dispatcher.dispatch(event, entry, origin="api")
    metrics.TASKS_DISPATCHED.labels(plugin=name).inc()
    if wait:
        record = wait_for(ctx().records, invocation_id, wait)
        if record and record.status.terminal:
            return jsonify(record.public()), 200
    return jsonify({"invocation_id": invocation_id, "status": Status.QUEUED.value,
                    "plugin": name, "event_id": event.event_id}), 202


@routes.post("/events")
def post_event() -> Any:
    event = read_event()
    entry_id = publish_event(ctx().conn, ctx().settings, event)
    return jsonify({"event_id": event.event_id, "entry_id": entry_id}), 202


@routes.get("/events/dead")
def dead_letters() -> Any:
    """The newest dead letters first: reason, detail and the event as it arrived."""
    limit = bounded_int("limit", 20, 1, 1000)
    entries = ctx().conn.xrevrange(ctx().settings.dead_stream, count=limit)
    return jsonify({"dead": [dead_entry(entry_id, fields) for entry_id, fields in entries]})


@routes.post("/events/dead/<entry_id>/replay")
def replay_dead_letter(entry_id: str) -> Any:
    """Publishes a dead-lettered event again (after a fix); it must now be valid."""
    found = ctx().conn.xrange(ctx().settings.dead_stream, min=entry_id, max=entry_id)
    if not found or found[0][0].decode() != entry_id:
        raise DeadLetterNotFound(f"no dead letter {entry_id!r}", entry_id=entry_id)
    event = Event.decode(found[0][1].get(b"event", b""), ctx().limits)
    published = publish_event(ctx().conn, ctx().settings, event)
    return jsonify({"event_id": event.event_id, "entry_id": published,
                    "replayed": entry_id}), 202


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


def rollback_version() -> str | None:
    """The body is empty, `{}` or `{"version": "<version or digest>"}`; nothing else."""
    raw = request.get_data(cache=False)
    if not raw.strip():
        return request.args.get("version") or None
    try:
        body = json.loads(raw)
    except ValueError:
        raise BadQuery("the body must be JSON: {} or {\"version\": \"1.0.0\"}",
                       field="body") from None
    if not isinstance(body, dict) or set(body) - {"version"}:
        raise BadQuery("the body must be {} or {\"version\": \"...\"}", field="body")
    version = body.get("version")
    if version is not None and (not isinstance(version, str) or not 0 < len(version) <= 200):
        raise BadQuery("version must be a non-empty string (a version or a digest)",
                       field="version")
    return version


def bounded_float(name: str, default: float, low: float, high: float) -> float:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BadQuery(f"{name} must be a number, got {raw[:40]!r}", field=name) from None
    if not low <= value <= high:  # also refuses nan and inf
        raise BadQuery(f"{name} must be between {low:g} and {high:g}, got {raw[:40]}",
                       field=name)
    return value


def bounded_int(name: str, default: int, low: int, high: int) -> int:
    """A query parameter that must be an integer within [low, high]; 400 otherwise."""
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadQuery(f"{name} must be an integer, got {raw[:40]!r}", field=name) from None
    if not low <= value <= high:
        raise BadQuery(f"{name} must be between {low} and {high}, got {value}", field=name)
    return value


@routes.get("/invocations/<invocation_id>")
def get_invocation(invocation_id: str) -> Any:
    record = ctx().records.get(invocation_id)
    if record is None:
        raise InvocationNotFound(f"no invocation {invocation_id!r} (unknown or expired)",
                                 invocation_id=invocation_id)
    return jsonify(record.public())


@routes.get("/plugins/<name>/invocations")
def plugin_invocations(name: str) -> Any:
    limit = bounded_int("limit", 20, 1, 1000)
    return jsonify({"plugin": name, "invocations": [
        r.public() for r in ctx().records.for_plugin(name, limit)]})


@routes.get("/openapi.json")
def openapi() -> Any:
    return jsonify(SPEC)


@routes.get("/docs")
def docs() -> Any:
    return Response(DOCS_HTML, mimetype="text/html")


@routes.get("/docs/static/<path:filename>")
def docs_static(filename: str) -> Any:
    import swagger_ui_bundle

    return send_from_directory(Path(swagger_ui_bundle.swagger_ui_path), filename)


def wait_for(records: RecordStore, invocation_id: str, seconds: float) -> InvocationRecord | None:
    """Polls the record until it is terminal or time is up."""
    deadline = time.monotonic() + seconds
    delay = 0.01
    while True:
        record = records.get(invocation_id)
        if (record and record.status.terminal) or time.monotonic() >= deadline:
            return record
        time.sleep(delay)
        delay = min(delay * 1.5, 0.2)
