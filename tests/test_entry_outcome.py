"""What became of a published entry (`GET /events/entries/<id>`, which `publish --wait`
reads), on a real Redis with the real listener and API, no workers: an entry that matched
nothing is handled once the listener acknowledged it, though it wrote nothing of its own
(its batch costs one XACK); one that ran a plugin, or was dead-lettered, says so; one not
yet read, or never published, is not handled."""

from __future__ import annotations

import pytest
import redis

from harness import isolated, new_id, wired
from manager.api.app import create_app
from manager.bus.dispatch import Dispatcher
from manager.bus.group import ensure_group
from manager.bus.listener import Listener
from manager.core.config import Settings
from manager.core.contract import make_celery


class Rig:
    def __init__(self, conn: redis.Redis, settings: Settings) -> None:
        self.conn = conn
        self.settings, registry = isolated(settings, conn)
        wiring = wired(conn, self.settings)
        dispatcher = Dispatcher(wiring, make_celery(self.settings.broker))
        self.listener = Listener(wiring, registry, dispatcher)
        self.api = create_app(wiring, registry, dispatcher).test_client()
        ensure_group(conn, self.settings.stream)

    def publish(self, topic: str, event_type: str = "ping") -> str:
        event = {"event_id": new_id(), "topic": topic, "event_type": event_type}
        reply = self.api.post("/events", json=event)
        assert reply.status_code == 202, reply.json
        return reply.json["entry_id"]

    def outcome(self, entry_id: str) -> dict:
        reply = self.api.get(f"/events/entries/{entry_id}")
        assert reply.status_code == 200, reply.json
        return reply.json


@pytest.fixture
def rig(conn: redis.Redis, unit_settings: Settings) -> Rig:
    return Rig(conn, unit_settings)


def test_an_entry_that_matched_nothing_is_handled_once_acknowledged(rig: Rig) -> None:
    nothing = [rig.publish("nobody.listens") for _ in range(3)]
    assert [rig.outcome(e)["handled"] for e in nothing] == [False] * 3  # not read yet
    reply, version = rig.listener.read()  # delivered: pending until acknowledged
    assert [rig.outcome(e)["handled"] for e in nothing] == [False] * 3
    rig.listener.handle_batch(reply[0][1], version)
    owed = list(rig.listener.acked)
    assert owed == nothing and rig.listener.owed == []  # nothing to write but the XACK
    rig.listener.flush()
    assert [rig.outcome(e) for e in nothing] == [
        {"entry_id": e, "handled": True, "dead": None, "runs": []} for e in nothing]
    keys = rig.conn.keys(f"{rig.settings.key_prefix}:*entry*")
    assert keys == [], keys  # no account of their own
    pending = rig.conn.xpending(rig.settings.event_stream, rig.settings.stream.group)
    assert pending["pending"] == 0


def test_an_entry_that_ran_or_died_says_so_and_unknown_ids_are_not_handled(rig: Rig) -> None:
    ran = rig.publish("test.v1")
    dead = rig.conn.xadd(rig.settings.event_stream, {"event": b"{not json"}).decode()
    while rig.listener.poll():
        pass
    rig.listener.flush()
    told = rig.outcome(ran)
    assert told["handled"] and "echo" in [r["plugin"] for r in told["runs"]], told
    assert all(r["invocation_id"] and not r["duplicate"] for r in told["runs"]), told
    told = rig.outcome(dead)
    assert told["handled"] and told["dead"].startswith("invalid_json"), told
    for unknown in ("0-1", f"{int(dead.split('-')[0]) + 10**6}-0", "not-an-id", "5"):
        assert rig.outcome(unknown)["handled"] is False, unknown


def test_entries_are_acknowledged_in_one_command_after_their_accounts(rig: Rig) -> None:
    """The order within the read's pipeline: every account written, then one XACK."""
    entries = [rig.publish("test.v1"), rig.publish("nobody.listens")]
    reply, version = rig.listener.read()
    rig.listener.handle_batch(reply[0][1], version)
    pipe = rig.listener.owed_pipeline()
    names = [str(args[0]).upper() for args, _ in pipe.command_stack]
    assert names[-1] == "XACK" and names.count("XACK") == 1, names
    xack = pipe.command_stack[-1][0]
    assert list(xack[3:]) == entries, xack
    pipe.execute()
    rig.listener.owed.clear()
    rig.listener.acked.clear()
    assert [rig.outcome(e)["handled"] for e in entries] == [True, True]
