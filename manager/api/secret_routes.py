"""Secrets over the API (SPEC §4, Secrets): set (or rotate) one and the plugins it is
bound to, list them, remove one. No endpoint ever returns a value: a secret's value
leaves the manager only encrypted, for a bound plugin's run."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from flask import Blueprint, jsonify, request
from spectree import Response as Resp

from manager.api.context import api_context as ctx
from manager.api.models import SecretIn, SecretList, SecretOut
from manager.api.openapi import ERRORS, api
from manager.core.secrets import SecretError, SecretNotFound, SecretStore, check_name

secret_routes = Blueprint("titan_secrets", __name__)


def named(name: str) -> str:
    """A name no secret can have is a URL of no secret (404), naming the rule."""
    try:
        return check_name(name)
    except SecretError as exc:
        raise SecretNotFound(f"there is no secret {name!r}, and none can be: {exc.message}",
                             secret=name) from None


def store() -> SecretStore:
    return SecretStore(ctx().conn, ctx().keys, ctx().settings.secrets_key)


@secret_routes.get("/secrets")
@api.validate(resp=Resp(HTTP_200=SecretList, **ERRORS))
def list_secrets() -> Any:
    """Every secret's name, size, bound plugins and when it changed (never a value)."""
    return jsonify({"secrets": [s.public() for s in store().list()]})


@secret_routes.put("/secrets/<name>")
@api.validate(json=SecretIn, resp=Resp(HTTP_200=SecretOut, **ERRORS))
def set_secret(name: str) -> Any:
    """Sets or rotates a secret (`value`: text, or base64 with `encoding: base64` for
    bytes) and binds it to `plugins`; the next run of a bound plugin reads the new
    value."""
    body = request.context.json.root  # type: ignore[attr-defined]
    named(name)
    try:
        value = (base64.b64decode(body.value, validate=True) if body.encoding == "base64"
                 else body.value.encode())
    except binascii.Error:
        raise SecretError(f"secret {name!r}: the value is not base64") from None
    unknown = [p for p in body.plugins if ctx().registry.get(p) is None]
    info = store().set(name, value, tuple(body.plugins))
    return jsonify({**info.public(), "unknown_plugins": unknown})


@secret_routes.delete("/secrets/<name>")
@api.validate(resp=Resp(HTTP_200=SecretOut, **ERRORS))
def remove_secret(name: str) -> Any:
    """Removes a secret: runs of plugins that list it fail, naming it, until it is set."""
    found = {s.name: s for s in store().list()}.get(named(name))
    if found is None or not store().remove(name):
        raise SecretNotFound(f"no secret named {name!r}", secret=name)
    return jsonify({**found.public(), "unknown_plugins": []})
