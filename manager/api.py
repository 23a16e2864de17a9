"""The REST API (SPEC §6), built by `create_app`. It publishes events and enqueues tasks;
it never runs plugins and never talks to Docker (workers report the engine's state)."""

from __future__ import annotations

import hmac
import json
import time
from pathlib import Path
from typing import Any

import redis
from flask import Flask, Response, jsonify, request, send_from_directory
from werkzeug.exceptions import HTTPException

from manager import metrics
from manager.config import Settings
from manager.dispatch import Dispatcher
from manager.errors import (
    EventError,
    InvocationNotFound,
    PermissionDenied,
    PluginNotFound,
    PluginUnavailable,
    TitanError,
    VersionNotFound,
)
from manager.events import Event, Limits
from manager.keys import Keys
from manager.openapi import SPEC
from manager.records import RecordStore, Status
from manager.registry import Registry

STATUS_CODES = {EventError: 400, PluginNotFound: 404, InvocationNotFound: 404,
                VersionNotFound: 404,
                PluginUnavailable: 409, PermissionDenied: 403}
MAX_WAIT_S = 600.0
DOCS_HTML = """<!doctype html><html><head><meta charset="utf-8">
<title>Titan Plugin Manager API</title>
<link rel="stylesheet" href="/docs/static/swagger-ui.css"></head><body><div id="ui"></div>
<script src="/docs/static/swagger-ui-bundle.js"></script><script>
SwaggerUIBundle({url: "/openapi.json", dom_id: "#ui"});</script></body></html>"""


def _error(code: str, message: str, status: int, **details: Any) -> tuple[Response, int]:
    return jsonify({"error": {"code": code, "message": message, "details": details}}), status


def publish_event(conn: redis.Redis, settings: Settings, event: Event) -> str:
    """XADDs an event to the bus; returns the stream entry id."""
    entry = conn.xadd(settings.event_stream, {"event": event.encode()},
                      maxlen=settings.stream_maxlen, approximate=True)
    return entry.decode() if isinstance(entry, bytes) else entry


def worker_health(conn: redis.Redis, keys: Keys) -> dict[str, Any]:
    """Workers write a heartbeat (with their Docker engine's state) every few seconds."""
    workers = {}
    for key in conn.scan_iter(match=keys.worker_pattern, count=100):
        raw = conn.get(key)
        if raw:
            beat = json.loads(raw)
            workers[beat["name"]] = beat
    return workers


