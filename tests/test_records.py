"""The invocation record's transition table, and its enforcement by the Lua scripts on a
real Redis: every allowed and every refused transition, terminal states never left, the
finishing step atomic and idempotent."""

from __future__ import annotations

import itertools
import json
import time
import uuid
from dataclasses import fields

import pytest

from harness import wired
from manager.core.errors import BudgetExceeded
from manager.core.record_store import Charge, Claimed, RecordStore, Written
from manager.core.records import (
    ACTIVE,
    TERMINAL,
    InvocationRecord,
    Outcome,
    Status,
    allowed,
)
from manager.core.slots import SlotAsk, SlotGrant

S = Status
EXPECTED = {  # (from, to) pairs that are allowed; every other pair is refused
    *((a, S.QUEUED) for a in ACTIVE),
    *((a, S.THROTTLED) for a in (S.PENDING, S.QUEUED, S.THROTTLED, S.RETRYING)),
    *((a, S.RUNNING) for a in (S.PENDING, S.QUEUED, S.THROTTLED, S.RETRYING, S.RUNNING)),
    (S.RUNNING, S.RETRYING),
    *((S.RUNNING, t) for t in (S.SUCCEEDED, S.FAILED, S.TIMEOUT, S.OOM, S.OUTPUT_LIMIT,
                               S.REJECTED)),
    *((a, S.LOST) for a in ACTIVE),
}


@pytest.mark.parametrize(("source", "target"), list(itertools.product(Status, Status)))
def test_transition_table(source: Status, target: Status) -> None:
    assert allowed(source, target) == ((source, target) in EXPECTED)


def test_terminal_states_are_never_left() -> None:
    assert all(not allowed(t, target) for t in TERMINAL for target in Status)


def test_the_api_schema_comes_from_the_record() -> None:
    from manager.api.models import Invocation

    schema = Invocation.model_json_schema()
    assert schema["$defs"]["Status"]["enum"] == [s.value for s in Status]
    assert schema["properties"]["exit_code"]["anyOf"] == [{"type": "integer"}, {"type": "null"}]
    assert schema["properties"]["result_event_ids"]["type"] == "array"
    assert set(schema["properties"]) == {f.name for f in fields(InvocationRecord)} - {"request"}


def _new(store: RecordStore, status: Status = Status.PENDING) -> str:
    inv = uuid.uuid4().hex
    store.create(InvocationRecord(inv, "p", "1.0.0", "sha256:x", "e1", "t", "e", "api", status,
                                  time.time()), 60)
    return inv


def _force(store: RecordStore, inv: str, status: Status) -> None:
    store.conn.hset(store.keys.invocation(inv), "status", json.dumps(status.value))


@pytest.mark.parametrize("source", list(Status))
def test_redis_enforces_the_table(conn, settings, source: Status) -> None:
    store = wired(conn, settings.with_(event_stream=f"{settings.event_stream}.records")).records
    for target in Status:
        inv = _new(store)
        _force(store, inv, source)
        if target.terminal:
            written = store.store(inv, Outcome(target, events=(json.dumps({"x": 1}),)))
        else:
            written = store.transition(inv, target)
        expected = allowed(source, target) and not (target is S.RUNNING and source is S.RUNNING)
        assert written.applied == expected, (source, target)  # running->running: takeover only
        assert written.found is source
        assert store.get(inv).status is (target if expected else source)


def test_storing_a_runs_end_is_atomic_and_happens_once(conn, settings) -> None:
    mine = settings.with_(event_stream=f"{settings.event_stream}.finish")
    store = wired(conn, mine).records
    inv = _new(store)
    assert store.transition(inv, Status.RUNNING, increment="attempts", worker="w1").applied
    events = [json.dumps({"event_id": f"{inv}-r1"}), json.dumps({"event_id": f"{inv}-r2"})]
    ended = Outcome(Status.SUCCEEDED, events=tuple(events), result_event_ids=(f"{inv}-r1",))
    first = store.store(inv, ended)
    again = store.store(inv, ended)
    assert first.applied and not again.applied and again.found is Status.SUCCEEDED
    assert conn.xlen(mine.event_stream) == 2
    record = store.get(inv)
    assert record.published and record.attempts == 1 and record.worker == "w1"
    assert conn.zscore(store.keys.inflight, inv) is None


def test_a_run_sent_again_keeps_why_in_its_history(conn, settings) -> None:
    store = wired(conn, settings).records
    inv = _new(store)
    for n in range(23):
        store.transition(inv, Status.RUNNING, increment="attempts", worker="w1")
        store.transition(inv, Status.RETRYING, reason=f"try {n}", note=f"try {n}")
    store.transition(inv, Status.RUNNING, worker="w1", reason=None)  # no note: no entry
    history = store.get(inv).history
    assert [h["reason"] for h in history] == [f"try {n}" for n in range(3, 23)]  # last 20
    assert {h["status"] for h in history} == {"retrying"}
    assert history[0]["at"] <= history[-1]["at"] and abs(history[-1]["at"] - store.now()) < 60
    assert store.get(_new(store)).history == ()


