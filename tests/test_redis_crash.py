"""Nothing lost through a Redis crash, and no run left `running` forever (SPEC §4): a
SIGKILLed Redis mid-burst, a Redis outage while the outcome is being stored, a run whose
worker and message both vanished, and an event the API answered 202 to."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
import redis

from harness import (
    Bus,
    RedisProxy,
    RedisServer,
    WorkerProcess,
    broker_drained,
    isolated,
    new_id,
    private_settings,
    record_of,
    records_of,
    wait_until,
    wired,
)
from manager.api.app import create_app
from manager.bus.dispatch import Dispatcher
from manager.bus.listener import Listener
from manager.bus.sweeper import Sweeper
from manager.core.config import Settings
from manager.core.contract import make_celery, queued_tasks
from manager.core.events import Event
from manager.core.keys import Keys
from manager.core.slots import LEASE_TTL_S
from manager.plugins.registry import Registry
from workers.container import remove_container

pytestmark = pytest.mark.integration
OUTAGE_S = 1.0  # how long Redis stays down (a duration under test, not a wait)
ACTIVE = ("pending", "queued", "throttled", "running", "retrying")


class CrashStack:
    """A private Redis with AOF on a persistent dir, a listener that also sweeps, and
    worker processes: what `make up` runs, at test scale."""

    def __init__(self, plugins_dir: Path, files_dir: Path, run_dir: Path,
                 workers: int = 1, **changes: object) -> None:
        self.server = RedisServer(persist=True)
        self.settings = private_settings(
            self.server.url, plugins_dir, run_dir, allowed_roots=(files_dir,),
            visibility_timeout=10, restore_interval=2, reclaim_idle_ms=2000, housekeeping_s=2,
            sweep_grace_s=5, sweep_interval_s=5, **changes)
        self.conn = redis.Redis.from_url(self.server.url)
        self.registry = Registry(wired(self.conn, self.settings))
        self.registry.reload()
        self.dispatcher = Dispatcher(wired(self.conn, self.settings),
                                     make_celery(self.settings.broker))
        listener_conn = redis.Redis.from_url(self.server.url)
        self.sweeper = Sweeper(wired(listener_conn, self.settings), self.dispatcher)
        self.listener = Listener(wired(listener_conn, self.settings),
                                 Registry(wired(listener_conn, self.settings)), self.dispatcher,
                                 housekeeping=self.sweeper.maybe_sweep)
        self.workers = [WorkerProcess(self.settings, f"crash{n}", concurrency=1)
                        for n in range(workers)]
        self.bus = Bus(self.conn, self.settings)
        for w in self.workers:
            w.wait_ready(self.conn)
        threading.Thread(target=self.listener.run, daemon=True).start()

    def close(self) -> None:
        self.listener.stop()
        for w in self.workers:
            w.stop()
        self.server.stop()
        shutil.rmtree(self.settings.cache_dir, ignore_errors=True)


@pytest.fixture
def crash_stack(plugins_dir, files_dir, tmp_path) -> Iterator[CrashStack]:
    stack = CrashStack(plugins_dir, files_dir, tmp_path, workers=2)
    yield stack
    stack.close()


def results_by_cause(conn: redis.Redis, settings: Settings) -> Counter:
    counts: Counter = Counter()
    for _, fields in conn.xrange(settings.event_stream):
        event = json.loads(fields[b"event"])
        if event.get("causation_id"):
            counts[event["causation_id"]] += 1
    return counts


def test_a_redis_crash_mid_burst_loses_nothing_and_doubles_nothing(crash_stack) -> None:
    s = crash_stack
    events = [new_id("burst") for _ in range(30)]
    for event_id in events:
        s.bus.publish({"event_id": event_id, "topic": "test.v1", "event_type": "ping"})
    wait_until(lambda: any(r["status"] == "running" for r in records_of(s.conn, s.settings,
                                                                        "echo")), 30,
               "runs in flight")
    s.server.crash()
    time.sleep(OUTAGE_S)
    s.server.start()  # same port, same AOF directory, as `make up` starts it

    def settled() -> bool:
        records = records_of(s.conn, s.settings, "echo", 500)
        done = [r for r in records if r["event_id"] in events and r["status"] not in ACTIVE]
        return len(done) >= len(events)

    wait_until(settled, 240, "every event to reach a terminal record")
    wait_until(lambda: broker_drained(s.conn, s.settings), 120, "the broker to drain")
    records = [r for r in records_of(s.conn, s.settings, "echo", 500) if r["event_id"] in events]
    per_event = Counter(r["event_id"] for r in records)
    assert all(per_event[e] == 1 for e in events), per_event
    assert {r["status"] for r in records} == {"succeeded"}, [
        (r["status"], r["reason"]) for r in records if r["status"] != "succeeded"]
    results = results_by_cause(s.conn, s.settings)
    assert all(results[e] == 1 for e in events), {e: results[e] for e in events}


def test_a_redis_outage_while_the_outcome_is_stored_ends_in_one_record_and_one_event(
        plugins_dir, files_dir, tmp_path) -> None:
    server = RedisServer(persist=True, tcp=True)
    proxy = RedisProxy(server)
    proxy.start()
    settings = private_settings(server.url, plugins_dir, tmp_path, allowed_roots=(files_dir,),
                                visibility_timeout=5, restore_interval=1)
    conn = redis.Redis.from_url(server.url)
    registry = Registry(wired(conn, settings))
    registry.reload()
    worker = WorkerProcess(settings.with_(redis_url=proxy.url), "outage", concurrency=1)
    try:
        worker.wait_ready(conn)
        event = Event(new_id("outage"), "test.v1", "sleep", {"seconds": 2})
        inv, _ = Dispatcher(wired(conn, settings), make_celery(settings.broker)).dispatch(
            event, registry.get("sleeper"), "api")
        # its container running (past `running`, the worker still reads the plugin's
        # bundle from Redis: an outage there is another test's case)
        wait_until(lambda: docker.from_env().containers.list(sparse=True, filters={
            "label": [f"titan.instance={settings.instance}", f"titan.invocation={inv}"],
            "status": "running"}), 60, "the run's container to start")
        proxy.stop()  # Redis vanishes for the worker while its container runs and finishes
        try:
            wait_until(lambda: "Redis unreachable" in worker.log.read_text(), 60,
                       "the worker to fail storing the outcome")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the record: {record_of(conn, settings, inv)}; the "
                                 f"worker's log: {worker.log.read_text()[-3000:]}") from None
        assert record_of(conn, settings, inv)["status"] == "running"
        proxy.start()
        done = wait_until(lambda: (r := record_of(conn, settings, inv))["status"] not in ACTIVE
                          and r, 90, "the outcome to be stored")
        # an acknowledgement lost with the old connection brings the message back after
        # the visibility timeout: the broker drains only once that delivery is done
        wait_until(lambda: broker_drained(conn, settings), 60, "the broker to drain")
        assert done["status"] == "succeeded" and done["attempts"] == 1, done
        assert record_of(conn, settings, inv)["attempts"] == 1
        assert results_by_cause(conn, settings)[event.event_id] == 1
        assert done["result_event_ids"] == [f"{inv}-r1"]
        log = worker.log.read_text()
        assert "Redis unreachable" in log and "retrying in" in log
    finally:
        worker.stop()
        proxy.stop()
        server.stop()
        shutil.rmtree(settings.cache_dir, ignore_errors=True)


def _drop_message(conn: redis.Redis, keys: Keys, invocation_id: str) -> None:
    """The task message vanishes: removed from kombu's unacknowledged set (kept under
    this instance's own prefix)."""
    assert not conn.exists("unacked"), "kombu's keys must carry the instance's prefix"
    for tag, raw in conn.hgetall(keys.unacked).items():
        if json.loads(raw)[0]["headers"]["id"] == invocation_id:
            conn.hdel(keys.unacked, tag)
            conn.zrem(keys.unacked_index, tag)
            return
    raise AssertionError("no unacknowledged message for the run")


