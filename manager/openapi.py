"""The OpenAPI 3 document served at /openapi.json (and rendered at /docs)."""

from __future__ import annotations

from typing import Any

from manager import __version__
from manager.records import field_schema

_ERR = {"$ref": "#/components/responses/Error"}
_EVENT_BODY = {"required": True, "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/Event"}}}}


def _op(summary: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"summary": summary, "responses": responses, **extra}


def _ok(description: str, schema: str | None = None) -> dict[str, Any]:
    resp: dict[str, Any] = {"description": description}
    if schema:
        ref = {"$ref": f"#/components/schemas/{schema}"}
        resp["content"] = {"application/json": {"schema": ref}}
    return resp


def _name(param: str = "name") -> dict[str, Any]:
    return {"name": param, "in": "path", "required": True, "schema": {"type": "string"}}


SPEC: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "Titan Plugin Manager", "version": __version__,
             "description": "Events in on a Redis stream, sandboxed plugin runs, result events "
                            "out. With TITAN_API_TOKEN set, send `Authorization: Bearer <token>`."},
    "paths": {
        "/health": {"get": _op("Redis, Docker engine and worker health",
                               {"200": _ok("healthy", "Health"), "503": _ok("unhealthy", "Health")},
                               security=[])},
        "/plugins": {"get": _op("List plugins", {"200": _ok("plugins")})},
        "/plugins/reload": {"post": _op("Rediscover plugins/ and publish the registry",
                                        {"200": _ok("what changed"), "401": _ERR})},
        "/plugins/{name}": {"get": _op("One plugin", {"200": _ok("plugin"), "404": _ERR},
                                       parameters=[_name()])},
        "/plugins/{name}/rollback": {"post": _op(
            "Put a kept version back in service (default: the one before the current)",
            {"200": _ok("from and to"), "404": _ERR}, parameters=[_name()],
            requestBody={"required": False, "content": {"application/json": {"schema": {
                "type": "object", "properties": {"version": {
                    "type": "string", "description": "a version or digest"}}}}}})},
        "/plugins/{name}/trigger": {"post": _op(
            "Run this plugin on an event, regardless of its triggers",
            {"202": _ok("queued"), "200": _ok("finished (with ?wait)", "Invocation"),
             "400": _ERR, "404": _ERR, "409": _ERR},
            parameters=[_name(), {"name": "wait", "in": "query", "required": False,
                                  "schema": {"type": "number", "maximum": 600},
                                  "description": "seconds to wait for the finished record"}],
            requestBody=_EVENT_BODY)},
        "/plugins/{name}/invocations": {"get": _op(
            "Recent runs of a plugin, newest first", {"200": _ok("records"), "404": _ERR},
            parameters=[_name(), {"name": "limit", "in": "query",
                                  "schema": {"type": "integer", "default": 20, "maximum": 1000}}])},
        "/events": {"post": _op("Publish an event to the bus",
                                {"202": _ok("published"), "400": _ERR}, requestBody=_EVENT_BODY)},
        "/invocations/{id}": {"get": _op("One run record", {"200": _ok("record", "Invocation"),
                                                            "404": _ERR},
                                         parameters=[_name("id")])},
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "responses": {"Error": {"description": "error", "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/Error"}}}}},
        "schemas": {
            "Event": {"type": "object", "required": ["event_id", "topic", "event_type"],
                      "properties": {
                          "event_id": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"},
                          "topic": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,128}$"},
                          "event_type": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,128}$"},
                          "payload": {"type": "object"}, "source": {"type": "string"},
                          "time": {"type": "string", "format": "date-time"},
                          "correlation_id": {"type": "string"},
                          "causation_id": {"type": "string"},
                          "hops": {"type": "integer", "minimum": 0}}},
            "Invocation": field_schema(),
            "Health": {"type": "object", "properties": {
                "status": {"type": "string"}, "redis": {"type": "object"},
                "docker": {"type": "object"}, "workers": {"type": "object"}}},
            "Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
                "code": {"type": "string"}, "message": {"type": "string"},
                "details": {"type": "object"}}}}},
        },
    },
    "security": [{"bearer": []}],
}
