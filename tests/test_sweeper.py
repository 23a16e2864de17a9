"""The sweeper's judgements on a real Redis, without workers or Docker: a held run is left
alone, a sent run waits while its own message is in the broker (whatever else the queue
holds), an unheld run is re-queued or marked lost once its message is gone, and a run is
judged once."""

from __future__ import annotations

import json
import time

import pytest
import redis
from prometheus_client import REGISTRY

from harness import Bus, isolated, new_id, record_of, wired
from manager.bus.dispatch import Dispatcher
from manager.bus.sweeper import Sweeper
from manager.core.config import Settings
from manager.core.contract import make_celery
from manager.core.events import Event
from manager.core.records import InvocationRecord, Outcome, Status
from manager.core.runs import RunRequest
from manager.core.slots import HELD_FOR_S, LEASE_TTL_S


class Rig:
    def __init__(self, conn: redis.Redis, settings: Settings, **changes: object) -> None:
        self.conn = conn
        self.settings, self.registry = isolated(settings, conn, **changes)
        self.keys = self.settings.keys
        self.dispatcher = Dispatcher(wired(conn, self.settings), make_celery(self.settings.broker))
        self.sweeper = Sweeper(wired(conn, self.settings), self.dispatcher)

    @property
    def patience(self) -> float:
        """How long a sent run must look abandoned before it is."""
        return self.settings.sweep_grace_s

    def lose(self, req: RunRequest) -> bytes:
        """Takes the run's own message out of the queue (as a failover can), leaving the
        others; returns it."""
        for message in self.conn.lrange(self.settings.task_queue, 0, -1):
            if json.loads(message)["headers"]["id"] == req.invocation_id:
                assert self.conn.lrem(self.settings.task_queue, 1, message) == 1
                return message
        raise AssertionError(f"no message of {req.invocation_id} in the queue")

    def run(self, plugin: str = "echo", sent: bool = True) -> RunRequest:
        """A run past its deadline: recorded (pending), and sent (queued) unless not."""
        req = self.registry.get(plugin).request(Event(new_id(), "test.v1", "ping"),
                                                self.settings.plugin, "api", "sw" + new_id())
        self.dispatcher.records.create(InvocationRecord.from_request(req), 0)
        if sent:
            self.dispatcher.send(req)  # no worker consumes this test's queue
            self.dispatcher.records.transition(req.invocation_id, Status.QUEUED, due_in=0)
        return req

    def running(self, req: RunRequest, worker: str = "gone@host") -> None:
        """The run was claimed by a worker (which then died) and its message is gone."""
        assert self.dispatcher.records.transition(
            req.invocation_id, Status.RUNNING, increment="attempts", due_in=0,
            worker=worker).applied
        self.conn.delete(self.settings.task_queue)

    def status(self, req: RunRequest) -> dict:
        return record_of(self.conn, self.settings, req.invocation_id)


@pytest.fixture
def rig(conn, unit_settings) -> Rig:
    return Rig(conn, unit_settings, sweep_grace_s=2)


def test_held_runs_and_runs_whose_message_is_in_the_broker_are_left_alone(rig: Rig) -> None:
    """A run with a lease is held; a sent run whose message is in a queue list, or
    delivered and unacknowledged (kombu's hash), waits its turn however late it is."""
    held, queued, delivered = rig.run(), rig.run(), rig.run()
    rig.conn.set(rig.keys.lease(held.invocation_id), "someone@host", ex=60)
    message = rig.lose(delivered)
    rig.conn.hset(rig.settings.keys.unacked, "a-delivery-tag",
                  json.dumps([json.loads(message), "", rig.settings.task_queue]))
    for later in (0, rig.patience + 1, 10 * rig.patience):
        rig.conn.zadd(rig.keys.inflight, {r.invocation_id: 0
                                          for r in (held, queued, delivered)})
        report = rig.sweeper.sweep(time.time() + later)
        assert report.suspected == [] and report.requeued == []
    for r in (held, queued, delivered):
        assert rig.conn.zscore(rig.keys.inflight, r.invocation_id) > time.time()  # later
        assert rig.status(r)["status"] == "queued"


