"""The lanes every attack runs on (fixtures, registered by tests/conftest.py): prewarmed
containers (the product's default) or cold ones, each with the container alone between
the plugin and the kernel, or gVisor as well; and `attack`, one run of the hostile plugin
through the real path (event on the bus -> listener -> Celery worker -> Docker)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from harness import Bus, WorkerProcess, new_id, records_of, wait_until, wired
from manager.bus.dispatch import Dispatcher
from manager.bus.listener import Listener
from manager.core.config import Settings
from manager.core.contract import make_celery
from manager.plugins.registry import Registry


@dataclass
class Lane:
    """Where attacks run: prewarmed containers (the product's default) or cold ones, each
    with the container alone between the plugin and the kernel, or gVisor as well."""

    name: str
    bus: Bus
    settings: Settings
    worker: WorkerProcess

    @property
    def warm(self) -> bool:
        return not self.name.endswith("cold")

    @property
    def gvisor(self) -> bool:
        return self.name.startswith("gvisor")


@pytest.fixture(scope="module", params=["warm", "cold", "gvisor-warm", "gvisor-cold"])
def lane(request, conn, settings) -> Iterator[Lane]:
    """Each lane has its own stream, queue, listener and worker, so that what one test
    file left running on the session's worker never holds a lane's slots."""
    name = request.param
    mine = settings.with_(event_stream=f"{settings.event_stream}.{name}",
                          task_queue=f"{settings.task_queue}.{name}",
                          prewarm_size=0 if name.endswith("cold") else settings.prewarm_size,
                          isolation="gvisor" if name.startswith("gvisor") else "container")
    lane_worker = WorkerProcess(mine, name, concurrency=2, TITAN_ISOLATION=mine.isolation)
    listener_conn = redis.Redis.from_url(mine.redis_url)
    lane_listener = Listener(wired(listener_conn, mine), Registry(wired(listener_conn, mine)),
                             Dispatcher(wired(conn, mine), make_celery(mine.broker)))
    thread = threading.Thread(target=lane_listener.run, daemon=True)
    try:
        lane_worker.wait_ready(conn)
        thread.start()
        yield Lane(name, Bus(conn, mine), mine, lane_worker)
    finally:
        lane_listener.stop()
        lane_worker.stop()


@pytest.fixture
def attack(lane: Lane, conn, docker_client):
    """Runs one attack on this lane; returns (record, the event it caused)."""
    bus, settings, worker = lane.bus, lane.settings, lane.worker

    def run(name: str, timeout: float = 60, **payload: Any) -> tuple[dict, dict]:
        event_id = new_id(name.replace("_", "-"))
        bus.publish({"event_id": event_id, "topic": "hostile.v1", "event_type": "attack",
                     "payload": {"attack": name, **payload}})
        caused = bus.result_of(event_id, timeout=timeout)
        record = next(r for r in records_of(conn, settings, "hostile", 50)
                      if r["event_id"] == event_id)
        if not lane.warm:
            assert not record["warm"], "the cold lane ran warm"
        assert worker.proc.poll() is None, "the worker died"
        gone = lambda: not docker_client.containers.list(  # noqa: E731
            all=True, sparse=True, filters={"id": record["container_id"]})
        if record["container_id"]:  # removed afterwards (in the background, when warm)
            wait_until(gone, 15, "the run's container to be removed")
        return record, caused

    return run


def report(result: tuple[dict, dict]) -> dict:
    record, caused = result
    assert record["status"] == "succeeded", record
    return caused["payload"]