def test_a_run_whose_worker_died_is_re_queued_one_lease_after_its_hold_lapsed(
        settings, conn, docker_client) -> None:
    """Its message gone too (kombu's visibility timeout is an hour here): the sweeper alone
    sends it again, once its deadline, renewed with its hold, has passed."""
    mine, registry = isolated(settings, conn, sweep_grace_s=1, visibility_timeout=3600)
    worker = WorkerProcess(mine, "vanishing", concurrency=1)
    sweeper = Sweeper(wired(conn, mine), Dispatcher(wired(conn, mine), make_celery(mine.broker)))
    try:
        worker.wait_ready(conn)
        event = Event(new_id("vanish"), "test.v1", "sleep", {"seconds": 30})
        inv, _ = Dispatcher(wired(conn, mine), make_celery(mine.broker)).dispatch(
            event, registry.get("sleeper"), "api")
        wait_until(lambda: record_of(conn, mine, inv).get("status") == "running", 60, "running")
        lease = Keys(mine.key_prefix).lease(inv)
        wait_until(lambda: conn.exists(lease), 20, "the worker to hold the run")
        renewed = conn.zscore(f"{mine.key_prefix}:inflight", inv)
        wait_until(lambda: conn.zscore(f"{mine.key_prefix}:inflight", inv) > renewed, 20,
                   "the hold to move the run's deadline on")
        os.killpg(worker.proc.pid, signal.SIGKILL)
        worker.proc.wait(10)
        _drop_message(conn, Keys(mine.key_prefix), inv)
        assert sweeper.sweep().requeued == []  # its deadline has not passed yet
        wait_until(lambda: not conn.exists(lease), 20, "the dead worker's lease to end")
        deadline = conn.zscore(f"{mine.key_prefix}:inflight", inv)
        assert time.time() < deadline <= time.time() + LEASE_TTL_S + 1  # one lease later
        assert sweeper.sweep().requeued == []
        report = sweeper.sweep(deadline + 0.1)
    finally:
        worker.stop()
        for c in docker_client.containers.list(
                all=True, filters={"label": f"titan.invocation={inv}"}):
            remove_container(c)
    assert report.requeued == [inv] and report.suspected == []
    again = record_of(conn, mine, inv)
    assert again["status"] == "queued" and again["requeues"] == 1, again
    assert "its worker vanishing@" in again["reason"], again
    assert queued_tasks(conn, mine.broker) == 1  # sent again


