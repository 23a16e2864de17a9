"""What an operator's /metrics says of runs: their wall time and their event-to-result
latency, told apart by warm/cold and by isolation. A real worker process writes them to
its multiprocess directory (as `make up`'s workers do); they are read from there."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from harness import WorkerProcess, isolated, new_id, record_of, wait_until, wired
from manager.bus.dispatch import Dispatcher
from manager.core.contract import make_celery
from manager.core.events import Event

pytestmark = pytest.mark.integration


def sample(directory: Path, name: str, **labels: str) -> float:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    return registry.get_sample_value(name, labels) or 0.0


def test_run_metrics_tell_warm_from_cold_and_name_the_isolation(
        settings, conn, tmp_path: Path) -> None:
    own = f"{settings.instance}-m{uuid.uuid4().hex[:6]}"  # its prewarmed containers' label
    mine, registry = isolated(settings, conn, instance=own)
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    worker = WorkerProcess(mine, "metered", concurrency=1,
                           PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    dispatcher = Dispatcher(wired(conn, mine), make_celery(mine.broker))

    def run() -> dict:
        inv, _ = dispatcher.dispatch(Event(new_id("metered"), "test.v1", "ping", {}),
                                     registry.get("echo"), origin="api")
        return wait_until(lambda: (r := record_of(conn, mine, inv))
                          and r["status"] == "succeeded" and r, 60, "the run")

    try:
        worker.wait_ready(conn)
        first = run()  # the worker's first run of it: cold, and prewarming starts
        # ready, as the worker logs it: listed by the engine is not ready yet, and a run
        # waits only half a second for a prewarm under way (a loaded CI machine's went cold)
        wait_until(lambda: "prewarmed echo " in worker.log.read_text(), 30, "a prewarmed one")
        second = run()
    finally:
        worker.stop()
    assert (first["warm"], second["warm"]) == (False, True)
    for warm in ("false", "true"):
        labels = {"plugin": "echo", "warm": warm, "isolation": "container"}
        assert sample(metrics_dir, "titan_invocation_duration_seconds_count", **labels) == 1
        assert sample(metrics_dir, "titan_event_to_result_seconds_count", **labels) == 1
        took = sample(metrics_dir, "titan_event_to_result_seconds_sum", **labels)
        ran = sample(metrics_dir, "titan_invocation_duration_seconds_sum", **labels)
        assert took >= ran > 0  # the event's whole way includes the run
