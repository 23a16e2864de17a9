"""Fair in a crowd (fair queueing, manager.bus.dispatch.priority_of): a run's place in the
queue is its place in its plugin's line, so with five plugins' backlogs queued on two
slots, a sixth plugin's single run starts before any plugin's third run; a weight of 2
gives a plugin twice the turns of weight 1; the queue depth and the oldest waiting run
per plugin are visible in the API and the metrics; runs waiting for a plugin that a
reload removes still run, on the version they were matched to. Ordering is asserted,
never timing."""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import WorkerProcess, new_id, private_settings, record_of, wait_until, wired
from manager.api.app import create_app
from manager.bus.dispatch import Dispatcher, priority_of
from manager.core.contract import make_celery
from manager.core.events import Event
from manager.core.lines import Line, lines
from manager.core.metrics import StateCollector
from manager.core.records import InvocationRecord, Outcome, Status
from manager.plugins.registry import Registry

MANIFEST = """\
name: {name}
version: 1.0.0
triggers: [{{topic: crowd.v1, event_type: {name}}}]
entrypoint: python main.py
image: titan-runtime:py3.11
resources: {{cpu: "250m", memory: "64Mi"}}
weight: {weight}
"""
MAIN = """\
import json, os, time
time.sleep(float(json.loads(os.environ["EVENT_DATA"])["payload"].get("seconds", 0)))
print(json.dumps({"topic": "crowd.v1", "event_type": "done", "payload": {}}))
"""
SLOTS = 2
CROWD = [f"busy{n}" for n in range(1, 6)]
PLUGINS = {**dict.fromkeys(CROWD, 1), "newcomer": 1, "heavy": 2, "light": 1, "doomed": 1}


def test_a_runs_level_is_its_place_in_line_per_unit_of_weight() -> None:
    assert [priority_of(n, 1) for n in (0, 1, 2, 9, 50)] == [0, 1, 2, 9, 9]
    assert [priority_of(n, 2) for n in (0, 1, 2, 3, 19)] == [0, 0, 1, 1, 9]


@pytest.fixture
def crowd(redis_url: str, conn, tmp_path: Path) -> Iterator[dict]:
    plugins = tmp_path / "plugins"
    for name, weight in PLUGINS.items():
        (plugins / name).mkdir(parents=True)
        (plugins / name / "plugin.yaml").write_text(MANIFEST.format(name=name, weight=weight))
        (plugins / name / "main.py").write_text(MAIN)
    (tmp_path / "run").mkdir()
    mine = private_settings(redis_url, plugins, tmp_path / "run", throttle_backoff_max=2)
    registry = Registry(wired(conn, mine))
    registry.reload()
    worker = WorkerProcess(mine, f"crowd{uuid.uuid4().hex[:6]}", concurrency=SLOTS)
    dispatcher = Dispatcher(wired(conn, mine), make_celery(mine.broker))
    try:
        worker.wait_ready(conn)
        yield {"settings": mine, "registry": registry, "dispatcher": dispatcher,
               "plugins": plugins,
               "api": create_app(wired(conn, mine), registry, dispatcher).test_client()}
    finally:
        worker.stop()
        shutil.rmtree(mine.cache_dir, ignore_errors=True)


def send(crowd: dict, name: str, seconds: float) -> str:
    event = Event(new_id(name), "crowd.v1", name, {"seconds": seconds})
    return crowd["dispatcher"].dispatch(event, crowd["registry"].get(name), "api")[0]


def finished(conn, crowd: dict, ids: list[str]) -> list[dict] | None:
    found = [record_of(conn, crowd["settings"], i) for i in ids]
    return found if all(r.get("status") == "succeeded" for r in found) else None