def test_a_run_whose_own_message_is_gone_is_sent_again_while_others_wait(rig: Rig) -> None:
    """A failover can lose one message while the queue is busy with others: the run whose
    message is in neither the queue nor kombu's hash on two looks `sweep_grace_s` apart
    is sent again; the others are left alone."""
    lost, others = rig.run(), [rig.run() for _ in range(3)]
    rig.lose(lost)
    assert rig.sweeper.sweep().suspected == [lost.invocation_id]
    assert rig.sweeper.sweep(time.time() + rig.patience - 1).requeued == []  # within grace
    report = rig.sweeper.sweep(time.time() + rig.patience + 1)
    assert report.requeued == [lost.invocation_id] and report.lost == []
    again = rig.status(lost)
    assert again["status"] == "queued" and again["requeues"] == 1
    assert "re-queued by the sweeper" in again["reason"]
    ids = [json.loads(m)["headers"]["id"] for m in rig.conn.lrange(rig.settings.task_queue, 0, -1)]
    assert sorted(ids) == sorted([lost.invocation_id, *(o.invocation_id for o in others)])
    assert all(rig.status(o)["requeues"] == 0 for o in others)


def test_a_run_waiting_to_be_sent_again_is_left_alone_and_taken_once(rig: Rig) -> None:
    """A retry's backoff waits in Redis on Redis's clock (manager.core.later), not as a
    Celery ETA: the sweeper counts it as sent, and each due run goes to one taker."""
    from manager.core.later import Later

    later = Later(rig.conn, rig.keys)
    soon, afar = rig.run(), rig.run()
    for req, after in ((soon, 0), (afar, 3600)):
        rig.lose(req)
        later.put(req.invocation_id, req.to_dict(), after, rig.settings.task_queue, priority=3)
    report = rig.sweeper.sweep(time.time() + 10 * rig.patience)
    assert report.suspected == [] and report.requeued == []
    assert later.due() == [(soon.to_dict(), 3, rig.settings.task_queue)]
    assert later.due() == []  # taken once
    rig.conn.zadd(rig.keys.inflight, {soon.invocation_id: 0})
    assert rig.sweeper.sweep().suspected == [soon.invocation_id]  # taken, never sent
    assert rig.conn.zscore(rig.keys.later, afar.invocation_id) is not None


def test_a_pending_run_whose_message_never_left_is_sent_after_its_grace(rig: Rig) -> None:
    req = rig.run(sent=False)
    assert rig.sweeper.sweep().suspected == [req.invocation_id]
    assert rig.sweeper.sweep().requeued == []  # within sweep_grace_s
    report = rig.sweeper.sweep(time.time() + rig.settings.sweep_grace_s + 1)
    assert report.requeued == [req.invocation_id]
    (message,) = rig.conn.lrange(rig.settings.task_queue, 0, -1)
    assert json.loads(message)["headers"]["id"] == req.invocation_id
    assert rig.status(req)["status"] == "queued"


def test_a_running_run_whose_process_died_is_re_queued_at_once(rig: Rig) -> None:
    """Unheld and due means its process stopped renewing a lease ago: no wait for kombu's
    visibility timeout, and no `retries` needed (its plugin did not fail)."""
    req = rig.run("echo")  # no retries
    rig.running(req)
    report = rig.sweeper.sweep()
    assert report.requeued == [req.invocation_id] and report.suspected == []
    record = rig.status(req)
    assert record["status"] == "queued" and record["attempts"] == 1
    assert "its worker gone@host stopped holding it" in record["reason"]
    assert rig.conn.llen(rig.settings.task_queue) == 1  # sent again


def test_a_run_whose_process_keeps_dying_is_lost_with_a_failure_event(rig: Rig) -> None:
    req = rig.run("echo")
    counted = {"plugin": "echo", "status": "lost"}
    before = REGISTRY.get_sample_value("titan_invocations_total", counted) or 0
    for _ in range(rig.settings.max_requeues):
        rig.running(req)
        assert rig.sweeper.sweep().requeued == [req.invocation_id]
    rig.running(req)
    report = rig.sweeper.sweep()
    assert report.lost == [req.invocation_id] and report.requeued == []
    lost = rig.status(req)
    assert lost["status"] == "lost" and "gone@host" in lost["reason"]
    assert lost["requeues"] == rig.settings.max_requeues
    failure = Bus(rig.conn, rig.settings).result_of(req.event.event_id, timeout=5)
    assert failure["event_type"] == "invocation_failed"
    assert failure["payload"]["status"] == "lost"
    assert failure["payload"]["reason"] == lost["reason"]
    assert REGISTRY.get_sample_value("titan_invocations_total", counted) == before + 1
    assert rig.sweeper.sweep(time.time() + rig.patience + 1).lost == []  # judged once
    assert rig.conn.zscore(rig.keys.inflight, req.invocation_id) is None


