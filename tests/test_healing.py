"""Workers heal themselves after an engine outage, and the listener keeps one bad stream
entry from delaying the others."""

from __future__ import annotations

import glob
import json
import re
import time
import uuid
from typing import Any

import pytest

from harness import (
    Bus,
    DockerProxy,
    PrivateEngine,
    WorkerProcess,
    new_id,
    record_of,
    records_of,
    running_a_plugin,
    wait_until,
    wired,
)
from manager.bus.dispatch import Dispatcher
from manager.bus.group import ensure_group
from manager.bus.listener import Listener
from manager.core.contract import make_celery
from manager.core.events import Event
from manager.plugins.loader import PluginEntry
from workers.container import remove_container

pytestmark = pytest.mark.integration
ACTIVE = ("pending", "queued", "throttled", "running", "retrying")


def pool_children(pid: int) -> list[int]:
    children: list[int] = []
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        with open(path) as fh:
            children += [int(p) for p in fh.read().split()]
    return children


def test_containers_left_by_an_engine_outage_are_reaped_without_a_restart(
        settings, conn, registry, docker_client) -> None:
    mine = settings.with_(task_queue=f"{settings.task_queue}.heal", retry_backoff_max=1)
    labelled = {"label": [f"titan.instance={mine.instance}", f"titan.host={mine.worker_name}"]}
    runs = {"label": [*labelled["label"], "titan.invocation"]}  # idle prewarmed ones stay
    proxy = DockerProxy()
    proxy.start()
    worker = WorkerProcess(mine, "healing", concurrency=2, DOCKER_HOST=proxy.url)
    try:
        worker.wait_ready(conn)
        pid = worker.proc.pid
        dispatcher = Dispatcher(wired(conn, mine), make_celery(mine.broker))
        invs = [dispatcher.dispatch(Event(new_id("heal"), "test.v1", "ping"),
                                    registry.get("echo"), "api")[0] for _ in range(12)]
        wait_until(lambda: any(record_of(conn, mine, i).get("status") == "running"
                               for i in invs), 60, "runs in flight")
        proxy.stop()  # the engine goes away mid-burst ...
        unfinished = [i for i in invs if record_of(conn, mine, i)["status"] in ACTIVE]
        assert unfinished, "the burst finished before the outage: it would test nothing"
        time.sleep(2)  # the length of the outage
        proxy.start()  # ... and comes back
        for inv in invs:
            wait_until(lambda inv=inv: record_of(conn, mine, inv)["status"] not in ACTIVE, 120,
                       "the burst to finish")
        outcomes = [record_of(conn, mine, i) for i in invs]
        assert {r["status"] for r in outcomes} == {"succeeded"}, [
            (r["status"], r["reason"], r["warm"]) for r in outcomes]
        # What a create that reached the engine while its answer was lost leaves behind:
        # a container of one of this worker's processes that no run uses.
        child = pool_children(pid)[0]
        leaked = f"leaked-{uuid.uuid4().hex[:6]}"
        docker_client.containers.create(mine.runtime_image, ["sleep", "60"], labels={
            "titan.managed": "1", "titan.instance": mine.instance,
            "titan.host": mine.worker_name, "titan.worker_pid": str(child),
            "titan.invocation": leaked})
        wait_until(lambda: not docker_client.containers.list(all=True, sparse=True,
                                                             filters=runs), 15,
                   "every leftover container to be reaped")
        assert worker.proc.poll() is None and worker.proc.pid == pid  # never restarted
        # by the heartbeat, which says so just after the removal (in the same beat as a
        # leftover of the outage, at times)
        wait_until(lambda: re.search(rf"reaped \d+ container\(s\) no run uses: .*{leaked}",
                                     worker.log.read_text()), 15, "the heartbeat's report")
    finally:
        worker.stop()
        proxy.stop()
        for c in docker_client.containers.list(all=True, sparse=True, filters=labelled):
            remove_container(c)