def test_a_takeover_is_a_compare_and_set_on_the_owner(conn, settings) -> None:
    store = wired(conn, settings).records
    inv = _new(store)
    store.transition(inv, Status.RUNNING, increment="attempts", worker="dead@host")
    running = frozenset({Status.RUNNING})
    assert not store.transition(inv, Status.RUNNING, sources=running, owner="other@host",
                                worker="me@host").applied
    assert store.transition(inv, Status.RUNNING, sources=running, owner="dead@host",
                            increment="attempts", worker="me@host").applied
    assert not store.transition(inv, Status.RUNNING, sources=running, owner="dead@host",
                                worker="third@host").applied  # only one rescuer wins
    record = store.get(inv)
    assert record.worker == "me@host" and record.attempts == 2


CLAIMABLE = frozenset({S.PENDING, S.QUEUED, S.THROTTLED, S.RETRYING})


def test_a_claim_takes_the_record_the_slot_and_the_run_in_one_step(conn, settings) -> None:
    store = wired(conn, settings).records
    plugin = f"claim-{uuid.uuid4().hex[:6]}"
    first, second, done = (_new(store, S.QUEUED) for _ in range(3))
    for inv in (first, second, done):
        store.conn.hset(store.keys.invocation(inv), "plugin", json.dumps(plugin))
    claimed = store.claim(SlotAsk(plugin, first, 1, 1.0), CLAIMABLE, 60,
                          holder="w1", worker="w1")
    assert claimed.grant is SlotGrant.GRANTED
    assert claimed.record.status is S.QUEUED and claimed.record.attempts == 0  # as it was
    now = store.get(first)
    assert now.status is S.RUNNING and now.attempts == 1 and now.worker == "w1"
    assert conn.zscore(store.keys.plugin_slots(plugin), first) is not None
    assert conn.get(store.keys.lease(first)) == b"w1"  # held, by its claimer
    # the cap holds: the second run is left as it was, and told why
    capped = store.claim(SlotAsk(plugin, second, 1, 1.0), CLAIMABLE, 60, "w1")
    assert capped.grant is SlotGrant.CONCURRENCY and store.get(second).status is S.QUEUED
    # a final run is not claimable: no slot, no change, the record to say why
    _force(store, done, S.SUCCEEDED)
    final = store.claim(SlotAsk(plugin, done, None, 1.0), CLAIMABLE, 60, "w1")
    assert final.grant is None and final.record.status is S.SUCCEEDED
    assert conn.zcard(store.keys.plugin_slots(plugin)) == 1
    gone = store.claim(SlotAsk(plugin, "no-such-run", None, 1.0), CLAIMABLE, time.time(), "w1")
    assert gone == Claimed(None, None)
    assert conn.get(store.keys.lease(second)) is None  # not claimed: not held
    # storing the outcome frees the slot and ends the hold in the same step
    assert store.store(first, Outcome(S.SUCCEEDED), slot_of=plugin).applied
    assert conn.zcard(store.keys.plugin_slots(plugin)) == 0
    assert conn.get(store.keys.lease(first)) is None


def test_a_run_is_created_only_within_its_budget(conn, settings) -> None:
    store = wired(conn, settings.with_(fanout_budget=2)).records
    correlation, entry = uuid.uuid4().hex, uuid.uuid4().hex
    made = []
    for _ in range(3):  # one entry charged for two runs, however often it is handled
        inv = uuid.uuid4().hex
        record = InvocationRecord(inv, "p", "1.0.0", "sha256:x", "e1", "t", "e", "bus",
                                  S.PENDING, time.time())
        made.append(store.create(record, 60, charge=Charge(correlation, 2,
                                                                          entry))[1])
    assert made == [True, True, True]
    assert int(conn.get(store.keys.budget(correlation))) == 2
    over = InvocationRecord(uuid.uuid4().hex, "p", "1.0.0", "sha256:x", "e2", "t", "e", "bus",
                            S.PENDING, time.time())
    with pytest.raises(BudgetExceeded, match="used its budget of 2 runs"):
        store.create(over, 60, charge=Charge(correlation, 1, uuid.uuid4().hex))
    assert store.get(over.invocation_id) is None  # nothing stored


def test_a_transition_can_ride_in_a_callers_pipeline(conn, settings) -> None:
    store = wired(conn, settings).records
    inv = _new(store)
    conn.script_flush()  # the pipelined form needs no script Redis has already seen
    pipe = conn.pipeline(transaction=False)
    store.queue_transition(pipe, inv, S.QUEUED, sources=frozenset({S.PENDING}))
    pipe.get(store.keys.invocation(inv) + ":nothing")
    applied, _ = pipe.execute()
    assert Written.of(applied) == Written(True, S.PENDING)
    assert store.get(inv).status is S.QUEUED
