"""Unit tests: the Event model (SPEC §2)."""

from __future__ import annotations

import json

import pytest

from manager.core.errors import EventError
from manager.core.events import Event, Limits, from_outside

GOOD = {"event_id": "test-001", "topic": "fs.v1", "event_type": "file_created",
        "payload": {"path": "/srv/titan/files/a.pdf"}}


def reason(raw: bytes | str, limits: Limits | None = None) -> tuple[str, str]:
    with pytest.raises(EventError) as info:
        Event.decode(raw, limits)
    return info.value.details["reason"], info.value.details["field"]


def test_decode_encode_roundtrip() -> None:
    event = Event.decode(json.dumps({**GOOD, "hops": 2, "time": "2026-01-01T00:00:00Z"}))
    assert event.payload == GOOD["payload"] and event.hops == 2
    assert Event.decode(event.encode()) == event


def test_payload_defaults_to_empty_object() -> None:
    event = Event.decode(json.dumps({k: v for k, v in GOOD.items() if k != "payload"}))
    assert event.payload == {} and event.hops == 0


@pytest.mark.parametrize(("change", "field"), [
    ({"event_id": ""}, "event_id"), ({"event_id": "a b"}, "event_id"),
    ({"event_id": "x" * 129}, "event_id"), ({"topic": "fs/v1"}, "topic"),
    ({"event_type": 5}, "event_type"), ({"payload": []}, "payload"),
    ({"hops": -1}, "hops"), ({"hops": True}, "hops"), ({"hops": "1"}, "hops"),
    ({"time": "yesterday"}, "time"), ({"source": 3}, "source"), ({"extra": 1}, "extra"),
    # `$` matched before a trailing newline: every name and id is matched whole
    ({"event_id": "a\n"}, "event_id"), ({"topic": "fs.v1\n"}, "topic"),
    ({"event_type": "x\n"}, "event_type"),
])
def test_invalid_fields_are_named(change: dict, field: str) -> None:
    assert reason(json.dumps({**GOOD, **change}))[1] == field


def test_missing_required_field() -> None:
    assert reason(json.dumps({"event_id": "a", "topic": "b"})) == ("missing_field", "event_type")


def test_size_depth_encoding_and_shape_limits() -> None:
    assert reason(json.dumps({**GOOD, "payload": {"x": "a" * 2_000_000}}))[0] == "too_large"
    deep_raw = json.dumps(GOOD)[:-1] + ', "payload": ' + "[" * 1000 + "]" * 1000 + "}"
    assert reason(deep_raw)[0] == "too_deep"
    assert Event.decode(json.dumps(GOOD)[:-1] + ', "hops": 1}').hops == 1  # the same splice
    assert reason(b'{"event_id": "\xff"}')[0] == "invalid_utf8"
    assert reason("[1, 2]")[0] == "not_an_object"
    assert reason('{"event_id": NaN}')[0] == "invalid_json"
    assert reason("not json")[0] == "invalid_json"


def test_depth_counts_only_structure_not_brackets_in_strings() -> None:
    raw = json.dumps({**GOOD, "payload": {"text": "[" * 500}})
    assert Event.decode(raw, Limits(max_depth=3)).payload["text"] == "[" * 500


def test_event_just_under_the_size_limit_is_accepted() -> None:
    base = len(json.dumps({**GOOD, "payload": {"x": ""}}))
    raw = json.dumps({**GOOD, "payload": {"x": "a" * (1024 * 1024 - base)}})
    assert len(raw) == 1024 * 1024
    assert len(Event.decode(raw).payload["x"]) == 1024 * 1024 - base


def test_lone_surrogates_are_refused() -> None:
    raw = json.dumps({**GOOD, "payload": {"x": "\ud800"}})
    assert reason(raw)[0] == "invalid_unicode"


def test_a_digest_is_matched_whole() -> None:
    from manager.core.errors import BundleError
    from workers.plugin_cache import check_digest

    good = "sha256:" + "0" * 64
    assert check_digest(good) == good
    with pytest.raises(BundleError, match="invalid digest"):
        check_digest(good + "\n")


@pytest.mark.parametrize(("change", "reason"), [
    ({"topic": "plugins.v1"}, "reserved_topic"),
    ({"topic": "Plugins.v1"}, "reserved_topic"),
    ({"topic": "PLUGINS.V1"}, "reserved_topic"),
    ({"source": "plugin:x"}, "forged_source"),
    ({"source": "Plugin:x"}, "forged_source"),
    ({"source": "PLUGIN:file_watcher@1.0.0"}, "forged_source"),
])
def test_reserved_names_are_reserved_whatever_their_case(change: dict, reason: str) -> None:
    event = Event.from_dict({"event_id": "e1", "topic": "t.v1", "event_type": "x", **change})
    with pytest.raises(EventError) as refused:
        from_outside(event)
    assert refused.value.details["reason"] == reason


def test_the_api_schema_reserves_them_whatever_their_case() -> None:
    from manager.api.models import EventIn

    for change in ({"topic": "Plugins.v1"}, {"source": "Plugin:x"}):
        with pytest.raises(ValueError):
            EventIn.model_validate({"event_id": "e1", "topic": "t.v1", "event_type": "x",
                                    **change})
    EventIn.model_validate({"event_id": "e1", "topic": "plugins.v2", "event_type": "x",
                            "source": "plugins-team"})