class PoisonedDispatcher(Dispatcher):
    """Fails for one event, as a bug or a broken dependency would."""

    poison = ""

    def dispatch(self, event: Event, plugin: PluginEntry, origin: str = "bus",
                 **kwargs: Any) -> tuple[str, bool]:
        if event.event_id == self.poison:
            raise RuntimeError("poison pill")
        return super().dispatch(event, plugin, origin, **kwargs)


def test_a_poisoned_entry_delays_none_of_its_batch_and_is_dead_lettered(settings, conn,
                                                                        registry) -> None:
    uid = uuid.uuid4().hex[:6]
    mine = settings.with_(event_stream=f"{settings.event_stream}.{uid}",
                          dead_stream=f"{settings.dead_stream}.{uid}",
                          task_queue=f"{settings.task_queue}.{uid}", max_deliveries=3,
                          reclaim_idle_ms=0)
    ensure_group(conn, mine.stream)
    dispatcher = PoisonedDispatcher(wired(conn, mine), make_celery(mine.broker))
    events = [new_id("batch") for _ in range(10)]
    dispatcher.poison = events[4]
    for event_id in events:
        conn.xadd(mine.event_stream, {"event": json.dumps(
            {"event_id": event_id, "topic": "test.v1", "event_type": "ping"})})
    listener = Listener(wired(conn, mine), registry, dispatcher, consumer="c1")
    assert listener.poll() == 10  # one batch: nine dispatched, the poisoned one pending
    listener.flush()  # the acknowledgements ride with the next read; send them now
    dispatched = {r["event_id"] for r in records_of(conn, mine, "echo", 1000)}
    assert set(events) - dispatched == {events[4]}
    assert conn.xpending(mine.event_stream, mine.consumer_group)["pending"] == 1
    assert listener.reclaim() == 1  # second delivery: still pending
    assert conn.xlen(mine.dead_stream) == 0
    assert listener.reclaim() == 1  # third: dead-lettered
    listener.flush()
    (_, dead), = conn.xrange(mine.dead_stream)
    assert dead[b"reason"] == b"unprocessable"
    assert dead[b"detail"] == b"failed 3 times; last error: RuntimeError: poison pill"
    assert json.loads(dead[b"event"])["event_id"] == events[4]
    assert conn.xpending(mine.event_stream, mine.consumer_group)["pending"] == 0


def serving(docker_client, settings, event_id: str, within: float = 30) -> object:
    """The container of this test instance whose plugin process runs `event_id` now (not
    the one a run before it is leaving)."""
    def find() -> object | None:
        for c in docker_client.containers.list(
                filters={"label": f"titan.instance={settings.instance}"}):
            try:
                if running_a_plugin(c, event_id):
                    return c
            except Exception:
                continue
        return None

    return wait_until(find, within, "a container running a plugin")


@pytest.mark.parametrize(("plugin", "warm"), [("sleeper", True), ("sleeper_cold", False)])
def test_a_container_stopped_from_outside_is_retried_not_failed(
        plugin: str, warm: bool, settings, conn, registry, docker_client) -> None:
    """An engine shutdown or a `docker stop` from outside is never the plugin's failure,
    on either path: the run is retried (sandbox_unavailable) and succeeds once."""
    uid = uuid.uuid4().hex[:8]  # a worker of its own: an empty pool, its own label
    mine = settings.with_(task_queue=f"{settings.task_queue}.stop{uid}",
                          instance=f"{settings.instance}-stop{uid}", retry_backoff_max=1)
    worker = WorkerProcess(mine, f"stopped{uid}", concurrency=1)
    dispatcher = Dispatcher(wired(conn, mine), make_celery(mine.broker))
    entry = registry.get(plugin)
    try:
        worker.wait_ready(conn)
        if warm:  # its first run is cold and leaves a prewarmed container behind
            primer = dispatcher.dispatch(Event(new_id("prime"), "test.v1", "sleep",
                                               {"seconds": 0}), entry, origin="api")[0]
            wait_until(lambda: record_of(conn, mine, primer).get("status") == "succeeded",
                       60, "the priming run")
            # ready, as the worker logs it (listed by the engine is not ready yet)
            wait_until(lambda: f"prewarmed {plugin} " in worker.log.read_text(), 30,
                       "a prewarmed one")
        event = Event(new_id("stopped"), "test.v1", "sleep", {"seconds": 8})
        invocation, _ = dispatcher.dispatch(event, entry, origin="api")
        container = serving(docker_client, mine, event.event_id)
        assert (container.labels.get("titan.pool") == "1") is warm, container.labels
        container.stop(timeout=1)
        record = wait_until(lambda: (r := record_of(conn, mine, invocation))
                            and r["status"] not in ACTIVE and r, 120, "the run to finish")
        assert record["status"] == "succeeded" and record["attempts"] == 2, record
        assert record["container_id"] != container.id
        result = Bus(conn, mine).result_of(event.event_id)
        assert result["event_type"] == "slept"
    finally:
        worker.stop()


