"""Redis is no longer a single point of failure: a primary, a replica and three Sentinels
(private ports), every client finding the primary through the Sentinels. The primary is
SIGKILLed during a burst; Sentinel promotes the replica; every accepted event still ends
with exactly one succeeded record and one result event, nobody restarting anything; the
old primary, started again, rejoins as a replica. With TITAN_REDIS_MIN_REPLICAS=1 an
event is accepted only once a replica has it: with the replica stopped, the API answers
503 naming it, and nothing is lost."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from harness import WorkerProcess, free_port, new_id, private_settings, record_of, wait_until
from manager.api.app import create_app
from manager.bus.dispatch import Dispatcher
from manager.bus.listener import Listener
from manager.core.clients import redis_client
from manager.core.config import Settings
from manager.core.contract import make_celery
from manager.plugins.registry import Registry

pytestmark = pytest.mark.integration
PASSWORD = uuid.uuid4().hex
ACTIVE = ("pending", "queued", "throttled", "running", "retrying")


class Node:
    """One redis-server (a data node, or a Sentinel) on a free port, with its own dir."""

    def __init__(self, root: Path, name: str, lines: list[str], sentinel: bool = False):
        self.port = free_port()
        self.dir = root / name
        self.dir.mkdir()
        self.conf = self.dir / "redis.conf"
        self.conf.write_text("\n".join([f"port {self.port}", "bind 127.0.0.1",
                                        f"dir {self.dir}", f"requirepass {PASSWORD}",
                                        *lines]) + "\n")
        self.sentinel = sentinel
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        args = ["redis-server", str(self.conf)] + (["--sentinel"] if self.sentinel else [])
        self.proc = subprocess.Popen(args, stdout=(self.dir / "log").open("ab"),
                                     stderr=subprocess.STDOUT)
        wait_until(lambda: self.ping(), 20, f"redis on {self.port}")

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=PASSWORD, socket_timeout=2)

    def ping(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def role(self) -> str:
        return self.client().info("replication")["role"]

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class Cluster:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="titan-ha-"))
        data = ["appendonly yes", "appendfsync everysec", 'save ""', f"masterauth {PASSWORD}"]
        self.primary = Node(self.root, "primary", data)
        self.replica = Node(self.root, "replica",
                            [*data, f"replicaof 127.0.0.1 {self.primary.port}"])
        wait_until(lambda: self.replica.client().info("replication")["master_link_status"]
                   == "up", 30, "the replica to sync")
        self.sentinels = [Node(self.root, f"sentinel{n}", [
            f"sentinel monitor titan 127.0.0.1 {self.primary.port} 2",
            f"sentinel auth-pass titan {PASSWORD}",
            "sentinel down-after-milliseconds titan 1000",
            "sentinel failover-timeout titan 5000"], sentinel=True) for n in range(3)]
        wait_until(lambda: all(int(s.client().sentinel_master("titan")["num-other-sentinels"])
                               == 2 for s in self.sentinels), 30, "the Sentinels to meet")

    def settings(self, plugins_dir: Path, run_dir: Path, **extra: object) -> Settings:
        return private_settings(
            f"redis://default:{PASSWORD}@127.0.0.1:{self.primary.port}/0", plugins_dir,
            run_dir, redis_sentinels=",".join(f"127.0.0.1:{s.port}" for s in self.sentinels),
            redis_master="titan", redis_min_replicas=1, **extra)

    def close(self) -> None:
        for node in (*self.sentinels, self.replica, self.primary):
            node.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    yield c
    c.close()


@pytest.fixture
def ha_stack(cluster: Cluster, plugins_dir: Path, tmp_path: Path) -> Iterator[dict]:
    settings = cluster.settings(plugins_dir, tmp_path, visibility_timeout=20,
                                restore_interval=2, reclaim_idle_ms=3000, housekeeping_s=2)
    conn = redis_client(settings)
    Registry(conn, settings).reload()
    dispatcher = Dispatcher(conn, settings, make_celery(settings))
    listener_conn = redis_client(settings)
    listener = Listener(listener_conn, settings, Registry(listener_conn, settings), dispatcher)
    workers = [WorkerProcess(settings, f"ha{n}{uuid.uuid4().hex[:4]}", concurrency=1)
               for n in range(2)]
    thread = threading.Thread(target=listener.run, daemon=True)
    try:
        for w in workers:
            w.wait_ready(conn)
        thread.start()
        yield {"settings": settings, "conn": conn, "dispatcher": dispatcher,
               "client": create_app(settings, conn, Registry(conn, settings),
                                    dispatcher).test_client()}
    finally:
        listener.stop()
        for w in workers:
            w.stop()
        shutil.rmtree(settings.cache_dir, ignore_errors=True)


def publish(client, event_id: str) -> int:
    return client.post("/events", json={"event_id": event_id, "topic": "test.v1",
                                        "event_type": "ping"}).status_code


def test_a_primary_killed_mid_burst_loses_and_doubles_nothing(cluster: Cluster,
                                                              ha_stack: dict) -> None:
    s, conn, client = ha_stack["settings"], ha_stack["conn"], ha_stack["client"]
    events = [new_id("ha") for _ in range(40)]
    assert [publish(client, e) for e in events] == [202] * 40  # accepted: a replica has each

    def records() -> list[dict]:
        ids = conn.zrange(f"{s.key_prefix}:plugin:echo:invocations", 0, -1)
        return [r for i in ids if (r := record_of(conn, s, i.decode()))]

    wait_until(lambda: sum(r["status"] == "succeeded" for r in records()) >= 3, 120,
               "runs to succeed before the crash")
    cluster.primary.kill()  # ... the primary dies mid-burst; nobody restarts anything
    wait_until(lambda: cluster.replica.role() == "master", 60, "Sentinel to promote the replica")

    def settled() -> bool:
        done = [r for r in records() if r["event_id"] in events and r["status"] not in ACTIVE]
        return len({r["event_id"] for r in done}) >= len(events)

    try:
        wait_until(settled, 240, "every event to reach a terminal record on the new primary")
    except AssertionError:
        seen = {r["event_id"]: r["status"] for r in records()}
        missing = [e for e in events if e not in seen]
        raise AssertionError(f"statuses {sorted(seen.values())}, {len(missing)} events "
                             f"without a record") from None
    mine = [r for r in records() if r["event_id"] in events]
    assert sorted(r["event_id"] for r in mine) == sorted(events), "a run missing or doubled"
    assert {r["status"] for r in mine} == {"succeeded"}, [
        (r["status"], r["reason"]) for r in mine if r["status"] != "succeeded"]
    results: dict[str, int] = {}
    for _, fields in conn.xrange(s.event_stream):
        event = json.loads(fields[b"event"])
        if event.get("causation_id") in events:
            results[event["causation_id"]] = results.get(event["causation_id"], 0) + 1
    assert all(results.get(e) == 1 for e in events), results
    cluster.primary.start()  # the old primary comes back ... as a replica of the new one
    wait_until(lambda: cluster.primary.role() == "slave", 60, "the old primary to rejoin")


def test_an_event_no_replica_confirms_is_a_503_naming_the_replica(cluster: Cluster,
                                                                  ha_stack: dict) -> None:
    s, conn, client = ha_stack["settings"], ha_stack["conn"], ha_stack["client"]
    assert publish(client, new_id("before")) == 202
    cluster.replica.stop()
    event_id = new_id("unconfirmed")
    response = client.post("/events", json={"event_id": event_id, "topic": "test.v1",
                                            "event_type": "ping"})
    assert response.status_code == 503, response.json
    error = response.json["error"]
    assert error["code"] == "not_replicated" and "replica" in error["message"], error
    cluster.replica.start()
    kept = [json.loads(f[b"event"])["event_id"] for _, f in conn.xrange(s.event_stream)]
    assert event_id in kept  # on the primary all along: a 503 is "not confirmed", not "lost"
