"""Delivery: nothing lost and nothing run twice through crashes and outages. Each fault is
injected by the test itself: SIGKILL, SIGTERM, cutting the Docker engine, restarting Redis."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
import redis

from harness import (
    Bus,
    DockerProxy,
    RedisServer,
    WorkerProcess,
    caused_by,
    new_id,
    private_settings,
    record_of,
    records_of,
    wait_until,
    wired,
)
from manager.api.app import create_app
from manager.bus.dispatch import Dispatcher
from manager.bus.group import ensure_group
from manager.bus.listener import Listener
from manager.core.config import Settings
from manager.core.contract import make_celery
from manager.core.events import Event
from manager.core.records import InvocationRecord, Status
from manager.plugins.registry import Registry

pytestmark = pytest.mark.integration


def own(settings: Settings, **changes) -> Settings:
    """The session's stack with a queue (and limits) of this test's own."""
    return settings.with_(task_queue=f"{settings.task_queue}.{uuid.uuid4().hex[:6]}", **changes)


def dispatch(conn, settings: Settings, registry, plugin: str, topic: str, event_type: str,
             **payload) -> tuple[str, str]:
    event = Event(new_id(), topic, event_type, payload)
    invocation_id, _ = Dispatcher(wired(conn, settings), make_celery(settings.broker)).dispatch(
        event, registry.get(plugin), "api")
    return invocation_id, event.event_id


def record(conn, settings, invocation_id: str) -> dict:
    return record_of(conn, settings, invocation_id)


ACTIVE = (None, "pending", "queued", "throttled", "running", "retrying")


def finished(conn, settings, invocation_id: str, timeout: float = 90) -> dict:
    return wait_until(lambda: (r := record(conn, settings, invocation_id)).get("status")
                      not in ACTIVE and r, timeout, f"invocation {invocation_id} to finish")


def containers(client: docker.DockerClient, settings: Settings, invocation_id: str) -> list:
    return client.containers.list(all=True, sparse=True, filters={"label": [
        f"titan.instance={settings.instance}", f"titan.invocation={invocation_id}"]})


def test_worker_killed_mid_run_is_redelivered_and_runs_once(settings, conn, registry,
                                                             docker_client) -> None:
    mine = own(settings, visibility_timeout=3, restore_interval=2)
    first = WorkerProcess(mine, "victim", concurrency=1)
    second = None
    try:
        first.wait_ready(conn)
        inv, event_id = dispatch(conn, mine, registry, "sleeper", "test.v1", "sleep", seconds=3)
        wait_until(lambda: containers(docker_client, mine, inv), 60, "the run's container")
        os.killpg(first.proc.pid, signal.SIGKILL)
        first.proc.wait(10)
        second = WorkerProcess(mine, "rescuer", concurrency=1)  # same host: reaps the orphan
        second.wait_ready(conn)
        done = finished(conn, mine, inv, timeout=120)
    finally:
        first.stop()
        if second:
            second.stop()
    assert done["status"] == "succeeded" and done["attempts"] == 2, done
    assert done["worker"].startswith("rescuer@")
    results = caused_by(conn, mine, event_id)
    assert [e["event_type"] for e in results] == ["slept"]
    assert done["result_event_ids"] == [results[0]["event_id"]]
    assert not containers(docker_client, mine, inv)


def test_pending_entries_of_a_dead_listener_are_reclaimed_without_duplicates(
        settings, conn, registry, dispatcher, worker) -> None:
    # reclaim_idle_ms=0: pending entries are taken over however briefly they were idle
    mine = settings.with_(event_stream=f"{settings.event_stream}.reclaim", reclaim_idle_ms=0)
    ensure_group(conn, mine.stream)
    crashed_before = {"event_id": new_id(), "topic": "test.v1", "event_type": "ping"}
    crashed_after = {"event_id": new_id(), "topic": "test.v1", "event_type": "ping"}
    for event in (crashed_before, crashed_after):
        conn.xadd(mine.event_stream, {"event": json.dumps(event)})
    # A listener read both, dispatched the second, and died before acknowledging either.
    read = conn.xreadgroup(mine.consumer_group, "dead-listener", {mine.event_stream: ">"})
    assert len(read[0][1]) == 2
    dispatcher.dispatch(Event.from_dict(crashed_after), registry.get("echo"))
    rescuer = Listener(wired(conn, mine), registry, dispatcher, "rescuer")
    assert rescuer.reclaim() == 2
    rescuer.flush()  # its acknowledgements would ride with its next read
    assert conn.xpending(mine.event_stream, mine.consumer_group)["pending"] == 0
    for event in (crashed_before, crashed_after):
        runs = [r for r in records_of(conn, settings, "echo", 500)
                if r["event_id"] == event["event_id"]]
        assert len(runs) == 1, runs
        assert finished(conn, settings, runs[0]["invocation_id"])["status"] == "succeeded"


@pytest.fixture
def proxied(settings, conn) -> Iterator[tuple[Settings, DockerProxy, WorkerProcess]]:
    proxy = DockerProxy()
    proxy.start()
    mine = own(settings, sandbox_patience_s=3, retry_backoff_max=1)
    worker = WorkerProcess(mine, "proxied", concurrency=1, DOCKER_HOST=proxy.url)
    try:
        worker.wait_ready(conn)
        yield mine, proxy, worker
    finally:
        proxy.start() if proxy.server is None else None
        worker.stop()
        proxy.stop()


def test_docker_engine_outage_is_retried_then_succeeds(proxied, conn, registry) -> None:
    mine, proxy, _ = proxied
    proxy.stop()
    inv, _ = dispatch(conn, mine, registry, "echo", "test.v1", "ping")
    retrying = wait_until(lambda: (r := record(conn, mine, inv)).get("status") == "retrying"
                          and r, 60, "status retrying")
    assert retrying["reason"].startswith("sandbox_unavailable")
    proxy.start()
    done = finished(conn, mine, inv)
    assert done["status"] == "succeeded" and done["attempts"] >= 2, done


def test_docker_engine_outage_past_the_budget_fails_visibly(proxied, conn, registry) -> None:
    mine, proxy, _ = proxied
    proxy.stop()
    inv, event_id = dispatch(conn, mine, registry, "echo", "test.v1", "ping")
    done = finished(conn, mine, inv)
    assert done["status"] == "failed" and done["attempts"] >= 2, done  # waited out first
    assert done["reason"].startswith("sandbox_unavailable: ")
    assert done["reason"].endswith(" s, TITAN_SANDBOX_PATIENCE_S)"), done["reason"]
    (failure,) = caused_by(conn, mine, event_id)
    assert failure["event_type"] == "invocation_failed"
    assert failure["payload"]["reason"] == done["reason"]


def test_plugin_failures_are_retried_only_when_the_manifest_says_so(settings, conn, registry,
                                                                    worker) -> None:
    inv, event_id = dispatch(conn, settings, registry, "flaky", "test.v1", "flaky")
    done = finished(conn, settings, inv)
    assert done["status"] == "failed" and done["attempts"] == 3  # retries: 2
    assert len(caused_by(conn, settings, event_id)) == 1  # one failure event, at the end
    inv, _ = dispatch(conn, settings, registry, "failing", "test.v1", "fail")
    assert finished(conn, settings, inv)["attempts"] == 1


def test_plugins_triggering_each_other_stop_at_the_hops_limit(settings, conn,
                                                              stack) -> None:
    bus = Bus(conn, settings)
    start = new_id("loop")
    bus.publish({"event_id": start, "topic": "loop.v1", "event_type": "a"})
    dead = bus.wait_event(lambda d: d.get("reason") == "hops_exceeded"
                          and d["event"].get("correlation_id") == start,
                          timeout=120, stream=settings.dead_stream)
    assert dead["event"]["hops"] == settings.max_hops + 1
    assert dead["detail"] == f"hops {settings.max_hops + 1} is over the limit {settings.max_hops}"


def test_concurrency_caps_parallel_runs_and_others_are_not_starved(settings, conn, registry,
                                                                   worker) -> None:
    invs = [dispatch(conn, settings, registry, "limited", "test.v1", "limited")[0]
            for _ in range(4)]
    other, _ = dispatch(conn, settings, registry, "echo", "test.v1", "ping")
    other_done = finished(conn, settings, other, timeout=120)
    runs = sorted((finished(conn, settings, i, timeout=120) for i in invs),
                  key=lambda r: r["started_at"])
    assert all(r["status"] == "succeeded" for r in runs), runs
    for earlier, later in itertools.pairwise(runs):
        assert later["started_at"] >= earlier["finished_at"], (earlier, later)
    assert other_done["finished_at"] < runs[-1]["finished_at"]  # not stuck behind the flood
    # the slot is freed in the step that stores the outcome (which is what ended the wait)
    assert conn.zcard(f"{settings.key_prefix}:plugin:limited:slots") == 0


def test_graceful_shutdown_finishes_the_run_in_flight(settings, conn, registry,
                                                      docker_client) -> None:
    mine = own(settings)
    worker = WorkerProcess(mine, "graceful", concurrency=1)
    try:
        worker.wait_ready(conn)
        inv, _ = dispatch(conn, mine, registry, "sleeper", "test.v1", "sleep", seconds=2)
        wait_until(lambda: containers(docker_client, mine, inv), 60, "the run's container")
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.proc.wait(60) == 0
    finally:
        worker.stop()
    done = record(conn, mine, inv)
    assert done["status"] == "succeeded" and done["attempts"] == 1, done


def test_redis_restart_is_survived_by_listener_workers_and_api(plugins_dir: Path,
                                                               tmp_path: Path) -> None:
    server = RedisServer(persist=True)
    mine = private_settings(server.url, plugins_dir, tmp_path)
    conn = redis.Redis.from_url(mine.redis_url)
    registry = Registry(wired(conn, mine))
    registry.reload()
    dispatcher = Dispatcher(wired(conn, mine), make_celery(mine.broker))
    listener = Listener(wired(redis.Redis.from_url(mine.redis_url), mine),
                        Registry(wired(redis.Redis.from_url(mine.redis_url), mine)), dispatcher)
    thread = threading.Thread(target=listener.run, daemon=True)
    worker = WorkerProcess(mine, "survivor", concurrency=1)
    client = create_app(wired(conn, mine), registry, dispatcher).test_client()
    bus = Bus(conn, mine)
    try:
        worker.wait_ready(conn)
        thread.start()
        first = new_id()
        bus.publish({"event_id": first, "topic": "test.v1", "event_type": "ping"})
        assert bus.result_of(first)["event_type"] == "pong"
        server.stop(keep_data=True)
        down = client.get("/health")
        assert down.status_code == 503 and down.json["redis"]["ok"] is False
        server.start()
        wait_until(lambda: client.get("/health").status_code == 200, 60, "health to recover")
        second = new_id()
        wait_until(lambda: bus.publish({"event_id": second, "topic": "test.v1",
                                        "event_type": "ping"}), 30, "publishing again")
        assert bus.result_of(second, timeout=90)["event_type"] == "pong"
    finally:
        listener.stop()
        worker.stop()
        server.stop()
        shutil.rmtree(mine.cache_dir, ignore_errors=True)


def test_retention_trims_by_age_and_length_and_records_expire(settings, conn) -> None:
    mine = settings.with_(event_stream=f"{settings.event_stream}.retention",
                          dead_stream=f"{settings.dead_stream}.retention", stream_max_age=60,
                          stream_maxlen=50, record_ttl=120)
    old_ms = int((time.time() - 3600) * 1000)
    for n in range(5):
        conn.xadd(mine.event_stream, {"event": "{}"}, id=f"{old_ms + n}-0")
    from manager.api.context import publish_event

    for _ in range(500):
        publish_event(conn, mine.stream, mine.redis, Event(new_id(), "t", "e"))
    Listener(wired(conn, mine), Registry(wired(conn, mine)), None).trim()  # type: ignore[arg-type]
    entries = conn.xrange(mine.event_stream)
    assert all(int(e[0].split(b"-")[0]) > old_ms + 10 for e in entries)
    assert len(entries) <= mine.stream_maxlen + 100  # MAXLEN ~ trims whole nodes
    store = wired(conn, mine).records
    store.create(InvocationRecord("ret-1", "retention_probe", "1.0.0", "sha256:x", "e", "t",
                                  "e", "api", Status.QUEUED, time.time()), 60)
    assert store.get("ret-1").status is Status.QUEUED
    assert 0 < conn.ttl(f"{settings.key_prefix}:inv:ret-1") <= 120
