"""A second worker host, for real: a second Docker engine with its own socket, data root,
exec root and bridge (another host in everything but the kernel, tests/harness.py's
PrivateEngine), the runtime image loaded into it, and a worker on it with its own cache
and no filesystem shared with the manager (it fetches bundles from Redis). Both hosts'
workers reach Redis as another host would: over TLS only, verifying its certificate and
presenting their own (`rediss://`, the CA's client certificate). A burst spreads
over both hosts; that worker is SIGKILLed mid-burst; every event ends succeeded exactly
once; its leftover containers on the second engine are reaped by the next worker started
there."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path

import pytest

from harness import PrivateEngine, WorkerProcess, isolated, new_id, record_of, wait_until, wired
from manager.bus.dispatch import Dispatcher
from manager.bus.sweeper import Sweeper
from manager.core.contract import make_celery
from manager.core.events import Event
from redis_nodes import tls_settings

pytestmark = pytest.mark.integration
ACTIVE = ("pending", "queued", "throttled", "running", "retrying")


def containers_on(engine: PrivateEngine, instance: str) -> list[str]:
    listed = subprocess.run(["docker", "-H", engine.url, "ps", "-aq", "--filter",
                             f"label=titan.instance={instance}"], capture_output=True,
                            text=True, check=True)
    return listed.stdout.split()


def test_a_burst_spreads_over_two_hosts_and_survives_one_of_them(settings, conn,
                                                                    redis_server) -> None:
    uid = uuid.uuid4().hex[:8]
    # keys of its own: its sweeper must not send other tests' runs to these workers
    mine, registry = isolated(settings, conn, redis_url=redis_server.tls_url, **tls_settings(),
                              instance=f"{settings.instance}-hosts{uid}", visibility_timeout=10,
                              restore_interval=2, prewarm_size=0,
                              cache_dir=Path(tempfile.mkdtemp(prefix="cache-a-")))
    engine = PrivateEngine(settings.runtime_image)
    elsewhere = Path(tempfile.mkdtemp(prefix="titan-host-b-"))
    host_b = mine.with_(worker_name=f"host-b-{uid}", cache_dir=elsewhere / "cache")
    here = WorkerProcess(mine.with_(worker_name=f"host-a-{uid}"), f"hosta{uid}",
                         concurrency=2)
    there = WorkerProcess(host_b, f"hostb{uid}", concurrency=2, cwd=elsewhere,
                          DOCKER_HOST=engine.url)
    after = None
    dispatcher = Dispatcher(wired(conn, mine), make_celery(mine.broker))
    # the manager's sweeper, once a second: a run the killed worker had taken to send
    # again later (a throttle's backoff, workers.resend) has no message left but the one
    # the sweeper sends (manager.bus.sweeper)
    sweeper, stop = Sweeper(wired(conn, mine), dispatcher), threading.Event()

    def sweep() -> None:
        while not stop.wait(1):
            sweeper.sweep()

    threading.Thread(target=sweep, daemon=True).start()
    try:
        here.wait_ready(conn)
        there.wait_ready(conn)
        tls_port = redis_server.tls_url.rsplit(":", 1)[1].split("/")[0]
        assert any(c["laddr"].endswith(f":{tls_port}") for c in conn.client_list()), \
            "the workers are not on the TLS port"
        events = [Event(new_id("hosts"), "test.v1", "sleep", {"seconds": 3})
                  for _ in range(24)]
        invs = [dispatcher.dispatch(e, registry.get("sleeper"), "api")[0] for e in events]
        wait_until(lambda: containers_on(engine, mine.instance), 120,
                   "a run's container on the second host")
        os.killpg(there.proc.pid, signal.SIGKILL)  # the second host's worker dies mid-burst
        there.proc.wait(10)
        assert containers_on(engine, mine.instance), "its run left no container behind"
        records = [wait_until(lambda i=i: (r := record_of(conn, mine, i))
                              and r["status"] not in ACTIVE and r, 300, "every run to end")
                   for i in invs]
        after = WorkerProcess(host_b, f"hostb2{uid}", concurrency=1, cwd=elsewhere,
                              DOCKER_HOST=engine.url)
        after.wait_ready(conn)
        wait_until(lambda: not containers_on(engine, mine.instance), 60,
                   "the next worker on the second host to reap what the dead one left")
    finally:
        stop.set()
        for worker in (here, there, after):
            if worker is not None:
                worker.stop()
        engine.destroy()
        shutil.rmtree(elsewhere, ignore_errors=True)
        shutil.rmtree(mine.cache_dir, ignore_errors=True)
    assert [r["status"] for r in records] == ["succeeded"] * len(invs), [
        (r["status"], r["reason"]) for r in records]
    # the burst spread (a run was seen on the second host before the kill), the first host
    # ran its share, and took over what the killed worker held
    assert any(r["worker"].startswith(f"hosta{uid}") for r in records)
    taken_over = [r for r in records if r["attempts"] > 1]
    assert taken_over and all(r["worker"].startswith(f"hosta{uid}") for r in taken_over)
    for event in events:
        caused = [e for _, f in conn.xrange(mine.event_stream)
                  if (e := json.loads(f[b"event"])).get("causation_id") == event.event_id]
        assert len(caused) == 1 and caused[0]["event_type"] == "slept", caused
