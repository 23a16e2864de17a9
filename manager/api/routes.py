"""The API's endpoints (SPEC §6), as a blueprint over the context `create_app` built.

Shapes come from manager/api/models.py through spectree (manager/api/openapi.py; chosen
because it takes pydantic models as they are): it validates queries, other bodies and
responses with them and builds the OpenAPI document from the same models. An event is
validated once, by the Event itself (size, nesting and UTF-8 first, before any JSON parser
recurses, then every field); its schema is written from the Event's rules.
"""

from __future__ import annotations

import difflib
import json
import time
from pathlib import Path
from typing import Any

import redis
from flask import Blueprint, Response, current_app, g, jsonify, request, send_from_directory
from spectree import Response as Resp

from manager.api.context import api_context as ctx
from manager.api.context import reload_registry
from manager.api.models import (
    ErrorBody,
    EventIn,
    Health,
    Invocation,
    InvocationList,
    LimitQuery,
    PluginList,
    PluginOut,
    Queued,
    ReloadOut,
    RollbackIn,
    RollbackOut,
    Standing,
    WaitQuery,
)
from manager.api.openapi import ERRORS, api, query
from manager.core.beats import WorkerBeat
from manager.core.clients import describe
from manager.core.errors import (
    BadQuery,
    InvocationNotFound,
    PluginNotFound,
    PluginUnavailable,
)
from manager.core.events import Event, from_outside
from manager.core.lines import lines
from manager.core.observer import observer
from manager.core.record_store import Charge
from manager.core.records import Status
from manager.plugins.loader import PluginEntry

DOCS_HTML = """<!doctype html><html><head><meta charset="utf-8">
<title>Titan Plugin Manager API</title>
<link rel="stylesheet" href="/docs/static/swagger-ui.css"></head><body><div id="ui"></div>
<script src="/docs/static/swagger-ui-bundle.js"></script><script>
SwaggerUIBundle({url: "/openapi.json", dom_id: "#ui"});</script></body></html>"""
EVENT_PATHS = ("/events",)


routes = Blueprint("titan", __name__)


@routes.before_app_request
def _read_event() -> None:
    """Events are checked by the project's own rules before anything parses them."""
    if request.method == "POST" and (request.path in EVENT_PATHS or
                                     request.path.endswith("/trigger")):
        g.event = from_outside(Event.decode(request.get_data(cache=True), ctx().limits))


def plugin_or_404(name: str) -> PluginEntry:
    entry = ctx().registry.get(name)
    if entry is None:
        close = difflib.get_close_matches(name, list(ctx().registry.entries()), n=3)
        hint = f" (did you mean: {', '.join(close)}?)" if close else ""
        raise PluginNotFound(f"no plugin named {name!r}{hint}", plugin=name,
                             suggestions=close)
    return entry


@routes.get("/health")
@api.validate(resp=Resp(HTTP_200=Health, HTTP_503=Health), security={})
def health() -> Any:
    """Redis, the Docker engine (as workers report it) and at least one worker."""
    c = ctx()
    state: dict[str, Any] = {}
    try:
        c.conn.ping()
        state["redis"] = {"ok": True}
        workers = WorkerBeat.all(c.conn, c.keys)
    except redis.RedisError as exc:
        state["redis"] = {"ok": False, "error": describe(exc, c.settings.redis)}
        workers = []
    engines = [w for w in workers if w.docker_ok]
    state["docker"] = {"ok": bool(engines), "workers_reporting": len(engines),
                       "errors": sorted({w.docker_error for w in workers if w.docker_error})}
    state["workers"] = {"ok": bool(workers), "count": len(workers),
                        "names": sorted(w.name for w in workers)}
    # Ids of the runs' range the host has given out since: never leased, but named here
    # (a run still works; an operator removes the account or moves TITAN_RUN_IDS).
    conflicts = sorted({c for w in workers for c in w.run_id_conflicts})
    state["run_ids"] = {"ok": not conflicts, "conflicts": conflicts}
    # Processes holding gVisor's Sentry uid (65534, runsc's choice): they can signal
    # gVisor runs; named so the operator moves them (docs/security.md).
    neighbours = sorted({f"{w.name}: {n}" for w in workers for n in w.sentry_neighbours})
    state["gvisor"] = {"ok": not neighbours, "sentry_neighbours": neighbours}
    ok = all(state[p]["ok"] for p in ("redis", "docker", "workers"))
    return jsonify({"status": "ok" if ok else "unavailable", **state}), 200 if ok else 503


@routes.get("/plugins")
@api.validate(resp=Resp(HTTP_200=PluginList, **ERRORS))
def list_plugins() -> Any:
    """Every plugin: status, version, digest, triggers, errors, warnings and its line of
    runs waiting (depth, how long the oldest has waited)."""
    entries = ctx().registry.entries()
    line = lines(ctx().conn, ctx().keys, entries, time.time())
    return jsonify({"plugins": [{**e.public(), "queue": line[name].public()}
                                for name, e in entries.items()]})


