"""The API's shapes, once: pydantic models that validate what comes in, check what goes
out, and generate /openapi.json (through spectree, in manager/api/routes.py). The invocation
model is derived from InvocationRecord, so the schema, the record and the CLI's statuses
cannot drift apart."""

from __future__ import annotations

import math
import re
import typing
from dataclasses import MISSING, fields
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, RootModel, create_model, field_validator

from manager.core.events import (
    EVENT_ID_PATTERN,
    MAX_OPTIONAL_LEN,
    NAME_PATTERN,
    PLUGIN_SOURCE,
    RESERVED_TOPICS,
)
from manager.core.records import InvocationRecord, Status
from manager.core.secrets import MAX_VALUE_BYTES


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EventIn(_Model):
    """An event (SPEC §2), as the OpenAPI document shows it. It is written from the Event's
    own rules (manager.core.events) and only documents them: the API validates an event
    once, with the Event itself (size, nesting and UTF-8 first, before any JSON parser
    recurses, then every field)."""

    model_config = ConfigDict(extra="forbid", strict=True, regex_engine="python-re")
    event_id: str = Field(pattern=f"^{EVENT_ID_PATTERN}$")
    topic: str = Field(pattern=rf"^(?!(?i:{'|'.join(map(re.escape, sorted(RESERVED_TOPICS)))})$)"
                       + f"{NAME_PATTERN}$",
                       description="`plugins.v1` is reserved for the manager's own events")
    event_type: str = Field(pattern=f"^{NAME_PATTERN}$")
    payload: dict[str, Any] = {}
    source: str | None = Field(None, max_length=MAX_OPTIONAL_LEN,
                               pattern=f"^(?!(?i:{re.escape(PLUGIN_SOURCE)}))",
                               description="default `api`; `plugin:*` is for plugin results")
    time: str | None = Field(None, max_length=MAX_OPTIONAL_LEN,
                             json_schema_extra={"format": "date-time"}, description="RFC 3339")
    correlation_id: str | None = Field(None, max_length=MAX_OPTIONAL_LEN)
    causation_id: str | None = Field(None, max_length=MAX_OPTIONAL_LEN)
    hops: int = Field(0, ge=0, strict=False)  # 3.0 is 3, as in JSON


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: dict[str, Any] | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class WaitQuery(_Model):
    wait: float | None = Field(None, gt=0, le=600, description="seconds to wait for the result")

    @field_validator("wait")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value


class LimitQuery(_Model):
    limit: int = Field(20, ge=1, le=1000)


_BOUND = Field(min_length=1, max_length=100, description="the plugins whose runs may read it")
_PLUGIN = typing.Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
BASE64 = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=|[A-Za-z0-9+/]{4})$"


class TextSecretIn(_Model):
    value: str = Field(min_length=1, max_length=MAX_VALUE_BYTES,
                       description="the value, as text (at most 64 KiB in UTF-8)")
    encoding: typing.Literal["utf-8"] = "utf-8"
    plugins: list[_PLUGIN] = _BOUND