@pytest.mark.integration
def test_a_quiet_plugins_run_waits_for_a_slot_not_for_every_backlog(crowd: dict,
                                                                    conn) -> None:
    runs = {name: [send(crowd, name, 1) for _ in range(5)] for name in CROWD}
    wait_until(lambda: sum(record_of(conn, crowd["settings"], i).get("status") == "running"
                           for ids in runs.values() for i in ids) == SLOTS, 60,
               "the crowd to fill both slots")
    # visible while they wait: depth and the oldest run's wait, in the API and metrics
    shown = crowd["api"].get("/plugins/busy5").json["queue"]
    assert shown["depth"] >= 4 and shown["oldest_wait_s"] > 0, shown
    listed = {p["name"]: p["queue"] for p in crowd["api"].get("/plugins").json["plugins"]}
    assert listed["busy5"]["depth"] >= 4 and listed["newcomer"] == {"depth": 0,
                                                                    "oldest_wait_s": None}
    newcomer = send(crowd, "newcomer", 0)
    every = [i for ids in runs.values() for i in ids]
    done = wait_until(lambda: finished(conn, crowd, [*every, newcomer]), 240, "every run")
    by_id = dict(zip([*every, newcomer], done, strict=True))
    thirds = {name: sorted(by_id[i]["started_at"] for i in ids)[2]
              for name, ids in runs.items()}
    assert by_id[newcomer]["started_at"] < min(thirds.values()), (by_id[newcomer], thirds)


@pytest.mark.integration
def test_a_weight_of_two_gets_twice_the_turns(crowd: dict, conn) -> None:
    runs = [(name, send(crowd, name, 0.3)) for name in ("heavy", "light") for _ in range(20)]
    done = wait_until(lambda: finished(conn, crowd, [i for _, i in runs]), 240, "every run")
    order = [name for _, name in sorted((r["started_at"], name)
                                        for (name, _), r in zip(runs, done, strict=True))]
    heavy = order[:30].count("heavy")
    assert 17 <= heavy <= 23, order  # about 20 of the first 30 (2:1)


@pytest.mark.integration
def test_runs_waiting_for_a_removed_plugin_run_on_their_version(crowd: dict, conn) -> None:
    blockers = [send(crowd, name, 3) for name in ("busy1", "busy2")]
    wait_until(lambda: all(record_of(conn, crowd["settings"], i).get("status") == "running"
                           for i in blockers), 60, "both slots to be taken")
    doomed = [send(crowd, "doomed", 0) for _ in range(3)]
    shutil.rmtree(crowd["plugins"] / "doomed")
    assert crowd["registry"].reload()["removed"] == ["doomed"]
    done = wait_until(lambda: finished(conn, crowd, doomed), 120, "the doomed runs")
    assert {(r["version"], r["status"]) for r in done} == {("1.0.0", "succeeded")}
    assert all(r["started_at"] > time.time() - 120 for r in done)


def test_a_plugins_line_is_kept_through_every_status_change(conn, settings) -> None:
    mine = settings.with_(key_prefix=f"{settings.key_prefix}line{uuid.uuid4().hex[:6]}")
    store = wired(conn, mine).records
    made = [store.create(InvocationRecord(uuid.uuid4().hex, "p", "1.0.0", "sha256:x",
                                          new_id(), "t", "e", "api", Status.PENDING,
                                          time.time() - age), 60)
            for age in (30, 20, 10)]
    assert [m.ahead for m in made] == [0, 1, 2]  # each run's place in its plugin's line
    line = lines(conn, mine.keys, ["p", "q"], time.time())
    assert line["p"].depth == 3 and 29 < line["p"].oldest_wait_s < 40, line
    assert line["q"] == Line(0, None)
    first, second, _ = (m.invocation_id for m in made)
    store.transition(first, Status.QUEUED)
    store.transition(second, Status.THROTTLED)  # still in line: sent, not yet running
    assert lines(conn, mine.keys, ["p"], time.time())["p"].depth == 3
    store.transition(first, Status.RUNNING)
    store.transition(second, Status.RUNNING)
    assert store.store(second, Outcome(Status.FAILED, "x")).applied
    line = lines(conn, mine.keys, ["p"], time.time())["p"]
    assert line.depth == 1 and line.oldest_wait_s < 15, line
    collected = {(m.name, s.labels.get("plugin"), s.value) for m in
                 StateCollector(dict, dict, lambda: {"p": line}).collect() for s in m.samples}
    assert ("titan_plugin_queue_depth", "p", 1.0) in collected, collected
