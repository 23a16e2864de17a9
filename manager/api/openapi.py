"""The API's OpenAPI side: the spectree instance that builds /openapi.json from the
pydantic models (manager.api.models), and how its validation errors become the API's
JSON errors, naming the field."""

from __future__ import annotations

from typing import Any

from flask import request
from pydantic import ValidationError
from spectree import SecurityScheme, SpecTree
from spectree.models import SecuritySchemeData

from manager import __version__
from manager.api.models import ErrorBody, WaitQuery
from manager.core.errors import BadQuery


def _invalid(req: Any, resp: Any, error: Exception | None, instance: Any, adapter: Any) -> None:
    """spectree's validation errors as the API's JSON errors, naming the field."""
    if error is None:
        return
    first = error.errors()[0]  # type: ignore[attr-defined]
    field = ".".join(str(p) for p in first["loc"]) or "body"
    message = f"{field}: {first['msg']}"
    raise BadQuery(message, field=field)


def query(model: type[WaitQuery]) -> WaitQuery:
    """An endpoint's query parameters, for the ones whose body the Event validates."""
    try:
        return model.model_validate(request.args.to_dict())
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "query"
        raise BadQuery(f"{field}: {first['msg']}", field=field) from None


api = SpecTree("flask", mode="strict", title="Titan Plugin Manager", version=__version__,
               validation_error_status=400, before=_invalid, annotations=False,
               page_templates={}, description="Events in on a Redis stream, sandboxed plugin "
               "runs, result events out. Every endpoint but "
               "/health, /docs and /openapi.json needs `Authorization: Bearer <token>`.",
               security_schemes=[SecurityScheme(name="bearer", data=SecuritySchemeData(
                   type="http", scheme="bearer"))], security={"bearer": []})
ERRORS = {"HTTP_400": ErrorBody, "HTTP_401": ErrorBody, "HTTP_404": ErrorBody,
          "HTTP_503": ErrorBody}