class BytesSecretIn(_Model):
    value: str = Field(min_length=4, max_length=4 * -(-MAX_VALUE_BYTES // 3), pattern=BASE64,
                       description="the value's bytes, in standard base64 (at most 64 KiB "
                                   "once decoded)")
    encoding: typing.Literal["base64"]
    plugins: list[_PLUGIN] = _BOUND


class SecretIn(RootModel[TextSecretIn | BytesSecretIn]):
    """A secret's value and its plugins: text, or bytes in base64 (`encoding: base64`).
    The schema says which values each takes (base64 by its pattern, its length the one
    that holds 64 KiB), so the API refuses no value the schema allows but one over 64 KiB
    once encoded or decoded (the last base64 group can carry one or two bytes more: a
    pattern cannot count them, the store does)."""


class SecretOut(BaseModel):
    name: str
    size: int
    plugins: list[str]
    changed_at: float
    unknown_plugins: list[str] = Field(default_factory=list,
                                       description="bound names no plugin has (yet)")


class SecretList(BaseModel):
    secrets: list[SecretOut]


class RollbackIn(_Model):
    version: str | None = Field(None, min_length=1, max_length=200,
                                description="a version or a digest; default: the previous")


class Part(BaseModel):
    model_config = ConfigDict(extra="allow")
    ok: bool


class Health(BaseModel):
    status: str
    redis: Part
    docker: Part
    workers: Part
    run_ids: Part
    gvisor: Part  # processes holding the Sentries' uid (sentry_neighbours)


class TriggerOut(BaseModel):
    topic: str
    event_type: str


class TimerOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    schedule: str | None = None
    every: str | None = None
    timezone: str
    catch_up: str
    key: str
    next: list[str]


class QueueOut(BaseModel):
    depth: int = Field(description="runs in line (pending, queued, throttled, retrying)")
    oldest_wait_s: float | None = Field(description="how long the oldest has waited")


class PluginOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    status: str = Field(description="loaded, invalid or draft (valid, left out of service "
                        "until `draft: true` is deleted from its plugin.yaml)")
    version: str | None
    digest: str | None
    errors: list[str]
    warnings: list[str]
    triggers: list[TriggerOut | TimerOut] = Field(description="event triggers (topic, "
                                               "event_type) and timers, each with its next "
                                               "three fire times")
    draft: str | None = Field(None, description="a loaded plugin whose directory now holds "
                              "a draft: that draft's version (the loaded one still serves)")
    weight: int | None = Field(None, description="its turns in the queue and share of "
                               "slots, relative to weight 1 (manifest `weight`)")
    queue: QueueOut = Field(description="its runs sent and not yet running")


class PluginList(BaseModel):
    plugins: list[PluginOut]


class Ref(BaseModel):
    version: str | None
    digest: str | None


class RollbackOut(BaseModel):
    name: str
    to: Ref
    from_: Ref = Field(alias="from")


class ReloadOut(BaseModel):
    added: list[dict[str, Any]]
    updated: list[dict[str, Any]]
    removed: list[str]
    rejected: list[dict[str, Any]]
    drafts: list[dict[str, Any]] = Field([], description="plugins marked `draft: true`, left "
                                         "out of service; `serving`: what still serves")
    warnings: list[dict[str, Any]]
    unsettled: list[dict[str, Any]] = Field([], description="plugins whose directory was "
                                            "still being written: their old version serves")


class Queued(BaseModel):
    invocation_id: str
    status: str
    plugin: str
    event_id: str
    record: str = Field(description="the run record's URL (also the Location header)")
    waited: bool = Field(False, description="false when ?wait was asked for but every "
                         "waiting slot was taken: poll `record` instead")


class Standing(BaseModel):
    invocation_id: str
    plugin: str
    status: str
    queued_s: float = Field(description="since the run was recorded, until it started (or "
                            "until now, if it has not)")
    ahead: int = Field(description="unfinished runs recorded before it that have not started")
    running: int = Field(description="runs running now, on every worker")


class Published(BaseModel):
    event_id: str
    entry_id: str
    replayed: str | None = None


class EntryRun(BaseModel):
    plugin: str
    invocation_id: str
    duplicate: bool  # the event_id already ran this plugin: that earlier run, not a new one


class EntryOutcome(BaseModel):
    entry_id: str
    handled: bool
    dead: str | None = None  # "reason: detail" when it was dead-lettered
    runs: list[EntryRun]


class DeadLetter(BaseModel):
    id: str
    reason: str
    detail: str
    entry_id: str
    time: float
    event: Any = None


class DeadLetters(BaseModel):
    dead: list[DeadLetter]


def _invocation_model() -> type[BaseModel]:
    """InvocationRecord's public fields, as a response model."""
    hints = typing.get_type_hints(InvocationRecord)
    spec: dict[str, Any] = {}
    for f in fields(InvocationRecord):
        if f.name == "request":
            continue
        hint = hints[f.name]
        if typing.get_origin(hint) is tuple:
            hint = list[typing.get_args(hint)[0]]
        default = f.default if f.default is not MISSING else ...
        spec[f.name] = (Status if f.name == "status" else hint, default)
    return create_model("Invocation", **spec)


Invocation = _invocation_model()


class InvocationList(BaseModel):
    plugin: str
    invocations: list[Invocation]  # type: ignore[valid-type]