@pytest.mark.parametrize("away_s", [0, 90])
def test_an_engine_stopped_during_warm_runs_fails_no_run(settings, conn, registry,
                                                         away_s: int) -> None:
    """The engine goes down (SIGTERM: it stops every container, prewarmed ones and runs
    in flight) and comes back during a burst, at once or 90 s later (far past the old
    count of quick tries, within TITAN_SANDBOX_PATIENCE_S): no run is the plugin's
    failure; every event ends succeeded, exactly once."""
    uid = uuid.uuid4().hex[:8]
    engine = PrivateEngine(settings.runtime_image)
    mine = settings.with_(task_queue=f"{settings.task_queue}.engine{uid}",
                          event_stream=f"{settings.event_stream}.engine{uid}",
                          instance=f"{settings.instance}-engine{uid}", retry_backoff_max=2)
    worker = WorkerProcess(mine, f"engine{uid}", concurrency=2, DOCKER_HOST=engine.url)
    dispatcher = Dispatcher(wired(conn, mine), make_celery(mine.broker))
    entry = registry.get("sleeper")
    try:
        worker.wait_ready(conn)
        primers = [dispatcher.dispatch(Event(new_id("prime"), "test.v1", "sleep",
                                             {"seconds": 0}), entry, origin="api")[0]
                   for _ in range(2)]
        wait_until(lambda: all(record_of(conn, mine, i).get("status") == "succeeded"
                               for i in primers), 120, "the priming runs")
        events = [Event(new_id("outage"), "test.v1", "sleep", {"seconds": 2})
                  for _ in range(10)]
        invs = [dispatcher.dispatch(e, entry, origin="api")[0] for e in events]
        wait_until(lambda: sum(record_of(conn, mine, i).get("warm") is not None
                               or record_of(conn, mine, i).get("status") == "running"
                               for i in invs) >= 2, 60, "runs in flight")
        engine.stop()  # ... the engine goes down mid-burst ...
        assert [i for i in invs if record_of(conn, mine, i)["status"] in ACTIVE]
        time.sleep(away_s)  # the length of the outage
        engine.start()  # ... and comes back
        records = [wait_until(lambda i=i: (r := record_of(conn, mine, i))
                              and r["status"] not in ACTIVE and r, 240, "every run to end")
                   for i in invs]
        assert [r["status"] for r in records] == ["succeeded"] * 10, [
            (r["status"], r["reason"]) for r in records]
        assert any(r["attempts"] > 1 for r in records), "the outage hit no run"
        # (a prewarm the outage stopped says nothing of the image: the pool starts others)
        assert any(r["warm"] for r in records), ("no run was warm", [
            (r["attempts"], r["warm"]) for r in records])
        for event in events:
            caused = [e for _, f in conn.xrange(mine.event_stream)
                      if (e := json.loads(f[b"event"])).get("causation_id") == event.event_id]
            assert len(caused) == 1 and caused[0]["event_type"] == "slept", caused
    finally:
        worker.stop()
        engine.destroy()
