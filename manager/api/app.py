"""The REST API (SPEC §6), built by `create_app`. It publishes events and enqueues tasks;
it never runs plugins and never talks to Docker (workers report the engine's state).
The endpoints are in `manager.api.routes` (plugins, runs, health, docs) and
`manager.api.bus_routes` (publishing, entry outcomes, dead letters)."""

from __future__ import annotations

import hmac
import threading
from collections.abc import Callable
from typing import Any

import redis
from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

from manager.api.bus_routes import bus_routes
from manager.api.console.pages import console
from manager.api.context import ApiContext, error
from manager.api.routes import routes
from manager.api.secret_routes import secret_routes
from manager.bus.dispatch import Dispatcher
from manager.core.config import Settings
from manager.core.errors import (
    API_HEADER,
    BadQuery,
    BudgetExceeded,
    DeadLetterNotFound,
    EventError,
    InvocationNotFound,
    NotReplicated,
    PermissionDenied,
    PluginNotFound,
    PluginUnavailable,
    TitanError,
    VersionNotFound,
)
from manager.core.secrets import SecretError, SecretNotFound
from manager.core.wiring import Wiring
from manager.plugins.registry import Registry

STATUS_CODES = {SecretNotFound: 404, EventError: 400, BadQuery: 400, BudgetExceeded: 429,
                PluginNotFound: 404,
                InvocationNotFound: 404, VersionNotFound: 404, DeadLetterNotFound: 404,
                PluginUnavailable: 409, PermissionDenied: 403, NotReplicated: 503,
                SecretError: 400}
PUBLIC_PATHS = ("/health", "/docs", "/openapi.json", "/ui")  # and /docs/static/...
CONSOLE = "/ui/"  # the console signs its browsers in itself (manager.api.console.guard)


def create_app(wiring: Wiring, registry: Registry, dispatcher: Dispatcher,
               on_reload: Callable[[dict[str, Any]], object] | None = None) -> Flask:
    """Flask app factory; every dependency is passed in (tests pass their own)."""
    settings = wiring.settings
    app = Flask(__name__)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.config["MAX_CONTENT_LENGTH"] = settings.event_limits.request_bytes
    app.extensions["titan"] = ApiContext(settings, wiring.conn, registry, dispatcher,
                                         wiring.records, wiring.keys,
                                         settings.event_limits,
                                         threading.BoundedSemaphore(max(1, settings.api_waiters)),
                                         on_reload)
    app.before_request(_auth(settings))
    app.after_request(_mark)
    app.register_error_handler(TitanError, _titan_error)
    app.register_error_handler(redis.RedisError, _redis_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_blueprint(routes)
    app.register_blueprint(bus_routes)
    app.register_blueprint(secret_routes)
    app.register_blueprint(console)
    return app


def _mark(response: Any) -> Any:
    """Every answer says it is the Titan API: the CLI tells it from whatever else might
    answer on its URL."""
    response.headers[API_HEADER] = "1"
    return response


def _auth(settings: Settings) -> Any:
    def check() -> Any:
        if not settings.api_token or request.path in PUBLIC_PATHS or \
                request.path.startswith(("/docs/", CONSOLE)):
            return None
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {settings.api_token}".encode()):
            return error("unauthorized", "missing or wrong bearer token", 401)
        return None

    return check


def _titan_error(exc: TitanError) -> Any:
    status = next((s for t, s in STATUS_CODES.items() if isinstance(exc, t)), 500)
    return jsonify({"error": exc.to_dict()}), status


def _redis_error(exc: redis.RedisError) -> Any:
    return error("redis_unavailable", f"Redis is unavailable: {exc}", 503)


def _http_error(exc: HTTPException) -> Any:
    response, status = error(exc.name.lower().replace(" ", "_"), exc.description or exc.name,
                             exc.code or 500)
    for name, value in exc.get_headers():  # a 405 names the methods allowed (Allow)
        if name.lower() == "allow":
            response.headers["Allow"] = value
    return response, status
