"""A worker killed with SIGKILL while its container runs: the next worker started on that
host kills and removes the orphan."""

from __future__ import annotations

import os
import signal

import pytest

from harness import WorkerProcess, new_id, wait_until, wired
from manager.bus.dispatch import Dispatcher
from manager.core.contract import make_celery
from manager.core.events import Event

pytestmark = pytest.mark.integration


def test_restarted_worker_reaps_the_orphan_container(settings, conn, registry,
                                                     docker_client) -> None:
    own = settings.with_(task_queue=f"{settings.task_queue}.orphans")
    labels = {"label": [f"titan.instance={own.instance}", "titan.plugin=slow",
                        "titan.invocation"]}  # the run's container, not a prewarmed one
    worker = WorkerProcess(own, "orphans", concurrency=1)
    try:
        worker.wait_ready(conn)
        dispatcher = Dispatcher(wired(conn, own), make_celery(own.broker))
        dispatcher.dispatch(Event(new_id(), "test.v1", "slow"), registry.get("slow"), "api")
        (container,) = wait_until(lambda: docker_client.containers.list(filters=labels), 60,
                                  "the plugin's container")
        os.killpg(worker.proc.pid, signal.SIGKILL)
        worker.proc.wait(10)
        container.reload()
        assert container.status == "running"  # orphaned: nobody will stop it now
    finally:
        worker.stop()
    again = WorkerProcess(own, "orphans2", concurrency=1)
    try:
        again.wait_ready(conn)
        wait_until(lambda: not docker_client.containers.list(all=True, sparse=True,
                                                             filters=labels), 30,
                   "the orphan to be reaped")
    finally:
        again.stop()


def test_a_killed_workers_prewarmed_containers_are_reaped(settings, conn, registry,
                                                          docker_client) -> None:
    own = settings.with_(task_queue=f"{settings.task_queue}.pool-orphans",
                         instance=f"{settings.instance}-pool")  # apart from the session's
    pooled = {"label": [f"titan.instance={own.instance}", "titan.pool=1", "titan.plugin=echo"]}
    worker = WorkerProcess(own, "pooled", concurrency=1)
    try:
        worker.wait_ready(conn)
        Dispatcher(wired(conn, own), make_celery(own.broker)).dispatch(
            Event(new_id(), "test.v1", "ping"), registry.get("echo"), "api")
        wait_until(lambda: docker_client.containers.list(sparse=True, filters=pooled), 60,
                   "a prewarmed container waiting for the next run")
        os.killpg(worker.proc.pid, signal.SIGKILL)
        worker.proc.wait(10)
        assert docker_client.containers.list(sparse=True, filters=pooled)  # orphaned
    finally:
        worker.stop()
    again = WorkerProcess(own, "pooled2", concurrency=1)
    try:
        again.wait_ready(conn)
        wait_until(lambda: not docker_client.containers.list(all=True, sparse=True,
                                                             filters=pooled), 30,
                   "the prewarmed orphan to be reaped")
    finally:
        again.stop()