def test_a_pending_run_whose_message_never_reached_the_broker_is_sent_again(
        settings, conn) -> None:
    from manager.core.records import InvocationRecord

    mine, registry = isolated(settings, conn, sweep_grace_s=0)
    dispatcher = Dispatcher(wired(conn, mine), make_celery(mine.broker))
    req = registry.get("echo").request(Event(new_id(), "test.v1", "ping"), mine.plugin, "api",
                                       "vanished" + new_id())
    dispatcher.records.create(InvocationRecord.from_request(req), 0)
    sweeper = Sweeper(wired(conn, mine), dispatcher)
    assert sweeper.sweep().suspected == [req.invocation_id]
    assert sweeper.sweep().requeued == [req.invocation_id]
    worker = WorkerProcess(mine, "resend", concurrency=1)
    try:
        worker.wait_ready(conn)
        again = wait_until(lambda: (r := record_of(conn, mine, req.invocation_id))["status"]
                           not in ACTIVE and r, 60, "the re-queued run")
    finally:
        worker.stop()
    assert again["status"] == "succeeded" and again["requeues"] == 1 and again["attempts"] == 1


def test_an_event_answered_202_survives_a_redis_crash(plugins_dir, tmp_path) -> None:
    server = RedisServer(persist=True)
    try:
        settings = private_settings(server.url, plugins_dir, tmp_path)
        conn = redis.Redis.from_url(server.url)
        registry = Registry(wired(conn, settings))
        client = create_app(wired(conn, settings), registry,
                            Dispatcher(wired(conn, settings),
                                       make_celery(settings.broker))).test_client()
        event_id = new_id("durable")
        resp = client.post("/events", json={"event_id": event_id, "topic": "t", "event_type": "e"})
        assert resp.status_code == 202
        server.crash()  # at once: Redis writes its AOF before it answers
        server.start()
        conn = redis.Redis.from_url(server.url)
        stored = [json.loads(f[b"event"])["event_id"] for _, f in
                  conn.xrange(settings.event_stream)]
        assert stored == [event_id]
    finally:
        server.stop()
