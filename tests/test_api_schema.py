"""Schemathesis over the whole API, generated from its own OpenAPI document: no 5xx, every
status and body as documented. A private app (its own keys, stream, queue, registry with
only `echo`, and a worker) so the generated calls touch nobody else's data. Bounded and
derandomized: the same cases every run."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from harness import WorkerProcess, wired
from manager.api.app import create_app
from manager.bus.dispatch import Dispatcher
from manager.core.contract import make_celery
from manager.plugins.registry import Registry

pytestmark = pytest.mark.integration
TOKEN = "schema-test-token"


@pytest.fixture(scope="module")
def private_app(conn, settings, tmp_path_factory) -> Iterator[object]:
    plugins = tmp_path_factory.mktemp("schema-plugins")
    shutil.copytree(Path(__file__).parent / "plugins" / "echo", plugins / "echo")
    uid = uuid.uuid4().hex[:6]
    mine = settings.with_(plugins_dir=plugins, key_prefix=f"{settings.key_prefix}s{uid}",
                          event_stream=f"{settings.event_stream}.s{uid}",
                          dead_stream=f"{settings.dead_stream}.s{uid}",
                          task_queue=f"{settings.task_queue}.s{uid}", api_token=TOKEN)
    registry = Registry(wired(conn, mine))
    registry.reload()
    worker = WorkerProcess(mine, "schema", concurrency=1)
    try:
        worker.wait_ready(conn)
        yield create_app(wired(conn, mine), registry,
                         Dispatcher(wired(conn, mine), make_celery(mine.broker)))
    finally:
        worker.stop()


def test_the_api_keeps_its_own_contract(private_app) -> None:
    """Every operation of /openapi.json, 25 generated cases each (schemathesis's pytest
    plugin does not load under pytest 9, so its strategies are driven here)."""
    api_schema = schemathesis.openapi.from_wsgi("/openapi.json", private_app)
    failures, operations = {}, 0
    for result in api_schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy())
        @settings(max_examples=25, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case) -> None:
            if case.query and "wait" in case.query:  # bounded time per case
                case.query["wait"] = min(float(case.query["wait"]), 5.0)
            case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"})

        try:
            check()
        except Exception as exc:
            failures[operation.label] = str(exc)[:1500]
    assert operations >= 11
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