@routes.get("/plugins/<name>")
@api.validate(resp=Resp(HTTP_200=PluginOut, **ERRORS))
def get_plugin(name: str) -> Any:
    """One plugin, with its kept versions."""
    data = {**plugin_or_404(name).public(),
            "queue": lines(ctx().conn, ctx().keys, [name], time.time())[name].public()}
    data["versions"] = [{**e.ref(), "loaded_at": e.loaded_at,
                         "serving": e.digest == data["digest"]}
                        for e in ctx().registry.versions(name)]
    return jsonify(data)


@routes.post("/plugins/<name>/rollback")
@api.validate(json=RollbackIn, resp=Resp(HTTP_200=RollbackOut, **ERRORS))
def rollback(name: str) -> Any:
    """Puts a kept version back in service (default: the one before the current)."""
    plugin_or_404(name)
    return jsonify(ctx().registry.rollback(name, rollback_version()))


@routes.post("/plugins/reload")
@api.validate(resp=Resp(HTTP_200=ReloadOut, **ERRORS))
def reload_plugins() -> Any:
    """Rediscovers the plugins directory; what was added, updated, removed, rejected."""
    return jsonify(reload_registry(ctx()))


@routes.post("/plugins/<name>/trigger")
@api.validate(json=EventIn, query=WaitQuery, skip_validation=True,  # the Event validates
              resp=Resp(HTTP_200=Invocation, HTTP_202=Queued, HTTP_409=ErrorBody,
                        HTTP_429=ErrorBody, **ERRORS))
def trigger(name: str) -> Any:
    """Runs this plugin on the event, regardless of its triggers; with ?wait, the record."""
    entry = plugin_or_404(name)
    if not entry.runnable:
        raise PluginUnavailable(entry.unavailable, plugin=name, status=entry.status.value,
                                errors=list(entry.errors))
    event: Event = g.event
    wait = query(WaitQuery).wait
    # charged to its correlation like a bus event (BudgetExceeded: 429, nothing runs)
    invocation_id, _ = ctx().dispatcher.dispatch(event, entry, origin="api",
                                                 charge=Charge(event.correlation, 1))
    observer().dispatched(name)
    waited = False
    if wait and ctx().waiters.acquire(blocking=False):
        waited = True
        try:
            record = ctx().records.wait(invocation_id, wait)
        finally:
            ctx().waiters.release()
        if record and record.status.terminal:
            return jsonify(record.public()), 200
    location = f"/invocations/{invocation_id}"
    response = jsonify({"invocation_id": invocation_id, "status": Status.QUEUED.value,
                        "plugin": name, "event_id": event.event_id, "record": location,
                        "waited": waited})
    response.headers["Location"] = location
    return response, 202


@routes.get("/invocations/<invocation_id>")
@api.validate(resp=Resp(HTTP_200=Invocation, **ERRORS))
def get_invocation(invocation_id: str) -> Any:
    """One run record."""
    record = ctx().records.get(invocation_id)
    if record is None:
        raise InvocationNotFound(f"no invocation {invocation_id!r} (unknown or expired)",
                                 invocation_id=invocation_id)
    return jsonify(record.public())


@routes.get("/invocations/<invocation_id>/standing")
@api.validate(resp=Resp(HTTP_200=Standing, **ERRORS))
def get_standing(invocation_id: str) -> Any:
    """Where a run stands: how long it has waited, and how many runs are ahead of it (a
    wait that ran out says so)."""
    record = ctx().records.get(invocation_id)
    if record is None:
        raise InvocationNotFound(f"no invocation {invocation_id!r} (unknown or expired)",
                                 invocation_id=invocation_id)
    ahead, running = (0, 0) if record.status.terminal else ctx().records.standing(record)
    until = record.started_at if record.started_at else time.time()
    return jsonify({"invocation_id": invocation_id, "plugin": record.plugin,
                    "status": record.status.value, "ahead": ahead, "running": running,
                    "queued_s": round(max(0.0, until - record.created_at), 3)})


@routes.get("/plugins/<name>/invocations")
@api.validate(query=LimitQuery, resp=Resp(HTTP_200=InvocationList, **ERRORS))
def plugin_invocations(name: str) -> Any:
    """Recent runs of a plugin, newest first (also of a removed one, while its records
    last); a name that is neither loaded nor has runs is not found."""
    limit = request.context.query.limit  # type: ignore[attr-defined]
    runs = ctx().records.for_plugin(name, limit)
    if not runs:
        plugin_or_404(name)
    return jsonify({"plugin": name, "invocations": [r.public() for r in runs]})


@routes.get("/openapi.json")
def openapi() -> Any:
    api.app = current_app  # the spec is built from this app's routes
    return jsonify(api.spec)


@routes.get("/docs")
def docs() -> Any:
    return Response(DOCS_HTML, mimetype="text/html")


@routes.get("/docs/static/<path:filename>")
def docs_static(filename: str) -> Any:
    import swagger_ui

    return send_from_directory(Path(swagger_ui.__file__).parent / "static", filename)


def rollback_version() -> str | None:
    """The body is empty, `{}` or `{"version": "<version or digest>"}`; nothing else."""
    raw = request.get_data(cache=True)
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