def test_a_held_runs_deadline_moves_on_with_its_lease(rig: Rig) -> None:
    """The process running a run renews its lease and its deadline together; once the run
    is stored, a late renewal extends neither."""
    req = rig.run("echo")
    rig.running(req, "alive@host")
    slots = wired(rig.conn, rig.settings).slots
    slots.hold(req.plugin, req.invocation_id, "alive@host", take=True)
    deadline = rig.conn.zscore(rig.keys.inflight, req.invocation_id)
    assert time.time() + LEASE_TTL_S < deadline <= time.time() + HELD_FOR_S + 1
    assert rig.sweeper.sweep().requeued == []
    assert rig.dispatcher.records.store(req.invocation_id, Outcome(Status.SUCCEEDED)).applied
    slots.hold(req.plugin, req.invocation_id, "alive@host")
    assert rig.conn.zscore(rig.keys.inflight, req.invocation_id) is None
    assert rig.conn.get(rig.keys.lease(req.invocation_id)) is None


def test_a_lease_lost_with_a_failover_is_taken_back_by_its_live_holder(rig: Rig) -> None:
    """A promoted replica may lack the last renewals: the process still running the run
    takes its lease back (the record says the run is its own), so the sweeper never
    re-queues a live run; a holder the record does not name gets nothing."""
    req = rig.run("echo")
    rig.running(req, "alive@host")
    slots = wired(rig.conn, rig.settings).slots
    lease = rig.keys.lease(req.invocation_id)
    rig.conn.delete(lease)
    slots.hold(req.plugin, req.invocation_id, "stale@host")
    assert rig.conn.get(lease) is None
    slots.hold(req.plugin, req.invocation_id, "alive@host")
    assert rig.conn.get(lease) == b"alive@host"
    rig.conn.zadd(rig.keys.inflight, {req.invocation_id: 0})
    assert rig.sweeper.sweep().requeued == []  # held


def test_a_run_re_queued_too_often_is_lost(rig: Rig) -> None:
    req = rig.run(sent=False)
    for n in range(rig.settings.max_requeues):
        rig.conn.delete(rig.settings.task_queue)
        rig.conn.zadd(rig.keys.inflight, {req.invocation_id: 0})
        rig.sweeper.sweep()
        assert rig.sweeper.sweep(time.time() + rig.patience + 1).requeued == [req.invocation_id]
        assert rig.status(req)["requeues"] == n + 1
    rig.conn.delete(rig.settings.task_queue)
    rig.conn.zadd(rig.keys.inflight, {req.invocation_id: 0})
    rig.sweeper.sweep()
    assert rig.sweeper.sweep(time.time() + rig.patience + 1).lost == [req.invocation_id]


def test_finished_runs_are_dropped_from_the_sweepers_view(rig: Rig) -> None:
    req = rig.run()
    rig.running(req, "alive@host")
    assert rig.dispatcher.records.store(req.invocation_id, Outcome(Status.SUCCEEDED)).applied
    rig.conn.zadd(rig.keys.inflight, {req.invocation_id: 0})  # a deadline left behind
    assert rig.sweeper.sweep(time.time() + rig.patience + 1).lost == []
    assert rig.conn.zscore(rig.keys.inflight, req.invocation_id) is None


def test_one_sweeper_at_a_time(rig: Rig) -> None:
    req = rig.run(sent=False)
    rig.conn.set(rig.keys.sweep_lock, "another-process", px=60_000)
    assert rig.sweeper.sweep().suspected == []  # the other one is sweeping
    rig.conn.delete(rig.keys.sweep_lock)
    assert rig.sweeper.sweep().suspected == [req.invocation_id]