def create_app(settings: Settings, conn: redis.Redis, registry: Registry,
               dispatcher: Dispatcher) -> Flask:
    """Flask app factory; every dependency is passed in (tests pass their own)."""
    app = Flask(__name__)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    records = RecordStore(conn, settings)
    keys = Keys(settings.key_prefix)
    limits = Limits(settings.max_event_bytes, settings.max_event_depth)

    def read_event() -> Event:
        return Event.decode(request.get_data(cache=False), limits)

    def plugin_or_404(name: str) -> Any:
        entry = registry.get(name)
        if entry is None:
            raise PluginNotFound(f"no plugin named {name!r}", plugin=name)
        return entry

    @app.before_request
    def _auth() -> Any:
        if not settings.api_token or request.path == "/health":
            return None
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {settings.api_token}".encode()):
            return _error("unauthorized", "missing or wrong bearer token", 401)
        return None

    @app.errorhandler(TitanError)
    def _titan_error(exc: TitanError) -> Any:
        status = next((s for t, s in STATUS_CODES.items() if isinstance(exc, t)), 500)
        return jsonify({"error": exc.to_dict()}), status

    @app.errorhandler(redis.RedisError)
    def _redis_error(exc: redis.RedisError) -> Any:
        return _error("redis_unavailable", f"Redis is unavailable: {exc}", 503)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Any:
        return _error(exc.name.lower().replace(" ", "_"), exc.description or exc.name,
                      exc.code or 500)

    @app.get("/health")
    def health() -> Any:
        state: dict[str, Any] = {}
        try:
            conn.ping()
            state["redis"] = {"ok": True}
            workers = worker_health(conn, keys)
        except redis.RedisError as exc:
            state["redis"] = {"ok": False, "error": str(exc)}
            workers = {}
        engines = [w for w in workers.values() if w.get("docker", {}).get("ok")]
        state["docker"] = {"ok": bool(engines), "workers_reporting": len(engines),
                           "errors": sorted({w["docker"]["error"] for w in workers.values()
                                             if w.get("docker", {}).get("error")})}
        state["workers"] = {"ok": bool(workers), "count": len(workers),
                            "names": sorted(workers)}
        ok = all(state[p]["ok"] for p in ("redis", "docker", "workers"))
        return jsonify({"status": "ok" if ok else "unavailable", **state}), 200 if ok else 503

    @app.get("/plugins")
    def list_plugins() -> Any:
        return jsonify({"plugins": [e.public() for e in registry.entries().values()]})

    @app.get("/plugins/<name>")
    def get_plugin(name: str) -> Any:
        data = plugin_or_404(name).public()
        data["versions"] = [{**e.ref(), "loaded_at": e.loaded_at,
                             "serving": e.digest == data["digest"]}
                            for e in registry.versions(name)]
        return jsonify(data)

    @app.post("/plugins/<name>/rollback")
    def rollback(name: str) -> Any:
        body = request.get_json(silent=True) or {}
        version = body.get("version") or request.args.get("version")
        return jsonify(registry.rollback(name, version))

    @app.post("/plugins/reload")
    def reload_plugins() -> Any:
        try:
            changes = registry.reload()
        except Exception:
            metrics.RELOADS.labels(result="error").inc()
            raise
        metrics.RELOADS.labels(result="ok").inc()
        return jsonify(changes)

    @app.post("/plugins/<name>/trigger")
    def trigger(name: str) -> Any:
        entry = plugin_or_404(name)
        if not entry.runnable:
            raise PluginUnavailable(f"plugin {name!r} is {entry.status.value}", plugin=name,
                                    errors=list(entry.errors))
        event = read_event()
        wait = request.args.get("wait", type=float)
        invocation_id, _ = dispatcher.dispatch(event, entry, origin="api")
        metrics.TASKS_DISPATCHED.labels(plugin=name).inc()
        if wait:
            record = _wait_for(records, invocation_id, min(wait, MAX_WAIT_S))
            if record and Status(record["status"]).terminal:
                return jsonify(record), 200
        return jsonify({"invocation_id": invocation_id, "status": Status.QUEUED.value,
                        "plugin": name, "event_id": event.event_id}), 202

    @app.post("/events")
    def post_event() -> Any:
        event = read_event()
        entry_id = publish_event(conn, settings, event)
        return jsonify({"event_id": event.event_id, "entry_id": entry_id}), 202

    @app.get("/invocations/<invocation_id>")
    def get_invocation(invocation_id: str) -> Any:
        record = records.get(invocation_id)
        if record is None:
            raise InvocationNotFound(f"no invocation {invocation_id!r} (unknown or expired)",
                                     invocation_id=invocation_id)
        return jsonify(record)

    @app.get("/plugins/<name>/invocations")
    def plugin_invocations(name: str) -> Any:
        plugin_or_404(name)
        limit = max(1, min(request.args.get("limit", 20, type=int), 1000))
        return jsonify({"plugin": name, "invocations": records.for_plugin(name, limit)})

    @app.get("/openapi.json")
    def openapi() -> Any:
        return jsonify(SPEC)

    @app.get("/docs")
    def docs() -> Any:
        return Response(DOCS_HTML, mimetype="text/html")

    @app.get("/docs/static/<path:filename>")
    def docs_static(filename: str) -> Any:
        import swagger_ui_bundle

        return send_from_directory(Path(swagger_ui_bundle.swagger_ui_path), filename)

    return app


def _wait_for(records: RecordStore, invocation_id: str, seconds: float) -> dict[str, Any] | None:
    """Polls the record until it is terminal or time is up."""
    deadline = time.monotonic() + seconds
    delay = 0.01
    while True:
        record = records.get(invocation_id)
        if (record and Status(record["status"]).terminal) or time.monotonic() >= deadline:
            return record
        time.sleep(delay)
        delay = min(delay * 1.5, 0.2)
